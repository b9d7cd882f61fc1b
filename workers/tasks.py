"""The ``imageqa.generate`` task: thin glue between Celery, `workers.generate` and the results stream."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, NoReturn

from celery import Celery
from celery.exceptions import Reject

from producer.broker import RETRYABLE, with_redis_retry
from producer.constants import TASK_GENERATE
from producer.contract import ErrorInfo, ResultRecord, TaskMessage
from producer.errors import ContractError, ErrorCode
from producer.jobs import JobRecord
from producer.quarantine import quarantine
from producer.results import publish
from workers import metrics
from workers.app import results_client, runtime, worker_settings
from workers.diversity import TemplateGate
from workers.engines.base import EngineDead
from workers.generate import WORKER_NAME, process
from workers.isolation import IsolationGate
from workers.screen import Screened, job_total, raw_message, screen

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 300.0
"""How long a finished result waits for Redis to come back before the task gives up on it."""
EXIT_ENGINE_DEAD = 70
_gate = IsolationGate()


class RowFailed(Exception):
    """Raised by the task once its row's error record (or its quarantine entry) is in Redis, so that
    Celery reports the task as failed with the error code: a ``task-failed`` event, which monitors
    such as Flower count. Its message is acknowledged all the same (acks on failure), so the row is
    neither retried nor delivered again; Celery logs it at INFO, without a traceback."""


def register(app: Celery) -> None:
    """Registers `generate` as ``imageqa.generate`` on the worker's app (`workers.app.create_app`)."""
    app.task(
        name=TASK_GENERATE,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        acks_on_failure_or_timeout=True,
        ignore_result=True,
        throws=(RowFailed,),
    )(generate)


def generate(self: Any, *args: Any, **kwargs: Any) -> str:
    """Returns the row's outcome, ``"ok: 4 pairs"``, or raises `RowFailed` for an error row; either
    reaches monitors in the task's events (there is no result backend)."""
    # Kombu marks a message it puts back (its worker died, or it was requeued) as redelivered.
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    try:
        # Positional arguments are taken here, not refused by Python, so that they become an error
        # row (or a quarantined message) rather than a TypeError in a log.
        screened = screen(args, kwargs, worker_settings().max_message_bytes)
        if screened.problem is not None:
            _refuse(screened, args, kwargs, self.request.id or "")
        return _outcome(_generate(kwargs, redelivered))
    except RETRYABLE as e:
        # Redis stayed away longer than the retry budget: put the message back rather than lose it.
        log.error("Redis unavailable for too long (%s); requeueing the task", e)
        raise Reject(e, requeue=True) from e


class CancelFlags:
    """The jobs' cancel flags, read from Redis at most once per ``ttl_s`` per job and process, so a
    task costs no round trip for it; a cancel takes effect within ``ttl_s``."""

    def __init__(self, ttl_s: float = 0.5) -> None:
        self.ttl_s = ttl_s
        self._flags: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def cancelled(self, job_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._flags.get(job_id)
        if seen is not None and now - seen[0] < self.ttl_s:
            return seen[1]
        flag = with_redis_retry(lambda: JobRecord(results_client(), job_id).is_cancelled(), PUBLISH_RETRY_S)
        with self._lock:
            if len(self._flags) > 10_000:  # long-lived worker, many jobs: forget the stale ones
                self._flags = {j: f for j, f in self._flags.items() if now - f[0] < self.ttl_s}
            self._flags[job_id] = (now, flag)
        return flag


_cancel_flags = CancelFlags()


def _outcome(record: ResultRecord) -> str:
    if record.error is not None:
        raise _failed(record.error.code, record.error.message)
    return f"ok: {len(record.qa_pairs or ())} pairs"


def _failed(code: str, message: str, prefix: str = "") -> RowFailed:
    return RowFailed(f"{prefix}{code}: {message[:200]}")


def _generate(kwargs: dict[str, Any], redelivered: bool = False) -> ResultRecord:
    try:
        message = TaskMessage.decode(kwargs)
    except ContractError as e:
        _reject(kwargs, e)
    if message.enqueued_at:
        metrics.QUEUE_WAIT.observe(max(0.0, time.time() - message.enqueued_at))
    if _cancel_flags.cancelled(message.job_id):
        error = ErrorInfo(
            code=ErrorCode.CANCELLED, message="the job was cancelled before this row was processed"
        )
        record = _error(message.model_dump(mode="json"), error)
        with_redis_retry(lambda: publish(results_client(), record), PUBLISH_RETRY_S)
        return record
    if redelivered:
        # It may be the item that crashed the last worker (see isolation.py): its last allowed start
        # runs alone, earlier ones beside the others, so a preempted worker's tasks come back at full
        # speed. Its first start is not recorded (that would cost every task a round trip); later
        # starts are, once they really start, so items waiting behind a suspect are not charged.
        job = JobRecord(results_client(), message.job_id)
        counted = with_redis_retry(lambda: job.starts_counted(message.item_id), PUBLISH_RETRY_S)
        last_try = 2 + counted == worker_settings().max_attempts
        with _gate.alone() if last_try else _gate.normal():
            restarts = with_redis_retry(lambda: job.count_start(message.item_id), PUBLISH_RETRY_S)
            record = _run(message, 1 + restarts)
    else:
        with _gate.normal():
            record = _run(message, 1)
    with_redis_retry(lambda: publish(results_client(), record), PUBLISH_RETRY_S)
    return record


def _run(message: TaskMessage, attempts: int) -> ResultRecord:
    settings = worker_settings()
    if attempts > settings.max_attempts:
        return _error(
            message.model_dump(mode="json"),
            ErrorInfo(
                code=ErrorCode.POISON_ITEM,
                message=f"started {attempts - 1} times, alone after the first, and never finished"
                " (it crashes or hangs the worker)",
            ),
        )
    try:
        with metrics.IN_FLIGHT.track_inprogress():
            return process(message, runtime(), settings, _template_gate())
    except EngineDead as e:
        # Not this item's fault: leave its message unacked (it is redelivered) and let the
        # supervisor restart the worker with a fresh engine.
        log.critical("the engine died (%s); exiting so the worker is restarted", e)
        logging.shutdown()
        os._exit(EXIT_ENGINE_DEAD)


@functools.cache
def _template_gate() -> TemplateGate:
    return TemplateGate(results_client())


def _error(kwargs: dict[str, Any], error: ErrorInfo) -> ResultRecord:
    row_index = kwargs.get("row_index")
    return ResultRecord(
        job_id=kwargs["job_id"],
        item_id=kwargs["item_id"],
        row_index=row_index if isinstance(row_index, int) and row_index >= 0 else 0,
        row=kwargs.get("row"),
        error=error,
        worker=WORKER_NAME,
        job_total=job_total(kwargs),
    )


def _reject(kwargs: dict[str, Any], error: ContractError) -> NoReturn:
    """An invalid message becomes an error row when it names its job and item (else: `_refuse`)."""
    _refuse(Screened(kwargs, error), (), kwargs, "")


def _refuse(screened: Screened, args: tuple[Any, ...], kwargs: dict[str, Any], task_id: str) -> NoReturn:
    """A message the worker cannot use becomes its item's error row when it names its job and item,
    and goes to the quarantine otherwise; either is in Redis before the task fails (`RowFailed`) and
    the message is acknowledged. A message too large to keep has its row left out of the error row."""
    error = screened.problem
    assert error is not None
    if screened.names_item:
        fields = screened.fields
        if error.code == ErrorCode.MESSAGE_TOO_LARGE:
            fields = {**fields, "row": None}
        record = _error(fields, ErrorInfo(code=error.code, message=error.message))
        with_redis_retry(lambda: publish(results_client(), record), PUBLISH_RETRY_S)
        raise _failed(error.code, error.message)
    raw = raw_message(args, kwargs)

    def store() -> None:
        pipe = results_client().pipeline()
        quarantine(
            pipe,
            source="task",
            code=error.code,
            reason=error.message,
            raw=raw,
            ref=task_id,
            origin=WORKER_NAME,
            job_id=screened.job_id,
        )
        pipe.execute()

    with_redis_retry(store, PUBLISH_RETRY_S)
    raise _failed(error.code, error.message, prefix="quarantined: ")
