"""Prometheus metrics of workers and the collector (prometheus-client; names documented in README)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

IMAGES = Counter(
    "imageqa_images", "Items finished by this worker, by outcome and error code", ["status", "code"]
)
IN_FLIGHT = Gauge("imageqa_requests_in_flight", "Tasks running in this worker process")
QUEUE_WAIT = Histogram("imageqa_queue_wait_seconds", "Enqueue to task start", buckets=_LATENCY_BUCKETS_S)
STAGE = Histogram(
    "imageqa_stage_seconds",
    "Time per item in each stage (load, engine, validate)",
    ["stage"],
    buckets=_LATENCY_BUCKETS_S,
)
ROWS = Counter("imageqa_collector_rows", "Rows written by the collector, by file", ["file"])
COLLECTOR_LAG = Gauge("imageqa_collector_lag_entries", "Results in the stream not yet read by the collector")
COLLECTOR_PENDING = Gauge("imageqa_collector_pending_entries", "Results read but not yet acknowledged")
QUEUE_DEPTH = Gauge("imageqa_queue_depth", "Tasks waiting in the generate queue")


def serve(port: int, address: str) -> None:
    """Serves /metrics; port 0 turns metrics off."""
    if not port:
        return
    try:
        start_http_server(port, addr=address)
    except OSError as e:  # metrics are not worth a worker: say so and go on
        log.warning("metrics server on %s:%d did not start: %s", address, port, e)
        return
    log.info("metrics on http://%s:%d/metrics", address, port)


@contextmanager
def stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE.labels(name).observe(time.perf_counter() - started)
