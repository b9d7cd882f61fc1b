"""``imageqa retry``: send a job's failed rows again, so that those that now succeed join the output.

The rows come from the job's errors file (each line holds the row, its item id and its error code);
`JobRecord.take_for_retry` takes them back in Redis atomically (out of the done set, failure counters
down, into the retrying set); then one task per row is sent from the row as the errors file holds it.
When a retried row's new result arrives, the collector removes the row's old errors-file line and
writes the new one (output or errors), so each row is still in exactly one file, once.

A retry that dies after taking the rows back and before sending them leaves them missing with nothing
in flight: the collector's stall watch (`workers.stall`) sends them again from the input.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import orjson
import redis
from celery import Celery

from producer.errors import TRANSIENT, ErrorCode, ImageQAError
from producer.inputs import RawRow
from producer.jobs import JobRecord, job_status
from producer.resend import job_source, send_rows

log = logging.getLogger(__name__)

CANCEL_FLAG_WAIT_S = 1.0
"""Pause before sending the rows of a cancelled job again: longer than workers cache its cancel flag."""


@dataclass(frozen=True)
class RetrySummary:
    job_id: str
    retried: int
    """Rows sent again."""
    by_code: dict[str, int]
    """Rows sent again by the error code they had."""


@dataclass(frozen=True)
class FailedRow:
    """One line of an errors file."""

    raw: RawRow
    item_id: str
    code: str


def retry_job(
    app: Celery, r: redis.Redis, job_id: str, codes: Collection[ErrorCode] = TRANSIENT
) -> RetrySummary:
    """Sends again the job's failed rows whose error code is in ``codes`` (default: `TRANSIENT`).

    Raises `ImageQAError` when there is no such job, when the collector adopted it (no parameters
    recorded) or when its errors file cannot be read. Rows being retried already are left alone.
    """
    status = job_status(r, job_id)
    if status is None:
        raise ImageQAError(f"no job {job_id!r}")
    job = JobRecord(r, job_id)
    source = job_source(job)
    errors_path = Path(status.errors_path)
    if status.failed and not errors_path.exists():
        raise ImageQAError(
            f"job {job_id} has {status.failed} failed rows but its errors file {errors_path} is not "
            "here: run the retry where the collector's files are visible"
        )
    wanted = {str(code) for code in codes}
    rows = {row.item_id: row for row in failed_rows(errors_path) if row.code in wanted}
    taken = job.take_for_retry({item_id: row.code for item_id, row in rows.items()})
    if taken and status.state == "cancelled":
        # Workers cache a job's cancel flag for half a second (`workers.tasks.CancelFlags`): sent at
        # once, the rows could meet the flag just cleared and be cancelled again.
        time.sleep(CANCEL_FLAG_WAIT_S)
    send_rows(app, r, job, source, ((rows[item_id].raw, item_id) for item_id in taken))
    by_code = Counter(rows[item_id].code for item_id in taken)
    log.info("job %s: %d failed rows sent again (%s)", job_id, len(taken), dict(by_code))
    return RetrySummary(job_id=job_id, retried=len(taken), by_code=dict(by_code))


def failed_rows(errors_path: Path) -> list[FailedRow]:
    """The rows of an errors file (empty if there is none). A line that does not parse (the tail of a
    batch the collector is writing, not yet recorded) is skipped; so is a line without an item id."""
    try:
        data = errors_path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ImageQAError(f"cannot read the errors file {errors_path}: {e}") from e
    rows = []
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
            rows.append(
                FailedRow(
                    raw=RawRow(int(entry["row_index"]), entry["row"]),
                    item_id=str(entry["item_id"]),
                    code=str(entry["error"]["code"]),
                )
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return rows
