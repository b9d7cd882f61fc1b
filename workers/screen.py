"""What a worker does with a task message it cannot use: an error row if it names its job and item,
else the quarantine (`producer.quarantine`). No message is dropped.

`screen` checks what `TaskMessage.decode` cannot see: the message's size and positional arguments
(``imageqa.generate`` takes keyword arguments only), and that it names a job and an item at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from producer.errors import ContractError, ErrorCode

TOO_LARGE_HINT = "IMAGEQA_MAX_MESSAGE_BYTES"


@dataclass(frozen=True)
class Screened:
    """A message's verdict: the fields to read its job and item from, and what is wrong, if anything."""

    fields: dict[str, Any]
    """The keyword arguments, or the dict among the positional arguments that names the job and item."""
    problem: ContractError | None

    @property
    def names_item(self) -> bool:
        """True when the message names its job and item, so a problem can become that item's error row."""
        return _text_id(self.fields.get("job_id")) and _text_id(self.fields.get("item_id"))

    @property
    def job_id(self) -> str | None:
        job_id = self.fields.get("job_id")
        return job_id if _text_id(job_id) else None


def raw_message(args: Sequence[Any], kwargs: dict[str, Any]) -> bytes:
    """The task's arguments as JSON (as they came in: they were JSON on the wire)."""
    value = {"args": list(args), "kwargs": kwargs}
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer past 64 bits, which Python's json reads and orjson refuses
        return json.dumps(value, default=str).encode()


def screen(args: Sequence[Any], kwargs: dict[str, Any], max_message_bytes: int) -> Screened:
    """Checks the task's arguments before they are decoded: at most ``max_message_bytes`` as JSON,
    keyword arguments only, a job and an item named."""
    fields = _named_fields(args, kwargs)
    size = len(raw_message(args, kwargs))
    if size > max_message_bytes:
        return Screened(
            fields,
            ContractError(
                f"the task message is {size} bytes, over the limit of {max_message_bytes} bytes "
                f"({TOO_LARGE_HINT}); send images as paths or URLs, not inline",
                code=ErrorCode.MESSAGE_TOO_LARGE,
            ),
        )
    if args:
        return Screened(
            fields,
            ContractError(
                f"the task message has {len(args)} positional argument(s); imageqa.generate takes "
                "keyword arguments only (send the message fields as kwargs)"
            ),
        )
    screened = Screened(fields, None)
    if not screened.names_item:
        return Screened(fields, ContractError("a task message without job_id/item_id cannot become a row"))
    return screened


def job_total(fields: dict[str, Any]) -> int | None:
    """The message's ``job_total`` if it is a valid one, for the error row of an unusable message."""
    total = fields.get("job_total")
    return total if type(total) is int and total >= 1 else None


def _named_fields(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments, unless they name no item and a dict among the positional arguments does
    (a client that sent the fields as ``args=[{...}]``); failing both, the first that names a job."""
    candidates = [kwargs, *(a for a in args if isinstance(a, dict))]
    for candidate in candidates:
        if _text_id(candidate.get("job_id")) and _text_id(candidate.get("item_id")):
            return candidate
    return next((c for c in candidates if _text_id(c.get("job_id"))), kwargs)


def _text_id(value: object) -> bool:
    return isinstance(value, str) and bool(value)
