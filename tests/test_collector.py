"""The collector keeps the results stream short (what every group has acknowledged is dropped),
finishes a job whose last batch a killed collector wrote, and writes rows once when Redis lost the
record of their write; the tests' collector thread reports a crash."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.broker import redis_client
from producer.constants import COLLECTOR_GROUP, RESULTS_STREAM
from producer.contract import GenerationParams, QAPair, ResultRecord
from producer.jobs import JobRecord, job_status
from producer.results import publish
from tests.helpers import CollectorThread, read_jsonl
from workers.collector import Collector
from workers.settings import CollectorSettings


def _publish(url: str, job: str, first: int, count: int) -> None:
    pipe = redis_client(url).pipeline(transaction=False)
    for i in range(first, first + count):
        record = ResultRecord(
            job_id=job,
            item_id=f"item-{i}",
            row_index=i,
            row={"image": ["x.jpg"], "n": i},
            qa_pairs=[QAPair(question="What is it?", answer=f"Thing {i}.")],
            worker="test",
        )
        publish(pipe, record)
    pipe.execute()


def _register(url: str, tmp_path: Path) -> Path:
    out = tmp_path / "out.jsonl"
    JobRecord(redis_client(url), "job").register(
        output_path=str(out),
        errors_path=str(tmp_path / "out.errors.jsonl"),
        output_key="qa_pairs",
        input_path=str(tmp_path / "in.jsonl"),
        params_json=GenerationParams().model_dump_json(),
    )
    return out


def test_acknowledged_results_are_trimmed_and_unacknowledged_ones_kept(redis_url: str, tmp_path: Path):
    r = redis_client(redis_url)
    out = _register(redis_url, tmp_path)
    collector = Collector(CollectorSettings(redis_url=redis_url, batch_size=50, metrics_port=0))
    collector.ensure_group()
    _publish(redis_url, "job", 0, 120)
    while collector.step() > 0:
        pass
    assert len(read_jsonl(out)) == 120
    # Another consumer (a dead collector, say) has read 30 more entries but never acknowledged them.
    _publish(redis_url, "job", 120, 40)
    r.xreadgroup(COLLECTOR_GROUP, "dead-collector", {RESULTS_STREAM: ">"}, count=30)
    assert r.xlen(RESULTS_STREAM) == 160

    dropped = collector.trim()

    # The 120 written entries are gone; the 30 pending and 10 unread ones stay for the collectors.
    assert dropped == 120 and r.xlen(RESULTS_STREAM) == 40
    pending = r.xpending(RESULTS_STREAM, COLLECTOR_GROUP)
    assert pending["pending"] == 30
    collector.settings = CollectorSettings(redis_url=redis_url, batch_size=50, metrics_port=0, claim_idle_s=0)
    collector.maybe_claim()
    while collector.step() > 0:
        pass
    rows = read_jsonl(out)
    assert sorted(row["n"] for row in rows) == list(range(160))
    collector.trim()
    assert r.xlen(RESULTS_STREAM) == 0


def test_a_job_whose_last_batch_was_written_before_a_crash_is_finished_on_restart(
    redis_url: str, tmp_path: Path, monkeypatch
):
    # Given a job fully enqueued whose every row a collector wrote, the collector dying before it
    # could mark the job done
    r = redis_client(redis_url)
    out = _register(redis_url, tmp_path)
    job = JobRecord(r, "job")
    pipe = r.pipeline()
    job.add_items(pipe, [f"item-{i}" for i in range(10)])
    pipe.execute()
    job.close_enqueue(skipped=0)
    _publish(redis_url, "job", 0, 10)
    dying = Collector(CollectorSettings(redis_url=redis_url, metrics_port=0))
    monkeypatch.setattr(JobRecord, "finish_if_complete", lambda *args, **kwargs: False)
    dying.start()
    dying.step()
    monkeypatch.undo()
    status = job_status(r, "job")
    assert status is not None and status.written == 10 and not status.finished

    # When a collector starts again, with nothing left to write
    Collector(CollectorSettings(redis_url=redis_url, metrics_port=0)).start()

    # Then the job is done, and announced as such
    status = job_status(r, "job")
    assert status is not None and status.finished and status.state == "done"
    assert len(read_jsonl(out)) == 10


def test_a_collector_thread_that_dies_fails_the_test(redis_url: str, monkeypatch):
    # The cluster tests run their collector in `CollectorThread`: its crash must not pass unnoticed.
    def crash(self: Collector, **kwargs: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Collector, "step", crash)
    died = r"the collector thread died: RuntimeError\('disk on fire'\)"

    running = CollectorThread(redis_url)
    running.thread.start()
    running.thread.join(10)
    with pytest.raises(AssertionError, match=died):
        running.check()

    with pytest.raises(AssertionError, match=f"{died}$"), CollectorThread(redis_url) as thread:
        thread.thread.join(10)


def test_rows_whose_record_redis_lost_are_written_again_not_twice(redis_url: str, tmp_path: Path):
    # Given a collector that wrote two batches, and a Redis that lost the record of the second (what
    # a machine crash does to the last second of writes under appendfsync everysec)
    r = redis_client(redis_url)
    out = _register(redis_url, tmp_path)
    _publish(redis_url, "job", 0, 10)
    collector = Collector(CollectorSettings(redis_url=redis_url, batch_size=5, metrics_port=0))
    collector.start()
    assert collector.step() == 5
    saved = {key: r.dump(key) for key in r.scan_iter()}
    assert collector.step() == 5
    assert len(read_jsonl(out)) == 10
    r.flushdb()
    for key, value in saved.items():
        r.restore(key, 0, value)

    # When the collector goes on, the second batch's results delivered to it again
    assert collector.step() == 5

    # Then the file holds each row once, and Redis counts each once
    assert sorted(row["n"] for row in read_jsonl(out)) == list(range(10))
    status = job_status(r, "job")
    assert status is not None and status.written == 10
