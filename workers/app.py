"""The Celery app of the workers, built by `create_app` from the settings of ``imageqa worker``.

The engine is built once when the worker starts (``worker_init``) and shut down when it stops.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

import redis
from celery import Celery, signals

from producer.broker import celery_app, redis_client
from workers.delivery import DeliveryRefresh
from workers.runtime import EngineRuntime
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}
EXIT_ENGINE_FAILED = 3
"""Exit status of a worker whose engine failed to start; its log's last line starts with `ENGINE_FAILED`."""
ENGINE_FAILED = "engine failed to start: "


def create_app(settings: WorkerSettings) -> Celery:
    """The worker's Celery app with the ``imageqa.generate`` task registered.

    ``settings`` become this process's worker settings: the task and the engine, started when the
    worker starts, read them through `worker_settings`.
    """
    from workers import tasks

    app = celery_app(
        settings.broker,
        settings.visibility_timeout_s,
        name="imageqa-worker",
        restore_interval_s=settings.restore_interval_s,
    )
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # Task events cost a Redis publish per task state; Flower switches them on while it watches.
        worker_send_task_events=settings.task_events,
    )
    app.steps["consumer"].add(DeliveryRefresh)
    _state["settings"] = settings
    tasks.register(app)
    return app


def worker_settings() -> WorkerSettings:
    """The settings the worker app of this process was created with (`create_app`)."""
    if "settings" not in _state:
        raise RuntimeError("no worker app in this process (create_app builds it)")
    return _state["settings"]


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
                client = _state["redis"] = redis_client(worker_settings().redis_url)
    return client


def start_engine(settings: WorkerSettings) -> EngineRuntime:
    from workers.engines import build_engine

    engine = build_engine(settings.engine, request_timeout_s=max(1, settings.task_time_limit_s - 30))
    rt = EngineRuntime(engine)
    rt.start()
    _state["runtime"] = rt
    return rt


def stop_engine() -> None:
    rt = _state.pop("runtime", None)
    if rt is not None:
        rt.stop()


@signals.worker_init.connect
def _on_worker_init(**_: Any) -> None:
    settings = worker_settings()
    log.info("starting %s engine for %s", settings.engine.kind, settings.engine.model)
    try:
        start_image_pool(settings)
        rt = start_engine(settings)
    except Exception as e:
        log.exception("engine failed to start")
        # Last, on one line: what `imageqa run` shows of a worker whose engine did not start.
        log.critical("%s%s: %s", ENGINE_FAILED, type(e).__name__, " ".join(str(e).split())[:1000])
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_ENGINE_FAILED)
    describe = getattr(rt.engine, "describe", None)  # the vLLM engine's settings as vLLM resolved them
    log.info("engine ready%s", f": {json.dumps(describe(), default=str)}" if callable(describe) else "")
    from workers import metrics

    metrics.serve(settings.metrics_port, settings.metrics_address)


def start_image_pool(settings: WorkerSettings) -> None:
    from workers import preprocess

    size = settings.preprocess_workers
    pool = preprocess.start_pool(preprocess.default_pool_size() if size is None else size)
    log.info("images load in %s", f"{pool.size} processes" if pool else "the worker process")


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    from workers import preprocess

    stop_engine()
    preprocess.stop_pool()
