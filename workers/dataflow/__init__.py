"""The DataFlow operator API: ``ImageQAGenerate(serving).run(storage, ...)`` on one box or a cluster.

    from workers.dataflow import FileStorage, ImageQAGenerate, LocalModelVLMServing_vllm

    serving = LocalModelVLMServing_vllm(hf_model_name_or_path="Qwen/Qwen2.5-VL-3B-Instruct")
    storage = FileStorage(first_entry_file_name="data/rows.jsonl", cache_path="./cache_local",
                          file_name_prefix="imageqa", cache_type="jsonl")
    storage.step()
    ImageQAGenerate(serving).run(storage=storage, multi_modal_key="image", output_key="qa_pairs")
    # -> ./cache_local/imageqa_step1.jsonl: each row + "qa_pairs": [{"question": ..., "answer": ...}]

Servings: `LocalModelVLMServing_vllm` (vLLM in this process), `APIVLMServing_openai` (any
OpenAI-compatible server), `ClusterServing` (a running imageqa cluster), `LocalServing` (any engine).
"""

from producer.errors import (
    ClusterServingError,
    DataFlowError,
    EngineArgsError,
    ModelUnavailable,
    StorageError,
)
from workers.dataflow.cluster import ClusterServing
from workers.dataflow.operator import ImageQAGenerate
from workers.dataflow.servings import (
    APIVLMServing_openai,
    LocalModelVLMServing_vllm,
    LocalServing,
    RowInput,
    RowResult,
    RunContext,
    Serving,
)
from workers.dataflow.storage import FileStorage

__all__ = [
    "APIVLMServing_openai",
    "ClusterServing",
    "ClusterServingError",
    "DataFlowError",
    "EngineArgsError",
    "FileStorage",
    "ImageQAGenerate",
    "LocalModelVLMServing_vllm",
    "LocalServing",
    "ModelUnavailable",
    "RowInput",
    "RowResult",
    "RunContext",
    "Serving",
    "StorageError",
]
