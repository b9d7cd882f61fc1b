"""Redis and Celery connections shared by every role (producer, worker, collector)."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from celery import Celery

from producer.constants import QUEUE_GENERATE, TASK_GENERATE
from producer.errors import BrokerUnavailable

log = logging.getLogger(__name__)

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""Redis errors that pass once Redis is back (a restart, a dropped connection, a load from disk)."""

T = TypeVar("T")


def redis_client(url: str) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` or ``redis+socket:///path`` URLs."""
    if url.startswith("redis+socket://"):
        parts = urlsplit(url)
        db = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("virtual_host", "0")
        return redis.Redis(unix_socket_path=parts.path, db=int(db), password=parts.password)
    return redis.Redis.from_url(url)


def check_redis(url: str, timeout_s: float = 2.0) -> None:
    """Raises `BrokerUnavailable` with a clear message when Redis does not answer."""
    client = redis_client(url)
    client.connection_pool.connection_kwargs["socket_connect_timeout"] = timeout_s
    try:
        client.ping()
    except redis.RedisError as e:
        raise BrokerUnavailable(f"Redis at {redact(url)} does not answer: {e}") from e
    finally:
        client.close()


class RedisBackoff:
    """The wait between attempts while Redis is away: 0.1 s, doubling up to 5 s, until ``budget_s``
    (None: no limit) has passed since the start or the last `reset`. ``sleep`` may be
    ``threading.Event.wait`` so that a stop request cuts the wait short."""

    def __init__(self, budget_s: float | None = None, sleep: Callable[[float], object] = time.sleep) -> None:
        self.budget_s = budget_s
        self._sleep = sleep
        self.reset()

    def reset(self) -> None:
        """Redis answered: the next failure waits the shortest time again."""
        self._delay_s = 0.1
        self._deadline_s = None if self.budget_s is None else time.monotonic() + self.budget_s

    def wait(self, error: Exception) -> bool:
        """Logs ``error`` and sleeps before the next attempt; False, without sleeping, once the
        budget is spent."""
        if self._deadline_s is not None and time.monotonic() > self._deadline_s:
            return False
        log.warning("Redis unavailable (%s); retrying in %.1f s", error, self._delay_s)
        self._sleep(self._delay_s)
        self._delay_s = min(self._delay_s * 2, 5.0)
        return True


def with_redis_retry(call: Callable[[], T], budget_s: float) -> T:
    """Runs a Redis call, waiting out a Redis restart for up to ``budget_s``; then raises its error."""
    backoff = RedisBackoff(budget_s)
    while True:
        try:
            return call()
        except RETRYABLE as e:
            if not backoff.wait(e):
                raise


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def celery_config(redis_url: str, visibility_timeout_s: int, restore_interval_s: int = 10) -> dict[str, Any]:
    """Celery settings both sides must agree on: JSON only, late acks, one prefetch, redelivery."""
    config: dict[str, Any] = {
        "broker_url": redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            # Sweep for messages whose worker died (unacked past the visibility timeout) this often.
            "unacked_restore_interval": restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_keepalive": True,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "result_accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE_GENERATE,
        "task_routes": {TASK_GENERATE: {"queue": QUEUE_GENERATE}},
        "worker_hijack_root_logger": False,
    }
    if urlsplit(redis_url).scheme == "rediss":
        # Kombu connects to a rediss:// URL without ssl_* parameters unverified, where redis-py verifies
        # the certificate: make the Celery side verify too. ``ssl_*`` parameters of the URL (a CA file,
        # say) replace these options.
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def celery_app(
    redis_url: str, visibility_timeout_s: int, name: str = "imageqa", restore_interval_s: int = 10
) -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(redis_url, visibility_timeout_s, restore_interval_s))
    return app


def task_sender(app: Celery) -> Callable[[str, str, dict[str, Any]], None]:
    """A `producer.jobs.SendTask` that sends a Celery task by name, as JSON, on ``app``'s broker."""

    def send(name: str, queue: str, kwargs: dict[str, Any]) -> None:
        app.send_task(name, kwargs=kwargs, queue=queue)

    return send
