"""Checks before the engine starts, so that a worker that cannot serve says why in one line, at once.

`check_model` finds out whether vLLM could load the model: a local folder must hold a checkpoint (a
``config.json`` and weight files); a hub id must be in the local Hugging Face cache, or the hub must
answer for it. Without it, a missing model costs the engine's whole start (half a minute on a CPU)
and ends in a page of traceback. `check_engine` adds the engine arguments, checked against vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from producer.errors import ModelUnavailable
from workers.settings import DEFAULT_MODEL, EngineSettings

__all__ = ["check_engine", "check_engine_model", "check_model"]

HUB_TIMEOUT_S = 10.0
"""Longest wait for the hub's answer about a model that is not in the local cache."""
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json")
CONFIG_FILES = ("config.json", "params.json")  # Hugging Face's, Mistral's
USE_FOLDER = "pass --model a checkpoint folder (config.json and *.safetensors) or a hub id"


def check_engine(settings: EngineSettings) -> None:
    """For engine=vllm: the engine arguments are vLLM's (imports vLLM) and the model can be loaded.
    Raises `EngineArgsError` or `ModelUnavailable`; other engines need no check here."""
    if settings.kind != "vllm":
        return
    check_engine_model(settings)  # first: it takes a moment, importing vLLM takes seconds
    from workers.engines import vllm_config

    vllm_config(settings)


def check_engine_model(settings: EngineSettings) -> None:
    """For engine=vllm: `check_model` with the revision and loading arguments of ``settings``."""
    if settings.kind == "vllm":
        check_model(settings.model, {**settings.vllm.engine_args, "revision": settings.vllm.revision})


def check_model(model: str, engine_args: dict[str, Any] | None = None) -> None:
    """Raises `ModelUnavailable` with what to do when vLLM could not load ``model`` (a folder, a
    ``.gguf`` file or a hub id); ``engine_args`` may name its ``revision``, ``download_dir`` and
    ``load_format``. Asks the hub only for a hub id that is not in the local cache."""
    args = engine_args or {}
    if "://" in model or os.environ.get("VLLM_USE_MODELSCOPE", "").lower() in ("1", "true"):
        return  # object storage (a loader of vLLM's) or another hub: vLLM's to check
    needs_weights = str(args.get("load_format", "auto")) != "dummy"
    path = Path(model).expanduser()
    if path.exists():
        _check_folder(path, needs_weights)
    elif model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
        raise ModelUnavailable(f"model folder {model} does not exist: {USE_FOLDER} such as {DEFAULT_MODEL}")
    else:
        _check_hub(model, args.get("revision"), args.get("download_dir"), needs_weights)


def _check_folder(path: Path, needs_weights: bool) -> None:
    if path.is_file():
        if path.suffix == ".gguf":
            return
        raise ModelUnavailable(f"model {path} is a file, not a checkpoint folder: {USE_FOLDER}")
    if not any((path / name).is_file() for name in CONFIG_FILES):
        raise ModelUnavailable(f"model folder {path} holds no model (no config.json): {USE_FOLDER}")
    if needs_weights and not _has_weights(path):
        raise ModelUnavailable(
            f"model folder {path} has a config.json but no weights (*.safetensors, *.bin): copy the "
            "checkpoint's weight files there, or pass --model a complete checkpoint folder or a hub id"
        )


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS)


def _check_hub(model: str, revision: str | None, cache_dir: str | None, needs_weights: bool) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelUnavailable(
            f"model {model!r} is neither an existing folder nor a hub id (namespace/name): {USE_FOLDER}"
        ) from None
    cache = cache_dir or constants.HF_HUB_CACHE
    cached = huggingface_hub.try_to_load_from_cache(model, "config.json", cache_dir=cache, revision=revision)
    offline = huggingface_hub.is_offline_mode()
    if isinstance(cached, str):
        if not offline or not needs_weights or _has_weights(Path(cached).parent):
            return  # vLLM fetches whatever else it needs, or finds it all in the cache
        raise ModelUnavailable(
            f"model {model} is only partly in the local Hugging Face cache ({cache}: no weights) and "
            f"HF_HUB_OFFLINE is set: download it with `hf download {model}`, or pass --model /path/to/folder"
        )
    download = (
        f"download it with `hf download {model}` where the hub is reachable, or pass --model /path/to/folder"
    )
    if offline:
        raise ModelUnavailable(
            f"model {model} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
            + download
        )
    endpoint = constants.ENDPOINT
    try:
        info = huggingface_hub.HfApi().model_info(model, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelUnavailable(_gated(model, endpoint)) from None
    except RevisionNotFoundError:
        raise ModelUnavailable(
            f"model {model} has no revision {revision!r} on the hub ({endpoint})"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"model {model} is not on the hub ({endpoint}): check the id (set HF_TOKEN for a private "
            "model), or pass --model /path/to/folder"
        ) from None
    except Exception as e:  # no network, no DNS, a proxy or the hub failing: all mean "cannot reach it"
        raise ModelUnavailable(
            f"model {model} is not in the local Hugging Face cache ({cache}) and the hub ({endpoint}) "
            f"cannot be reached ({_reason(e)}): {download}"
        ) from None
    if getattr(info, "gated", False) and not huggingface_hub.get_token():
        raise ModelUnavailable(_gated(model, endpoint))


def _gated(model: str, endpoint: str) -> str:
    return (
        f"model {model} is gated: accept its terms at {endpoint}/{model} and set HF_TOKEN (of that account)"
    )


def _reason(error: BaseException) -> str:
    """The innermost cause's message, on one line: "[Errno -2] Name or service not known"."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
