"""Engines: one file per implementation behind `workers.engines.base.Engine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engines.base import Engine
    from workers.engines.vllm import VLLMEngineConfig
    from workers.settings import WorkerSettings


def build_engine(settings: WorkerSettings) -> Engine:
    """The engine the settings name; heavy imports happen only here, when it is chosen."""
    if settings.engine == "fake":
        from workers.engines.fake import FakeEngine

        return FakeEngine(model=settings.model, delay_s=settings.fake_delay_s, faults=settings.fake_faults)
    if settings.engine == "openai":
        from workers.engines.openai import OpenAIEngine, OpenAIEngineConfig

        return OpenAIEngine(
            OpenAIEngineConfig(
                base_url=settings.base_url,
                model=settings.model,
                api_key=settings.api_key(),
                max_concurrency=settings.openai_max_concurrency,
                request_timeout_s=max(1, settings.task_time_limit_s - 30),
            )
        )
    from workers.engines.vllm import VLLMEngine

    return VLLMEngine(vllm_config(settings))


def vllm_config(settings: WorkerSettings) -> VLLMEngineConfig:
    """The engine settings a worker uses; on a machine without CUDA, CPU-friendly defaults."""
    from workers.engines.vllm import VLLMEngineConfig

    on_gpu = _cuda_available()
    extra: dict[str, object] = {}
    kv_bytes = settings.kv_cache_memory_bytes
    if kv_bytes is None and not on_gpu:
        # On CPU gpu_memory_utilization is a share of host RAM (0.9 would claim ~21 GB here).
        kv_bytes = 1 << 30
    if kv_bytes is not None:
        extra["kv_cache_memory_bytes"] = kv_bytes
    return VLLMEngineConfig(
        model=settings.model,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_num_seqs=settings.max_num_seqs,
        max_images_per_prompt=settings.max_images_per_prompt,
        dtype=settings.dtype,
        # torch.compile costs ~40 s at start on CPU and gains nothing there; CUDA graphs pay on GPU.
        enforce_eager=settings.enforce_eager if settings.enforce_eager is not None else not on_gpu,
        extra_engine_args=extra,
    )


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
