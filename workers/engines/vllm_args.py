"""vLLM engine arguments by vLLM's names: read from JSON or ``@file``, checked against ``AsyncEngineArgs``.

A worker takes the common arguments as options of its own (``--max-model-len``, ...) and any other
through ``--engine-args`` (``IMAGEQA_ENGINE_ARGS``). `parse_engine_args` only reads the text (no vLLM
import); `check_engine_args` imports vLLM and checks each name against the fields of its
``AsyncEngineArgs`` and each value against that field's type, as ``vllm serve`` would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from producer.errors import EngineArgsError

__all__ = ["check_engine_args", "normalize_name", "parse_engine_args"]

OWNED_BY_WORKER = {"model": "give the model with --model (IMAGEQA_MODEL)"}
"""Engine arguments the worker sets from settings of its own, which --engine-args may not change."""


def normalize_name(name: str) -> str:
    """vLLM's command-line spelling to its field name: ``--max-model-len`` -> ``max_model_len``."""
    return name.strip().lstrip("-").replace("-", "_")


def parse_engine_args(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """Engine arguments from a JSON object, ``@path`` to a JSON (or ``.yaml``) file, or a dict; names
    in either spelling (``max-model-len`` or ``max_model_len``). Raises `EngineArgsError`."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = _load(value)
    if not isinstance(value, dict):
        raise EngineArgsError(f"engine arguments must be a JSON object of name: value, not {value!r}")
    args: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not normalize_name(name):
            raise EngineArgsError(f"engine argument names must be non-empty strings, not {name!r}")
        key = normalize_name(name)
        if key in args:
            raise EngineArgsError(f"engine argument {key} is given twice")
        if key in OWNED_BY_WORKER:
            raise EngineArgsError(f"engine argument {key} cannot be given here: {OWNED_BY_WORKER[key]}")
        args[key] = item
    return args


def _load(text: str) -> Any:
    source = "--engine-args"
    if text.strip().startswith("@"):
        path = Path(text.strip()[1:]).expanduser()
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineArgsError(f"cannot read engine arguments from {path}: {e}") from e
        source = str(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise EngineArgsError(f"{source} is not valid YAML: {e}") from e
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EngineArgsError(
            f"{source} is not a JSON object ({e.msg} at line {e.lineno} column {e.colno}): {_clip(text)}"
        ) from e


def check_engine_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` checked against vLLM's ``AsyncEngineArgs`` (imports vLLM): every name must be one of its
    fields and every value valid for that field's type. Returns the values as vLLM takes them (a dict
    for a config field becomes that config). Raises `EngineArgsError` naming the closest names."""
    fields = _fields()
    checked: dict[str, Any] = {}
    for name, value in parse_engine_args(args).items():
        if name not in fields:
            raise EngineArgsError(_unknown(name, list(fields)))
        adapter = _adapter(name)
        if adapter is None:  # a type pydantic cannot check (torch.dtype, ...): vLLM checks it itself
            checked[name] = value
            continue
        from pydantic import ValidationError

        try:
            checked[name] = adapter.validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(_path_in(value, first["loc"]))
            raise EngineArgsError(
                f"engine argument {name}{'.' + where if where else ''}: {first['msg']} "
                f"(got {_clip(json.dumps(value, default=str))}; vLLM's type: {_type_name(fields[name])})"
            ) from None
    return checked


def _unknown(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    close += [n for n in names if name in n and n not in close][: 3 - len(close)]
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "see `vllm serve --help` for the engine arguments (--foo-bar is foo_bar here)"
    )
    return f"unknown vLLM engine argument {name!r}: {hint}"


def _path_in(value: Any, loc: tuple[Any, ...]) -> list[str]:
    """The part of a validation error's location that is in the value (not a union member's tag)."""
    path = []
    for part in loc:
        in_dict = isinstance(value, dict) and part in value
        in_list = isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        if not (in_dict or in_list):
            break
        value = value[part]
        path.append(str(part))
    return path


def _type_name(hint: Any) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "")


def _clip(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=1)
def _fields() -> dict[str, Any]:
    """``AsyncEngineArgs``'s field name -> its type (a string where it cannot be resolved)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    module = vars(sys.modules[AsyncEngineArgs.__module__])
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(AsyncEngineArgs):
        hint = field.type
        if isinstance(hint, str):
            # Annotations written as strings in vLLM's module; a name only imported for type
            # checkers stays a string (its values go unchecked here).
            with contextlib.suppress(Exception):
                hint = eval(hint, module)
        fields[field.name] = hint
    return fields


@functools.cache
def _adapter(name: str) -> Any:
    from pydantic import TypeAdapter

    hint = _fields()[name]
    if isinstance(hint, str):
        return None
    try:
        return TypeAdapter(hint)
    except Exception:  # pydantic has no schema for it
        return None
