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
from producer.outputs import OutputPlan, plan_output
from producer.results import publish
from producer.settings import ProducerSettings
from producer.sources import Location, absolute, is_dir, location, parent

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


def default_job_id(
    input_path: str | Path, output_path: Path | str, params: GenerationParams, *, meta: bool = True
) -> str:
    """Same input, same output and same settings give the same job, so a rerun resumes it."""
    output = absolute(location(output_path))
    key = f"{absolute(location(input_path))}|{output}|{params.fingerprint()}" + ("" if meta else "|no-meta")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def enqueue_file(
    input_path: str | Path,
    output_path: Path | str,
    *,
    settings: ProducerSettings,
    params: GenerationParams,
    errors_path: Path | None = None,
    job_id: str | None = None,
    input_format: str | None = None,
    media_base: Location | None = None,
    split: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
    meta: bool = True,
    on_job: Callable[[str], None] | None = None,
) -> EnqueueSummary:
    """Enqueues every row of ``input_path`` as a job writing to ``output_path``: a ``.jsonl`` or
    ``.parquet`` path or URL (`producer.outputs`); ``meta=False`` leaves each row's ``qa_meta`` out.

    Rows already written by an earlier run of the same job are skipped. A row that cannot become a
    task (malformed, no images) is sent straight to the collector as an error row. ``input_path`` is a
    local path, a URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``https://``) or a glob of files;
    relative image paths resolve against ``media_base`` (default: the input's folder or URL). ``split``
    picks a split of a ``save_to_disk`` folder or a hub dataset. When the job finishes, the
    Celery task ``on_done_task`` (if given) is sent to ``on_done_queue`` with the job's figures.
    ``on_job`` receives the job id once the job is registered, before any row is sent.
    """
    check_redis(settings.redis_url)
    source = absolute(location(input_path))
    rows = read_rows(source, input_format, split=split, image_key=settings.image_key)
    plan = plan_output(output_path, meta=meta, errors_path=errors_path)
    job_id = job_id or default_job_id(input_path, output_path, params, meta=meta)
    base = absolute(media_base or (source if is_dir(source) else parent(source)))
    r = redis_client(settings.redis_url)
    job = JobRecord(r, job_id)
    _register(job, plan, settings, params, str(source), on_done_task, on_done_queue)
    job.record_source(
        input_format=input_format, media_base=str(base), image_key=settings.image_key, split=split
    )
    if on_job:
        on_job(job_id)
    return _send_job(r, job, rows, settings, params, base, plan, on_progress)


def default_rows_job_id(output_path: Path | str, params: GenerationParams, *, meta: bool = True) -> str:
    """Rows given in memory: the same output and the same settings give the same job, so sending the
    same rows again resumes it (rows already written are skipped)."""
    key = f"rows|{absolute(location(output_path))}|{params.fingerprint()}" + ("" if meta else "|no-meta")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def enqueue_iter(
    rows: Iterable[Any],
    output_path: Path | str,
    *,
    settings: ProducerSettings,
    params: GenerationParams,
    errors_path: Path | None = None,
    job_id: str | None = None,
    media_base: Location | None = None,
    keep_rows: bool = True,
    meta: bool = True,
    on_progress: Callable[[int], None] | None = None,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
) -> EnqueueSummary:
    """Enqueues rows given in memory (dicts shaped as input-file rows) as a job, as `enqueue_file`
    does for a file; relative image paths resolve against ``media_base`` (default: the working
    folder). With ``keep_rows`` the rows sent are kept in Redis with the job (`JobRecord.keep_rows`),
    so that rows lost in transit can be sent again (`producer.resend`) with nobody holding them."""
    check_redis(settings.redis_url)
    plan = plan_output(output_path, meta=meta, errors_path=errors_path)
    job_id = job_id or default_rows_job_id(output_path, params, meta=meta)
    base = absolute(location(media_base) if media_base else Path.cwd())
    r = redis_client(settings.redis_url)
    job = JobRecord(r, job_id)
    _register(job, plan, settings, params, "", on_done_task, on_done_queue)
    job.record_source(
        input_format=None, media_base=str(base), image_key=settings.image_key, kept_rows=keep_rows
    )
    raw_rows = (_raw_row(index, row) for index, row in enumerate(rows))
    return _send_job(r, job, raw_rows, settings, params, base, plan, on_progress, keep_rows)


def _register(
    job: JobRecord,
    plan: OutputPlan,
    settings: ProducerSettings,
    params: GenerationParams,
    input_path: str,
    on_done_task: str | None,
    on_done_queue: str | None,
) -> None:
    job.register(
        output_path=plan.journal_path,
        errors_path=plan.errors_path,
        output_key=settings.output_key,
        input_path=input_path,
        params_json=params.model_dump_json(),
        on_done_task=on_done_task,
        on_done_queue=on_done_queue,
        final_output=plan.final_output,
        final_errors=plan.final_errors,
        meta=plan.meta,
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
    base: Location,
    plan: OutputPlan,
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
                item_ids = ids.next_ids([raw.identity for raw in batch])
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
    return EnqueueSummary(
        job_id=job_id,
        output_path=plan.final_output or plan.journal_path,
        errors_path=plan.final_errors or plan.errors_path,
        **counts,
    )


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
    raw: RawRow, item_id: str, job_id: str, params: GenerationParams, image_key: str, base: Location
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
