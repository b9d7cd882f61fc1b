"""Job control: status with rate and failures by code, cancel, the completion event and callback task,
and backpressure on the producer."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time

import orjson

from producer.broker import redis_client
from producer.constants import QUEUE_GENERATE, job_events_channel
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.helpers import (
    CollectorThread,
    WorkerProcess,
    make_images,
    read_jsonl,
    run_cli,
    wait_done,
    write_jsonl,
)

PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)
URL = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/11"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(URL, *args)


def test_cancel_skips_the_rest_and_every_row_is_still_accounted_for(media, tmp_path):
    redis_client(URL).flushdb()
    images = make_images(media, 20)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])
    env = {
        "IMAGEQA_REDIS_URL": URL,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        # Slow enough that at least half the rows are still queued when `imageqa cancel`, which
        # takes seconds to start on a busy machine, gets there.
        "IMAGEQA_FAKE_DELAY_S": "1.5",
        "IMAGEQA_CONCURRENCY": "2",
    }
    worker = WorkerProcess(env, tmp_path / "w.log").start(60)
    output = tmp_path / "out.jsonl"
    try:
        with CollectorThread(URL):
            job_id = enqueue_file(
                source, output, settings=ProducerSettings(redis_url=URL), params=PARAMS
            ).job_id
            deadline = time.monotonic() + 60
            while len(read_jsonl(output)) < 2:
                assert time.monotonic() < deadline, "no two rows written within 60 s"
                time.sleep(0.05)
            assert cli("cancel", job_id).returncode == 0
            st = wait_done(URL, job_id, timeout_s=60)
    finally:
        worker.stop()
    written, errors = read_jsonl(output), read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted([r["n"] for r in written] + [e["row"]["n"] for e in errors]) == list(range(20))
    assert {e["error"]["code"] for e in errors} == {"cancelled"}
    assert st.state == "cancelled" and st.failed == len(errors) >= 10
    report = json.loads(cli("status", job_id, "--json").stdout)
    assert report["failures"] == {"cancelled": len(errors)}
    assert report["state"] == "cancelled" and report["rate_per_s"] > 0
    human = cli("status", job_id).stderr
    assert "cancelled" in human and "rows/s" in human
    assert cli("cancel", "no-such-job").returncode == 2


def test_a_finished_job_announces_itself_and_sends_the_callback_task(fake_cluster, media, tmp_path):
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images] + [{"image": "gone.jpg"}])
    settings = ProducerSettings(redis_url=fake_cluster.redis_url)
    r = redis_client(fake_cluster.redis_url)
    pubsub = r.pubsub()
    pubsub.psubscribe(job_events_channel("*"))
    events: list[dict] = []

    def listen() -> None:
        for message in pubsub.listen():
            if message["type"] == "pmessage":
                events.append(orjson.loads(message["data"]))
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    with CollectorThread(fake_cluster.redis_url):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=settings,
            params=PARAMS,
            on_done_task="myapp.qa_ready",
            on_done_queue="myapp",
        )
        wait_done(fake_cluster.redis_url, summary.job_id)
    listener.join(10)
    assert events == [
        {
            "job_id": summary.job_id,
            "event": "finished",
            "state": "done",
            "written": 3,
            "failed": 1,
            "output_path": str(tmp_path / "out.jsonl"),
            "errors_path": str(tmp_path / "out.errors.jsonl"),
        }
    ]
    raw = r.lpop("myapp")
    assert raw is not None, "the callback task was not sent"
    message = json.loads(raw)
    assert message["headers"]["task"] == "myapp.qa_ready"
    _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == events[0]


def test_the_producer_pauses_while_the_queue_is_full_and_still_sends_every_row(media, tmp_path):
    redis_client(URL).flushdb()
    images = make_images(media, 8)
    rows = [{"image": images[i % 8].name, "n": i} for i in range(40)]
    source = write_jsonl(media / "in.jsonl", rows)
    env = {
        "IMAGEQA_REDIS_URL": URL,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_FAKE_DELAY_S": "0.05",
        "IMAGEQA_CONCURRENCY": "2",
    }
    worker = WorkerProcess(env, tmp_path / "w.log").start(60)
    deepest = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal deepest
        r = redis_client(URL)
        while not sampling.is_set():
            deepest = max(deepest, int(r.llen(QUEUE_GENERATE)))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    output = tmp_path / "out.jsonl"
    try:
        with CollectorThread(URL):
            sampler.start()
            settings = ProducerSettings(redis_url=URL, enqueue_batch=3, max_queued=6)
            summary = enqueue_file(source, output, settings=settings, params=PARAMS)
            sampling.set()
            st = wait_done(URL, summary.job_id, timeout_s=60)
    finally:
        sampling.set()
        worker.stop()
    # The queue never held more than the limit plus one batch, and every row was still written.
    assert 0 < deepest <= 6 + 3
    assert summary.enqueued == 40 and st.written == 40
    assert sorted(row["n"] for row in read_jsonl(output)) == list(range(40))
