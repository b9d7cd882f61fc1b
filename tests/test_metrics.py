"""Prometheus metrics from a real worker and a real collector process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from producer.broker import redis_client
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.helpers import ROOT, WorkerProcess, make_images, wait_done, write_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_worker_and_collector_metrics(media, tmp_path):
    url = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/11"
    redis_client(url).flushdb()
    images = make_images(media, 5)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images] + [{"image": "missing.jpg"}])
    worker_port, collector_port = free_port(), free_port()
    env = {"IMAGEQA_REDIS_URL": url, "IMAGEQA_MEDIA_ROOTS": str(media), "IMAGEQA_ENGINE": "fake"}
    worker = WorkerProcess({**env, "IMAGEQA_METRICS_PORT": str(worker_port)}, tmp_path / "w.log").start(60)
    collector = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "collect"],
        env={**os.environ, **env, "IMAGEQA_METRICS_PORT": str(collector_port)},
        cwd=ROOT,
    )
    try:
        job = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=url),
            params=GenerationParams(max_question_chars=40, max_answer_chars=40),
        )
        wait_done(url, job.job_id, timeout_s=60)
        time.sleep(0.5)
        w = scrape(worker_port)
        c = scrape(collector_port)
    finally:
        collector.terminate()
        collector.wait(30)
        worker.stop()
    assert w[("imageqa_images_total", (("code", ""), ("status", "ok")))] == 5
    assert w[("imageqa_images_total", (("code", "image_not_found"), ("status", "failed")))] == 1
    assert w[("imageqa_stage_seconds_count", (("stage", "engine"),))] == 5
    assert w[("imageqa_stage_seconds_count", (("stage", "load"),))] == 6
    assert w[("imageqa_queue_wait_seconds_count", ())] == 6
    assert w[("imageqa_requests_in_flight", ())] == 0
    assert c[("imageqa_collector_rows_total", (("file", "output"),))] == 5
    assert c[("imageqa_collector_rows_total", (("file", "errors"),))] == 1
