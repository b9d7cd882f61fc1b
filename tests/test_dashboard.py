"""The Grafana dashboard (ops/grafana/dashboards/imageqa.json) reads only metrics the processes export:
every metric named by a panel's query is served by a real worker with the real vLLM engine on the tiny
model, or by a real collector."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import ROOT, free_port, make_images, wait_done, write_jsonl

DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "imageqa.json"
# PromQL words that look like metric names: grouping and binary-operator keywords.
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
}
# What a metric family of each type exposes (prometheus-client's parser drops a counter's _total).
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: every name that is not a function, an aggregation, a
    keyword, a label or a label value."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, $__rate_interval
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w:$.])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or an aggregation
        names.add(match.group())
    return names


def dashboard_metrics() -> dict[str, set[str]]:
    """Metric name -> titles of the panels that read it."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            for name in names:
                found.setdefault(name, set()).add(panel["title"])
    return found


def exported(url: str) -> tuple[set[str], dict[str, float]]:
    """The sample names a /metrics endpoint exports (of families with no sample yet too), and the
    value of every unlabelled or summed sample by name."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    names: set[str] = set()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        for sample in family.samples:
            names.add(sample.name)
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return names, totals


def test_metric_names_are_read_from_promql():
    expr = (
        "histogram_quantile(0.95, sum by (le, stage)"
        ' (rate(imageqa_stage_seconds_bucket{stage!="x"}[$__rate_interval])))'
        " / on(instance) group_left max(vllm:kv_cache_usage_perc) or sum(rate(imageqa_rows_total[5m]))"
    )
    assert metric_names(expr) == {
        "imageqa_stage_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "imageqa_rows_total",
    }


def test_the_dashboard_has_throughput_queue_latency_rejection_and_engine_panels():
    metrics = dashboard_metrics()
    for wanted in (
        "imageqa_images_total",
        "imageqa_queue_depth",
        "imageqa_queue_oldest_age_seconds",
        "imageqa_task_seconds_bucket",
        "imageqa_pairs_rejected_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert wanted in metrics, wanted


@pytest.mark.engine
def test_every_dashboard_metric_is_exported_by_the_worker_or_the_collector(
    engine_cluster: Cluster, media: Path, tmp_path: Path
):
    # Given the real engine worker and a collector, each serving /metrics,
    worker_url = f"http://127.0.0.1:{engine_cluster.worker.env['IMAGEQA_METRICS_PORT']}/metrics"
    collector_port = free_port()
    env = {
        **os.environ,
        "IMAGEQA_REDIS_URL": engine_cluster.redis_url,
        "IMAGEQA_METRICS_PORT": str(collector_port),
    }
    collector = subprocess.Popen([sys.executable, "-m", "workers.cli", "collect"], env=env, cwd=ROOT)
    try:
        _, before = exported(worker_url)
        # when a job of two good rows and a missing image runs,
        rows = [{"image": [p.name]} for p in make_images(media, 2)] + [{"image": ["missing.jpg"]}]
        source = write_jsonl(media / "in.jsonl", rows)
        job = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=engine_cluster.redis_url),
            params=GenerationParams(max_tokens=256, generation_tries=1),
        )
        status = wait_done(engine_cluster.redis_url, job.job_id, timeout_s=300)
        assert status.written + status.failed == 3
        time.sleep(0.5)
        worker_names, after = exported(worker_url)
        collector_names, _ = exported(f"http://127.0.0.1:{collector_port}/metrics")
    finally:
        collector.terminate()
        collector.wait(30)

    # then every metric a dashboard panel reads is exported by one of them,
    missing = {
        name: sorted(panels)
        for name, panels in dashboard_metrics().items()
        if name not in worker_names | collector_names
    }
    assert not missing, f"panels read metrics nobody exports: {missing}"

    # the worker's counters moved with the job: images (not rows), tokens, in imageqa's and vLLM's counts,
    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("imageqa_images_total") == 2
    assert grew("imageqa_rows_total") == 3
    assert grew("imageqa_prompt_tokens_total") > 0 and grew("imageqa_generated_tokens_total") > 0
    assert grew("vllm:prompt_tokens_total") > 0 and grew("vllm:generation_tokens_total") > 0
    assert grew("vllm:request_success_total") >= 2
    assert grew("vllm:time_to_first_token_seconds_count") >= 2
    # and vLLM's periodic stats log stays off: the metrics are scraped, not logged.
    assert "Avg prompt throughput" not in engine_cluster.worker.log()
