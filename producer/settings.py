"""Settings of the producer role, read from ``IMAGEQA_*`` environment variables at the entry point."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
"""Seconds before Redis redelivers an unacknowledged task; longer than the longest task."""


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEQA_", extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    """Broker, job registry and results stream (``redis://``, ``rediss://`` or ``redis+socket://``)."""
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S


class ProducerSettings(RedisSettings):
    image_key: str = "image"
    output_key: str = "qa_pairs"
    enqueue_batch: int = 500
    """Rows checked against the job's done set per Redis round trip."""
    max_queued: int = 250_000
    """The producer pauses while more tasks than this wait in the queue (about 2.4 KB of Redis memory
    each), until workers have taken it down to 90%; 0: no limit."""
