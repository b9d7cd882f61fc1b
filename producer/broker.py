"""Redis and Celery connections shared by every role (producer, worker, collector)."""

from __future__ import annotations

import base64
import functools
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Exchange, Queue

from producer.constants import QUEUE_GENERATE, TASK_GENERATE
from producer.errors import BrokerUnavailable
from producer.settings import DEFAULT_VISIBILITY_TIMEOUT_S

log = logging.getLogger(__name__)

RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
"""Redis errors that pass once Redis is back (a restart, a dropped connection, a load from disk)."""

T = TypeVar("T")

KOMBU_UNACKED_KEY = "unacked"
"""Kombu's Redis transport keeps delivered, unacknowledged messages in this hash."""


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


def celery_config(broker_url: str, visibility_timeout_s: int, restore_interval_s: int = 10) -> dict[str, Any]:
    """Celery settings both sides must agree on: JSON only, late acks, one prefetch, redelivery.

    ``broker_url`` is a Redis URL or ``amqp://`` (RabbitMQ); the transport options of the other
    transport are ignored by each, so one configuration serves both.
    """
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Redis: a delivery left unacknowledged this long goes back to the queue. Live workers
            # keep theirs fresh (workers.delivery), so this is how long a dead worker's tasks wait.
            "visibility_timeout": visibility_timeout_s,
            # Sweep for messages whose worker died (unacked past the visibility timeout) this often.
            "unacked_restore_interval": restore_interval_s,
            "unacked_restore_throttle": 1,
            # The sweep holds a lock; a worker killed mid-sweep would hold it for Kombu's default
            # 300 s and stop every other worker's sweep. A sweep takes milliseconds.
            "unacked_mutex_expire": 2 * restore_interval_s,
            "socket_keepalive": True,
            # RabbitMQ: a publish returns once the broker has taken the message (publisher confirms).
            "confirm_publish": True,
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
        # Durable queue, persistent messages (RabbitMQ keeps both across a broker restart).
        "task_queues": [
            Queue(QUEUE_GENERATE, Exchange(QUEUE_GENERATE), routing_key=QUEUE_GENERATE, durable=True)
        ],
        "task_default_delivery_mode": "persistent",
        "task_default_queue": QUEUE_GENERATE,
        "task_routes": {TASK_GENERATE: {"queue": QUEUE_GENERATE}},
        "worker_hijack_root_logger": False,
    }
    if urlsplit(broker_url).scheme == "rediss":
        # Kombu connects to a rediss:// URL without ssl_* parameters unverified, where redis-py verifies
        # the certificate: make the Celery side verify too. ``ssl_*`` parameters of the URL (a CA file,
        # say) replace these options.
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def celery_app(
    broker_url: str, visibility_timeout_s: int, name: str = "imageqa", restore_interval_s: int = 10
) -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(broker_url, visibility_timeout_s, restore_interval_s))
    return app


@dataclass(frozen=True)
class QueueDepth:
    waiting: int
    """Tasks in the queue that no worker has taken yet."""
    unacked: int | None
    """Tasks taken by workers and not yet acknowledged (running or prefetched), over every queue of
    the broker; None where the broker does not tell: RabbitMQ reports it only through its management
    API, which imageqa does not use."""


def queue_depth(broker: Celery | str | redis.Redis, queue: str = QUEUE_GENERATE) -> QueueDepth:
    """How many tasks wait in ``queue`` and how many are taken, on a Redis or RabbitMQ broker.

    ``broker`` is a Celery app (its connection pool is used), a broker URL, or a Redis client of the
    broker's database. RabbitMQ answers a passive ``queue.declare`` with the ready messages; Redis is
    asked for the list's length and the size of Kombu's hash of unacknowledged deliveries.
    """
    if isinstance(broker, redis.Redis):
        return _redis_depth(broker, queue, KOMBU_UNACKED_KEY)
    app = broker if isinstance(broker, Celery) else _depth_app(broker)
    with app.pool.acquire(block=True) as conn:
        if conn.transport.driver_type == "redis":
            channel = conn.default_channel
            return _redis_depth(channel.client, queue, channel.unacked_key)
        # A passive declare of a missing queue closes the channel: use one of its own.
        with conn.channel() as channel:
            try:
                return QueueDepth(int(channel.queue_declare(queue=queue, passive=True).message_count), None)
            except conn.channel_errors:  # NOT_FOUND: no worker or producer declared it yet
                return QueueDepth(0, None)


def _redis_depth(client: redis.Redis, queue: str, unacked_key: str) -> QueueDepth:
    pipe = client.pipeline(transaction=False)
    pipe.llen(queue)
    pipe.hlen(unacked_key)
    waiting, unacked = pipe.execute()
    return QueueDepth(int(waiting), int(unacked))


@functools.lru_cache(maxsize=8)
def _depth_app(broker_url: str) -> Celery:
    return celery_app(broker_url, DEFAULT_VISIBILITY_TIMEOUT_S, name="imageqa-depth")


def task_sender(app: Celery) -> Callable[[str, str, dict[str, Any]], None]:
    """A `producer.jobs.SendTask` that sends a Celery task by name, as JSON, on ``app``'s broker."""

    def send(name: str, queue: str, kwargs: dict[str, Any]) -> None:
        app.send_task(name, kwargs=kwargs, queue=queue)

    return send


@dataclass(frozen=True)
class QueueHead:
    """The task that has waited longest in a queue: the next one a worker takes."""

    tag: str | None
    """Kombu's delivery tag of the message; None where the broker does not show the head."""
    enqueued_at: float | None
    """The task message's ``enqueued_at`` (Unix time); None if it has none (a client that does not
    set it) or the broker does not show the head."""


UNKNOWN_HEAD = QueueHead(None, None)


def queue_head(broker: Celery | str | redis.Redis, queue: str = QUEUE_GENERATE) -> QueueHead | None:
    """The oldest waiting task of ``queue``, read without taking it; None when nothing waits.

    Redis: the last element of Kombu's list (LINDEX -1; producers LPUSH, workers BRPOP), its body
    decoded from Kombu's envelope. RabbitMQ cannot show a message without delivering it (and a
    delivery marks it redelivered): always `UNKNOWN_HEAD`, whether tasks wait or not (`queue_depth`).
    """
    if isinstance(broker, redis.Redis):
        return _redis_head(broker, queue)
    app = broker if isinstance(broker, Celery) else _depth_app(broker)
    with app.pool.acquire(block=True) as conn:
        if conn.transport.driver_type == "redis":
            return _redis_head(conn.default_channel.client, queue)
    return UNKNOWN_HEAD


def _redis_head(client: redis.Redis, queue: str) -> QueueHead | None:
    raw: Any = client.lindex(queue, -1)
    if raw is None:
        return None
    try:
        envelope = json.loads(raw)
        tag = envelope.get("properties", {}).get("delivery_tag")
        body: Any = envelope.get("body")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        task = json.loads(body)
    except (ValueError, TypeError, AttributeError):
        return UNKNOWN_HEAD
    # Celery's message protocol 2 is [args, kwargs, embed]; protocol 1 a dict with "kwargs".
    kwargs = (
        task[1]
        if isinstance(task, list) and len(task) > 1
        else task.get("kwargs")
        if isinstance(task, dict)
        else None
    )
    enqueued_at = kwargs.get("enqueued_at") if isinstance(kwargs, dict) else None
    if not isinstance(enqueued_at, int | float) or isinstance(enqueued_at, bool):
        enqueued_at = None
    return QueueHead(str(tag) if tag is not None else None, enqueued_at)
