"""The vLLM engine options of ``imageqa worker`` and ``imageqa run``, under vLLM's own names.

`with_engine_options` gives a command the common engine arguments as options (``--max-model-len``,
``--tensor-parallel-size``, ...) and ``--engine-args JSON|@file`` for any other; the command receives
the ones given as ``vllm``, a dict for `workers.settings.VLLMSettings` (the options go over the
``IMAGEQA_*`` variables; ``--engine-args`` replaces ``IMAGEQA_ENGINE_ARGS``).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from producer.cli import fail
from producer.errors import EngineArgsError
from workers.engines.vllm_args import parse_engine_args

_PANEL = "vLLM engine (engine=vllm)"


def _option(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_PANEL, show_default=False)


def engine_options(
    tensor_parallel_size: Annotated[
        int | None, _option("--tensor-parallel-size", help="GPUs one engine spans (default 1).")
    ] = None,
    max_model_len: Annotated[
        int | None, _option("--max-model-len", help="Context length in tokens (default: the model's).")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, _option("--gpu-memory-utilization", help="Share of GPU memory vLLM takes (0.9).")
    ] = None,
    max_num_seqs: Annotated[
        int | None, _option("--max-num-seqs", help="Sequences batched in one engine step (64).")
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None, _option("--max-num-batched-tokens", help="Tokens in one engine step.")
    ] = None,
    quantization: Annotated[
        str | None, _option("--quantization", help="awq, gptq, fp8, ... (default: the checkpoint's).")
    ] = None,
    revision: Annotated[str | None, _option("--revision", help="Hub branch, tag or commit.")] = None,
    dtype: Annotated[str | None, _option("--dtype", help="auto, bfloat16, float16, float32.")] = None,
    trust_remote_code: Annotated[
        bool | None,
        _option("--trust-remote-code/--no-trust-remote-code", help="Run the model repository's own code."),
    ] = None,
    enable_prefix_caching: Annotated[
        bool | None,
        _option(
            "--enable-prefix-caching/--no-enable-prefix-caching",
            help="Reuse the KV cache of shared prompt prefixes.",
        ),
    ] = None,
    enforce_eager: Annotated[
        bool | None,
        _option("--enforce-eager/--no-enforce-eager", help="No CUDA graphs (default: on for CPU)."),
    ] = None,
    kv_cache_memory_bytes: Annotated[
        int | None, _option("--kv-cache-memory-bytes", help="KV cache size (CPU default 1 GiB).")
    ] = None,
    limit_mm_per_prompt: Annotated[
        str | None,
        _option(
            "--limit-mm-per-prompt",
            help="Items per prompt by modality: '{\"image\": 2}' or image=2 (default 4 images); "
            "rows with more images fail as too_many_images.",
        ),
    ] = None,
    engine_args: Annotated[
        str | None,
        _option(
            "--engine-args",
            help="Any other vLLM engine argument: a JSON object by vLLM's names, or @file (JSON or YAML).",
        ),
    ] = None,
) -> dict[str, Any]:
    """The engine settings given on the command line, for `VLLMSettings`; a malformed one exits with
    one line saying why."""
    options = dict(locals())
    given = {
        name: value
        for name, value in options.items()
        if value is not None and name not in ("limit_mm_per_prompt", "engine_args")
    }
    try:
        if engine_args is not None:
            given["engine_args"] = parse_engine_args(engine_args)
        if limit_mm_per_prompt is not None:
            limits = _limits(limit_mm_per_prompt)
            if isinstance(limits.get("image"), int):
                given["max_images_per_prompt"] = limits.pop("image")
            if limits:  # other modalities, or the image's size: with the other engine arguments
                args = given.setdefault("engine_args", {})
                if "limit_mm_per_prompt" in args:
                    raise EngineArgsError("limit_mm_per_prompt is given twice: in --engine-args and alone")
                args["limit_mm_per_prompt"] = limits
    except EngineArgsError as e:
        raise fail(e) from None
    return given


def _limits(text: str) -> dict[str, Any]:
    """``{"image": 2}`` (vLLM's JSON form) or ``image=2,video=0`` (its older form)."""
    if text.strip().startswith("{"):
        try:
            limits = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineArgsError(f"--limit-mm-per-prompt is not a JSON object ({e.msg}): {text}") from e
    else:
        try:
            limits = {k.strip(): int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
        except ValueError:
            raise EngineArgsError(
                f"--limit-mm-per-prompt {text!r}: expected '{{\"image\": 2}}' or image=2"
            ) from None
    if not isinstance(limits, dict) or not all(
        isinstance(v, (int, dict)) and not isinstance(v, bool) for v in limits.values()
    ):
        raise EngineArgsError(
            f'--limit-mm-per-prompt {text!r}: expected counts by modality, like {{"image": 2}}'
        )
    return limits


def with_engine_options(command: Callable[..., None]) -> Callable[..., None]:
    """Gives a command the options of `engine_options` in place of its keyword parameter ``vllm``,
    which receives the settings given (a dict, empty when none is)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "vllm"]
    options = list(inspect.signature(engine_options, eval_str=True).parameters.values())
    names = [p.name for p in options]

    @functools.wraps(command, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    def wrapper(**kwargs: Any) -> None:
        vllm = engine_options(**{name: kwargs.pop(name) for name in names})
        command(vllm=vllm, **kwargs)

    # Before the command's keyword-only parameters, which must stay last.
    positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    parameters = positional + options + keyword
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper
