"""Sending a job's rows again from its recorded input: the rows lost in transit (a stalled job, see
`workers.stall`) and the failed rows a retry takes back (`producer.retry`).

Both read what `enqueue_file` recorded about the job (`JobRecord.source`), or, for rows an
application gave in memory (`producer.enqueue_rows`), the rows kept with the job; a job the collector
adopted (tasks sent by another application) has no recorded input, and its rows cannot be re-sent
from here: the application that sent them must send them again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import suppress
from itertools import islice
from typing import TypeVar

import redis
from celery import Celery

from producer.enqueue import build_message, rejected_record, send_message
from producer.errors import ImageQAError, InputError
from producer.inputs import RawRow, RedisItemIds, read_rows
from producer.jobs import JobRecord, JobSource
from producer.results import publish

log = logging.getLogger(__name__)

BATCH_ROWS = 500
"""Rows read, checked against the job's sets and sent per Redis round trip."""

T = TypeVar("T")


def job_source(job: JobRecord) -> JobSource:
    """The job's recorded input; raises `ImageQAError` for a job the collector adopted."""
    source = job.source()
    if source is None:
        raise ImageQAError(
            f"job {job.job_id} was not enqueued by imageqa (another application sent its tasks): "
            "its input and parameters are unknown, so its rows can only be sent again by that application"
        )
    return source


def send_rows(
    app: Celery, r: redis.Redis, job: JobRecord, source: JobSource, rows: Iterable[tuple[RawRow, str]]
) -> int:
    """Sends one ``imageqa.generate`` task per (row, item id), as `enqueue_file` does, in batches of
    `BATCH_ROWS`; a row that cannot become a task goes to the collector as an error row. Counts the
    tasks in the job's ``enqueued``; returns the rows sent (tasks and error rows)."""
    sent = all_tasks = 0
    with app.producer_or_acquire() as producer:
        for batch in _batches(rows, BATCH_ROWS):
            pipe = r.pipeline()
            tasks = 0
            with producer.batch(max_size=len(batch) + 1):
                for raw, item_id in batch:
                    try:
                        message = build_message(
                            raw, item_id, job.job_id, source.params, source.image_key, source.media_base
                        )
                    except InputError as e:
                        publish(pipe, rejected_record(raw, item_id, job.job_id, e))
                        continue
                    send_message(app, producer, message, declare=not all_tasks + tasks)
                    tasks += 1
            job.count_enqueued(pipe, tasks)
            all_tasks += tasks
            pipe.execute()
            sent += len(batch)
    return sent


def resend_missing(app: Celery, r: redis.Redis, job_id: str, stop: threading.Event | None = None) -> int:
    """Sends again the rows of the job that are neither written nor in flight; returns how many.

    Call it only while `JobRecord.lost_in_transit` holds: that is how "not in flight" is known, since
    Redis cannot tell cheaply which job a queued or unacknowledged message belongs to. Reads the
    job's input again (the caller must see the same path), computes the item ids as `enqueue_file`
    did and sends the rows of the job's item set missing from its done set. Counts them in the job's
    ``resent``. Stops between batches once ``stop`` is set (the rest stays missing and is found again).
    """
    job = JobRecord(r, job_id)
    source = job_source(job)
    if source.input_path is None:
        return _resend_kept(app, r, job, source, stop)
    input_path = source.input_path
    ids = RedisItemIds(source.params.fingerprint(), r, job.pass_scratch_key())

    def missing() -> Iterator[tuple[RawRow, str]]:
        rows = read_rows(input_path, source.input_format, split=source.split, image_key=source.image_key)
        for batch in _batches(rows, BATCH_ROWS):
            if stop is not None and stop.is_set():
                return
            item_ids = ids.next_ids([raw.identity for raw in batch])
            pipe = r.pipeline(transaction=False)
            job.item_flags(pipe, item_ids)
            job.done_flags(pipe, item_ids)
            belongs, done = pipe.execute()
            for raw, item_id, mine, written in zip(batch, item_ids, belongs, done, strict=True):
                # An item outside the item set is a row added to the input since: not this job's.
                if mine and not written:
                    yield raw, item_id

    try:
        sent = send_rows(app, r, job, source, missing())
    finally:
        with suppress(redis.RedisError):
            ids.close()
    if sent:
        job.count_resent(sent)
    return sent


def _resend_kept(
    app: Celery, r: redis.Redis, job: JobRecord, source: JobSource, stop: threading.Event | None
) -> int:
    """`resend_missing` for a job enqueued from rows in memory: from the rows kept with it."""
    if not source.kept_rows:
        raise ImageQAError(
            f"job {job.job_id} was enqueued from rows in memory that were not kept (keep_rows=False): "
            "its missing rows can only be sent again by its application (enqueue_rows with the same "
            "rows and job id sends exactly the rows not yet written)"
        )

    def missing() -> Iterator[tuple[RawRow, str]]:
        for batch in job.kept_rows(BATCH_ROWS):
            if stop is not None and stop.is_set():
                return
            pipe = r.pipeline(transaction=False)
            job.done_flags(pipe, [item_id for item_id, _, _ in batch])
            (done,) = pipe.execute()
            for (item_id, index, row), written in zip(batch, done, strict=True):
                if not written:
                    yield RawRow(index, row), item_id

    sent = send_rows(app, r, job, source, missing())
    if sent:
        job.count_resent(sent)
    return sent


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch
