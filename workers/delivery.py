"""Keeping a live worker's tasks its own on a Redis broker, so that only a dead worker's come back.

Kombu's Redis transport records each delivery in the sorted set ``unacked_index``, scored by the time
it was delivered, and every consuming worker periodically puts back the entries scored older than the
visibility timeout: that is how the tasks of a worker that died are delivered again. Without more, a
task that runs longer than the timeout is delivered again too, while it still runs, so the timeout
had to exceed the longest task (an hour) and a dead worker's tasks waited that long.

Here a thread of the worker re-scores the deliveries it holds (``ZADD unacked_index XX``, the current
time) every third of the visibility timeout. A live worker's tasks never look old, however long they
run, and the timeout only bounds how long a dead worker's tasks wait: 30 s by default. The thread has
its own Redis connection and wakes on its own, so a busy consumer loop or a task holding the GIL for a
while does not hold it back; if a refresh is late anyway it says so in the log.

Limits: the worker's clock scores the deliveries and the sweeping worker's clock judges them (as in
Kombu), so hosts must keep their clocks within a few seconds (NTP). Other Celery applications that
consume from the same Redis database must refresh too, or use their own database (the sweep puts
back any delivery older than the timeout). After a Redis outage longer than the timeout a task may
run twice (the collector writes it once).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import redis
from celery import bootsteps

from producer.broker import redact, redis_client

log = logging.getLogger(__name__)

REFRESHES_PER_TIMEOUT = 3
"""Refreshes per visibility timeout: two may fail or come late before a delivery looks abandoned."""
LATE_FACTOR = 1.5
"""A refresh this many intervals after the previous one is logged as late."""
ZADD_CHUNK = 1000
"""Delivery tags per ZADD command."""


def refresh_interval_s(visibility_timeout_s: float) -> float:
    """Seconds between two refreshes of a worker's deliveries for a given visibility timeout."""
    return visibility_timeout_s / REFRESHES_PER_TIMEOUT


class DeliveryRefresher:
    """A thread that re-scores the delivery tags of the watched Kombu channels in ``index_key``.

    ``watch`` adds a channel's QoS (a consumer restart after a broker reconnection brings a new
    channel; the old one stays watched while its messages are unacknowledged, which costs nothing
    once they are acknowledged: ``ZADD XX`` never adds a tag that is gone).
    """

    def __init__(
        self,
        client: redis.Redis,
        index_key: str,
        visibility_timeout_s: float,
        interval_s: float | None = None,
    ) -> None:
        self.client = client
        self.index_key = index_key
        self.visibility_timeout_s = visibility_timeout_s
        self.interval_s = interval_s or refresh_interval_s(visibility_timeout_s)
        self.refreshes = 0
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imageqa-delivery-refresh", daemon=True)

    def watch(self, qos: Any) -> None:
        with self._lock:
            self._watched.add(qos)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.client.close()

    def in_flight(self) -> list[str]:
        """The tags of deliveries not yet acknowledged: running tasks and prefetched ones."""
        with self._lock:
            watched = list(self._watched)
        tags: list[str] = []
        for qos in watched:
            # Only the consumer thread changes these; a copy made while it does is simply made again.
            for _ in range(10):
                try:
                    delivered, acked = list(qos._delivered), set(qos._dirty)
                    break
                except RuntimeError:
                    continue
            else:
                continue
            tags.extend(tag for tag in delivered if tag not in acked)
        return tags

    def refresh(self) -> int:
        """Marks every delivery this worker holds as delivered now; returns how many it holds."""
        tags = self.in_flight()
        if tags:
            now = time.time()
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(tags), ZADD_CHUNK):
                # XX: only tags still recorded. One acknowledged, or put back by a sweep, stays gone.
                pipe.zadd(self.index_key, dict.fromkeys(tags[i : i + ZADD_CHUNK], now), xx=True)
            pipe.execute()
        self.refreshes += 1
        return len(tags)

    def _run(self) -> None:
        log.info(
            "refreshing in-flight deliveries every %.1f s (visibility timeout %g s)",
            self.interval_s,
            self.visibility_timeout_s,
        )
        last_ok = time.monotonic()
        wait_s = self.interval_s
        while not self._stop.wait(wait_s):
            started = time.monotonic()
            try:
                held = self.refresh()
            except redis.RedisError as e:
                wait_s = min(1.0, self.interval_s)
                log.warning("could not refresh in-flight deliveries (%s); retrying in %g s", e, wait_s)
                continue
            except Exception:  # the thread must outlive a bug: its death would hand every task away
                wait_s = min(1.0, self.interval_s)
                log.exception("refreshing in-flight deliveries failed; retrying in %g s", wait_s)
                continue
            done = time.monotonic()
            since_s = done - last_ok
            if since_s > self.interval_s * LATE_FACTOR:
                log.warning(
                    "in-flight deliveries refreshed %.1f s after the previous time instead of %.1f s; past"
                    " %g s other workers take them over and run them again",
                    since_s,
                    self.interval_s,
                    self.visibility_timeout_s,
                )
            log.debug("refreshed %d in-flight deliveries in %.1f ms", held, (done - started) * 1000)
            last_ok = done
            wait_s = max(0.0, self.interval_s - (done - started))


class DeliveryRefresh(bootsteps.StartStopStep):
    """Consumer bootstep running a `DeliveryRefresher` while the worker consumes from a Redis broker.

    Its thread starts with the consumer and outlives consumer restarts (a broker reconnection stops
    and starts the consumer's steps; each start watches the new channel), and a warm shutdown until
    the pool has finished its tasks: it stops only when the consumer shuts down.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.refresher: DeliveryRefresher | None = None

    def start(self, parent: Any) -> None:
        if parent.connection.transport.driver_type != "redis":
            return  # AMQP brokers requeue a consumer's deliveries when its connection closes
        url = parent.app.conf.broker_url
        if url.startswith("sentinel://"):
            log.warning(
                "in-flight deliveries are not refreshed on %s (Redis Sentinel): tasks running longer than"
                " the visibility timeout are delivered again",
                redact(url),
            )
            return
        channel = parent.task_consumer.channel
        if self.refresher is None:
            interval_s = refresh_interval_s(float(channel.visibility_timeout))
            client = redis_client(url)
            # A Redis that stops answering must not hang the thread past the next refresh.
            client.connection_pool.connection_kwargs.update(
                socket_timeout=interval_s, socket_connect_timeout=interval_s
            )
            self.refresher = DeliveryRefresher(
                client,
                # The transport prefixes its keys itself; this client does not.
                channel.global_keyprefix + channel.unacked_index_key,
                float(channel.visibility_timeout),
            )
            self.refresher.start()
        self.refresher.watch(channel.qos)

    def shutdown(self, parent: Any) -> None:
        if self.refresher is not None:
            self.refresher.stop()
            self.refresher = None
