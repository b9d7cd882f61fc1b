"""Enqueueing an input file as a job: one ``imageqa.generate`` task per row, by task name."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from producer.broker import celery_app, check_redis, queue_depth, redis_client, task_sender
from producer.constants import QUEUE_GENERATE, TASK_GENERATE
from producer.contract import (
    MAX_ROW_BYTES,
    ErrorInfo,
    GenerationParams,
    ResultRecord,
    TaskMessage,
    canonical_json,
)
from producer.errors import ErrorCode, InputError
from producer.inputs import RawRow, RedisItemIds, read_rows, resolve_ref, row_images
from producer.jobs import JobRecord
from producer.results import publish
from producer.settings import ProducerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnqueueSummary:
    job_id: str
    rows: int
    enqueued: int
    rejected: int
    skipped: int
    output_path: str
    errors_path: str


def default_errors_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".errors.jsonl")


def default_job_id(input_path: Path, output_path: Path, params: GenerationParams) -> str:
    """Same input, same output and same settings give the same job, so a rerun resumes it."""
    key = f"{input_path.resolve()}|{output_path.resolve()}|{params.fingerprint()}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def enqueue_file(
    input_path: Path,
    output_path: Path,
    *,
    settings: ProducerSettings,
    params: GenerationParams,
    errors_path: Path | None = None,
    job_id: str | None = None,
    input_format: str | None = None,
    media_base: Path | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
    on_job: Callable[[str], None] | None = None,
) -> EnqueueSummary:
    """Enqueues every row of ``input_path`` as a job writing to ``output_path``.

    Rows already written by an earlier run of the same job are skipped. A row that cannot become a
    task (malformed, no images) is sent straight to the collector as an error row. Relative image
    paths resolve against ``media_base`` (default: the input's folder). When the job finishes, the
    Celery task ``on_done_task`` (if given) is sent to ``on_done_queue`` with the job's figures.
    ``on_job`` receives the job id once the job is registered, before any row is sent.
    """
    check_redis(settings.redis_url)
    rows = read_rows(input_path, input_format)
    output_path = output_path.resolve()
    errors_path = (errors_path or default_errors_path(output_path)).resolve()
    job_id = job_id or default_job_id(input_path, output_path, params)
    base = (media_base or (input_path if input_path.is_dir() else input_path.parent)).resolve()
    r = redis_client(settings.redis_url)
    job = JobRecord(r, job_id)
    job.register(
        output_path=str(output_path),
        errors_path=str(errors_path),
        output_key=settings.output_key,
        input_path=str(input_path.resolve()),
        params_json=params.model_dump_json(),
        on_done_task=on_done_task,
        on_done_queue=on_done_queue,
    )
    job.record_source(input_format=input_format, media_base=str(base), image_key=settings.image_key)
    if on_job:
        on_job(job_id)
    return _send_job(r, job, rows, settings, params, base, output_path, errors_path, on_progress)


def default_rows_job_id(output_path: Path, params: GenerationParams) -> str:
    """Rows given in memory: the same output and the same settings give the same job, so sending the
    same rows again resumes it (rows already written are skipped)."""
    key = f"rows|{output_path.resolve()}|{params.fingerprint()}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def enqueue_iter(
    rows: Iterable[Any],
    output_path: Path,
    *,
    settings: ProducerSettings,
    params: GenerationParams,
    errors_path: Path | None = None,
    job_id: str | None = None,
    media_base: Path | None = None,
    keep_rows: bool = True,
    on_progress: Callable[[int], None] | None = None,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
) -> EnqueueSummary:
    """Enqueues rows given in memory (dicts shaped as input-file rows) as a job, as `enqueue_file`
    does for a file; relative image paths resolve against ``media_base`` (default: the working
    folder). With ``keep_rows`` the rows sent are kept in Redis with the job (`JobRecord.keep_rows`),
    so that rows lost in transit can be sent again (`producer.resend`) with nobody holding them."""
    check_redis(settings.redis_url)
    output_path = output_path.resolve()
    errors_path = (errors_path or default_errors_path(output_path)).resolve()
    job_id = job_id or default_rows_job_id(output_path, params)
    base = (media_base or Path.cwd()).resolve()
    r = redis_client(settings.redis_url)
    job = JobRecord(r, job_id)
    job.register(
        output_path=str(output_path),
        errors_path=str(errors_path),
        output_key=settings.output_key,
        input_path="",
        params_json=params.model_dump_json(),
        on_done_task=on_done_task,
        on_done_queue=on_done_queue,
    )
    job.record_source(
        input_format=None, media_base=str(base), image_key=settings.image_key, kept_rows=keep_rows
    )
    raw_rows = (_raw_row(index, row) for index, row in enumerate(rows))
    return _send_job(
        r, job, raw_rows, settings, params, base, output_path, errors_path, on_progress, keep_rows
    )


def _raw_row(index: int, row: Any) -> RawRow:
    """A row given in memory, or its error when it is not JSON (its item id needs its JSON)."""
    try:
        canonical_json(row)
    except TypeError as e:
        return RawRow(
            index, repr(row)[:1000], InputError(f"row {index} is not JSON: {e}", code=ErrorCode.ROW_MALFORMED)
        )
    return RawRow(index, row)


def _send_job(
    r: redis.Redis,
    job: JobRecord,
    rows: Iterable[RawRow],
    settings: ProducerSettings,
    params: GenerationParams,
    base: Path,
    output_path: Path,
    errors_path: Path,
    on_progress: Callable[[int], None] | None,
    keep_rows: bool = False,
) -> EnqueueSummary:
    """One enqueue pass over a registered job's rows: item ids, one task per row not yet written,
    an error row per row that cannot become a task, backpressure; closes the enqueue at the end."""
    job_id = job.job_id
    app = celery_app(settings.broker, settings.visibility_timeout_s, name="imageqa-producer")
    ids = RedisItemIds(params.fingerprint(), r, job.pass_scratch_key())
    counts = {"rows": 0, "enqueued": 0, "rejected": 0, "skipped": 0}
    try:
        with app.producer_or_acquire() as producer:
            for batch in _batches(rows, settings.enqueue_batch):
                item_ids = ids.next_ids([raw.row for raw in batch])
                items = list(zip(batch, item_ids, strict=True))
                pipe = r.pipeline()
                job.add_items(pipe, item_ids)
                job.done_flags(pipe, item_ids)
                _, done_flags = pipe.execute()
                pipe = r.pipeline()
                if keep_rows:
                    job.keep_rows(
                        pipe,
                        {
                            item_id: (raw.index, raw.row)
                            for (raw, item_id), d in zip(items, done_flags, strict=True)
                            if not d
                        },
                    )
                # One Redis round trip for the batch's messages (Kombu's publish batch), not one each.
                with producer.batch(max_size=len(items) + 1):
                    for (raw, item_id), done in zip(items, done_flags, strict=True):
                        counts["rows"] += 1
                        if done:
                            counts["skipped"] += 1
                            continue
                        try:
                            message = build_message(raw, item_id, job_id, params, settings.image_key, base)
                        except InputError as e:
                            counts["rejected"] += 1
                            publish(pipe, rejected_record(raw, item_id, job_id, e))
                            continue
                        send_message(app, producer, message, declare=not counts["enqueued"])
                        counts["enqueued"] += 1
                job.count_enqueued(pipe, sum(1 for d in done_flags if not d))
                pipe.execute()
                if settings.max_queued:
                    queued = queue_depth(app).waiting
                    if queued > settings.max_queued:
                        _wait_for_room(app, settings.max_queued, queued)
                if on_progress:
                    on_progress(counts["rows"])
        # Only a complete pass closes the job: after a failure the rerun must be able to finish it.
        job.close_enqueue(counts["skipped"])
        job.finish_if_complete(task_sender(app))
    finally:
        with suppress(redis.RedisError):  # the keys expire by themselves if Redis is gone
            ids.close()
        r.close()
    log.info("job %s: %d rows, %d enqueued, %d rejected, %d already done", job_id, *counts.values())
    return EnqueueSummary(job_id=job_id, output_path=str(output_path), errors_path=str(errors_path), **counts)


def send_message(app: Celery, producer: Any, message: TaskMessage, *, declare: bool) -> None:
    """Publishes one ``imageqa.generate`` task on ``producer`` (inside its publish batch). ``declare``:
    declare the queue with this message (the first of a pass; again per message is waste)."""
    app.send_task(
        TASK_GENERATE,
        kwargs=message.model_dump(mode="json"),
        queue=QUEUE_GENERATE,
        task_id=f"{message.job_id}:{message.item_id}",
        producer=producer,
        argsrepr="()",
        kwargsrepr=message.summary(),
        declare=None if declare else [],
    )


def _wait_for_room(app: Celery, limit: int, queued: int, poll_s: float = 0.5) -> None:
    """Backpressure: waits until the workers have taken the queue down to 90% of ``limit``, so Redis
    holds a bounded number of tasks however long the input is."""
    log.warning(
        "%d tasks are waiting in the queue (IMAGEQA_MAX_QUEUED=%d): pausing until workers take them",
        queued,
        limit,
    )
    while queue_depth(app).waiting > limit * 0.9:
        time.sleep(poll_s)


def build_message(
    raw: RawRow, item_id: str, job_id: str, params: GenerationParams, image_key: str, base: Path
) -> TaskMessage:
    if raw.error is not None:
        raise raw.error
    size = len(canonical_json(raw.row))
    if size > MAX_ROW_BYTES:
        raise InputError(
            f"row is {size} bytes, over the limit of {MAX_ROW_BYTES}", code=ErrorCode.ROW_TOO_LARGE
        )
    refs = [resolve_ref(ref, base) for ref in row_images(raw.row, image_key)]
    return TaskMessage(
        job_id=job_id,
        item_id=item_id,
        row_index=raw.index,
        images=refs,
        row=raw.row,
        params=params,
        enqueued_at=time.time(),
    )


def rejected_record(raw: RawRow, item_id: str, job_id: str, error: InputError) -> ResultRecord:
    return ResultRecord(
        job_id=job_id,
        item_id=item_id,
        row_index=raw.index,
        row=raw.row,
        error=ErrorInfo(code=error.code, message=error.message),
        worker=f"producer@{os.uname().nodename}",
    )


def _batches(rows: Iterable[RawRow], size: int) -> Iterator[list[RawRow]]:
    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch
