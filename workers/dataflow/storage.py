"""`FileStorage`: DataFlow's step files on disk, read and written exactly (no pandas type guessing).

Step 0 is the first entry file; step N >= 1 is ``{cache_path}/{file_name_prefix}_step{N}.{cache_type}``.
Rows are read with the producer's input readers, so a JSONL row comes back byte for byte as it was
written; pandas is needed only for ``read(output_type="dataframe")`` and for writing a DataFrame.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

from producer.errors import ErrorCode, InputError, StorageError
from producer.inputs import detect_format, read_rows, resolve_ref

log = logging.getLogger(__name__)

CACHE_TYPES = ("jsonl", "json", "csv", "parquet")
MEDIA_TYPES = ("image",)

Row = dict[str, Any]


class FileStorage:
    """Step files of a DataFlow pipeline, with a named media column.

    Call ``step()`` before each operator: it advances the step counter (from -1) and returns a copy,
    as in DataFlow. ``read()`` reads the current step (step 0 is ``first_entry_file_name``, whose
    format comes from its suffix: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, or a folder of images);
    ``write(data)`` writes the next step's file in ``cache_type``, atomically. CSV cells that hold a
    JSON list or object come back as that value; other CSV cells come back as strings.

    ``media_key`` names the column that holds media (what an operator's ``multi_modal_key`` usually
    names); ``media_type`` must be ``"image"``. Relative media paths resolve against the first entry
    file's folder, then the working directory (`resolve_media`); the rows keep them as written.
    """

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache",
        file_name_prefix: str = "dataflow_cache",
        cache_type: str = "jsonl",
        media_key: str = "image",
        media_type: str = "image",
    ) -> None:
        if cache_type not in CACHE_TYPES:
            raise StorageError(
                f"cache_type {cache_type!r} is not supported; use one of {', '.join(CACHE_TYPES)}"
            )
        if media_type not in MEDIA_TYPES:
            raise StorageError(f"media_type {media_type!r} is not supported; this storage serves images")
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.media_key = media_key
        self.media_type = media_type
        self.operator_step = -1
        entry = Path(first_entry_file_name) if first_entry_file_name else None
        base = (entry if entry.is_dir() else entry.parent) if entry is not None else Path(".")
        self._media_base = base.resolve()

    def step(self) -> FileStorage:
        """Advances to the next step and returns a copy of the storage at that step."""
        self.operator_step += 1
        return copy.copy(self)

    def reset(self) -> FileStorage:
        self.operator_step = -1
        return self

    def file_path(self, step: int) -> Path:
        """The file of ``step``: the first entry file for 0, a step file in ``cache_path`` after."""
        if step < 0:
            raise StorageError("call storage.step() before reading or writing (once before each operator)")
        if step == 0:
            return Path(self.first_entry_file_name)
        return Path(self.cache_path) / f"{self.file_name_prefix}_step{step}.{self.cache_type}"

    def read(self, output_type: Literal["dataframe", "dict"] = "dataframe") -> Any:
        """The current step's rows: a pandas DataFrame, or with ``"dict"`` a list of dicts."""
        if output_type not in ("dataframe", "dict"):
            raise StorageError(f"output_type must be 'dataframe' or 'dict', not {output_type!r}")
        rows = self._read_rows()
        return rows if output_type == "dict" else _dataframe(rows)

    def write(self, data: Any) -> str:
        """Writes a list of dicts or a DataFrame as the next step's file; returns its path."""
        rows = _rows_of(data)
        path = self.file_path(self.operator_step + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a crash never leaves a half-written step file behind.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            _WRITERS[self.cache_type](tmp, rows)
            os.replace(tmp, path)
        except (TypeError, ValueError) as e:
            raise StorageError(f"cannot write {path} as {self.cache_type}: {e}") from e
        finally:
            tmp.unlink(missing_ok=True)
        log.info("wrote %d rows to %s", len(rows), path)
        return str(path)

    def get_keys_from_dataframe(self) -> list[str]:
        """The column names of the current step, in first-seen order."""
        return list(_columns(self._read_rows()))

    def resolve_media(self, ref: str) -> str:
        """A media reference as an engine needs it. URIs and absolute paths pass unchanged; a relative
        path resolves against the first entry file's folder if the file is there, else against the
        working directory if it is there, else against the folder (so errors name that place).
        Raises `InputError` (``image_ref_invalid``) for an unsupported URI scheme."""
        primary = resolve_ref(ref, self._media_base)
        if len(urlsplit(ref).scheme) > 1 or Path(ref).is_absolute() or Path(primary).exists():
            return primary
        fallback = resolve_ref(ref, Path.cwd())
        return fallback if Path(fallback).exists() else primary

    def _read_rows(self) -> list[Row]:
        path = self.file_path(self.operator_step)
        if self.operator_step == 0 and not self.first_entry_file_name:
            return []
        try:
            fmt = detect_format(path) if self.operator_step == 0 else self.cache_type
            rows = []
            for raw in read_rows(path, fmt):
                if raw.error is not None:
                    raise StorageError(f"{path}: {raw.error.message}", code=raw.error.code)
                if not isinstance(raw.row, dict):
                    kind = type(raw.row).__name__
                    raise StorageError(
                        f"{path}: row {raw.index + 1} is a {kind}, not an object",
                        code=ErrorCode.ROW_MALFORMED,
                    )
                rows.append(raw.row)
        except InputError as e:
            raise StorageError(e.message, code=e.code) from e
        if fmt == "csv":
            rows = [{key: _csv_cell(value) for key, value in row.items()} for row in rows]
        if fmt == "folder" and self.media_key != "image":
            rows = [{self.media_key: row["image"]} for row in rows]
        return rows


def _dataframe(rows: list[Row]) -> Any:
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the install
        raise StorageError(
            "read(output_type='dataframe') needs pandas: pip install 'imageqa[service]'"
        ) from e
    return pd.DataFrame(rows)


def _rows_of(data: Any) -> list[Row]:
    if isinstance(data, list):
        if not all(isinstance(row, dict) for row in data):
            raise StorageError(
                "write() takes a list of dicts or a pandas DataFrame; the list holds other values"
            )
        return data
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a DataFrame; pandas is not imported here
        return [{str(k): _plain(v) for k, v in row.items()} for row in data.to_dict(orient="records")]
    raise StorageError(f"write() takes a list of dicts or a pandas DataFrame, not {type(data).__name__}")


def _plain(value: Any) -> Any:
    """A DataFrame cell as a JSON-like value: numpy values to Python ones, NaN / NA / NaT to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bytes, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else float(value)
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    return _plain(tolist()) if callable(tolist) else value


def _columns(rows: list[Row]) -> dict[str, None]:
    return dict.fromkeys(key for row in rows for key in row)


def _json_default(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_jsonl(path: Path, rows: list[Row]) -> None:
    with path.open("wb") as f:
        for row in rows:
            f.write(orjson.dumps(row, default=_json_default) + b"\n")


def _write_json(path: Path, rows: list[Row]) -> None:
    path.write_bytes(orjson.dumps(rows, default=_json_default, option=orjson.OPT_INDENT_2) + b"\n")


def _write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(_columns(rows)), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_text(value) for key, value in row.items()})


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):  # read back as the value by `_csv_cell`
        return orjson.dumps(value, default=_json_default).decode()
    return str(value)


def _csv_cell(value: Any) -> Any:
    # The producer's reader already turns "[...]" cells into lists; objects ("{...}") come back too.
    if isinstance(value, str) and value.startswith("{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _write_parquet(path: Path, rows: list[Row]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the install
        raise StorageError("writing Parquet needs pyarrow: pip install 'imageqa[service]'") from e
    # Every key of every row (pyarrow's from_pylist would take the first row's keys only).
    table = pa.table({key: [row.get(key) for row in rows] for key in _columns(rows)})
    pq.write_table(table, path)


_WRITERS: dict[str, Callable[[Path, list[Row]], None]] = {
    "jsonl": _write_jsonl,
    "json": _write_json,
    "csv": _write_csv,
    "parquet": _write_parquet,
}
