"""Health checks for process supervisors (Docker, systemd): is this host's worker answering, is the
collector still reading the results stream?

Both ask the cluster (the worker: a ping through the broker, Redis or RabbitMQ; the collector: Redis),
the way the rest of it sees the process, rather than only checking that a PID exists: a worker stuck
before its consumer starts, or a collector whose loop has stopped, is unhealthy.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import redis

from producer.broker import celery_app, redis_client
from producer.constants import COLLECTOR_GROUP, RESULTS_STREAM
from producer.settings import RedisSettings
from workers.settings import CollectorSettings


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str


def check_worker(settings: RedisSettings, timeout_s: float = 5.0, hostname: str | None = None) -> Health:
    """Healthy when a worker node on ``hostname`` (default: this host) answers a Celery ping.

    Worker nodes are named ``imageqa-<pid>@<host>``; the pid is not known from outside, so the ping goes
    to every node matching ``*@<host>`` and the first reply is enough. In a container the host name is
    the container's, so this checks exactly the worker of that container.
    """
    host = hostname or socket.gethostname()
    app = celery_app(settings.broker, settings.visibility_timeout_s, name="imageqa-health")
    try:
        replies = app.control.ping(timeout=timeout_s, pattern=f"*@{host}", matcher="glob", limit=1)
    except (OSError, redis.RedisError) as e:
        return Health(False, f"cannot reach the broker: {e}")
    finally:
        app.close()
    names = sorted(name for reply in replies for name in reply)
    if not names:
        return Health(False, f"no worker on {host} answered a ping within {timeout_s:g} s")
    return Health(True, f"{', '.join(names)} answered")


def check_collector(settings: CollectorSettings, max_idle_s: float = 60.0) -> Health:
    """Healthy when the consumer ``settings.consumer`` read the results stream in the last ``max_idle_s``.

    A running collector polls the stream every ``block_ms`` even when there is nothing to read, and
    Redis records when each consumer of the group last asked (``XINFO CONSUMERS``, field ``idle``).
    Redis 7.2 or newer: older versions count only reads that returned entries, so a collector with
    nothing to do would look idle.
    """
    r = redis_client(settings.redis_url)
    try:
        consumers = r.xinfo_consumers(RESULTS_STREAM, COLLECTOR_GROUP)
    except redis.ResponseError:
        return Health(False, f"no consumer group {COLLECTOR_GROUP!r} on {RESULTS_STREAM} yet")
    except (OSError, redis.RedisError) as e:
        return Health(False, f"cannot reach Redis: {e}")
    finally:
        r.close()
    for consumer in consumers:
        name = consumer["name"]
        if (name.decode() if isinstance(name, bytes) else name) == settings.consumer:
            idle_s = int(consumer["idle"]) / 1000
            if idle_s > max_idle_s:
                return Health(False, f"{settings.consumer} last read the stream {idle_s:.0f} s ago")
            return Health(True, f"{settings.consumer} read the stream {idle_s:.1f} s ago")
    return Health(False, f"{settings.consumer} has not read the results stream")
