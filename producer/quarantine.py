"""The quarantine: what a worker or the collector received but could not use, kept instead of dropped.

A results-stream entry the collector cannot decode (written by a newer worker, or by a bug) and a task
message a worker cannot turn into a row (it names no job and item) go to the Redis Stream
`QUARANTINE_STREAM` with the reason, the job id when it can be recovered and the raw message (its
first `RAW_MAX_BYTES`). The stream keeps about `QUARANTINE_MAXLEN` of the newest entries; a counter
keeps the total, and the job's hash counts its own (`JobRecord.count_quarantined`).
``imageqa quarantine`` lists the entries, ``imageqa status`` counts them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis

from producer import constants
from producer.errors import ErrorCode
from producer.jobs import JobRecord

log = logging.getLogger(__name__)

RAW_MAX_BYTES = 64 * 1024
"""Bytes of the raw message an entry keeps; the rest is cut (``raw_bytes`` gives the full size), so
that a flood of huge messages cannot fill Redis's memory."""

Source = Literal["task", "result"]
"""Where a quarantined entry came from: a task message (worker) or a results-stream entry (collector)."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined message, as ``imageqa quarantine`` shows it."""

    entry_id: str
    """Its id in the quarantine stream (which gives the time it was quarantined)."""
    source: str
    code: str
    """The `ErrorCode` of the reason: ``message_invalid`` or ``message_too_large``."""
    reason: str
    job_id: str | None
    """The job the message names, if that could be read from it."""
    ref: str
    """The task id of a task message, the stream entry id of a result entry."""
    origin: str
    """The worker or collector that quarantined it."""
    at: float
    """When it was quarantined, Unix time in seconds."""
    raw_bytes: int
    """Size of the whole raw message."""
    raw: bytes
    """The raw message, cut after `RAW_MAX_BYTES`."""

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "raw": self.raw.decode("utf-8", "replace"), "truncated": self.truncated}

    @property
    def truncated(self) -> bool:
        return len(self.raw) < self.raw_bytes


def quarantine(
    pipe: redis.client.Pipeline,
    *,
    source: Source,
    code: ErrorCode,
    reason: str,
    raw: bytes,
    ref: str,
    origin: str,
    job_id: str | None = None,
) -> None:
    """Adds to ``pipe``: put one message in the quarantine stream, count it (in all and for its job)
    and log it. The caller acknowledges the message only once ``pipe`` has run, in the same
    transaction when it can, so that a crash in between loses nothing."""
    pipe.xadd(
        constants.QUARANTINE_STREAM,
        {
            b"source": source,
            b"code": str(code),
            b"reason": reason,
            b"job_id": job_id or "",
            b"ref": ref,
            b"origin": origin,
            b"t": repr(time.time()),
            b"raw_bytes": len(raw),
            b"raw": raw[:RAW_MAX_BYTES],
        },
        maxlen=constants.QUARANTINE_MAXLEN,
        approximate=True,
    )
    pipe.incr(constants.QUARANTINE_COUNT)
    if job_id:
        JobRecord(pipe, job_id).count_quarantined(pipe)
    log.error("quarantining a %s (%s, job %s): %s", source, ref, job_id or "unknown", reason)


def quarantined_total(r: redis.Redis) -> int:
    """Entries ever quarantined (more than `list_quarantined` can show once the stream is trimmed)."""
    return int(r.get(constants.QUARANTINE_COUNT) or 0)


def list_quarantined(r: redis.Redis, limit: int = 20, job_id: str | None = None) -> list[QuarantineEntry]:
    """The newest ``limit`` entries, newest first; only ``job_id``'s if given (scanning at most the
    newest ten thousand entries for them)."""
    count = limit if job_id is None else max(limit, 10_000)
    raw: Any = r.xrevrange(constants.QUARANTINE_STREAM, count=count)
    entries = [_entry(entry_id, fields) for entry_id, fields in raw]
    if job_id is not None:
        entries = [e for e in entries if e.job_id == job_id]
    return entries[:limit]


def recover_job_id(raw: bytes) -> str | None:
    """The ``job_id`` of an undecodable record, if it is at least a JSON object that names one."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    job_id = value.get("job_id") if isinstance(value, dict) else None
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= 128 else None


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> QuarantineEntry:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    return QuarantineEntry(
        entry_id=entry_id.decode(),
        source=text(b"source"),
        code=text(b"code"),
        reason=text(b"reason"),
        job_id=text(b"job_id") or None,
        ref=text(b"ref"),
        origin=text(b"origin"),
        at=float(text(b"t") or 0),
        raw_bytes=int(text(b"raw_bytes") or 0),
        raw=fields.get(b"raw", b""),
    )
