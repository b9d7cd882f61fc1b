"""The vLLM engine: one warm ``AsyncLLM`` per process, fed concurrently from many tasks.

``VLLMEngine`` renders an ``EngineRequest`` with the model's own chat template, hands the PIL images
to vLLM as ``multi_modal_data`` and returns the generated text. vLLM batches all in-flight
``generate`` calls continuously: keep many requests in flight rather than batching yourself.
``offline_chat`` runs the same requests through the offline ``LLM.chat`` (the throughput bar).

vllm/torch are imported lazily inside functions, so importing this module is cheap; no celery here.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workers import metrics

from . import lifeline
from .base import Engine, EngineDead, EngineRequest

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["VLLMEngine", "VLLMEngineConfig", "offline_chat"]

logger = logging.getLogger(__name__)

# Backends for which vLLM accepts ``disable_any_whitespace`` (validated in StructuredOutputsConfig).
_COMPACT_JSON_BACKENDS = ("guidance", "xgrammar")


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Settings for one vLLM engine (the same for ``VLLMEngine`` and ``offline_chat``).

    Attributes:
        model: local checkpoint directory or hub id (e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``).
        max_model_len: context length; ``None`` takes the model's own maximum.
        gpu_memory_utilization: fraction of GPU memory vLLM may claim; on CPU, of *host* memory
            (there prefer ``kv_cache_memory_bytes`` in ``extra_engine_args``).
        tensor_parallel_size: GPUs per engine.
        max_num_seqs: most sequences vLLM schedules in one step (its continuous batch size).
        max_images_per_prompt: ``limit_mm_per_prompt`` for images; videos are off (0: no profiling).
        dtype: model dtype (``"auto"`` = the checkpoint's, e.g. bfloat16).
        enforce_eager: skip torch.compile / CUDA graphs: faster start, slower GPU steps. Use it on
            CPU, where compiling even the tiny model adds ~40 s to start and gains nothing.
        structured_outputs_backend: engine-wide grammar backend. ``"guidance"`` (llguidance) is the
            default: with random weights xgrammar let raw control characters into strings.
        seed: engine-wide sampling seed. There is deliberately no per-request seed: it crashes
            ``AsyncLLM`` on CPU ("CPU Generator does not use offset").
        extra_engine_args: any other ``AsyncEngineArgs``/``LLM`` keyword; wins over the above.
    """

    model: str
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int = 64
    max_images_per_prompt: int = 4
    dtype: str = "auto"
    enforce_eager: bool = False
    structured_outputs_backend: str = "guidance"
    seed: int = 0
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AsyncEngineArgs(...)`` and ``LLM(...)`` (imports vllm)."""
        from vllm.config import StructuredOutputsConfig

        backend = self.structured_outputs_backend
        # Compact JSON: with flexible whitespace a weak model can pad output with blanks until it
        # hits max_tokens. The flag is engine-wide: 0.32's backends ignore the per-request copy.
        structured = StructuredOutputsConfig(
            backend=backend,  # type: ignore[arg-type]
            disable_any_whitespace=backend in _COMPACT_JSON_BACKENDS,
        )
        kwargs: dict[str, Any] = dict(
            model=self.model,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            max_num_seqs=self.max_num_seqs,
            limit_mm_per_prompt={"image": self.max_images_per_prompt, "video": 0},
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
            structured_outputs_config=structured,
            seed=self.seed,
            # No periodic stats log line; VLLMEngine still collects the stats for its Prometheus
            # metrics (the worker's /metrics), `offline_chat` does not.
            disable_log_stats=True,
        )
        return {**kwargs, **self.extra_engine_args}


def _prefer_single_engine_process() -> None:
    """Run the model inside the one EngineCore process instead of a further worker process.

    ``AsyncLLM`` always runs EngineCore in a child process. With multiprocessing on (vLLM's default)
    the CPU backend also spawns a worker process from EngineCore: that fails in Celery's daemonic
    prefork children, and measured here it started in 26 s instead of 18 s and needed a force-kill
    at shutdown. On GPU with TP=1 the executor is in-process anyway; ``LLM`` (offline) becomes fully
    in-process. An explicit setting by the operator wins.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _chat_messages(request: EngineRequest, image_parts: list[dict[str, Any]]) -> list[Any]:
    """One system message (if any) and one user message: the images first, then the text."""
    system = [{"role": "system", "content": request.system_prompt}] if request.system_prompt else []
    return [*system, {"role": "user", "content": [*image_parts, {"type": "text", "text": request.prompt}]}]


def _sampling_params(request: EngineRequest, *, final_only: bool) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    s = request.sampling
    extra: dict[str, Any] = {}
    if request.json_schema is not None:
        extra["structured_outputs"] = StructuredOutputsParams(json=request.json_schema)
    if final_only:
        # Stream nothing but the finished text: no per-token detokenized updates to ship.
        extra["output_kind"] = RequestOutputKind.FINAL_ONLY
    # top_k / repetition_penalty stay vLLM's neutral defaults: SamplingParams built here do not
    # inherit the checkpoint's generation_config.json (Qwen's ships top_k=1, i.e. greedy).
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, **extra)


class VLLMEngine(Engine):
    """``Engine`` on one vLLM ``AsyncLLM``; ``generate`` may be awaited concurrently many times.

    ``await start()`` once (~18 s on CPU for the tiny model, minutes for a real checkpoint), then
    any number of concurrent ``await generate(req)`` on the same loop, then ``await shutdown()``,
    which stops the EngineCore child process. Scripts must guard their entry point with
    ``if __name__ == "__main__":``: on CPU vLLM spawns EngineCore, which re-imports ``__main__``.
    """

    name = "vllm"

    def __init__(self, config: VLLMEngineConfig) -> None:
        self.config = config
        self._llm: AsyncLLM | None = None
        self._chat_template: str | None = None
        self._render: Any = None  # async prompt-dict -> engine input, or None for raw prompts
        # Every first try of a job has the same text: render the chat template once, not per image
        # (it runs on the engine's event loop, which every request shares).
        self._templated = functools.lru_cache(maxsize=256)(self._apply_template)

    async def start(self) -> None:
        """Build the engine. Idempotent. Raises whatever vLLM raises if the model cannot load."""
        if self._llm is not None:
            return
        import asyncio

        _prefer_single_engine_process()
        built: list[AsyncLLM] = []

        def build() -> None:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
            from vllm.v1.metrics.loggers import PrometheusStatLogger

            args = AsyncEngineArgs(**self.config.engine_kwargs())
            # Handed over through a list, not returned: the executor's futures and its worker
            # frame would keep a returned engine alive after shutdown(), until interpreter exit.
            # vLLM's engine metrics (vllm:*) go to prometheus-client's default registry, which the
            # worker's /metrics serves; with log stats off, the only stat logger (no periodic log).
            built.append(AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger]))

        # Import + construction block for many seconds; a thread keeps the loop responsive.
        # AsyncLLM supports construction outside the loop: it starts its output task lazily.
        # That thread is the lifetime thread: the EngineCore it starts dies with this process.
        await asyncio.wrap_future(lifeline.launch(build))
        llm = built.pop()
        # What AsyncLLM.__init__ does when built on a running loop: start pulling outputs now, so an
        # engine failure before the first request is noticed. Private, hence guarded.
        start_output_handler = getattr(llm, "_run_output_handler", None)
        if callable(start_output_handler):
            start_output_handler()
        try:
            self._chat_template = _resolve_chat_template(llm)
            self._render = _make_renderer(llm)
        except BaseException:
            llm.shutdown()
            raise
        self._llm = llm

    def describe(self) -> dict[str, Any]:
        """The settings of the running engine as vLLM resolved them (after ``start``), for its log."""
        config = self._require_llm().vllm_config
        model, scheduler = config.model_config, config.scheduler_config
        multimodal = model.multimodal_config
        return {
            "model": model.model,
            "revision": model.revision,
            "dtype": str(model.dtype).removeprefix("torch."),
            "quantization": model.quantization,
            "max_model_len": model.max_model_len,
            "max_num_seqs": scheduler.max_num_seqs,
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
            "limit_mm_per_prompt": (
                {m: multimodal.get_limit_per_prompt(m) for m in ("image", "video")} if multimodal else {}
            ),
            "enable_prefix_caching": config.cache_config.enable_prefix_caching,
            "enforce_eager": model.enforce_eager,
        }

    def render_prompt(self, request: EngineRequest) -> str:
        """The prompt text: the model's chat template with one image placeholder per image."""
        text: str = self._templated(request.system_prompt, request.prompt, len(request.images))
        return text

    def _apply_template(self, system_prompt: str | None, prompt: str, images: int) -> str:
        tokenizer: Any = self._require_llm().get_tokenizer()
        request = EngineRequest(request_id="", images=[], prompt=prompt, system_prompt=system_prompt)
        messages = _chat_messages(request, [{"type": "image"} for _ in range(images)])
        return tokenizer.apply_chat_template(
            messages, chat_template=self._chat_template, tokenize=False, add_generation_prompt=True
        )

    async def generate(self, request: EngineRequest) -> str:
        """Generate for one request and return the full text of the (single) completion.

        With ``request.json_schema`` the output is grammar-constrained to the schema; it can still
        be cut off at ``max_tokens`` (give strings ``maxLength`` and arrays ``maxItems``). Raises
        ``ValueError`` for too many images, `EngineDead` when vLLM's EngineCore is gone (its
        ``EngineDeadError``), and vLLM's other errors as they are.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._require_llm()
        if len(request.images) > self.config.max_images_per_prompt:
            n, limit = len(request.images), self.config.max_images_per_prompt
            raise ValueError(f"{n} images > max_images_per_prompt {limit}")
        prompt: dict[str, Any] = {"prompt": self.render_prompt(request)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        engine_input: Any = await self._render(prompt) if self._render else prompt
        params = _sampling_params(request, final_only=True)

        final = None
        try:
            async for output in llm.generate(engine_input, params, request.request_id):
                final = output
        except EngineDeadError as e:
            raise EngineDead(str(e)) from e
        if final is None or not final.outputs:
            raise RuntimeError(f"vLLM returned no output for request {request.request_id}")
        completion = final.outputs[0]
        metrics.count_tokens(len(final.prompt_token_ids or ()), len(completion.token_ids or ()))
        if completion.finish_reason == "length":
            logger.warning("request %s hit max_tokens; output is truncated", request.request_id)
        return completion.text

    async def shutdown(self) -> None:
        """Stop the engine and its EngineCore process (SIGTERM, join, kill after 5 s). Idempotent.

        Called explicitly because relying on garbage collection once left an orphan EngineCore.
        """
        llm, self._llm = self._llm, None
        self._render = None  # holds the renderer (tokenizer, processor)
        if llm is not None:
            llm.shutdown()
            del llm
            # AsyncLLM sits in reference cycles; collect it now, while modules are intact, rather
            # than at interpreter exit where its __del__ fails ("'NoneType' is not callable").
            import gc

            gc.collect()

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise RuntimeError("VLLMEngine.start() has not been awaited")
        return self._llm


def _resolve_chat_template(llm: Any) -> str | None:
    """The template vLLM's chat path would use: the processor's (where Qwen2.5-VL keeps it), else
    the tokenizer's, else vLLM's fallback for the model type."""
    tokenizer = llm.get_tokenizer()
    try:
        from vllm.renderers.hf import resolve_chat_template

        template = resolve_chat_template(tokenizer, None, None, model_config=llm.model_config)
    except (ImportError, TypeError) as exc:  # another vLLM version: use the tokenizer's own
        logger.debug("vLLM chat-template resolution unavailable (%s)", exc)
        template = None
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(f"model {llm.model_config.model!r} has no chat template")
    return template


def _make_renderer(llm: Any) -> Any:
    """An async function prompt-dict -> rendered engine input, or None to pass raw prompts.

    vLLM 0.32 deprecates raw prompts to ``AsyncLLM.generate`` in favour of the renderer's output
    (tokenized, images run through the HF processor; both off the event loop in there).
    """
    renderer = getattr(llm, "renderer", None)
    try:
        from vllm.renderers.inputs.preprocess import parse_model_prompt
    except ImportError:
        return None
    if renderer is None or not hasattr(renderer, "render_cmpl_async"):
        return None
    model_config = llm.model_config
    # The chat template already wrote every special token; add none on top (as vLLM's chat path).
    tok_params = renderer.default_chat_tok_params

    async def render(prompt: dict[str, Any]) -> Any:
        (engine_input,) = await renderer.render_cmpl_async(
            [parse_model_prompt(model_config, prompt)], tok_params
        )
        return engine_input

    return render


def offline_chat(
    config: VLLMEngineConfig,
    requests: list[EngineRequest],
    *,
    stats: dict[str, float] | None = None,
) -> list[str]:
    """Run ``requests`` through vLLM's offline ``LLM.chat`` in one batch; texts in request order.

    Same engine settings, prompts and sampling/structured-output parameters as ``VLLMEngine``, so
    its images/s is the bar for the worker path. Builds and shuts down its own engine (blocking).
    If ``stats`` is given it receives ``start_s`` (engine build) and ``generate_s`` (the batch).
    """
    import time

    _prefer_single_engine_process()
    t0 = time.perf_counter()
    from vllm import LLM

    llm = LLM(**config.engine_kwargs())
    try:
        t1 = time.perf_counter()
        conversations = [
            _chat_messages(r, [{"type": "image_pil", "image_pil": im} for im in r.images]) for r in requests
        ]
        params = [_sampling_params(r, final_only=False) for r in requests]
        outputs = llm.chat(conversations, sampling_params=params, use_tqdm=False)
        if stats is not None:
            stats.update(start_s=t1 - t0, generate_s=time.perf_counter() - t1)
        return [o.outputs[0].text for o in outputs]
    finally:
        # LLM has no public shutdown; its engine core client does (kills any EngineCore child).
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
