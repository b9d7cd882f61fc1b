"""The job registry in Redis: one hash per job with its outputs and counters, plus item sets."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from celery import Celery

from producer import constants as k
from producer.broker import queue_depth


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

    @property
    def agreement_rate(self) -> float | None:
        """Share of verified pairs whose answers agreed; None without a verification pass."""
        verified = self.qa.get("verified", 0)
        return round(self.qa.get("agreed", 0) / verified, 4) if verified else None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None and self.state in ("done", "cancelled")

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
        }


def register_job(
    r: redis.Redis,
    job_id: str,
    *,
    output_path: str,
    errors_path: str,
    output_key: str,
    input_path: str,
    params_json: str,
    on_done_task: str | None = None,
    on_done_queue: str | None = None,
) -> None:
    """Creates the job, or reopens it for another enqueue pass over the same input."""
    now = time.time()
    pipe = r.pipeline()
    pipe.hsetnx(k.job_key(job_id), "created_at", now)
    pipe.hset(
        k.job_key(job_id),
        mapping={
            "state": "enqueuing",
            "output_path": output_path,
            "errors_path": errors_path,
            "output_key": output_key,
            "input_path": input_path,
            "params": params_json,
            "enqueue_complete": 0,
        },
    )
    pipe.hdel(k.job_key(job_id), "finished_at", "cancelled")
    if on_done_task:
        pipe.hset(
            k.job_key(job_id),
            mapping={"on_done_task": on_done_task, "on_done_queue": on_done_queue or "celery"},
        )
    pipe.zadd(k.JOBS_INDEX, {job_id: now}, nx=True)
    pipe.execute()


def adopt_job(r: redis.Redis, job_id: str, output_dir: Path) -> dict[str, str]:
    """Registers a job first seen by the collector, writing to ``output_dir/<job_id>.jsonl``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in job_id)
    fields = {
        "state": "running",
        "output_path": str(output_dir / f"{safe}.jsonl"),
        "errors_path": str(output_dir / f"{safe}.errors.jsonl"),
        "output_key": "qa_pairs",
        "created_at": str(time.time()),
    }
    pipe = r.pipeline()
    for key, value in fields.items():
        pipe.hsetnx(k.job_key(job_id), key, value)
    pipe.zadd(k.JOBS_INDEX, {job_id: time.time()}, nx=True)
    pipe.execute()
    return job_config(r, job_id) or fields


def job_config(r: redis.Redis, job_id: str) -> dict[str, str] | None:
    raw: dict[bytes, bytes] = r.hgetall(k.job_key(job_id))  # type: ignore[assignment]
    if not raw:
        return None
    return {key.decode(): value.decode() for key, value in raw.items()}


def job_status(r: redis.Redis, job_id: str) -> JobStatus | None:
    pipe = r.pipeline()
    pipe.hgetall(k.job_key(job_id))
    pipe.scard(k.job_items_key(job_id))
    raw, total = pipe.execute()
    if not raw:
        return None
    h = {key.decode(): value.decode() for key, value in raw.items()}
    return JobStatus(
        job_id=job_id,
        state=h.get("state", "unknown"),
        total=int(total),
        written=int(h.get("written", 0)),
        failed=int(h.get("failed", 0)),
        enqueued=int(h.get("enqueued", 0)),
        skipped=int(h.get("skipped", 0)),
        enqueue_complete=h.get("enqueue_complete") == "1",
        output_path=h.get("output_path", ""),
        errors_path=h.get("errors_path", ""),
        output_key=h.get("output_key", "qa_pairs"),
        created_at=float(h.get("created_at", 0)),
        finished_at=float(h["finished_at"]) if "finished_at" in h else None,
        failures={key[7:]: int(v) for key, v in h.items() if key.startswith("failed:")},
        rejected={key[9:]: int(v) for key, v in h.items() if key.startswith("rejected:")},
        qa={key[3:]: int(v) for key, v in h.items() if key.startswith("qa:")},
    )


def list_jobs(r: redis.Redis, limit: int = 50) -> list[str]:
    ids: list[bytes] = r.zrevrange(k.JOBS_INDEX, 0, limit - 1)  # type: ignore[assignment]
    return [j.decode() for j in ids]


SendTask = Callable[[str, str, dict[str, object]], None]
"""(task name, queue, kwargs) -> None: sends a Celery task by name."""


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
    if not r.exists(k.RESULTS_STREAM):
        return True
    try:
        groups: Any = r.xinfo_groups(k.RESULTS_STREAM)
    except redis.ResponseError:
        return True
    return all(not (g.get("lag") or g.get("pending")) for g in groups)


def cancel_job(r: redis.Redis, job_id: str) -> bool:
    """Marks the job cancelled: workers turn its remaining tasks into ``cancelled`` error rows."""
    if not r.exists(k.job_key(job_id)):
        return False
    r.hset(k.job_key(job_id), mapping={"state": "cancelled", "cancelled": 1})
    return True


def finish_if_complete(r: redis.Redis, job_id: str, send_task: SendTask | None = None) -> bool:
    """Marks the job done when enqueueing is over and every item is written; True if it is done.

    Called by the collector after each batch and by the producer after enqueueing; idempotent. When
    the job finishes it announces it on its pub/sub channel and, if the enqueuer named one, sends the
    Celery task ``on_done_task`` with the job's figures.
    """
    pipe = r.pipeline()
    pipe.hget(k.job_key(job_id), "enqueue_complete")
    pipe.scard(k.job_items_key(job_id))
    pipe.scard(k.job_done_key(job_id))
    complete, total, done = pipe.execute()
    if complete != b"1" or done < total:
        return False
    if r.hsetnx(k.job_key(job_id), "finished_at", time.time()):
        if r.hget(k.job_key(job_id), "cancelled") != b"1":
            r.hset(k.job_key(job_id), "state", "done")
        status = job_status(r, job_id)
        assert status is not None
        event = {
            "job_id": job_id,
            "event": "finished",
            "state": status.state,
            "written": status.written,
            "failed": status.failed,
            "output_path": status.output_path,
            "errors_path": status.errors_path,
        }
        r.publish(k.job_events_channel(job_id), orjson.dumps(event))
        callback: list[bytes | None] = r.hmget(k.job_key(job_id), ["on_done_task", "on_done_queue"])  # type: ignore[assignment]
        if callback[0] and send_task is not None:
            send_task(callback[0].decode(), (callback[1] or b"celery").decode(), event)
    return True
