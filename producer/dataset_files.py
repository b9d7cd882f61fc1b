"""Dataset inputs: Parquet and Arrow files in the Hugging Face ``datasets`` layout, folders written by
``datasets.save_to_disk``, ``hf://datasets/ORG/NAME`` and WebDataset tar shards.

An image stored in the file (a ``{"bytes", "path"}`` struct, a binary column, a tar member) becomes an
`EmbeddedRef` in the row, so the task names the file and the cell and the worker reads just that image;
the item id hashes the image's digest instead (`RawRow.key`). A struct with only a ``path`` becomes
that path, resolved like any image reference.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from producer.errors import ErrorCode, InputError
from producer.sources import (
    EmbeddedRef,
    Location,
    absolute,
    exists,
    filesystem,
    input_error,
    join,
    open_input,
    store_url,
)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
"""WebDataset member extensions read as images (the first one a sample has is its image)."""
TEXT_MEMBERS = frozenset({"txt", "text", "caption", "cls", "cls2", "id", "index", "label", "md"})
"""WebDataset member extensions copied into the row as text (``json`` is parsed)."""
MAX_TEXT_MEMBER_BYTES = 1024 * 1024
"""A text or JSON member larger than this is referred to, like an image, instead of copied."""
DEFAULT_SPLIT = "train"

Row = dict[str, Any]
MakeRef = Callable[[str, int, int | None], EmbeddedRef]
"""(column, row in the file or row group, item of a list cell) -> the cell's reference."""


def digest(data: bytes) -> str:
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def read_parquet(loc: Location) -> Iterator[tuple[Row, Row]]:
    """(row, key) per row of a Parquet file, one row group at a time."""
    import pyarrow.parquet as pq

    container = str(absolute(loc))
    with open_input(loc) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
            raise InputError(
                f"{loc} is not a readable Parquet file: {e}", code=ErrorCode.INPUT_UNREADABLE
            ) from e
        for group in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(group)

            def make_ref(column: str, row: int, item: int | None, group: int = group) -> EmbeddedRef:
                return EmbeddedRef(container, "parquet", column=column, row_group=group, row=row, item=item)

            yield from _table_rows(table, make_ref)


def read_arrow(loc: Location) -> Iterator[tuple[Row, Row]]:
    """(row, key) per row of an Arrow IPC file or stream (what ``save_to_disk`` writes)."""
    import pyarrow as pa

    container = str(absolute(loc))
    offset = 0
    with open_input(loc) as f:
        try:
            reader = _arrow_reader(pa, f)
        except Exception as e:
            raise InputError(
                f"{loc} is not a readable Arrow file: {e}", code=ErrorCode.INPUT_UNREADABLE
            ) from e
        for batch in reader:
            table = pa.Table.from_batches([batch])

            def make_ref(column: str, row: int, item: int | None, offset: int = offset) -> EmbeddedRef:
                return EmbeddedRef(container, "arrow", column=column, row=offset + row, item=item)

            yield from _table_rows(table, make_ref)
            offset += batch.num_rows


def _arrow_reader(pa: Any, f: Any) -> Iterator[Any]:
    head = f.read(6)
    f.seek(0)
    if head == b"ARROW1":  # the random-access file format
        reader = pa.ipc.open_file(f)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(pa.ipc.open_stream(f))


def _table_rows(table: Any, make_ref: MakeRef) -> Iterator[tuple[Row, Row]]:
    kinds = {field.name: kind for field in table.schema if (kind := _bytes_kind(field.type))}
    for index, row in enumerate(table.to_pylist()):
        if not kinds:
            yield row, row
            continue
        key = dict(row)
        for column, kind in kinds.items():
            value = row[column]
            if kind == "list" and isinstance(value, list):
                cells = [_cell(v, make_ref, column, index, i) for i, v in enumerate(value)]
                row[column], key[column] = [c[0] for c in cells], [c[1] for c in cells]
            else:
                row[column], key[column] = _cell(value, make_ref, column, index, None)
        yield row, key


def _bytes_kind(type_: Any) -> str | None:
    """``cell`` for an image struct or binary column, ``list`` for a list of them, else None."""
    import pyarrow as pa

    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return "cell"
    if pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0:
        return "cell"
    if pa.types.is_list(type_) or pa.types.is_large_list(type_):
        return "list" if _bytes_kind(type_.value_type) == "cell" else None
    return None


def _cell(value: Any, make_ref: MakeRef, column: str, row: int, item: int | None) -> tuple[Any, Any]:
    """(what the row holds, what the item id hashes) for one image cell."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if isinstance(data, bytes | bytearray):
        return str(make_ref(column, row, item)), digest(bytes(data))
    return path, path


def saved_dataset_files(folder: Location, split: str | None) -> list[Location]:
    """The Arrow files of a ``save_to_disk`` folder, in order; a ``DatasetDict`` folder's ``split``
    (default ``train``, or its only split)."""
    if exists(join(folder, "dataset_dict.json")):
        splits = list(_read_json(join(folder, "dataset_dict.json")).get("splits", []))
        folder = join(folder, _pick_split(splits, split, folder))
    elif split is not None:
        raise InputError(
            f"{folder} holds one dataset with no splits; drop --split", code=ErrorCode.INPUT_UNREADABLE
        )
    state = _read_json(join(folder, "state.json"))
    files = [join(folder, entry["filename"]) for entry in state.get("_data_files", [])]
    if not files:
        raise InputError(f"{folder} lists no data files in state.json", code=ErrorCode.INPUT_UNREADABLE)
    return files


def hub_dataset_files(root: Location, split: str | None) -> list[Location]:
    """The Parquet files of a dataset repository (``hf://datasets/ORG/NAME``, or a folder laid out
    the same way) that hold ``split`` (default ``train`` if there is one, else all of them): files
    named ``SPLIT-00000-of-00002.parquet`` or ``SPLIT.parquet``, or ``SPLIT/0000.parquet``."""
    if isinstance(root, Path):
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
    else:
        fs, path = filesystem(root)
        path = path.rstrip("/")
        try:
            found = sorted(posixpath.relpath(p, path) for p in fs.glob(path + "/**/*.parquet"))
        except Exception as e:
            raise input_error(e, root) from e
    if not found:
        raise InputError(f"no Parquet files in {root}", code=ErrorCode.INPUT_NOT_FOUND)
    by_split: dict[str, list[str]] = {}
    for rel in found:
        by_split.setdefault(_split_of(rel), []).append(rel)
    if split is None and DEFAULT_SPLIT not in by_split:
        chosen = found
    else:
        chosen = by_split[_pick_split(sorted(by_split), split or DEFAULT_SPLIT, root)]
    if isinstance(root, Path):
        return [root / rel for rel in chosen]
    return [store_url(fs, f"{path}/{rel}") for rel in chosen]


def _split_of(rel: str) -> str:
    """``data/train-00000-of-00002.parquet``, ``train.parquet``, ``default/train/0000.parquet``: train."""
    *folders, name = rel.split("/")
    stem = name.removesuffix(".parquet")
    if sharded := re.fullmatch(r"(.+?)-\d+-of-\d+", stem):
        return sharded.group(1)
    if stem.isdigit() and folders:
        return folders[-1]
    return stem.split("-", 1)[0]


def _pick_split(splits: list[str], split: str | None, where: Location) -> str:
    if split is None:
        split = DEFAULT_SPLIT if DEFAULT_SPLIT in splits or len(splits) != 1 else splits[0]
    if split not in splits:
        raise InputError(
            f"{where} has no split {split!r}; choose one with --split ({', '.join(splits) or 'none found'})",
            code=ErrorCode.INPUT_NOT_FOUND,
        )
    return split


def _read_json(loc: Location) -> dict[str, Any]:
    with open_input(loc) as f:
        try:
            data = orjson.loads(f.read())
        except orjson.JSONDecodeError as e:
            raise InputError(f"{loc} is not valid JSON: {e}", code=ErrorCode.INPUT_UNREADABLE) from e
    if not isinstance(data, dict):
        raise InputError(f"{loc} is not a JSON object", code=ErrorCode.INPUT_UNREADABLE)
    return data


def read_tar(loc: Location, image_key: str) -> Iterator[tuple[Row, Row]]:
    """(row, key) per sample of a WebDataset shard: members ``KEY.EXT`` in a row, ``__key__`` naming
    it. Text and JSON members are copied; the image (member ``image_key`` if the sample has one, else
    its first image member) goes under ``image_key``; other members are referred to by their ``EXT``."""
    container = str(absolute(loc))
    sample: tuple[Row, Row] | None = None
    current = None
    with open_input(loc) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:  # streamed: no seeking back on a remote file
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, base = posixpath.split(info.name)
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue
                    key = posixpath.join(folder, stem)
                    if key != current:
                        if sample is not None:
                            yield _sample(sample, image_key)
                        current, sample = key, ({"__key__": key}, {"__key__": key})
                    assert sample is not None
                    data = tar.extractfile(info)
                    payload = data.read() if data is not None else b""
                    sample[0][ext], sample[1][ext] = _member(container, info, ext, payload)
        except tarfile.TarError as e:
            raise InputError(f"{loc} is not a readable tar file: {e}", code=ErrorCode.INPUT_UNREADABLE) from e
    if sample is not None:
        yield _sample(sample, image_key)


def _member(container: str, info: tarfile.TarInfo, ext: str, payload: bytes) -> tuple[Any, Any]:
    lower = ext.lower()
    small = len(payload) <= MAX_TEXT_MEMBER_BYTES
    if small and lower == "json":
        try:
            value = orjson.loads(payload)
            return value, value
        except orjson.JSONDecodeError:
            pass
    if small and lower in TEXT_MEMBERS:
        text = payload.decode("utf-8", "replace")
        return text, text
    ref = EmbeddedRef(container, "tar", offset=info.offset_data, size=info.size, name=info.name)
    return str(ref), digest(payload)


def _sample(sample: tuple[Row, Row], image_key: str) -> tuple[Row, Row]:
    row, key = sample
    if image_key not in row:
        ext = next((e for e in row if e.lower() in IMAGE_MEMBERS), None)
        if ext is not None:
            row[image_key], key[image_key] = row.pop(ext), key.pop(ext)
    return row, key
