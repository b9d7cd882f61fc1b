"""The collector's stall watch: a job that lost rows in transit is sent them again, with nobody waiting.

Kombu's Redis transport pops a message before it records it as unacknowledged, so a worker killed (or
a Redis stopped) in that instant loses the message outright. Such a job is fully enqueued and not
finished, while nothing is queued, running or uncollected (`JobRecord.lost_in_transit`). ``imageqa
run`` sends the missing rows again itself; a job fed by ``imageqa enqueue`` or the DataFlow cluster
serving has only the collector, which always runs, so the collector watches for it:

- every ``stall_check_s`` (10 s) it asks Redis whether anything is in flight at all (three commands);
- a job seen lost in transit, with the same number of rows done, at two checks at least
  ``stall_grace_s`` (30 s) apart is stalled: the collector sends exactly its missing rows again
  (`producer.resend.resend_missing`) in a thread of its own, so its write loop goes on.

"Nothing in flight" is global: Redis cannot tell cheaply which job a queued or unacknowledged message
belongs to, so a stall is noticed once the whole cluster is idle (its queue drained and its results
collected), not while other jobs keep the workers busy. Jobs adopted from other applications have no
recorded input and are never re-sent (their ``enqueue_complete`` is never set, so they never count as
stalled): their application must send lost rows again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from celery import Celery

from producer import jobs
from producer.errors import ImageQAError
from producer.jobs import JobRecord, job_status, nothing_in_flight
from producer.resend import resend_missing

log = logging.getLogger(__name__)


RETRY_AFTER_FAILURE_S = 300.0
"""A re-send that failed (the input is gone, or not visible on the collector's host) is tried again
after this long, not at every check."""


@dataclass(frozen=True)
class _Suspect:
    since: float
    """When the job was first seen lost in transit (monotonic seconds)."""
    done: int
    """Its rows done then; any progress clears the suspicion."""


class StallWatch:
    """Called from the collector's loop (`maybe_check`); re-sends stalled jobs' rows in threads."""

    def __init__(
        self, r: redis.Redis, celery: Callable[[], Celery], *, check_s: float = 10.0, grace_s: float = 30.0
    ) -> None:
        self.r = r
        self.celery = celery
        self.check_s = check_s
        self.grace_s = grace_s
        self.stop = threading.Event()
        self._last_check = time.monotonic()
        self._suspects: dict[str, _Suspect] = {}
        self._resending: dict[str, threading.Thread] = {}
        self._failed_at: dict[str, float] = {}

    def maybe_check(self) -> None:
        """Runs `check` when ``check_s`` has passed since the last one (never if ``check_s`` is 0)."""
        if not self.check_s or time.monotonic() - self._last_check < self.check_s:
            return
        self._last_check = time.monotonic()
        self.check()

    def check(self) -> list[str]:
        """Looks for stalled jobs and starts re-sending the rows of each; returns their ids."""
        self._resending = {j: t for j, t in self._resending.items() if t.is_alive()}
        if not nothing_in_flight(self.r, self.celery()):
            self._suspects.clear()
            return []
        now = time.monotonic()
        seen: dict[str, _Suspect] = {}
        stalled = []
        for job_id in jobs.unfinished_jobs(self.r):
            failed_at = self._failed_at.get(job_id, float("-inf"))
            if job_id in self._resending or now - failed_at < RETRY_AFTER_FAILURE_S:
                continue
            status = job_status(self.r, job_id)
            if status is None or not JobRecord(self.r, job_id).lost_in_transit(status, self.celery()):
                continue
            before = self._suspects.get(job_id)
            if before is None or before.done != status.done:
                seen[job_id] = _Suspect(now, status.done)
            elif now - before.since >= self.grace_s:
                stalled.append(job_id)
            else:
                seen[job_id] = before
        self._suspects = seen
        for job_id in stalled:
            log.warning(
                "job %s: rows missing, nothing in flight for %.0f s (lost in transit): sending them again",
                job_id,
                self.grace_s,
            )
            thread = threading.Thread(
                target=self._resend, args=(job_id,), name=f"resend-{job_id}", daemon=True
            )
            self._resending[job_id] = thread
            thread.start()
        return stalled

    def join(self, timeout_s: float | None = None) -> None:
        """Waits for the re-sends under way (after `stop` is set they end at their next batch)."""
        for thread in list(self._resending.values()):
            thread.join(timeout_s)

    def _resend(self, job_id: str) -> None:
        try:
            # Checked again: `imageqa run` or a rerun of `imageqa enqueue` may have sent them since.
            status = job_status(self.r, job_id)
            if status is None or not JobRecord(self.r, job_id).lost_in_transit(status, self.celery()):
                return
            sent = resend_missing(self.celery(), self.r, job_id, self.stop)
            log.warning("job %s: %d rows sent again", job_id, sent)
        except ImageQAError as e:  # no input to send them from: say why, without a traceback
            self._failed_at[job_id] = time.monotonic()
            log.warning("job %s: rows missing, and %s", job_id, e.message)
        except Exception:
            self._failed_at[job_id] = time.monotonic()
            log.exception(
                "job %s: sending its missing rows again failed; trying again in %.0f s",
                job_id,
                RETRY_AFTER_FAILURE_S,
            )
