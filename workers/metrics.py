"""Prometheus metrics of workers and the collector (prometheus-client; names documented in README).

A worker's /metrics also carries vLLM's own engine metrics (``vllm:*``): its Prometheus stat logger
registers them in prometheus-client's default registry, the one served here (workers.engines.vllm).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from celery import Celery
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from producer.broker import queue_depth, queue_head

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# Worker
ROWS = Counter(
    "imageqa_rows", "Rows (items) finished by this worker, by outcome and error code", ["status", "code"]
)
IMAGES = Counter("imageqa_images", "Images loaded and handed to the engine by this worker")
PROMPT_TOKENS = Counter("imageqa_prompt_tokens", "Prompt tokens (images included) sent to the engine")
GENERATED_TOKENS = Counter("imageqa_generated_tokens", "Tokens the engine generated")
PAIRS_KEPT = Counter("imageqa_pairs_kept", "Question-answer pairs written to the output")
PAIRS_REJECTED = Counter("imageqa_pairs_rejected", "Question-answer pairs rejected, by reason", ["reason"])
IN_FLIGHT = Gauge("imageqa_requests_in_flight", "Tasks running in this worker process")
QUEUE_WAIT = Histogram("imageqa_queue_wait_seconds", "Enqueue to task start", buckets=_LATENCY_BUCKETS_S)
TASK = Histogram(
    "imageqa_task_seconds", "Time to process one row, start to result", buckets=_LATENCY_BUCKETS_S
)
STAGE = Histogram(
    "imageqa_stage_seconds",
    "Time per item in each stage (load, engine, validate)",
    ["stage"],
    buckets=_LATENCY_BUCKETS_S,
)

# Collector
COLLECTOR_ROWS = Counter("imageqa_collector_rows", "Rows written by the collector, by file", ["file"])
COLLECTOR_LAG = Gauge("imageqa_collector_lag_entries", "Results in the stream not yet read by the collector")
COLLECTOR_PENDING = Gauge("imageqa_collector_pending_entries", "Results read but not yet acknowledged")
QUEUE_DEPTH = Gauge("imageqa_queue_depth", "Tasks waiting in the generate queue")
QUEUE_UNACKED = Gauge(
    "imageqa_queue_unacked", "Tasks taken by workers and not yet acknowledged (Redis broker; NaN otherwise)"
)
QUEUE_OLDEST_AGE = Gauge(
    "imageqa_queue_oldest_age_seconds",
    "Age of the oldest task waiting in the generate queue (0: none waits; NaN: the broker does not tell)",
)


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


def count_tokens(prompt: int | None, generated: int | None) -> None:
    """Called by engines that know their token counts (vLLM, OpenAI-compatible servers)."""
    if prompt:
        PROMPT_TOKENS.inc(prompt)
    if generated:
        GENERATED_TOKENS.inc(generated)


def count_row(code: str | None, kept: int, rejected: Mapping[str, int], elapsed_s: float) -> None:
    """One finished row: its outcome (``code`` None when it is ok), its pairs and its time."""
    ROWS.labels("failed" if code else "ok", code or "").inc()
    if not code:
        PAIRS_KEPT.inc(kept)
    for reason, count in rejected.items():
        PAIRS_REJECTED.labels(reason).inc(count)
    TASK.observe(elapsed_s)


class QueueWatch:
    """Sets the queue gauges (depth, unacked, oldest task's age) from the broker; the collector calls
    `observe` every few seconds. The age is that of the oldest waiting task's ``enqueued_at``; for a
    task without one (sent by another client) it counts from when this watch first saw it oldest."""

    def __init__(self) -> None:
        self._head_seen: tuple[str, float] | None = None

    def observe(self, broker: Celery | str) -> None:
        try:
            depth = queue_depth(broker)
            head = queue_head(broker) if depth.waiting else None
        except Exception as e:  # a gauge is not worth the collector: RabbitMQ may be down, not Redis
            log.warning("queue depth unknown: %s", e)
            return
        QUEUE_DEPTH.set(depth.waiting)
        QUEUE_UNACKED.set(float("nan") if depth.unacked is None else depth.unacked)
        now = time.time()
        if head is None:
            age_s = 0.0
        elif head.enqueued_at is not None:
            age_s = max(0.0, now - head.enqueued_at)
        elif head.tag is not None:
            if self._head_seen is None or self._head_seen[0] != head.tag:
                self._head_seen = (head.tag, now)
            age_s = now - self._head_seen[1]
        else:
            age_s = float("nan")
        QUEUE_OLDEST_AGE.set(age_s)
