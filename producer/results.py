"""Appending result records to the results stream (workers, and producers for rows they reject)."""

from __future__ import annotations

from typing import Any

from producer.constants import RESULTS_STREAM
from producer.contract import ResultRecord

FIELD = b"r"
"""The stream entry field that holds the encoded `ResultRecord`."""


def publish(client: Any, record: ResultRecord) -> None:
    """XADD the record; ``client`` may be a Redis client or a pipeline."""
    client.xadd(RESULTS_STREAM, {FIELD: record.encode()})
