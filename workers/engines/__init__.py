"""Engines: one file per implementation behind `workers.engines.base.Engine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engines.base import Engine
    from workers.engines.vllm import VLLMEngineConfig
    from workers.settings import EngineSettings


def build_engine(settings: EngineSettings, *, request_timeout_s: float) -> Engine:
    """The engine of kind ``settings.kind``; heavy imports happen only here, when it is chosen.

    ``request_timeout_s`` bounds one request where the engine enforces it itself (engine=openai).
    """
    if settings.kind == "fake":
        from workers.engines.fake import FakeEngine

        return FakeEngine(model=settings.model, delay_s=settings.fake.delay_s, faults=settings.fake.faults)
    if settings.kind == "openai":
        from workers.engines.openai import OpenAIEngine, OpenAIEngineConfig

        return OpenAIEngine(
            OpenAIEngineConfig(
                base_url=settings.openai.base_url,
                model=settings.model,
                api_key=settings.openai.api_key(),
                max_concurrency=settings.openai.max_concurrency,
                request_timeout_s=request_timeout_s,
            )
        )
    if settings.kind == "simgpu":
        from workers.engines.simgpu import SimGPUEngine

        return SimGPUEngine(vllm_config(settings), settings.simgpu.service_s, settings.simgpu.slots)
    from workers.engines.vllm import VLLMEngine

    return VLLMEngine(vllm_config(settings))


def vllm_config(settings: EngineSettings) -> VLLMEngineConfig:
    """The vLLM engine config a worker uses; on a machine without CUDA, CPU-friendly defaults.

    Imports vLLM to check the engine arguments against it: raises `producer.errors.EngineArgsError`.
    """
    from workers.engines.vllm import VLLMEngineConfig
    from workers.engines.vllm_args import check_engine_args

    vllm = settings.vllm
    on_gpu = _cuda_available()
    extra: dict[str, object] = {
        name: value
        for name in ("quantization", "revision", "enable_prefix_caching", "max_num_batched_tokens")
        if (value := getattr(vllm, name)) is not None
    }
    if vllm.trust_remote_code:
        extra["trust_remote_code"] = True
    kv_bytes = vllm.kv_cache_memory_bytes
    if kv_bytes is None and not on_gpu:
        # On CPU gpu_memory_utilization is a share of host RAM (0.9 would claim ~21 GB here).
        kv_bytes = 1 << 30
    if kv_bytes is not None:
        extra["kv_cache_memory_bytes"] = kv_bytes
    # The engine's own settings too: `--dtype bf16` should fail here, not in the middle of the start.
    own = vllm.model_dump(exclude={"engine_args", "max_images_per_prompt"}, exclude_none=True)
    check_engine_args(own)
    engine_args = check_engine_args(vllm.engine_args)
    if "limit_mm_per_prompt" in engine_args:  # other modalities (or the image's size) beside the count
        engine_args["limit_mm_per_prompt"] = {
            "image": vllm.max_images_per_prompt,
            "video": 0,
            **engine_args["limit_mm_per_prompt"],
        }
    extra.update(engine_args)
    return VLLMEngineConfig(
        model=settings.model,
        max_model_len=vllm.max_model_len,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        tensor_parallel_size=vllm.tensor_parallel_size,
        max_num_seqs=vllm.max_num_seqs,
        max_images_per_prompt=vllm.max_images_per_prompt,
        dtype=vllm.dtype,
        # torch.compile costs ~40 s at start on CPU and gains nothing there; CUDA graphs pay on GPU.
        enforce_eager=vllm.enforce_eager if vllm.enforce_eager is not None else not on_gpu,
        extra_engine_args=extra,
    )


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
