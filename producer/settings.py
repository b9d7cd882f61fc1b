"""Settings of the producer role, read from ``IMAGEQA_*`` environment variables at the entry point."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT_S = 30
"""Seconds before a Redis broker hands an unacknowledged task to another worker. A live worker
re-marks the tasks it holds every third of this (`workers.delivery`), so it bounds how long a dead
worker's tasks wait, not how long a task may run."""


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEQA_", extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    """Job registry and results stream (``redis://``, ``rediss://`` or ``redis+socket://``)."""
    broker_url: str = ""
    """Where the tasks queue: ``amqp://`` (RabbitMQ) or a Redis URL; empty: ``redis_url``."""
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S

    @property
    def broker(self) -> str:
        """The broker URL in force: ``broker_url``, else ``redis_url`` (also after a copy that changes
        only ``redis_url``)."""
        return self.broker_url or self.redis_url


class ProducerSettings(RedisSettings):
    image_key: str = "image"
    output_key: str = "qa_pairs"
    enqueue_batch: int = 500
    """Rows checked against the job's done set per Redis round trip."""
    max_queued: int = 250_000
    """The producer pauses while more tasks than this wait in the queue (about 2.4 KB of Redis memory
    each), until workers have taken it down to 90%; 0: no limit."""
