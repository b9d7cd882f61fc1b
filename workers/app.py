"""The Celery app of the workers. ``celery -A workers.app worker -P threads`` or ``imageqa worker``.

The engine is built once when the worker starts (``worker_init``) and shut down when it stops.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

import redis
from celery import signals

from producer.broker import celery_app, redis_client
from workers.delivery import DeliveryRefresh
from workers.runtime import EngineRuntime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

settings = WorkerSettings()
app = celery_app(
    settings.broker_url,
    settings.visibility_timeout_s,
    name="imageqa-worker",
    restore_interval_s=settings.restore_interval_s,
)
app.conf.update(
    include=["workers.tasks"],
    worker_pool="threads",
    worker_concurrency=settings.concurrency,
    # Task events cost a Redis publish per task state; Flower switches them on while it watches.
    worker_send_task_events=settings.task_events,
)

app.steps["consumer"].add(DeliveryRefresh)

_state: dict[str, Any] = {}


def runtime() -> EngineRuntime:
    if "runtime" not in _state:
        raise RuntimeError("the engine is not running in this process (start it with `imageqa worker`)")
    return _state["runtime"]


_redis_lock = threading.Lock()


def results_client() -> redis.Redis:
    """One client (a thread-safe connection pool) for every task thread of this process."""
    client = _state.get("redis")
    if client is None:
        with _redis_lock:  # two racing threads must not each make one and drop the other's connections
            client = _state.get("redis")
            if client is None:
                client = _state["redis"] = redis_client(settings.redis_url)
    return client


def start_engine(worker_settings: WorkerSettings) -> EngineRuntime:
    from workers.engines import build_engine

    rt = EngineRuntime(build_engine(worker_settings))
    rt.start()
    _state["runtime"] = rt
    return rt


def stop_engine() -> None:
    rt = _state.pop("runtime", None)
    if rt is not None:
        rt.stop()


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    log.info("starting %s engine for %s", settings.engine, settings.model)
    try:
        start_engine(settings)
    except Exception:
        log.exception("engine failed to start")
        sys.stdout.flush()
        os._exit(3)
    log.info("engine ready")
    from workers import metrics

    metrics.serve(settings.metrics_port, settings.metrics_address)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    stop_engine()
