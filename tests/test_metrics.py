"""Prometheus metrics from a real worker and a real collector process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from producer.broker import celery_app, queue_depth, queue_head, redis_client
from producer.constants import QUEUE_GENERATE, TASK_GENERATE
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.helpers import ROOT, WorkerProcess, make_images, wait_done, write_jsonl
from workers import metrics


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
    rows = [{"image": p.name} for p in images[:4]] + [{"image": [images[4].name, images[0].name]}]
    source = write_jsonl(media / "in.jsonl", [*rows, {"image": "missing.jpg"}])
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
    assert w[("imageqa_rows_total", (("code", ""), ("status", "ok")))] == 5
    assert w[("imageqa_rows_total", (("code", "image_not_found"), ("status", "failed")))] == 1
    # Images, not rows: one row holds two images, the missing one loads none.
    assert w[("imageqa_images_total", ())] == 6
    # The fake engine answers three pairs per row, all kept; the failed row has none.
    assert w[("imageqa_pairs_kept_total", ())] == 15
    assert w[("imageqa_task_seconds_count", ())] == 6
    assert w[("imageqa_stage_seconds_count", (("stage", "engine"),))] == 5
    assert w[("imageqa_stage_seconds_count", (("stage", "load"),))] == 6
    assert w[("imageqa_queue_wait_seconds_count", ())] == 6
    assert w[("imageqa_requests_in_flight", ())] == 0
    assert c[("imageqa_collector_rows_total", (("file", "output"),))] == 5
    assert c[("imageqa_collector_rows_total", (("file", "errors"),))] == 1
    assert c[("imageqa_queue_depth", ())] == 0
    assert c[("imageqa_queue_oldest_age_seconds", ())] == 0


def test_the_collector_shows_the_queue_and_the_age_of_its_oldest_task(redis_url, media, tmp_path):
    # Given a collector with its metrics on, and no worker on this Redis,
    port = free_port()
    collector = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "collect"],
        env={**os.environ, "IMAGEQA_REDIS_URL": redis_url, "IMAGEQA_METRICS_PORT": str(port)},
        cwd=ROOT,
    )
    try:
        # when a job of three rows is enqueued,
        source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in make_images(media, 3)])
        enqueued_after = time.time()
        enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=redis_url),
            params=GenerationParams(),
        )
        # then its /metrics shows three tasks waiting, the oldest of them growing older.
        deadline = time.monotonic() + 60
        while True:
            try:
                c = scrape(port)
            except OSError:
                c = {}
            depth = c.get(("imageqa_queue_depth", ()))
            age_s = c.get(("imageqa_queue_oldest_age_seconds", ()))
            if depth == 3 and age_s is not None and age_s > 6:
                break
            assert time.monotonic() < deadline, f"queue depth {depth}, oldest age {age_s}"
            time.sleep(0.5)
        assert age_s <= time.time() - enqueued_after
        assert c[("imageqa_queue_unacked", ())] == 0
    finally:
        collector.terminate()
        collector.wait(30)


def test_the_age_of_a_task_without_enqueue_time_counts_from_when_it_was_first_seen(redis_url):
    # A task from a plain Celery client that does not set enqueued_at: its age counts from the
    # first look, and the next task's from when it became the oldest.
    with celery_app(redis_url, 30) as app:
        for item in ("a", "b"):
            app.send_task(TASK_GENERATE, kwargs={"job_id": "other-app", "item_id": item, "images": ["x.jpg"]})
        head = queue_head(redis_url)
        assert head is not None and head.enqueued_at is None and head.tag
        watch = metrics.QueueWatch()
        watch.observe(redis_url)
        assert metrics.QUEUE_DEPTH._value.get() == 2
        assert metrics.QUEUE_OLDEST_AGE._value.get() < 1
        time.sleep(1.2)
        watch.observe(redis_url)
        assert metrics.QUEUE_OLDEST_AGE._value.get() >= 1.2
        redis_client(redis_url).rpop(QUEUE_GENERATE)  # a worker takes the oldest
        watch.observe(redis_url)
        assert metrics.QUEUE_DEPTH._value.get() == 1
        assert metrics.QUEUE_OLDEST_AGE._value.get() < 1
        redis_client(redis_url).rpop(QUEUE_GENERATE)
        watch.observe(redis_url)
        assert metrics.QUEUE_DEPTH._value.get() == 0
        assert metrics.QUEUE_OLDEST_AGE._value.get() == 0


def test_the_oldest_task_is_read_without_taking_it(redis_url, media, tmp_path):
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in make_images(media, 2)])
    before = time.time()
    enqueue_file(
        source,
        tmp_path / "o.jsonl",
        settings=ProducerSettings(redis_url=redis_url),
        params=GenerationParams(),
    )
    head = queue_head(redis_url)
    assert head is not None and before <= head.enqueued_at <= time.time()
    assert queue_depth(redis_url).waiting == 2
