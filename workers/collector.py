"""The results collector: stream entries in, JSONL lines out, each item exactly once.

Reads the results stream with a consumer group, drops item ids the job has already written, appends
output and error lines, fsyncs once per batch, and only then records the items as done and acks the
entries. A collector that dies before the ack gets the same entries again on restart (same consumer
name), and the done set keeps them from being written twice.
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

from producer import constants as k
from producer import jobs
from producer.broker import redis_client
from producer.contract import ResultRecord, error_row, output_row
from producer.errors import ContractError
from producer.results import FIELD
from workers.settings import CollectorSettings

log = logging.getLogger(__name__)


@dataclass
class _JobBatch:
    config: dict[str, str]
    records: dict[str, ResultRecord] = field(default_factory=dict)


class Collector:
    def __init__(self, settings: CollectorSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client or redis_client(settings.redis_url)
        self.rows_written = 0
        self.rows_failed = 0
        self._configs: dict[str, dict[str, str]] = {}

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(k.RESULTS_STREAM, k.COLLECTOR_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self, stop: threading.Event | None = None) -> None:
        """Collects until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        self.ensure_group()
        self.drain_pending()
        while not stop.is_set():
            self.step(block_ms=self.settings.block_ms)

    def drain_pending(self) -> None:
        """Handles the entries this consumer read but did not ack before it last stopped."""
        while self.step(start_id="0") > 0:
            pass

    def step(self, start_id: str = ">", block_ms: int | None = None) -> int:
        response: Any = self.r.xreadgroup(
            k.COLLECTOR_GROUP,
            self.settings.consumer,
            {k.RESULTS_STREAM: start_id},
            count=self.settings.batch_size,
            block=block_ms,
        )
        entries = response[0][1] if response else []
        if entries:
            self.handle(entries)
        return len(entries)

    def handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        batches: dict[str, _JobBatch] = {}
        entry_ids = [entry_id for entry_id, _ in entries]
        for entry_id, fields in entries:
            try:
                record = ResultRecord.decode(fields[FIELD])
            except (ContractError, KeyError) as e:
                log.error("dropping stream entry %s: %s", entry_id.decode(), e)
                continue
            config = self._config(record.job_id)
            batches.setdefault(record.job_id, _JobBatch(config)).records.setdefault(record.item_id, record)
        pipe = self.r.pipeline()
        for job_id, batch in batches.items():
            self._write(job_id, batch, pipe)
        pipe.xack(k.RESULTS_STREAM, k.COLLECTOR_GROUP, *entry_ids)
        pipe.execute()
        for job_id in batches:
            if jobs.finish_if_complete(self.r, job_id):
                self._configs.pop(job_id, None)

    def _write(self, job_id: str, batch: _JobBatch, pipe: redis.client.Pipeline) -> None:
        item_ids = list(batch.records)
        done = self.r.smismember(k.job_done_key(job_id), item_ids)
        fresh = [batch.records[i] for i, d in zip(item_ids, done, strict=True) if not d]
        if not fresh:
            return
        output_key = batch.config.get("output_key", "qa_pairs")
        ok = [orjson.dumps(output_row(rec, output_key)) for rec in fresh if rec.ok]
        failed = [rec for rec in fresh if not rec.ok]
        _append(Path(batch.config["output_path"]), ok)
        _append(Path(batch.config["errors_path"]), [orjson.dumps(error_row(rec)) for rec in failed])
        pipe.sadd(k.job_done_key(job_id), *[rec.item_id for rec in fresh])
        if "input_path" not in batch.config:  # an adopted job: its items are known only from results
            pipe.sadd(k.job_items_key(job_id), *[rec.item_id for rec in fresh])
        pipe.hincrby(k.job_key(job_id), "written", len(ok))
        pipe.hincrby(k.job_key(job_id), "failed", len(failed))
        for rec in failed:
            pipe.hincrby(k.job_key(job_id), f"failed:{rec.error.code}", 1)  # type: ignore[union-attr]
        self.rows_written += len(ok)
        self.rows_failed += len(failed)

    def _config(self, job_id: str) -> dict[str, str]:
        if job_id not in self._configs:
            config = jobs.job_config(self.r, job_id)
            if config is None or "output_path" not in config:
                # Tasks sent by a plain Celery client name a job nobody registered: adopt it.
                config = jobs.adopt_job(self.r, job_id, Path(self.settings.output_dir).resolve())
                log.info("job %s was not registered; writing it to %s", job_id, config["output_path"])
            self._configs[job_id] = config
        return self._configs[job_id]


def _append(path: Path, lines: list[bytes]) -> None:
    """Appends whole lines and fsyncs; the caller acks only after this returns."""
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = b"\n".join(lines) + b"\n"
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def run_collector(settings: CollectorSettings, stop: threading.Event | None = None) -> None:
    collector = Collector(settings)
    log.info("collector %s reading %s", settings.consumer, k.RESULTS_STREAM)
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
