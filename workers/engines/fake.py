"""A real, instant engine for plumbing tests and benchmarks: it writes valid pairs without a model."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable

import orjson

from workers.engines.base import Engine, EngineRequest


class FakeEngine(Engine):
    """Answers every request with deterministic pairs derived from the image content.

    ``faults`` maps an image size (``"13x17"``) to ``"crash"`` (the process exits at once) or ``"hang"``
    (the request never finishes), so fault handling can be tested with real processes. ``respond``
    replaces the answer: it gets each request and returns the raw output (for scripted tests). A
    verification request (a schema with a single ``answer``) is answered from the same pairs.

    Without an image (the blind check) it knows one answer: it guesses "1" for "How many images",
    right for a row of one image and wrong for more. As a judge it scores its count question 5, its
    colour question 4 and its size question 2 (too generic), anything else 3.
    """

    name = "fake"

    def __init__(
        self,
        model: str = "fake",
        delay_s: float = 0.0,
        faults: dict[str, str] | None = None,
        respond: Callable[[EngineRequest], str] | None = None,
    ) -> None:
        self.model = model
        self.respond = respond
        self.delay_s = delay_s
        self.faults = faults or {}
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def generate(self, request: EngineRequest) -> str:
        if not self.started:
            raise RuntimeError("engine not started")
        for image in request.images:
            fault = self.faults.get(f"{image.width}x{image.height}")
            if fault == "crash":  # a poison item: takes the whole worker down, every time
                os._exit(13)
            if fault == "hang":
                await asyncio.sleep(3600)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.respond is not None:
            return self.respond(request)
        if _asks_judgement(request):
            score = next((s for q, s in _JUDGE_SCORES.items() if f"Question: {q}" in request.prompt), 3)
            return orjson.dumps({"reason": f"fake verdict {score}", "score": score}).decode()
        if not request.images:
            guess = "1" if "Question: How many images" in request.prompt else "unsure"
            return orjson.dumps({"answer": guess}).decode()
        digest = hashlib.sha1(b"".join(im.tobytes()[:4096] for im in request.images)).hexdigest()[:8]
        sizes = ", ".join(f"{im.width}x{im.height}" for im in request.images)
        pairs = [
            {"question": f"How many images ({digest})?", "answer": str(len(request.images)), "type": "count"},
            {"question": "What size is the image?", "answer": sizes, "type": "attribute"},
            {
                "question": "What colour dominates the picture?",
                "answer": _dominant(request),
                "type": "attribute",
            },
        ]
        if _asks_one_answer(request):
            known = {p["question"]: p["answer"] for p in pairs}
            asked = next((q for q in known if q in request.prompt), None)
            return orjson.dumps({"answer": known[asked] if asked else "unknown"}).decode()
        limits = _max_lengths(request)
        typed = _typed(request)
        for pair in pairs:
            for key, limit in limits.items():
                pair[key] = pair[key][:limit]
            if not typed:  # a schema without types forbids the key
                del pair["type"]
        return orjson.dumps({"qa_pairs": pairs}).decode()

    async def shutdown(self) -> None:
        self.started = False


_JUDGE_SCORES = {"How many images": 5, "What colour dominates": 4, "What size is": 2}


def _asks_judgement(request: EngineRequest) -> bool:
    schema = request.json_schema or {}
    return set(schema.get("properties", {})) == {"reason", "score"}


def _dominant(request: EngineRequest) -> str:
    pixel: tuple[int, ...] = request.images[0].convert("RGB").resize((1, 1)).getpixel((0, 0))  # type: ignore[assignment]
    r, g, b = pixel[:3]
    return max((r, "red"), (g, "green"), (b, "blue"))[1]


def _asks_one_answer(request: EngineRequest) -> bool:
    schema = request.json_schema or {}
    return set(schema.get("properties", {})) == {"answer"}


def _typed(request: EngineRequest) -> bool:
    try:
        return "type" in request.json_schema["properties"]["qa_pairs"]["items"]["properties"]  # type: ignore[index]
    except (TypeError, KeyError):
        return False


def _max_lengths(request: EngineRequest) -> dict[str, int]:
    # Honour the schema's maxLength like constrained decoding would.
    try:
        props = request.json_schema["properties"]["qa_pairs"]  # type: ignore[index]
        items = props["items"]["properties"]
        return {key: int(items[key]["maxLength"]) for key in ("question", "answer")}
    except (TypeError, KeyError):
        return {}
