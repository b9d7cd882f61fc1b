"""Engines: one file per implementation behind `workers.engines.base.Engine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.engines.base import Engine
    from workers.settings import WorkerSettings


def build_engine(settings: WorkerSettings) -> Engine:
    """The engine the settings name; heavy imports happen only here, when it is chosen."""
    if settings.engine == "fake":
        from workers.engines.fake import FakeEngine

        return FakeEngine(model=settings.model, delay_s=settings.fake_delay_s)
    from workers.engines.vllm import VLLMEngine, VLLMEngineConfig

    return VLLMEngine(
        VLLMEngineConfig(
            model=settings.model,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            max_num_seqs=settings.max_num_seqs,
            max_images_per_prompt=settings.max_images_per_prompt,
            dtype=settings.dtype,
        )
    )
