"""Waiting for a job to finish: the one loop behind ``imageqa status --wait``, ``imageqa run``, the
DataFlow cluster serving and the tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from celery import Celery

from producer.errors import ImageQAError
from producer.jobs import JobRecord, JobStatus, job_status

log = logging.getLogger(__name__)


def wait_for_job(
    r: redis.Redis,
    job_id: str,
    *,
    poll_s: float = 0.25,
    on_progress: Callable[[JobStatus], object] | None = None,
    timeout_s: float | None = None,
    stall_timeout_s: float | None = None,
    stall_warning_s: float | None = None,
    alive: Callable[[], bool] | None = None,
    resend: Callable[[JobStatus], object] | None = None,
    resend_after_s: float = 10.0,
    broker: Celery | str | None = None,
) -> JobStatus:
    """Polls the job every ``poll_s`` until it is finished (done or cancelled) and returns its status.

    ``on_progress`` receives every status read (to draw a progress bar). The wait ends with
    `ImageQAError` when the job is not in Redis, when ``alive`` (say, "is the worker running?") returns
    False, after ``timeout_s`` in all or when no row has finished for ``stall_timeout_s``; the job
    itself goes on. ``stall_warning_s`` only logs a warning, once.

    ``resend`` is the delivery guarantee's last step: it is called with the status when the job has
    lost rows in transit (`JobRecord.lost_in_transit`) for ``resend_after_s`` in a row, and should
    enqueue the same input again, which sends exactly the missing rows. ``broker`` is the tasks'
    broker (a Celery app or URL) when it is not the Redis of ``r``.
    """
    job = JobRecord(r, job_id)
    started = last_change = time.monotonic()
    last_done = -1
    warned = False
    lost_since: float | None = None
    while True:
        st = job_status(r, job_id)
        if st is None:
            raise ImageQAError(f"job {job_id} is not in Redis (it disappeared, or was never registered)")
        if on_progress is not None:
            on_progress(st)
        if st.finished:
            return st
        if alive is not None and not alive():
            raise ImageQAError("the worker stopped before the job was done")
        now = time.monotonic()
        if resend is not None and job.lost_in_transit(st, broker):
            lost_since = lost_since or now
            if now - lost_since > resend_after_s:
                resend(st)
                lost_since = None
        else:
            lost_since = None
        if st.done != last_done:
            last_done, last_change = st.done, now
        elif stall_timeout_s is not None and now - last_change > stall_timeout_s:
            raise ImageQAError(f"no row finished for {stall_timeout_s:g} s; giving up on job {job_id}")
        elif stall_warning_s is not None and not warned and now - last_change > stall_warning_s:
            warned = True
            log.warning(
                "job %s: no row finished for %.0f s (%d/%d done); are workers and a collector running?",
                job_id,
                now - last_change,
                st.done,
                st.total,
            )
        if timeout_s is not None and now - started > timeout_s:
            raise ImageQAError(
                f"job {job_id}: {st.done}/{st.total} rows done after {timeout_s:g} s; the job goes on"
            )
        time.sleep(poll_s)
