"""The engine interface: one chat request with images in, the model's raw text out."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image


class EngineDead(Exception):
    """Raised by an engine whose model process is gone for good: not the item's fault, so no error
    row is written; the worker exits and its supervisor restarts it with a fresh engine."""


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 1024


@dataclass(frozen=True)
class EngineRequest:
    """One prompt: a user message made of images followed by text, and an optional system prompt.

    ``json_schema`` asks the engine to constrain its output to that schema where it can.
    """

    request_id: str
    images: list[Image]
    prompt: str
    system_prompt: str | None = None
    json_schema: dict[str, Any] | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


class Engine(abc.ABC):
    """An engine answers many concurrent ``generate`` calls on one asyncio loop.

    ``start`` and ``generate`` run on that loop; ``shutdown`` releases the model and its processes.
    """

    name: str = "engine"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def generate(self, request: EngineRequest) -> str: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
