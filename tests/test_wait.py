"""`producer.wait.wait_for_job` against a real Redis: progress, resending rows lost in transit, and
giving up on a job that does not finish."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from producer.broker import redis_client
from producer.constants import QUEUE_GENERATE
from producer.contract import GenerationParams, QAPair, ResultRecord
from producer.errors import ImageQAError
from producer.jobs import JobRecord, JobStatus
from producer.wait import wait_for_job

ITEMS = [f"item-{i}" for i in range(3)]


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis_client(redis_url)


def enqueued_job(r: redis.Redis, tmp_path: Path) -> JobRecord:
    """A job whose three rows were all enqueued and none is written yet."""
    job = JobRecord(r, "job")
    job.register(
        output_path=str(tmp_path / "out.jsonl"),
        errors_path=str(tmp_path / "out.errors.jsonl"),
        output_key="qa_pairs",
        input_path=str(tmp_path / "in.jsonl"),
        params_json=GenerationParams().model_dump_json(),
    )
    pipe = r.pipeline()
    job.add_items(pipe, ITEMS)
    job.count_enqueued(pipe, len(ITEMS))
    pipe.execute()
    job.close_enqueue(skipped=0)
    return job


def write(job: JobRecord, item_ids: list[str]) -> None:
    """Records rows as the collector does after writing them."""
    records = [
        ResultRecord(
            job_id=job.job_id,
            item_id=item_id,
            row_index=0,
            row={"image": "x.jpg"},
            qa_pairs=[QAPair(question="What is it?", answer="A thing.")],
            worker="test",
        )
        for item_id in item_ids
    ]
    pipe = job.r.pipeline()
    job.record_results(pipe, records, new_items=False)
    pipe.execute()
    job.finish_if_complete()


def test_every_status_goes_to_the_progress_callback_until_the_job_is_done(r, tmp_path):
    # Given a job whose rows are written one per poll
    job = enqueued_job(r, tmp_path)
    seen: list[JobStatus] = []

    def on_progress(status: JobStatus) -> None:
        seen.append(status)
        if status.done < len(ITEMS):
            write(job, [ITEMS[status.done]])

    # When waiting for it
    final = wait_for_job(r, job.job_id, poll_s=0.01, on_progress=on_progress, timeout_s=10)

    # Then the callback saw every step, and the wait returns the finished job
    assert [st.done for st in seen] == [0, 1, 2, 3]
    assert final.finished and final.state == "done" and final.written == 3


def test_rows_lost_in_transit_are_resent_once_the_job_stalls_with_nothing_in_flight(r, tmp_path):
    # Given a fully enqueued job that stalls: nothing queued, running or uncollected
    job = enqueued_job(r, tmp_path)
    resent: list[JobStatus] = []

    def resend(status: JobStatus) -> None:
        resent.append(status)
        write(job, ITEMS)  # what enqueueing again leads to

    # When waiting with a resend callback
    final = wait_for_job(r, job.job_id, poll_s=0.02, resend=resend, resend_after_s=0.2, timeout_s=10)

    # Then the missing rows were sent again, once, and the job finished
    assert [(st.done, st.total) for st in resent] == [(0, 3)]
    assert final.finished and final.written == 3


def test_nothing_is_resent_while_tasks_wait_in_the_queue(r, tmp_path):
    # Given a stalled job with a task still queued (a busy worker will take it)
    job = enqueued_job(r, tmp_path)
    r.rpush(QUEUE_GENERATE, b"{}")
    resent: list[JobStatus] = []

    # When the wait runs out of time
    with pytest.raises(ImageQAError, match=r"job job: 0/3 rows done after 0\.5 s; the job goes on"):
        wait_for_job(r, job.job_id, poll_s=0.02, resend=resent.append, resend_after_s=0.1, timeout_s=0.5)

    # Then no row was sent again
    assert resent == []


def test_a_job_with_no_row_finishing_gives_up_after_the_stall_timeout(r, tmp_path):
    job = enqueued_job(r, tmp_path)
    with pytest.raises(ImageQAError, match=r"no row finished for 0\.2 s; giving up on job job"):
        wait_for_job(r, job.job_id, poll_s=0.02, stall_timeout_s=0.2)


def test_waiting_ends_when_the_worker_stops_or_the_job_is_unknown(r, tmp_path):
    job = enqueued_job(r, tmp_path)
    with pytest.raises(ImageQAError, match="the worker stopped"):
        wait_for_job(r, job.job_id, poll_s=0.02, alive=lambda: False)
    with pytest.raises(ImageQAError, match="job nope is not in Redis"):
        wait_for_job(r, "nope", poll_s=0.02)
