"""A simulated GPU behind vLLM's real front end: what limits a worker when the model is fast.

``SimGPUEngine`` is `VLLMEngine` with everything up to the hand-over to EngineCore real and the model
replaced by a fixed service time. Per request, in the worker's process, as with a real GPU engine:

- the model's chat template, then vLLM's renderer: tokenizing and the model's own multimodal
  processor (for Qwen2.5-VL the HF image processor: resize to the patch grid, normalize, patchify),
  with vLLM's processor cache and image hashing, on the renderer's executor thread;
- ``InputProcessor.process_inputs`` (the ``EngineCoreRequest``) and its msgpack encoding, the bytes
  ``AsyncLLM`` would send to EngineCore;
- then the "GPU": at most ``slots`` requests at once, each held ``service_s`` on the event loop,
  costing no CPU; the answer is schema-valid pairs built from the request alone.

So the engine's capacity is ``slots / service_s`` images/s and every CPU second the worker spends is
the feeding side's. No EngineCore process, no model weights are loaded (only its config, tokenizer
and processor). For benchmarks (``ops/bench_gpufeed.py``), not for data.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from .vllm import VLLMEngine, VLLMEngineConfig

__all__ = ["SimGPUEngine", "simulated_answer"]

log = logging.getLogger(__name__)


class SimGPUEngine(VLLMEngine):
    """`VLLMEngine`'s request path on vLLM's real renderer and input processor, with a simulated GPU."""

    name = "simgpu"

    def __init__(self, config: VLLMEngineConfig, service_s: float, slots: int) -> None:
        super().__init__(config)
        self.service_s = service_s
        self.slots = slots

    async def start(self) -> None:
        if self._llm is not None:
            return
        built: list[_FrontEnd] = []

        def build() -> None:
            built.append(_FrontEnd(self.config, self.service_s, self.slots))

        await asyncio.to_thread(build)
        front = built.pop()
        from .vllm import _make_renderer, _resolve_chat_template

        self._chat_template = _resolve_chat_template(front)
        self._render = _make_renderer(front)
        self._llm = front  # type: ignore[assignment]


@dataclass
class _Completion:
    text: str
    finish_reason: str = "stop"
    token_ids: tuple[int, ...] = ()
    """No tokens are generated: the engine's token counters count only the prompts."""


@dataclass
class _Output:
    outputs: list[_Completion]
    prompt_token_ids: list[int] | None = None


class _FrontEnd:
    """The parts of ``AsyncLLM`` that run in the worker's process, and a GPU that only takes time."""

    def __init__(self, config: VLLMEngineConfig, service_s: float, slots: int) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import renderer_from_config
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm.v1.serial_utils import MsgpackEncoder

        self.vllm_config = AsyncEngineArgs(**config.engine_kwargs()).create_engine_config(
            UsageContext.ENGINE_CONTEXT
        )
        self.model_config = self.vllm_config.model_config
        self.renderer = renderer_from_config(self.vllm_config)
        self.input_processor = InputProcessor(self.vllm_config, self.renderer)
        self.encoder = MsgpackEncoder()
        self.service_s = service_s
        self._slots = asyncio.Semaphore(slots)

    def get_tokenizer(self) -> Any:
        return self.renderer.get_tokenizer()

    async def generate(self, engine_input: Any, params: Any, request_id: str) -> AsyncIterator[_Output]:
        request = self.input_processor.process_inputs(request_id, engine_input, params, ("generate",))
        self.encoder.encode(request)  # what AsyncLLM sends to EngineCore
        async with self._slots:
            await asyncio.sleep(self.service_s)
        completion = _Completion(simulated_answer(params.structured_outputs))
        yield _Output([completion], getattr(request, "prompt_token_ids", None))

    def shutdown(self) -> None:
        self.renderer.shutdown()


def simulated_answer(structured: Any) -> str:
    """Pairs that pass the checks, within the schema's lengths; a verification gets one answer."""
    schema: dict[str, Any] = (getattr(structured, "json", None) or {}) if structured else {}
    if set(schema.get("properties", {})) == {"answer"}:
        return orjson.dumps({"answer": "a photograph"}).decode()
    pairs = [
        {"question": "What is shown?", "answer": "a photograph"},
        {"question": "Indoors or outdoors?", "answer": "outdoors"},
        {"question": "Which colour stands out?", "answer": "blue"},
    ]
    try:
        items = schema["properties"]["qa_pairs"]["items"]["properties"]
        limits = {key: int(items[key]["maxLength"]) for key in ("question", "answer")}
    except (KeyError, TypeError):
        limits = {}
    for pair in pairs:
        for key, limit in limits.items():
            pair[key] = pair[key][:limit]
    return orjson.dumps({"qa_pairs": pairs}).decode()
