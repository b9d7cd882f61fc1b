"""The results collector: stream entries in, JSONL lines out, each item exactly once.

Reads the results stream with a consumer group and, per batch:

1. drops item ids the job has already written (the job's done set);
2. records, per job, a *write marker* in Redis: the output and errors file sizes before the write
   (1 and 2 in one round trip: `JobRecord.begin_write` sets the marker only if the old one shows
   nothing to undo);
3. appends the lines and fsyncs;
4. in one MULTI: adds the items to the done set, bumps the counters, sets the markers to the new
   file sizes (marked committed), records a declared job size (``job_total``), quarantines entries it
   cannot decode, acks, and reads what tells whether each job is complete.

A collector killed anywhere in between restarts (same consumer name), finds its markers, truncates
the files back to the recorded sizes (removing a torn or an unrecorded line) and handles its pending
entries again. So every result lands exactly once, and no half-written line survives.

The marker outlives the commit (until the job finishes) because Redis itself may lose the last
second of writes (``appendfsync everysec``, a machine crash): then the lines of a batch are on disk
but the done-set add that recorded them is gone, and their results come back. Before each write the
collector truncates the file back to the size its marker records, so those lines are written once,
again, instead of twice. (If the lost second holds a job's first marker, nothing in Redis tells
what the file held before: its lines stay, and come again.)
One collector per set of output files: two collectors must not write the same job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.typing import EncodableT, FieldT

from producer import jobs
from producer.broker import RETRYABLE, RedisBackoff, celery_app, redis_client, task_sender
from producer.constants import COLLECTOR_GROUP, RESULTS_STREAM
from producer.contract import ResultRecord, error_row, output_row
from producer.errors import ContractError, OutputError
from producer.jobs import JobConfig, JobRecord
from producer.quarantine import quarantine, recover_job_id
from producer.results import FIELD
from workers import metrics, retried
from workers.publish import publish
from workers.settings import CollectorSettings
from workers.stall import StallWatch

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 30.0
"""After a failure to write a job's final output (an object store unreachable, say), the next try."""


@dataclass
class _JobBatch:
    job: JobRecord
    config: JobConfig
    records: dict[str, ResultRecord] = field(default_factory=dict)
    ok: list[bytes] = field(default_factory=list)
    failed: list[ResultRecord] = field(default_factory=list)
    declared_total: int | None = None
    """The ``job_total`` the batch's records carry, for a job no producer registered."""
    retried: list[str] = field(default_factory=list)
    """Items a retry took back: their old errors-file lines go before this batch is appended."""


class Collector:
    def __init__(self, settings: CollectorSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis_client(settings.redis_url)
        self.rows_written = 0
        self.rows_failed = 0
        self._configs: dict[str, JobConfig] = {}
        self._last_claim = 0.0
        self._last_observe = 0.0
        self._queue_watch = metrics.QueueWatch()
        self._celery: Any = None
        self._celery_lock = threading.Lock()
        self.stall = StallWatch(
            self.r, self._celery_app, check_s=settings.stall_check_s, grace_s=settings.stall_grace_s
        )
        self._redis_lost_writes = False
        self._last_publish = 0.0
        self._publish_after: dict[str, float] = {}
        """Job id -> when to try writing its final output again, after a failure (monotonic)."""

    def run(self, stop: threading.Event | None = None) -> None:
        """Collects until ``stop`` is set; rides out Redis restarts and connection losses."""
        stop = stop or threading.Event()
        backoff = RedisBackoff(sleep=stop.wait)
        while not stop.is_set():
            try:
                self.start()
                while not stop.is_set():
                    read = self.step(block_ms=self.settings.block_ms)
                    if 0 < read < self.settings.batch_size and self.settings.linger_ms:
                        stop.wait(self.settings.linger_ms / 1000)
                    if self._redis_lost_writes:  # the lost batch's entries may be pending with us
                        self._redis_lost_writes = False
                        self.start()
                    self.maybe_claim()
                    self.maybe_publish()
                    self.maybe_observe()
                    self.stall.maybe_check()
                    backoff.reset()
            except RETRYABLE as e:
                backoff.wait(e)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                log.warning("results stream or group vanished (Redis lost its data?); recreating it")
        self.stall.stop.set()

    def start(self) -> None:
        """Creates the group, undoes interrupted writes, then handles this consumer's pending entries."""
        self.ensure_group()
        self.recover()
        while self.step(start_id="0") > 0:
            pass
        self.finish_open_jobs()
        self.publish_pending()

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(RESULTS_STREAM, COLLECTOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def recover(self) -> None:
        """Truncates files back to the sizes in this consumer's (or a long-dead one's) write markers.
        The markers of open jobs stay, a dead consumer's taken over: they record what Redis knows is
        written."""
        now = time.time()
        open_jobs = set(jobs.unfinished_jobs(self.r))
        pipe = self.r.pipeline(transaction=False)
        for job, marker in jobs.write_markers(self.r):
            if self._undo_unrecorded(marker, now) is None:
                continue
            if job.job_id in open_jobs:
                job.mark_writing(pipe, {"consumer": self.settings.consumer, "state": "committed", "t": now})
            else:
                job.clear_write_marker(pipe)
        pipe.execute()

    def _undo_unrecorded(self, marker: dict[str, str], now: float) -> bool | None:
        """Truncates the marker's files back to its sizes: the bytes past them were never recorded
        in Redis. None if the marker is another live consumer's; else True if anything was cut."""
        stale = now - float(marker.get("t", now)) > self.settings.claim_idle_s
        if marker.get("consumer") != self.settings.consumer and not stale:
            return None
        cut = False
        for name in ("output_path", "errors_path"):
            path = marker.get(name)
            size = int(marker.get(name.replace("path", "size"), -1))
            if path and size >= 0 and os.path.exists(path) and os.path.getsize(path) > size:
                log.warning("truncating %s back to %d bytes (an interrupted write)", path, size)
                os.truncate(path, size)
                cut = True
        return cut

    def finish_open_jobs(self) -> None:
        """Marks done the jobs whose rows are all written but which are not marked finished: a
        collector killed between writing a job's last batch and marking the job leaves one behind."""
        for job_id in jobs.unfinished_jobs(self.r):
            if JobRecord(self.r, job_id).finish_if_complete(self._send_task):
                log.info("job %s: every row was written before a restart; marked done", job_id)

    def maybe_publish(self, every_s: float = 1.0) -> None:
        """Writes the final outputs of jobs that completed (`publish_pending`), checked every ``every_s``
        and right after a batch completes a job."""
        if time.monotonic() - self._last_publish >= every_s:
            self._last_publish = time.monotonic()
            self.publish_pending()

    def publish_pending(self) -> None:
        """Writes the final output (Parquet, ``--no-meta``, object storage: `workers.publish`) of every
        complete job that waits for one, marks it written and announces the job. A failure is recorded
        in the job (``imageqa status`` shows it; the job is announced with it once) and tried again
        after `PUBLISH_RETRY_S`."""
        now = time.monotonic()
        for job_id in jobs.pending_publications(self.r):
            if self._publish_after.get(job_id, 0.0) > now:
                continue
            job = JobRecord(self.r, job_id)
            config = job.config()
            if config is None or not config.final_output:
                job.mark_published()
                continue
            try:
                rows = publish(config)
            except Exception as e:  # an unreachable store or a bad journal must not stop collecting
                failed_before = job.publish_failed_before()
                message = e.message if isinstance(e, OutputError) else f"{type(e).__name__}: {e}"
                log.error(
                    "job %s: cannot write %s (trying again in %.0f s): %s",
                    job_id,
                    config.final_output,
                    PUBLISH_RETRY_S,
                    message,
                )
                job.mark_published(error=message)
                self._publish_after[job_id] = now + PUBLISH_RETRY_S
                if not failed_before:
                    job.announce(self._send_task)
                continue
            self._publish_after.pop(job_id, None)
            job.mark_published()
            job.announce(self._send_task)
            log.info("job %s: %d rows written to %s", job_id, rows, config.final_output)

    def maybe_claim(self) -> None:
        """Takes over entries that another, dead collector read but never acked."""
        if time.monotonic() - self._last_claim < self.settings.claim_idle_s / 4:
            return
        self._last_claim = time.monotonic()
        response: Any = self.r.xautoclaim(
            RESULTS_STREAM,
            COLLECTOR_GROUP,
            self.settings.consumer,
            min_idle_time=int(self.settings.claim_idle_s * 1000),
            count=self.settings.batch_size,
        )
        claimed = [entry for entry in response[1] if entry[1]] if response else []
        if claimed:
            log.warning("claimed %d entries from a dead collector", len(claimed))
            self.recover()
            self.handle(claimed)

    def maybe_observe(self, every_s: float = 5.0) -> None:
        """Refreshes the lag, pending and queue-depth gauges, and trims the stream."""
        if time.monotonic() - self._last_observe < every_s:
            return
        self._last_observe = time.monotonic()
        self.trim()
        groups: Any = self.r.xinfo_groups(RESULTS_STREAM)
        for group in groups:
            if group["name"] in (COLLECTOR_GROUP, COLLECTOR_GROUP.encode()):
                metrics.COLLECTOR_LAG.set(group.get("lag") or 0)
                metrics.COLLECTOR_PENDING.set(group.get("pending") or 0)
        self._queue_watch.observe(self.settings.broker)

    def trim(self) -> int:
        """Drops the results every consumer group has read and acknowledged, so the stream holds what
        is in flight, not the whole history of every job. Returns the number of entries dropped."""
        try:
            groups: Any = self.r.xinfo_groups(RESULTS_STREAM)
        except redis.ResponseError:  # no stream yet
            return 0
        needed: list[tuple[int, int]] = []
        for group in groups:
            ms, seq = _stream_id(group["last-delivered-id"])
            needed.append((ms, seq + 1))  # the first entry not yet delivered to this group
            if group["pending"]:
                oldest: Any = self.r.xpending(RESULTS_STREAM, group["name"])
                needed.append(_stream_id(oldest["min"]))
        if not needed:
            return 0
        # Entries below the oldest one still needed were delivered to every group and acknowledged.
        ms, seq = min(needed)
        dropped: int = self.r.xtrim(RESULTS_STREAM, minid=f"{ms}-{seq}", approximate=False)
        return dropped

    def step(self, start_id: str = ">", block_ms: int | None = None) -> int:
        response: Any = self.r.xreadgroup(
            COLLECTOR_GROUP,
            self.settings.consumer,
            {RESULTS_STREAM: start_id},
            count=self.settings.batch_size,
            block=block_ms,
        )
        entries = response[0][1] if response else []
        if entries:
            self.handle(entries)
        return len(entries)

    def handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        batches: dict[str, _JobBatch] = {}
        undecodable: list[tuple[bytes, dict[bytes, bytes], ContractError]] = []
        for entry_id, fields in entries:
            fields = fields or {}  # an entry deleted while pending comes back without fields
            try:
                record = decode_entry(fields)
            except ContractError as e:
                # Kept, not dropped: it is quarantined in the transaction that acknowledges it.
                undecodable.append((entry_id, fields, e))
                continue
            batch = batches.get(record.job_id)
            if batch is None:
                job = JobRecord(self.r, record.job_id)
                batch = batches[record.job_id] = _JobBatch(job, self._config(job))
            batch.records.setdefault(record.item_id, record)
            if record.job_total and not batch.config.registered:
                batch.declared_total = batch.declared_total or record.job_total
        retrying = self._prepare(batches)
        writing = {job_id: b for job_id, b in batches.items() if b.ok or b.failed}
        self._drop_retried(writing, retrying)
        for batch in writing.values():
            _append(Path(batch.config.output_path), batch.ok)
            _append(Path(batch.config.errors_path), [orjson.dumps(error_row(rec)) for rec in batch.failed])
        completions = self._commit(writing, [entry_id for entry_id, _ in entries], batches, undecodable)
        for batch in writing.values():
            self.rows_written += len(batch.ok)
            self.rows_failed += len(batch.failed)
            metrics.COLLECTOR_ROWS.labels("output").inc(len(batch.ok))
            metrics.COLLECTOR_ROWS.labels("errors").inc(len(batch.failed))
        for (job_id, batch), completion in zip(batches.items(), completions, strict=True):
            if batch.job.finish_if_complete(self._send_task, completion):
                self._configs.pop(job_id, None)
                if job_id in writing:
                    batch.job.clear_write_marker()
                    self._last_publish = 0.0  # its final output, if it has one, without delay

    def _send_task(self, name: str, queue: str, kwargs: dict[str, object]) -> None:
        task_sender(self._celery_app())(name, queue, kwargs)

    def _celery_app(self) -> Any:
        with self._celery_lock:  # the stall watch's threads send tasks too
            if self._celery is None:
                self._celery = celery_app(
                    self.settings.broker, self.settings.visibility_timeout_s, "imageqa-collector"
                )
            return self._celery

    def _prepare(self, batches: dict[str, _JobBatch]) -> dict[str, list[str]]:
        """One round trip before the write: drops the items each job has written already (its done
        set), finds those a retry took back, and sets each job's write marker to the files' sizes
        now (`JobRecord.begin_write`). Where the marker shows that Redis lost the record of written
        lines, undoes them first (see `_undo_unrecorded`) and then sets it. Returns, per job, the
        fresh items a retry took back."""
        if not batches:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for batch in batches.values():
            batch.job.done_flags(pipe, batch.records)
            batch.job.retrying_flags(pipe, batch.records)
            batch.job.begin_write(pipe, self._marker(batch.config, "writing"))
        replies = iter(pipe.execute())
        retrying: dict[str, list[str]] = {}
        lost: list[_JobBatch] = []
        now = time.time()
        for job_id, batch in batches.items():
            done, taken_back, current = next(replies), next(replies), next(replies)
            output_key = batch.config.output_key
            fresh: dict[str, ResultRecord] = {}
            for (item_id, record), is_done, retried_flag in zip(
                batch.records.items(), done, taken_back, strict=True
            ):
                if is_done:
                    continue
                fresh[item_id] = record
                if retried_flag:
                    retrying.setdefault(job_id, []).append(item_id)
                if record.ok:
                    # The journal always keeps the provenance (and so the row index): outputs
                    # without it, and ordered ones, are made from it when the job completes.
                    batch.ok.append(orjson.dumps(output_row(record, output_key, meta=True)))
                else:
                    batch.failed.append(record)
            batch.records = fresh
            if current is not None:
                marker = dict(zip(*[iter(value.decode() for value in current)] * 2, strict=True))
                if self._undo_unrecorded(marker, now):
                    log.warning("job %s: Redis lost the record of written rows; writing them again", job_id)
                    self._redis_lost_writes = True
                lost.append(batch)
        if lost:
            pipe = self.r.pipeline(transaction=False)
            for batch in lost:
                batch.job.mark_writing(pipe, self._marker(batch.config, "writing"))
            pipe.execute()
        return retrying

    def _commit(
        self,
        writing: dict[str, _JobBatch],
        entry_ids: list[bytes],
        batches: dict[str, _JobBatch],
        undecodable: list[tuple[bytes, dict[bytes, bytes], ContractError]],
    ) -> list[list[Any]]:
        """In one MULTI: the rows written are recorded, their markers set to the new file sizes,
        declared job totals and undecodable entries kept (`quarantine_entry`), and the entries acked.
        Returns, per job of ``batches``, the replies of `JobRecord.read_completion` read in it."""
        pipe = self.r.pipeline(transaction=True)
        for batch in writing.values():
            batch.job.record_results(pipe, batch.records.values(), new_items=not batch.config.registered)
            batch.job.mark_writing(pipe, self._marker(batch.config, "committed"))
            if batch.retried:
                batch.job.clear_retrying(pipe, batch.retried)
        for batch in batches.values():
            if batch.declared_total:
                batch.job.declare_total(pipe, batch.declared_total)
        for entry_id, fields, error in undecodable:
            quarantine_entry(pipe, entry_id, fields, error, self.settings.consumer)
        pipe.xack(RESULTS_STREAM, COLLECTOR_GROUP, *entry_ids)
        for batch in batches.values():
            batch.job.read_completion(pipe)
        replies = pipe.execute()
        reads = replies[len(replies) - 3 * len(batches) :]
        return [reads[i : i + 3] for i in range(0, len(reads), 3)]

    def _drop_retried(self, writing: dict[str, _JobBatch], retrying: dict[str, list[str]]) -> None:
        """Removes the old errors-file lines of retried rows, then records the rewritten file's size in
        the write marker before anything is appended (see `workers.retried`)."""
        for job_id, batch in writing.items():
            items = retrying.get(job_id)
            if items:
                batch.retried = items
                size = retried.drop_lines(Path(batch.config.errors_path), items)
                pipe = self.r.pipeline(transaction=False)
                batch.job.mark_writing(pipe, {"errors_size": size})
                pipe.execute()

    def _marker(self, config: JobConfig, state: str) -> dict[FieldT, EncodableT]:
        return {
            "consumer": self.settings.consumer,
            "state": state,
            "t": time.time(),
            "output_path": config.output_path,
            "errors_path": config.errors_path,
            "output_size": _size(config.output_path),
            "errors_size": _size(config.errors_path),
        }

    def _config(self, job: JobRecord) -> JobConfig:
        if job.job_id not in self._configs:
            config = job.config()
            if config is None:
                # Tasks sent by a plain Celery client name a job nobody registered: adopt it.
                config = job.adopt(Path(self.settings.output_dir).resolve())
                if config.final_output:
                    log.info("job %s: journal %s for %s", job.job_id, config.output_path, config.final_output)
                else:
                    log.info("job %s was not registered; writing it to %s", job.job_id, config.output_path)
            self._configs[job.job_id] = config
        return self._configs[job.job_id]


def decode_entry(fields: dict[bytes, bytes]) -> ResultRecord:
    """The result record of a stream entry; raises `ContractError` when there is none to decode."""
    if FIELD not in fields:
        raise ContractError(
            f"stream entry has no {FIELD.decode()!r} field (it has: "
            f"{', '.join(sorted(name.decode('latin-1') for name in fields)) or 'none'})"
        )
    return ResultRecord.decode(fields[FIELD])


def quarantine_entry(
    pipe: redis.client.Pipeline,
    entry_id: bytes,
    fields: dict[bytes, bytes],
    error: ContractError,
    consumer: str,
) -> None:
    """Adds to ``pipe``: keep an undecodable results entry (its record, or all its fields as JSON) in
    the quarantine stream, counted for its job if the raw record still names one."""
    raw = (
        fields[FIELD]
        if FIELD in fields
        else orjson.dumps({a.decode("latin-1"): b.decode("latin-1") for a, b in fields.items()})
    )
    quarantine(
        pipe,
        source="result",
        code=error.code,
        reason=error.message,
        raw=raw,
        ref=entry_id.decode(),
        origin=consumer,
        job_id=recover_job_id(raw),
    )


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _append(path: Path, lines: list[bytes]) -> None:
    """Appends whole lines and fsyncs; the caller acks only after this returns."""
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(b"\n".join(lines) + b"\n")
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def run_collector(settings: CollectorSettings, stop: threading.Event | None = None) -> None:
    collector = Collector(settings)
    metrics.serve(settings.metrics_port, settings.metrics_address)
    log.info("collector %s reading %s", settings.consumer, RESULTS_STREAM)
    started = time.monotonic()
    try:
        collector.run(stop)
    finally:
        log.info(
            "collector stopped after %.1f s: %d rows written, %d failed",
            time.monotonic() - started,
            collector.rows_written,
            collector.rows_failed,
        )
