"""Where a row's pairs came from: the model's revision and the prompt's hash, for ``qa_meta``.

The prompt hash covers the full rendered prompt a worker sends (system prompt and user text, before
any regeneration adds the questions already taken), so rows made with the same prompt share it
and a changed prompt shows. The model revision is the hub commit of a cached or snapshot
checkpoint, else a hash of a local checkpoint's config and weight file names and sizes (reading
gigabytes of weights per worker start would cost more than it tells).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from producer.contract import GenerationParams, Provenance
from producer.errors import ImageQAError
from workers.prompts import prompt_spec

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def provenance(params: GenerationParams, n_images: int, model: str) -> Provenance | None:
    """The provenance of a row made with ``params`` for ``n_images`` images on ``model``; None when
    the prompt cannot be built (an unknown prompt name: the row fails for that anyway)."""
    try:
        spec = prompt_spec(params, n_images)
    except ImageQAError:
        return None
    return Provenance(
        model_revision=model_revision(model),
        prompt_name="custom" if params.prompt_template is not None else params.prompt_version,
        prompt_hash=prompt_hash(spec.system_prompt, spec.text),
        sampling={"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens},
        params_fingerprint=params.fingerprint(),
    )


def prompt_hash(system_prompt: str | None, text: str) -> str:
    """16 hex digits of the SHA-256 of the system prompt and the user text."""
    digest = hashlib.sha256()
    digest.update((system_prompt or "").encode())
    digest.update(b"\0")
    digest.update(text.encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def model_revision(model: str) -> str | None:
    """The checkpoint's revision: a hub commit when one is known, ``files:<hash>`` for another local
    folder, None for a served model name nothing is known about (cached per process)."""
    path = Path(model).expanduser()
    if path.is_dir():
        parent = path.resolve().parent
        if parent.name == "snapshots" and _COMMIT.match(path.resolve().name):
            return path.resolve().name
        return "files:" + _files_hash(path)
    return _cached_hub_commit(model)


def _files_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    weights = sorted({p for pattern in _WEIGHTS for p in folder.glob(pattern)})
    for weight in weights:
        digest.update(f"\0{weight.name}\0{weight.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _cached_hub_commit(model: str) -> str | None:
    """The commit the local hub cache resolves ``model``'s main branch to, if it holds the model."""
    if model.count("/") != 1:
        return None
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - installed with the service extra
        return None
    ref = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None
