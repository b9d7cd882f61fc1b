"""Nothing received is dropped: what the collector cannot decode and what a worker cannot use goes to
the quarantine stream (counted in ``imageqa status``, listed by ``imageqa quarantine``), and a bad
message that names its job and item becomes that item's error row."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from celery import Celery

from producer.broker import redis_client
from producer.constants import (
    COLLECTOR_GROUP,
    QUARANTINE_STREAM,
    QUEUE_GENERATE,
    RESULTS_STREAM,
    job_events_channel,
)
from producer.contract import GenerationParams, QAPair, ResultRecord
from producer.enqueue import enqueue_file
from producer.jobs import JobRecord, job_status
from producer.quarantine import RAW_MAX_BYTES, list_quarantined, quarantined_total
from producer.results import publish
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import ROOT, CollectorThread, make_images, read_jsonl, wait_done, write_jsonl
from workers.collector import Collector
from workers.settings import DEFAULT_MAX_MESSAGE_BYTES, CollectorSettings

GARBAGE = b'{"schema_version": 2, "job_id": "qjob", "item_id": "from-the-future", "hologram": true}'


def _cli(redis_url: str, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "IMAGEQA_REDIS_URL": redis_url},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _client(redis_url: str) -> Celery:
    client = Celery("other-app", broker=redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    return client


def _wait_for(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_undecodable_result_is_quarantined_and_the_job_completes(
    fake_cluster: Cluster, media: Path, tmp_path: Path
):
    images = make_images(media, 4)
    write_jsonl(tmp_path / "in.jsonl", [{"image": [str(p)]} for p in images])
    r = redis_client(fake_cluster.redis_url)
    # A newer worker's record, and an entry without a record at all, in front of the job's results.
    r.xadd(RESULTS_STREAM, {b"r": GARBAGE})
    r.xadd(RESULTS_STREAM, {b"other": b"x"})
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path):
        summary = enqueue_file(
            tmp_path / "in.jsonl",
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=fake_cluster.redis_url),
            params=GenerationParams(),
            job_id="qjob",
        )
        st = wait_done(fake_cluster.redis_url, summary.job_id, timeout_s=60)
    assert (st.state, st.written, st.failed, st.quarantined) == ("done", 4, 0, 1)
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 4

    entries = list_quarantined(r)
    assert [(e.source, e.code, e.job_id) for e in entries] == [
        ("result", "message_invalid", None),
        ("result", "message_invalid", "qjob"),
    ]
    assert entries[1].raw == GARBAGE and "hologram" in entries[1].reason
    assert "no 'r' field" in entries[0].reason and b"other" in entries[0].raw
    assert quarantined_total(r) == 2
    # Acknowledged once quarantined: nothing is left pending.
    assert r.xpending(RESULTS_STREAM, COLLECTOR_GROUP)["pending"] == 0

    status = json.loads(_cli(fake_cluster.redis_url, "status", "qjob", "--json"))
    assert (status["quarantined"], status["quarantined_all_jobs"]) == (1, 2)
    listed = [json.loads(line) for line in _cli(fake_cluster.redis_url, "quarantine", "--json").splitlines()]
    assert [e["ref"] for e in listed] == [e.ref for e in entries]
    assert listed[1]["raw"] == GARBAGE.decode()
    assert "hologram" in _cli(fake_cluster.redis_url, "quarantine", "--limit", "1", "--job", "qjob")


def test_an_undecodable_entry_is_acknowledged_only_with_its_quarantine(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    r = redis_client(redis_url)
    r.xadd(RESULTS_STREAM, {b"r": GARBAGE})
    collector = Collector(CollectorSettings(redis_url=redis_url, metrics_port=0, output_dir=tmp_path))
    collector.ensure_group()

    # The collector dies as it commits: neither the quarantine entry nor the ack is in Redis.
    def crash(self: object, *args: object) -> None:
        raise redis.ConnectionError("killed")

    monkeypatch.setattr(Collector, "_commit", crash)
    with pytest.raises(redis.ConnectionError):
        collector.step()
    assert r.xpending(RESULTS_STREAM, COLLECTOR_GROUP)["pending"] == 1
    assert r.xlen(QUARANTINE_STREAM) == 0
    monkeypatch.undo()

    # Restarted, it handles its pending entry again: quarantined once, then acknowledged.
    collector.start()
    assert r.xpending(RESULTS_STREAM, COLLECTOR_GROUP)["pending"] == 0
    assert [e.job_id for e in list_quarantined(r)] == ["qjob"]
    assert quarantined_total(r) == 1


def test_a_quarantined_entry_keeps_a_bounded_part_of_a_huge_record(redis_url: str, tmp_path: Path):
    r = redis_client(redis_url)
    huge = orjson.dumps({"job_id": "big", "row": "x" * (RAW_MAX_BYTES * 3)})
    r.xadd(RESULTS_STREAM, {b"r": huge})
    collector = Collector(CollectorSettings(redis_url=redis_url, metrics_port=0, output_dir=tmp_path))
    collector.ensure_group()
    collector.step()
    (entry,) = list_quarantined(r)
    assert (len(entry.raw), entry.raw_bytes, entry.truncated) == (RAW_MAX_BYTES, len(huge), True)
    assert entry.job_id == "big" and job_status(r, "big") is not None


def _error_rows(tmp_path: Path, job_id: str, count: int) -> list[dict[str, Any]]:
    path = tmp_path / f"{job_id}.errors.jsonl"
    _wait_for(lambda: len(read_jsonl(path)) >= count)
    return read_jsonl(path)


def _kwargs(image: Path, item_id: str, job_id: str = "args-job") -> dict[str, Any]:
    return {"job_id": job_id, "item_id": item_id, "row_index": 3, "images": [str(image)], "row": {"n": 3}}


def test_positional_arguments_become_an_error_row(fake_cluster: Cluster, media: Path, tmp_path: Path):
    (image,) = make_images(media, 1)
    client = _client(fake_cluster.redis_url)
    client.send_task("imageqa.generate", args=[_kwargs(image, "as-args")], queue=QUEUE_GENERATE)
    client.send_task("imageqa.generate", args=[1, 2], kwargs=_kwargs(image, "both"), queue=QUEUE_GENERATE)
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path):
        errors = _error_rows(tmp_path, "args-job", 2)
    assert sorted((e["item_id"], e["row_index"], e["row"], e["error"]["code"]) for e in errors) == [
        ("as-args", 3, {"n": 3}, "message_invalid"),
        ("both", 3, {"n": 3}, "message_invalid"),
    ]
    assert all("keyword arguments only" in e["error"]["message"] for e in errors)
    assert not (tmp_path / "args-job.jsonl").exists()


def test_a_message_without_ids_is_quarantined(fake_cluster: Cluster, media: Path, tmp_path: Path):
    (image,) = make_images(media, 1)
    client = _client(fake_cluster.redis_url)
    r = redis_client(fake_cluster.redis_url)
    client.send_task("imageqa.generate", kwargs={"images": [str(image)]}, queue=QUEUE_GENERATE)
    client.send_task(
        "imageqa.generate", args=["lonely-job", "no-item"], task_id="t-args", queue=QUEUE_GENERATE
    )
    client.send_task("imageqa.generate", kwargs={"job_id": "half-job", "row_index": 0}, queue=QUEUE_GENERATE)
    _wait_for(lambda: r.xlen(QUARANTINE_STREAM) >= 3)
    entries = {e.ref: e for e in list_quarantined(r)}
    assert {(e.source, e.code) for e in entries.values()} == {("task", "message_invalid")}
    assert "positional" in entries["t-args"].reason
    assert orjson.loads(entries["t-args"].raw) == {"args": ["lonely-job", "no-item"], "kwargs": {}}
    assert sorted(e.job_id or "" for e in entries.values()) == ["", "", "half-job"]
    assert job_status(r, "half-job").quarantined == 1  # type: ignore[union-attr]
    assert all(e.origin.endswith(f":{fake_cluster.worker.proc.pid}") for e in entries.values())  # type: ignore[union-attr]
    _wait_for(lambda: "without job_id/item_id" in fake_cluster.worker.log())


def test_an_oversize_message_is_an_error_row_naming_the_limit(
    fake_cluster: Cluster, media: Path, tmp_path: Path
):
    (image,) = make_images(media, 1)
    client = _client(fake_cluster.redis_url)
    big = {**_kwargs(image, "big", "size-job"), "row": {"blob": "x" * DEFAULT_MAX_MESSAGE_BYTES}}
    client.send_task("imageqa.generate", kwargs=big, queue=QUEUE_GENERATE)
    client.send_task("imageqa.generate", kwargs=_kwargs(image, "small", "size-job"), queue=QUEUE_GENERATE)
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path):
        (error,) = _error_rows(tmp_path, "size-job", 1)
        _wait_for(lambda: len(read_jsonl(tmp_path / "size-job.jsonl")) == 1)
    assert (error["item_id"], error["error"]["code"], error["row"]) == ("big", "message_too_large", None)
    assert f"over the limit of {DEFAULT_MAX_MESSAGE_BYTES} bytes" in error["error"]["message"]
    assert "IMAGEQA_MAX_MESSAGE_BYTES" in error["error"]["message"]


def test_a_declared_total_finishes_an_adopted_job(redis_url: str, tmp_path: Path):
    r = redis_client(redis_url)
    events = r.pubsub()
    events.subscribe(job_events_channel("adopted"))
    pipe = r.pipeline(transaction=False)
    for i in range(3):
        record = ResultRecord(
            job_id="adopted",
            item_id=f"item-{i}",
            row_index=i,
            row={"n": i},
            qa_pairs=[QAPair(question="What?", answer="This.")],
            job_total=3,
        )
        publish(pipe, record)
        if i == 1:
            publish(pipe, record)  # a duplicate is one row, not two
    collector = Collector(CollectorSettings(redis_url=redis_url, metrics_port=0, output_dir=tmp_path))
    collector.ensure_group()
    pipe.execute()
    collector.step()
    st = job_status(r, "adopted")
    assert st is not None and (st.state, st.total, st.written, st.finished) == ("done", 3, 3, True)
    assert len(read_jsonl(tmp_path / "adopted.jsonl")) == 3
    messages = [m for m in iter(lambda: events.get_message(timeout=1.0), None) if m["type"] == "message"]
    assert [orjson.loads(m["data"])["state"] for m in messages] == ["done"]


def test_a_declared_total_waits_for_every_row(redis_url: str, tmp_path: Path):
    r = redis_client(redis_url)
    publish(
        r,
        ResultRecord(job_id="partial", item_id="a", row_index=0, row={}, qa_pairs=[], job_total=2),
    )
    collector = Collector(CollectorSettings(redis_url=redis_url, metrics_port=0, output_dir=tmp_path))
    collector.ensure_group()
    collector.step()
    st = job_status(r, "partial")
    assert st is not None and (st.state, st.done, st.total, st.finished) == ("running", 1, 2, False)
    assert not JobRecord(r, "partial").finish_if_complete()
