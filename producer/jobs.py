"""The job registry in Redis: one hash per job with its outputs and counters, plus item sets.

This module is the only code that names a job's keys and hash fields (their names are in
`producer.constants`): the producer, the workers and the collector go through `JobRecord`, and
read a job with `job_status`.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from celery import Celery
from redis.typing import EncodableT, FieldT

from producer import constants
from producer.broker import queue_depth
from producer.contract import GenerationParams, ResultRecord
from producer.sources import location
from producer.templates import normal_question, question_template

TOP_TEMPLATES = 10
"""Question templates the job status lists (``diversity.top_templates``)."""


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str
    total: int
    written: int
    failed: int
    enqueued: int
    skipped: int
    enqueue_complete: bool
    output_path: str
    errors_path: str
    output_key: str
    created_at: float
    finished_at: float | None

    @property
    def done(self) -> int:
        return self.written + self.failed

    failures: dict[str, int] = field(default_factory=dict)
    """Failed rows by error code."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Rejected question-answer pairs by reason (over all rows, written or failed)."""
    qa: dict[str, int] = field(default_factory=dict)
    """Pair counters: ``pairs`` written, generation ``tries``, ``verified`` and ``agreed`` pairs."""
    quarantined: int = 0
    """Entries of this job put in the quarantine stream (`producer.quarantine`)."""
    resent: int = 0
    """Rows the collector sent again after they were lost in transit (`workers.stall`)."""
    retried: int = 0
    """Failed rows taken back by ``imageqa retry`` (`producer.retry`), over every retry."""
    types: dict[str, int] = field(default_factory=dict)
    """Written pairs by question type (``QAPair.type``; pairs without one are not counted)."""
    diversity: dict[str, Any] = field(default_factory=dict)
    """Over the written pairs: ``distinct_question_share`` (distinct normalised questions / pairs,
    None before any pair) and ``top_templates`` (``[[template, pairs], ...]``, most used first)."""
    judge_scores: dict[str, int] = field(default_factory=dict)
    """Pairs the judge scored, by score ``"1"`` to ``"5"`` (``--judge``)."""

    @property
    def blind(self) -> dict[str, object]:
        """The blind check: pairs ``checked``, those ``answerable`` without the image, and their share."""
        checked, answerable = self.qa.get("blind_checked", 0), self.qa.get("blind_answerable", 0)
        rate = round(answerable / checked, 4) if checked else None
        return {"checked": checked, "answerable": answerable, "answerable_rate": rate}

    final_output: str = ""
    """The output made from the journal (``output_path``) when the job completes; empty: the
    journal is the output (`producer.outputs`)."""
    final_errors: str = ""
    """Where the errors file is uploaded when the job completes; empty: ``errors_path`` is final."""
    published_at: float | None = None
    """When the final output was written."""
    publish_error: str = ""
    """Why the final output could not be written (the collector tries again)."""

    @property
    def output(self) -> str:
        """Where the job's rows end up."""
        return self.final_output or self.output_path

    @property
    def errors(self) -> str:
        """Where the job's failed rows end up."""
        return self.final_errors or self.errors_path

    @property
    def agreement_rate(self) -> float | None:
        """Share of verified pairs whose answers agreed; None without a verification pass."""
        verified = self.qa.get("verified", 0)
        return round(self.qa.get("agreed", 0) / verified, 4) if verified else None

    @property
    def finished(self) -> bool:
        """Every row is written and, for a final output, that output too (or its failure recorded)."""
        if self.finished_at is None or self.state not in ("done", "cancelled"):
            return False
        return not self.final_output or self.published_at is not None or bool(self.publish_error)

    @property
    def rate_per_s(self) -> float:
        end = self.finished_at or time.time()
        return self.done / (end - self.created_at) if end > self.created_at else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_per_s
        return (self.total - self.done) / rate if rate and not self.finished else None

    def as_dict(self) -> dict[str, object]:
        return {
            **self.__dict__,
            "done": self.done,
            "rate_per_s": round(self.rate_per_s, 3),
            "eta_s": self.eta_s,
            "agreement_rate": self.agreement_rate,
            "blind": self.blind,
            "output": self.output,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class JobConfig:
    """Where the collector writes a job's rows."""

    output_path: str
    errors_path: str
    output_key: str
    registered: bool
    """False for a job the collector adopted: only its results name its items."""
    final_output: str = ""
    """Made from ``output_path`` (the journal) when the job completes (`producer.outputs`)."""
    final_errors: str = ""
    """Where ``errors_path`` is uploaded when the job completes."""
    meta: bool = True
    """The final output keeps each row's ``qa_meta``."""


@dataclass(frozen=True)
class JobSource:
    """How to read a job's input again: what re-sending lost rows and retrying failed ones need."""

    input_path: str | Path | None
    """A local path, or a URL (`producer.sources.location`); None for rows an application gave in
    memory (`producer.enqueue_rows`)."""
    input_format: str | None
    """Reader name (``jsonl``, ...); None: by the file's suffix."""
    media_base: str | Path
    """Relative image paths resolve against this folder (or URL)."""
    image_key: str
    params: GenerationParams
    split: str | None = None
    """The split of a ``save_to_disk`` folder or hub dataset that was read."""
    kept_rows: bool = False
    """Rows given in memory are kept in Redis with the job (`JobRecord.keep_rows`)."""


SendTask = Callable[[str, str, dict[str, object]], None]
"""(task name, queue, kwargs) -> None: sends a Celery task by name."""


class JobRecord:
    """One job's keys in Redis: its hash (settings, output paths, counters), its item set, its done
    set, its restart counts and the collector's write marker.

    Methods that take a ``pipe`` only add their commands to it, so the caller can make them part of
    one MULTI or one round trip with its own commands; the others talk to Redis themselves.
    """

    __slots__ = ("job_id", "key", "r")

    def __init__(self, r: redis.Redis, job_id: str) -> None:
        self.r = r
        self.job_id = job_id
        self.key = constants.job_key(job_id)

    # --- the producer --------------------------------------------------------------------------

    def register(
        self,
        *,
        output_path: str,
        errors_path: str,
        output_key: str,
        input_path: str,
        params_json: str,
        on_done_task: str | None = None,
        on_done_queue: str | None = None,
        final_output: str = "",
        final_errors: str = "",
        meta: bool = True,
    ) -> None:
        """Creates the job, or reopens it for another enqueue pass over the same input.

        An empty ``output_path`` lets the collector pick the journal and errors files in its output
        folder (for a ``final_output`` on object storage); see `producer.outputs`."""
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hsetnx(self.key, constants.JOB_CREATED_AT, now)
        fields: dict[FieldT, EncodableT] = {
            constants.JOB_STATE: "enqueuing",
            constants.JOB_OUTPUT_KEY: output_key,
            constants.JOB_INPUT_PATH: input_path,
            constants.JOB_PARAMS: params_json,
            constants.JOB_ENQUEUE_COMPLETE: 0,
            constants.JOB_META: int(meta),
        }
        if output_path:
            fields |= {constants.JOB_OUTPUT_PATH: output_path, constants.JOB_ERRORS_PATH: errors_path}
        if final_output:
            fields |= {constants.JOB_FINAL_OUTPUT: final_output, constants.JOB_FINAL_ERRORS: final_errors}
        else:
            pipe.hdel(self.key, constants.JOB_FINAL_OUTPUT, constants.JOB_FINAL_ERRORS)
        pipe.hset(self.key, mapping=fields)
        pipe.hdel(self.key, constants.JOB_FINISHED_AT, constants.JOB_CANCELLED)
        if on_done_task:
            pipe.hset(
                self.key,
                mapping={
                    constants.JOB_ON_DONE_TASK: on_done_task,
                    constants.JOB_ON_DONE_QUEUE: on_done_queue or "celery",
                },
            )
        pipe.zadd(constants.JOBS_INDEX, {self.job_id: now}, nx=True)
        pipe.execute()

    def record_source(
        self,
        *,
        input_format: str | None,
        media_base: str,
        image_key: str,
        split: str | None = None,
        kept_rows: bool | None = None,
    ) -> None:
        """Records how the input was read (see `source`), beside the input path `register` recorded.
        ``kept_rows``: the rows were given in memory (no input path), kept in Redis or not."""
        source: dict[str, Any] = {
            "format": input_format,
            "media_base": media_base,
            "image_key": image_key,
            "split": split,
        }
        if kept_rows is not None:
            source["kept_rows"] = kept_rows
        self.r.hset(self.key, constants.JOB_SOURCE, orjson.dumps(source))

    def source(self) -> JobSource | None:
        """How to read the job's input again; None for a job the collector adopted (no input, no
        parameters recorded). A job registered before the source was recorded reads its input by
        suffix, relative images from the input's folder, under the key ``image``."""
        raw: list[bytes | None] = self.r.hmget(
            self.key, [constants.JOB_INPUT_PATH, constants.JOB_PARAMS, constants.JOB_SOURCE]
        )  # type: ignore[assignment]
        input_path, params, source = raw
        if input_path is None or params is None:
            return None
        fields = orjson.loads(source) if source else {}
        path = None if "kept_rows" in fields else location(input_path.decode())
        base = fields.get("media_base")
        if base:
            folder: str | Path = location(base)
        elif path is None:
            folder = Path.cwd()
        else:
            folder = path if isinstance(path, str) or path.is_dir() else path.parent
        return JobSource(
            input_path=path,
            input_format=fields.get("format"),
            media_base=folder,
            image_key=fields.get("image_key") or "image",
            params=GenerationParams.model_validate_json(params),
            split=fields.get("split"),
            kept_rows=bool(fields.get("kept_rows")),
        )

    def keep_rows(self, pipe: redis.client.Pipeline, rows: Mapping[str, tuple[int, Any]]) -> None:
        """Adds to ``pipe``: keep ``rows`` (item id -> (row index, row)) of a job given in memory."""
        if rows:
            pipe.hset(
                constants.job_rows_key(self.job_id),
                mapping={item_id: orjson.dumps(list(row)) for item_id, row in rows.items()},
            )

    def kept_rows(self, count: int = 500) -> Iterator[list[tuple[str, int, Any]]]:
        """The kept rows (see `keep_rows`), in batches of about ``count``: (item id, row index, row)."""
        cursor = 0
        while True:
            reply: Any = self.r.hscan(constants.job_rows_key(self.job_id), cursor, count=count)
            cursor, found = reply
            batch = []
            for item_id, value in found.items():
                index, row = orjson.loads(value)
                batch.append((item_id.decode(), int(index), row))
            if batch:
                yield batch
            if cursor == 0:
                return

    def count_resent(self, rows: int) -> None:
        """Counts ``rows`` more rows sent again after they were lost in transit."""
        self.r.hincrby(self.key, constants.JOB_RESENT, rows)

    def take_for_retry(self, codes_by_item: Mapping[str, str]) -> list[str]:
        """Takes failed rows back for a retry, atomically: each item of ``codes_by_item`` (item id ->
        the error code of its errors-file line) that is done and not already being retried leaves the
        done set and joins the retrying set; ``failed`` and ``failed:<code>`` drop by one, its
        restart count is forgotten and ``retried`` grows. A finished job is reopened (and a cancelled
        one no longer cancelled). Returns the item ids taken, which the caller must send again."""
        if not codes_by_item:
            return []
        keys = [
            self.key,
            constants.job_done_key(self.job_id),
            constants.job_retrying_key(self.job_id),
            constants.job_attempts_key(self.job_id),
        ]
        fields = [
            constants.JOB_FAILED,
            constants.JOB_FAILED_PREFIX,
            constants.JOB_RETRIED,
            constants.JOB_FINISHED_AT,
            constants.JOB_CANCELLED,
            constants.JOB_STATE,
        ]
        items = list(codes_by_item.items())
        taken: list[bytes] = []
        for start in range(0, len(items), 1000):  # a bounded script: Redis serves nobody else meanwhile
            pairs = [value for item in items[start : start + 1000] for value in item]
            taken += self.r.eval(_TAKE_FOR_RETRY, len(keys), *keys, *fields, *pairs)
        return [item.decode() for item in taken]

    def pass_scratch_key(self) -> str:
        """A fresh prefix for the scratch keys of one enqueue pass (the row digests it has seen)."""
        return constants.job_pass_key(self.job_id, uuid.uuid4().hex)

    def add_items(self, pipe: redis.client.Pipeline, item_ids: Collection[str]) -> None:
        """Adds to ``pipe``: record ``item_ids`` as the job's items."""
        pipe.sadd(constants.job_items_key(self.job_id), *item_ids)

    def done_flags(self, pipe: redis.client.Pipeline, item_ids: Collection[str]) -> None:
        """Adds to ``pipe``: whether each of ``item_ids`` is already written (a list of 0 and 1)."""
        pipe.smismember(constants.job_done_key(self.job_id), list(item_ids))

    def item_flags(self, pipe: redis.client.Pipeline, item_ids: Collection[str]) -> None:
        """Adds to ``pipe``: whether each of ``item_ids`` is one of the job's items (a list of 0 and 1)."""
        pipe.smismember(constants.job_items_key(self.job_id), list(item_ids))

    def count_enqueued(self, pipe: redis.client.Pipeline, tasks: int) -> None:
        """Adds to ``pipe``: ``tasks`` more tasks were sent."""
        pipe.hincrby(self.key, constants.JOB_ENQUEUED, tasks)

    def close_enqueue(self, skipped: int) -> None:
        """An enqueue pass sent every row (``skipped`` of them were already written): the job can
        finish once the collector has written the rest."""
        pipe = self.r.pipeline()
        pipe.hincrby(self.key, constants.JOB_SKIPPED, skipped)
        pipe.hset(self.key, mapping={constants.JOB_ENQUEUE_COMPLETE: 1, constants.JOB_STATE: "running"})
        pipe.execute()

    def cancel(self) -> bool:
        """Marks the job cancelled: workers turn its remaining tasks into ``cancelled`` error rows.
        False if there is no such job."""
        if not self.r.exists(self.key):
            return False
        self.r.hset(self.key, mapping={constants.JOB_STATE: "cancelled", constants.JOB_CANCELLED: 1})
        return True

    def reset(self) -> None:
        """Forgets the job's items, written rows, counters and restarts, so that enqueueing it again
        starts it afresh (for output files that are gone)."""
        self.r.delete(
            self.key,
            constants.job_items_key(self.job_id),
            constants.job_done_key(self.job_id),
            constants.job_attempts_key(self.job_id),
            constants.job_retrying_key(self.job_id),
            constants.job_questions_key(self.job_id),
            constants.job_templates_key(self.job_id),
            constants.job_template_gate_key(self.job_id),
            constants.job_rows_key(self.job_id),
        )

    def lost_in_transit(self, status: JobStatus, broker: Celery | str | None = None) -> bool:
        """True when the job (last read as ``status``) was fully enqueued but is not done, while
        nothing is queued, running or uncollected: the missing rows' tasks were lost in transit (see
        `nothing_in_flight`), and enqueueing the same input again sends exactly those rows."""
        if not status.enqueue_complete or status.finished or not nothing_in_flight(self.r, broker):
            return False
        # The collector may have finished the job since ``status`` was read.
        return not self.r.hexists(self.key, constants.JOB_FINISHED_AT)

    # --- the workers ---------------------------------------------------------------------------

    def count_quarantined(self, pipe: redis.client.Pipeline) -> None:
        """Adds to ``pipe``: one more entry of this job went to the quarantine stream."""
        pipe.hincrby(self.key, constants.JOB_QUARANTINED, 1)

    def is_cancelled(self) -> bool:
        return self.r.hget(self.key, constants.JOB_CANCELLED) == b"1"

    def starts_counted(self, item_id: str) -> int:
        """How many starts of ``item_id`` were counted so far (see `count_start`)."""
        return int(self.r.hget(constants.job_attempts_key(self.job_id), item_id) or 0)

    def count_start(self, item_id: str) -> int:
        """Counts one more start of ``item_id`` by a worker; returns how many were counted."""
        return int(self.r.hincrby(constants.job_attempts_key(self.job_id), item_id, 1))

    # --- the collector -------------------------------------------------------------------------

    def config(self) -> JobConfig | None:
        """Where to write the job's rows; None for a job no producer registered."""
        raw: dict[bytes, bytes] = self.r.hgetall(self.key)  # type: ignore[assignment]
        return _config({key.decode(): value.decode() for key, value in raw.items()})

    def adopt(self, output_dir: Path) -> JobConfig:
        """Registers a job first seen by the collector, writing to ``output_dir/<job_id>.jsonl`` (see
        `job_file_stem` for ids that are not plain file names)."""
        safe = job_file_stem(self.job_id)
        fields = {
            constants.JOB_STATE: "running",
            constants.JOB_OUTPUT_PATH: str(output_dir / f"{safe}.jsonl"),
            constants.JOB_ERRORS_PATH: str(output_dir / f"{safe}.errors.jsonl"),
            constants.JOB_OUTPUT_KEY: "qa_pairs",
            constants.JOB_CREATED_AT: str(time.time()),
        }
        pipe = self.r.pipeline()
        for key, value in fields.items():
            pipe.hsetnx(self.key, key, value)
        pipe.zadd(constants.JOBS_INDEX, {self.job_id: time.time()}, nx=True)
        pipe.execute()
        config = self.config() or _config(fields)
        assert config is not None
        return config

    def mark_writing(self, pipe: redis.client.Pipeline, marker: Mapping[FieldT, EncodableT]) -> None:
        """Adds to ``pipe``: set the collector's write marker (what to undo if the write is torn)."""
        pipe.hset(constants.job_writing_key(self.job_id), mapping=marker)

    def read_write_marker(self, pipe: redis.client.Pipeline) -> None:
        """Adds to ``pipe``: read the collector's write marker (a dict, empty if there is none)."""
        pipe.hgetall(constants.job_writing_key(self.job_id))

    def begin_write(self, pipe: redis.client.Pipeline, marker: Mapping[FieldT, EncodableT]) -> None:
        """Adds to ``pipe``: set the collector's write marker to ``marker`` (its ``output_path``,
        ``output_size``, ``errors_path`` and ``errors_size`` the files as they are now) unless the
        current marker records those files smaller than they are, or other files: then the reply is
        the current marker (a flat list, as HGETALL's), untouched, for the caller to undo what Redis
        no longer records before it sets the marker; else the reply is None. One command where a read
        and a write would take two round trips."""
        head = [marker[name] for name in ("output_path", "output_size", "errors_path", "errors_size")]
        rest = [value for pair in marker.items() for value in pair]
        pipe.eval(_BEGIN_WRITE, 1, constants.job_writing_key(self.job_id), *head, *rest)

    def clear_write_marker(self, pipe: redis.client.Pipeline | None = None) -> None:
        """Deletes the write marker, or adds that to ``pipe``."""
        (pipe if pipe is not None else self.r).delete(constants.job_writing_key(self.job_id))

    def record_results(
        self, pipe: redis.client.Pipeline, records: Collection[ResultRecord], *, new_items: bool
    ) -> None:
        """Adds to ``pipe``: ``records`` are written (to the output or the errors file). Puts them in
        the done set (and in the item set if ``new_items``: an adopted job) and counts them: rows
        written and failed, failures by error code, pairs kept and rejected by reason."""
        pipe.sadd(constants.job_done_key(self.job_id), *[rec.item_id for rec in records])
        if new_items:
            pipe.sadd(constants.job_items_key(self.job_id), *[rec.item_id for rec in records])
        failed = sum(1 for rec in records if not rec.ok)
        pipe.hincrby(self.key, constants.JOB_WRITTEN, len(records) - failed)
        pipe.hincrby(self.key, constants.JOB_FAILED, failed)
        for name, count in _counters(records).items():
            pipe.hincrby(self.key, name, count)
        questions = [p.question for rec in records for p in rec.qa_pairs or ()]
        if questions:
            pipe.pfadd(constants.job_questions_key(self.job_id), *{normal_question(q) for q in questions})
            for template, count in Counter(question_template(q) for q in questions).items():
                pipe.zincrby(constants.job_templates_key(self.job_id), count, template)

    def declare_total(self, pipe: redis.client.Pipeline, total: int) -> None:
        """Adds to ``pipe``: an application that enqueues without registering the job says it has
        ``total`` rows, so the job is done once that many distinct items are written. The first
        declaration stands; it also closes the enqueue, as `close_enqueue` does for the producer."""
        pipe.hsetnx(self.key, constants.JOB_DECLARED_TOTAL, total)
        pipe.hset(self.key, constants.JOB_ENQUEUE_COMPLETE, 1)

    def retrying_flags(self, pipe: redis.client.Pipeline, item_ids: Collection[str]) -> None:
        """Adds to ``pipe``: whether each of ``item_ids`` was taken back by a retry (a list of 0 and 1),
        so that its old errors-file line goes when its new result is written."""
        pipe.smismember(constants.job_retrying_key(self.job_id), list(item_ids))

    def clear_retrying(self, pipe: redis.client.Pipeline, item_ids: Collection[str]) -> None:
        """Adds to ``pipe``: the retries of ``item_ids`` are written."""
        pipe.srem(constants.job_retrying_key(self.job_id), *item_ids)

    def read_completion(self, pipe: redis.client.Pipeline) -> None:
        """Adds to ``pipe`` the three reads `finish_if_complete` judges by (so that the collector makes
        them part of its commit instead of another round trip)."""
        pipe.hmget(self.key, [constants.JOB_ENQUEUE_COMPLETE, constants.JOB_DECLARED_TOTAL])
        pipe.scard(constants.job_items_key(self.job_id))
        pipe.scard(constants.job_done_key(self.job_id))

    def finish_if_complete(
        self, send_task: SendTask | None = None, completion: Sequence[Any] | None = None
    ) -> bool:
        """Marks the job done when enqueueing is over and every item is written (as many as the
        declared total, if there is one: `declare_total`); True if it is done.

        Called by the collector after each batch and by the producer after enqueueing; idempotent.
        When the job finishes it announces it on its pub/sub channel and, if the enqueuer named one,
        sends the Celery task ``on_done_task`` with the job's figures. ``completion``: the replies of
        `read_completion`, if the caller read them already.
        """
        if completion is None:
            pipe = self.r.pipeline()
            self.read_completion(pipe)
            completion = pipe.execute()
        (complete, declared), total, done = completion
        if complete != b"1" or done < max(total, int(declared or 0)):
            return False
        keys = [self.key, constants.PUBLISH_PENDING]
        args = [
            constants.JOB_FINISHED_AT,
            time.time(),
            constants.JOB_FINAL_OUTPUT,
            constants.JOB_PUBLISHED_AT,
            constants.JOB_PUBLISH_ERROR,
            self.job_id,
        ]
        finished = int(self.r.eval(_FINISH, len(keys), *keys, *args))  # type: ignore[arg-type]
        if finished:
            if self.r.hget(self.key, constants.JOB_CANCELLED) != b"1":
                self.r.hset(self.key, constants.JOB_STATE, "done")
            if finished == 1:  # else it is announced once its final output is written
                self.announce(send_task)
        return True

    def announce(self, send_task: SendTask | None = None) -> None:
        """Announces that the job finished on its pub/sub channel and, if the enqueuer named one,
        sends the Celery task ``on_done_task`` with the job's figures."""
        status = job_status(self.r, self.job_id)
        assert status is not None
        event = {
            "job_id": self.job_id,
            "event": "finished",
            "state": status.state,
            "written": status.written,
            "failed": status.failed,
            "output_path": status.output,
            "errors_path": status.errors,
        }
        if status.publish_error:
            event["output_error"] = status.publish_error
        self.r.publish(constants.job_events_channel(self.job_id), orjson.dumps(event))
        callback: list[bytes | None] = self.r.hmget(
            self.key, [constants.JOB_ON_DONE_TASK, constants.JOB_ON_DONE_QUEUE]
        )  # type: ignore[assignment]
        if callback[0] and send_task is not None:
            send_task(callback[0].decode(), (callback[1] or b"celery").decode(), event)

    def mark_published(self, error: str = "") -> None:
        """Records that the final output was written (and leaves the pending set), or why not (and
        stays there, to be tried again)."""
        pipe = self.r.pipeline()
        if error:
            pipe.hset(self.key, constants.JOB_PUBLISH_ERROR, error)
        else:
            pipe.hset(self.key, constants.JOB_PUBLISHED_AT, time.time())
            pipe.hdel(self.key, constants.JOB_PUBLISH_ERROR)
            pipe.srem(constants.PUBLISH_PENDING, self.job_id)
        pipe.execute()

    def publish_failed_before(self) -> bool:
        """True if an earlier attempt to write the final output failed."""
        return bool(self.r.hexists(self.key, constants.JOB_PUBLISH_ERROR))


_TAKE_FOR_RETRY = """
local job, done, retrying, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local failed, failed_prefix, retried, finished_at, cancelled, state = unpack(ARGV, 1, 6)
local taken = {}
for i = 7, #ARGV, 2 do
  local item, code = ARGV[i], ARGV[i + 1]
  if redis.call('SISMEMBER', retrying, item) == 0 and redis.call('SREM', done, item) == 1 then
    redis.call('SADD', retrying, item)
    redis.call('HINCRBY', job, failed, -1)
    if redis.call('HINCRBY', job, failed_prefix .. code, -1) <= 0 then
      redis.call('HDEL', job, failed_prefix .. code)
    end
    redis.call('HDEL', attempts, item)
    taken[#taken + 1] = item
  end
end
if #taken > 0 then
  redis.call('HINCRBY', job, retried, #taken)
  redis.call('HDEL', job, finished_at, cancelled)
  if redis.call('HGET', job, state) ~= 'enqueuing' then
    redis.call('HSET', job, state, 'running')
  end
end
return taken
"""
"""Lua for `JobRecord.take_for_retry`: KEYS job hash, done set, retrying set, restart counts; ARGV the
hash's field names, then item id, error code pairs."""


_FINISH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then return 1 end
redis.call('HDEL', KEYS[1], ARGV[4], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[6])
return 2
"""
"""Lua for `JobRecord.finish_if_complete`: KEYS job hash, pending-publication set; ARGV the finished
field and time, the final-output, published and publish-error fields, the job id. Returns 0 (already
finished), 1 (finished) or 2 (finished, its final output now to be written: marked pending, with
no trace of an earlier one, atomically, so no reader sees the old output as this one)."""


def pending_publications(r: redis.Redis) -> list[str]:
    """The jobs that are complete but whose final output is not written yet."""
    ids: set[bytes] = r.smembers(constants.PUBLISH_PENDING)  # type: ignore[assignment]
    return sorted(job_id.decode() for job_id in ids)


_BEGIN_WRITE = """
local m = redis.call('HMGET', KEYS[1], 'output_path', 'output_size', 'errors_path', 'errors_size')
for i = 0, 1 do
  local path, size = m[1 + 2 * i], m[2 + 2 * i]
  if path and size and tonumber(size) >= 0 then
    if path ~= ARGV[1 + 2 * i] or tonumber(ARGV[2 + 2 * i]) > tonumber(size) then
      return redis.call('HGETALL', KEYS[1])
    end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
return false
"""
"""Lua for `JobRecord.begin_write`: KEYS the write marker; ARGV the output path and size, the errors
path and size, then the new marker's field, value pairs. Sent with EVAL (Redis keeps it compiled):
EVALSHA in a pipeline would cost a SCRIPT EXISTS round trip per pipeline."""


def job_file_stem(job_id: str) -> str:
    """The stem of a job's file names (``<stem>.jsonl``, ``<stem>.errors.jsonl``), one no other job id
    gets: the id itself when it is only ASCII letters, digits, ``-``, ``_`` and ``.``, else those
    characters (others replaced by ``_``) plus ``~`` and a hash of the id. No id of the first kind holds
    ``~``, so ``a/b`` and ``a:b`` never share ``a_b``'s file; nor ends in ``.errors``, so job ``x.errors``
    never writes into job ``x``'s errors file."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in job_id)
    if safe == job_id and len(job_id) <= 200 and not job_id.endswith(".errors"):
        return job_id
    return f"{safe[:64]}~{hashlib.sha256(job_id.encode()).hexdigest()[:32]}"


def _config(h: dict[str, str]) -> JobConfig | None:
    if constants.JOB_OUTPUT_PATH not in h:
        return None
    return JobConfig(
        output_path=h[constants.JOB_OUTPUT_PATH],
        errors_path=h[constants.JOB_ERRORS_PATH],
        output_key=h.get(constants.JOB_OUTPUT_KEY, "qa_pairs"),
        registered=constants.JOB_INPUT_PATH in h,
        final_output=h.get(constants.JOB_FINAL_OUTPUT, ""),
        final_errors=h.get(constants.JOB_FINAL_ERRORS, ""),
        meta=h.get(constants.JOB_META, "1") == "1",
    )


def _counters(records: Collection[ResultRecord]) -> Counter[str]:
    """Job counters of failures by error code, and of pair quality: pairs written, generation tries,
    rejected pairs by reason and the verification pass."""
    counts: Counter[str] = Counter()
    for rec in records:
        if rec.error is not None:
            counts[constants.JOB_FAILED_PREFIX + rec.error.code] += 1
        counts[constants.JOB_QA_PREFIX + "pairs"] += len(rec.qa_pairs or ())
        counts.update(constants.JOB_TYPE_PREFIX + p.type for p in rec.qa_pairs or () if p.type)
        if rec.qa_stats is not None:
            counts[constants.JOB_QA_PREFIX + "tries"] += rec.qa_stats.tries
            counts[constants.JOB_QA_PREFIX + "verified"] += rec.qa_stats.verified
            counts[constants.JOB_QA_PREFIX + "agreed"] += rec.qa_stats.agreed
            counts[constants.JOB_QA_PREFIX + "blind_checked"] += rec.qa_stats.blind_checked
            counts[constants.JOB_QA_PREFIX + "blind_answerable"] += rec.qa_stats.blind_answerable
            counts.update(
                {constants.JOB_JUDGE_PREFIX + score: n for score, n in rec.qa_stats.judge_scores.items()}
            )
            counts.update(
                {constants.JOB_REJECTED_PREFIX + reason: n for reason, n in rec.qa_stats.rejected.items()}
            )
    return +counts  # drops zero counts


def job_status(r: redis.Redis, job_id: str) -> JobStatus | None:
    """The job's progress and figures; None if there is no such job."""
    pipe = r.pipeline()
    pipe.hgetall(constants.job_key(job_id))
    pipe.scard(constants.job_items_key(job_id))
    pipe.pfcount(constants.job_questions_key(job_id))
    pipe.zrevrange(constants.job_templates_key(job_id), 0, TOP_TEMPLATES - 1, withscores=True)
    raw, total, distinct, templates = pipe.execute()
    if not raw:
        return None
    h = {key.decode(): value.decode() for key, value in raw.items()}
    pairs = int(h.get(constants.JOB_QA_PREFIX + "pairs", 0))
    return JobStatus(
        job_id=job_id,
        state=h.get(constants.JOB_STATE, "unknown"),
        total=max(int(total), int(h.get(constants.JOB_DECLARED_TOTAL, 0))),
        written=int(h.get(constants.JOB_WRITTEN, 0)),
        failed=int(h.get(constants.JOB_FAILED, 0)),
        enqueued=int(h.get(constants.JOB_ENQUEUED, 0)),
        skipped=int(h.get(constants.JOB_SKIPPED, 0)),
        enqueue_complete=h.get(constants.JOB_ENQUEUE_COMPLETE) == "1",
        output_path=h.get(constants.JOB_OUTPUT_PATH, ""),
        errors_path=h.get(constants.JOB_ERRORS_PATH, ""),
        output_key=h.get(constants.JOB_OUTPUT_KEY, "qa_pairs"),
        created_at=float(h.get(constants.JOB_CREATED_AT, 0)),
        finished_at=float(h[constants.JOB_FINISHED_AT]) if constants.JOB_FINISHED_AT in h else None,
        failures=_prefixed(h, constants.JOB_FAILED_PREFIX),
        rejected=_prefixed(h, constants.JOB_REJECTED_PREFIX),
        qa=_prefixed(h, constants.JOB_QA_PREFIX),
        quarantined=int(h.get(constants.JOB_QUARANTINED, 0)),
        resent=int(h.get(constants.JOB_RESENT, 0)),
        retried=int(h.get(constants.JOB_RETRIED, 0)),
        types=_prefixed(h, constants.JOB_TYPE_PREFIX),
        diversity={
            "distinct_question_share": round(min(1.0, distinct / pairs), 4) if pairs else None,
            "top_templates": [[t.decode(), int(n)] for t, n in templates],
        },
        judge_scores=_prefixed(h, constants.JOB_JUDGE_PREFIX),
        final_output=h.get(constants.JOB_FINAL_OUTPUT, ""),
        final_errors=h.get(constants.JOB_FINAL_ERRORS, ""),
        published_at=float(h[constants.JOB_PUBLISHED_AT]) if constants.JOB_PUBLISHED_AT in h else None,
        publish_error=h.get(constants.JOB_PUBLISH_ERROR, ""),
    )


def _prefixed(h: dict[str, str], prefix: str) -> dict[str, int]:
    return {key.removeprefix(prefix): int(v) for key, v in h.items() if key.startswith(prefix)}


def list_jobs(r: redis.Redis, limit: int = 50) -> list[str]:
    ids: list[bytes] = r.zrevrange(constants.JOBS_INDEX, 0, limit - 1)  # type: ignore[assignment]
    return [j.decode() for j in ids]


def job_writing(r: redis.Redis, output_path: str) -> str | None:
    """The newest job whose output file is ``output_path`` (an absolute path), or None."""
    job_ids: list[bytes] = r.zrevrange(constants.JOBS_INDEX, 0, -1)  # type: ignore[assignment]
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hget(constants.job_key(job_id.decode()), constants.JOB_OUTPUT_PATH)
    for job_id, path in zip(job_ids, pipe.execute(), strict=True):
        if path is not None and path.decode() == output_path:
            return job_id.decode()
    return None


def unfinished_jobs(r: redis.Redis) -> list[str]:
    """The ids of the jobs not marked finished, in one round trip after the index."""
    job_ids: list[bytes] = r.zrange(constants.JOBS_INDEX, 0, -1)  # type: ignore[assignment]
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hexists(constants.job_key(job_id.decode()), constants.JOB_FINISHED_AT)
    return [job_id.decode() for job_id, done in zip(job_ids, pipe.execute(), strict=True) if not done]


_MARKER_HEAD, _, _MARKER_TAIL = constants.job_writing_key("*").partition("*")


def write_markers(r: redis.Redis) -> Iterator[tuple[JobRecord, dict[str, str]]]:
    """Every job with a collector's write marker, and the marker."""
    for key in r.scan_iter(match=constants.job_writing_key("*"), count=1000):
        raw: dict[bytes, bytes] = r.hgetall(key)  # type: ignore[assignment]
        if raw:
            job_id = key.decode().removeprefix(_MARKER_HEAD).removesuffix(_MARKER_TAIL)
            yield JobRecord(r, job_id), {a.decode(): b.decode() for a, b in raw.items()}


def nothing_in_flight(r: redis.Redis, broker: Celery | str | None = None) -> bool:
    """True when no task is queued or running and no result waits for the collector.

    ``broker`` is the Celery app or broker URL of the tasks (default: the Redis of ``r``). A job that
    is not finished while this holds has lost tasks in transit: Kombu's Redis transport pops a message
    before it records it as unacknowledged, so a worker killed in that instant takes the message with
    it. Enqueueing the same input again sends exactly the missing rows. RabbitMQ does not say how many
    tasks are taken (see `producer.broker.QueueDepth`), so on it this is never true; it loses no task
    that way either.
    """
    depth = queue_depth(broker or r)
    if depth.waiting or depth.unacked is None or depth.unacked:
        return False
    if not r.exists(constants.RESULTS_STREAM):
        return True
    try:
        groups: Any = r.xinfo_groups(constants.RESULTS_STREAM)
    except redis.ResponseError:
        return True
    return all(not (g.get("lag") or g.get("pending")) for g in groups)
