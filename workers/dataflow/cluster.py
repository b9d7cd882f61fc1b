"""`ClusterServing`: the operator's rows as one job on a running Celery cluster.

The rows go to a JSONL file in the storage's cache folder and are enqueued with the producer's
``enqueue_file`` (one task per row; the job registered in Redis so the collector writes it). The
serving waits for the job with a progress bar, then reads the collector's output and errors files
and puts each result back on its row. It starts no worker and no collector: both must be running on
the same Redis, the collector must be able to write to the cache folder (same machine or a shared
mount), and the workers must be able to read the images at their absolute paths.

The job id is a hash of the rows and the settings: running the same step again after an interruption
resumes the job (rows already written are not generated again).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import redis

from producer.broker import check_redis, redact, redis_client
from producer.cli import progress_bar
from producer.constants import COLLECTOR_GROUP, RESULTS_STREAM
from producer.contract import META_KEY, ErrorInfo, QAPair, canonical_json
from producer.enqueue import enqueue_file
from producer.errors import ClusterServingError, ImageQAError
from producer.jobs import JobRecord, JobStatus, job_status
from producer.settings import ProducerSettings, RedisSettings
from producer.wait import wait_for_job
from workers.dataflow.servings import (
    RowInput,
    RowResult,
    RunContext,
    Serving,
    generation_params,
)

log = logging.getLogger(__name__)

JOBS_DIR = "imageqa-cluster"
"""Folder under the storage's cache folder that holds each job's input, output and errors files."""
COLLECTOR_IDLE_WARNING_S = 30.0
"""A collector that has not read the results stream for this long is probably not running."""


class ClusterServing(Serving):
    """Generates on a running imageqa cluster (``imageqa worker`` processes and ``imageqa collect``).

    ``redis_url`` is the cluster's Redis (default: ``IMAGEQA_REDIS_URL``). ``model`` pins the model
    the workers must serve (default: whatever they serve). ``timeout_s`` bounds the wait for the job
    (default: no limit); on timeout or Ctrl-C the job goes on, and running the step again picks it up.
    The keyword arguments ``temperature``, ``top_p``, ``max_tokens``, ``min_pairs``, ``max_pairs``,
    ``max_question_chars`` and ``max_answer_chars`` shape the pairs.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float | None = None,
        poll_s: float = 0.25,
        stall_warning_s: float = 60.0,
        keep_files: bool = False,
        show_progress: bool = True,
        **generation: Any,
    ) -> None:
        self.redis_url = redis_url or RedisSettings().redis_url
        self.params = generation_params(model=model, **generation)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.stall_warning_s = stall_warning_s
        self.keep_files = keep_files
        self.show_progress = show_progress

    def generate(self, rows: Sequence[RowInput], context: RunContext) -> list[RowResult]:
        if not rows:
            return []
        check_redis(self.redis_url)
        lines = [orjson.dumps({**row.row, context.image_key: row.images}) for row in rows]
        job_id = self._job_id(lines, context)
        folder = Path(context.workdir).resolve() / JOBS_DIR / job_id
        source, output, errors = folder / "input.jsonl", folder / "output.jsonl", folder / "errors.jsonl"
        r = redis_client(self.redis_url)
        try:
            self._reset_stale(r, job_id, output, errors)
            folder.mkdir(parents=True, exist_ok=True)
            _write_lines(source, lines)
            settings = ProducerSettings(
                redis_url=self.redis_url, image_key=context.image_key, output_key=context.output_key
            )
            summary = enqueue_file(
                source, output, settings=settings, params=self.params, errors_path=errors, job_id=job_id
            )
            log.info(
                "cluster job %s on %s: %d rows, %d enqueued, %d already done",
                job_id,
                redact(self.redis_url),
                summary.rows,
                summary.enqueued,
                summary.skipped,
            )
            self._warn_without_collector(r)
            self._wait(r, job_id, len(rows))
        except (redis.RedisError, ImageQAError) as e:
            if isinstance(e, ClusterServingError):
                raise
            raise ClusterServingError(f"cluster job {job_id} failed: {e}") from e
        finally:
            r.close()
        results = _results(lines, output, errors, context.output_key)
        missing = sum(result is None for result in results)
        if missing:
            raise ClusterServingError(
                f"cluster job {job_id} is done but {missing} of {len(rows)} rows have no result in {folder}"
            )
        if not self.keep_files:
            shutil.rmtree(folder, ignore_errors=True)
        return [result for result in results if result is not None]

    def cleanup(self) -> None:
        """Nothing to release: the engines belong to the workers."""

    def _job_id(self, lines: list[bytes], context: RunContext) -> str:
        digest = hashlib.sha256()
        for line in lines:
            digest.update(line + b"\n")
        digest.update(f"|{self.params.fingerprint()}|{context.image_key}|{context.output_key}".encode())
        return f"dataflow-{digest.hexdigest()[:20]}"

    def _reset_stale(self, r: redis.Redis, job_id: str, output: Path, errors: Path) -> None:
        """Resume only a job whose Redis state and files agree; otherwise start it afresh."""
        known = job_status(r, job_id) is not None
        files = output.exists() or errors.exists()
        if known and not files:
            JobRecord(r, job_id).reset()
        elif files and not known:
            output.unlink(missing_ok=True)
            errors.unlink(missing_ok=True)

    def _warn_without_collector(self, r: redis.Redis) -> None:
        try:
            consumers: list[dict[str, Any]] = r.xinfo_consumers(RESULTS_STREAM, COLLECTOR_GROUP)
        except redis.ResponseError:  # no stream or no group: no collector has ever run
            consumers = []
        if not any(c.get("idle", float("inf")) < COLLECTOR_IDLE_WARNING_S * 1000 for c in consumers):
            log.warning(
                "no collector is reading %s on %s: results are written only while `imageqa collect` runs",
                RESULTS_STREAM,
                redact(self.redis_url),
            )

    def _wait(self, r: redis.Redis, job_id: str, total: int) -> JobStatus:
        with progress_bar("cluster", total, enabled=self.show_progress) as update:
            try:
                return wait_for_job(
                    r,
                    job_id,
                    poll_s=self.poll_s,
                    on_progress=lambda latest: update(latest.done, latest.failed),
                    timeout_s=self.timeout_s,
                    stall_warning_s=self.stall_warning_s,
                )
            except ImageQAError as e:
                raise ClusterServingError(
                    f"cluster {e.message}, and running this step again resumes it"
                ) from e


def _write_lines(path: Path, lines: list[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in lines))
    tmp.replace(path)


def _results(lines: list[bytes], output: Path, errors: Path, output_key: str) -> list[RowResult | None]:
    """Each row's result. An error line names its row, and so does an output line's ``qa_meta``; an
    output line without it is its input row plus the pairs, matched by content (identical rows are
    interchangeable)."""
    results: list[RowResult | None] = [None] * len(lines)
    by_content: dict[bytes, deque[int]] = defaultdict(deque)
    for index, line in enumerate(lines):
        by_content[canonical_json(orjson.loads(line))].append(index)
    for entry in _read_jsonl(errors):
        row_index = entry.get("row_index")
        if isinstance(row_index, int) and 0 <= row_index < len(lines) and results[row_index] is None:
            results[row_index] = RowResult(error=ErrorInfo.model_validate(entry["error"]))
    for row in _read_jsonl(output):
        pairs = [QAPair.model_validate(p) for p in row.pop(output_key, None) or []]
        meta = row.pop(META_KEY, None)
        row_index = meta.get("row_index") if isinstance(meta, dict) else None
        if isinstance(row_index, int) and 0 <= row_index < len(lines) and results[row_index] is None:
            results[row_index] = RowResult(pairs=pairs, meta=meta)
            continue
        candidates = by_content.get(canonical_json(row))
        while candidates:
            index = candidates.popleft()
            if results[index] is None:
                results[index] = RowResult(pairs=pairs, meta=meta)
                break
    return results


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
