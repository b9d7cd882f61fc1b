"""Input readers: stream rows from JSONL, JSON, CSV, Parquet, Arrow, WebDataset tar shards, a
``save_to_disk`` folder, ``hf://datasets/ORG/NAME`` or a folder of images, local or at a URL
(`producer.sources`), one file or a glob of them.

Each reader yields `RawRow`s (index, the parsed row or the reason it could not be parsed); `row_images`
and `resolve_ref` turn one into the image references a task needs. Images stored inside a file are
read only to hash them for the item id (`producer.dataset_files`); the task refers to them.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from producer import dataset_files, sources
from producer.contract import MAX_IMAGES_PER_ROW, canonical_json
from producer.errors import ErrorCode, InputError
from producer.sources import STORE_SCHEMES, EmbeddedRef, Location

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
URI_SCHEMES = frozenset({"http", "https", "file", "data"})
FORMATS = ("jsonl", "json", "csv", "parquet", "arrow", "webdataset", "datasets", "hub", "folder")
SPLIT_FORMATS = ("datasets", "hub")
"""Formats with splits (``--split``): a ``save_to_disk`` folder and ``hf://datasets/ORG/NAME``."""


@dataclass(frozen=True)
class RawRow:
    """One input row as read; ``error`` is set when the row could not be parsed."""

    index: int
    row: Any
    error: InputError | None = None
    key: Any = None
    """What the item id hashes when it is not the row: the row with each image stored in the input
    file replaced by its digest."""

    @property
    def identity(self) -> Any:
        return self.row if self.key is None else self.key


def detect_format(path: Location) -> str:
    if sources.is_dir(path):
        if sources.exists(sources.join(path, "state.json")) or sources.exists(
            sources.join(path, "dataset_dict.json")
        ):
            return "datasets"
        return "hub" if str(path).startswith("hf://datasets/") else "folder"
    suffix = sources.suffix(path)
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    if suffix == ".tar":
        return "webdataset"
    raise InputError(
        f"cannot tell the format of {path} (expected .jsonl, .json, .csv, .parquet, .arrow, .tar "
        "or a folder)",
        code=ErrorCode.INPUT_UNREADABLE,
    )


def read_rows(
    path: str | Path, fmt: str | None = None, *, split: str | None = None, image_key: str = "image"
) -> Iterator[RawRow]:
    """Streams the rows of an input file, folder, URL or glob of files; a row that does not parse is
    yielded with its error. ``split`` picks a split of a ``save_to_disk`` folder or a hub dataset;
    ``image_key`` is where a WebDataset sample's image goes."""
    files = sources.expand(sources.location(path))
    if not files or not sources.exists(files[0]):
        raise InputError(f"input not found: {path}", code=ErrorCode.INPUT_NOT_FOUND)
    fmt = fmt or detect_format(files[0])
    if fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if split is not None and fmt not in SPLIT_FORMATS:
        raise InputError(f"--split applies to a save_to_disk folder or hf://datasets/...; not to {fmt} input")
    if fmt == "datasets":
        fmt, files = (
            "arrow",
            [f for folder in files for f in dataset_files.saved_dataset_files(folder, split)],
        )
    elif fmt == "hub":
        fmt, files = "parquet", [f for root in files for f in dataset_files.hub_dataset_files(root, split)]
    return _numbered(_read_file(loc, fmt, image_key) for loc in files)


def _read_file(loc: Location, fmt: str, image_key: str) -> Iterator[RawRow]:
    if fmt in ("parquet", "arrow", "webdataset"):
        pairs = {
            "parquet": dataset_files.read_parquet,
            "arrow": dataset_files.read_arrow,
            "webdataset": lambda loc: dataset_files.read_tar(loc, image_key),
        }[fmt](loc)
        return (RawRow(0, row, key=None if key is row else key) for row, key in pairs)
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "folder": _read_folder}
    return readers[fmt](loc)


def _numbered(readers: Iterator[Iterator[RawRow]]) -> Iterator[RawRow]:
    """The rows of every file in order, numbered from 0 across them."""
    index = 0
    for rows in readers:
        for raw in rows:
            yield raw if raw.index == index else RawRow(index, raw.row, raw.error, raw.key)
            index += 1


def _read_jsonl(path: Location) -> Iterator[RawRow]:
    with sources.open_input(path) as f:
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                yield RawRow(index, orjson.loads(line))
            except orjson.JSONDecodeError as e:
                text = line.decode("utf-8", "replace").rstrip("\n")
                yield RawRow(index, text, InputError(f"line {index + 1} is not valid JSON: {e}"))
            index += 1


def _read_json(path: Location) -> Iterator[RawRow]:
    # A JSON document has to be parsed whole; use JSONL for inputs that do not fit in memory.
    with sources.open_input(path) as f:
        text = f.read()
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}", code=ErrorCode.INPUT_UNREADABLE) from e
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"{path} must hold a JSON list of rows", code=ErrorCode.INPUT_UNREADABLE)
    for index, row in enumerate(data):
        yield RawRow(index, row)


def _read_csv(path: Location) -> Iterator[RawRow]:
    delimiter = "\t" if sources.suffix(path) == ".tsv" else ","
    with sources.open_input(path, "r", newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.DictReader(f, delimiter=delimiter)):
            yield RawRow(index, {k: _csv_cell(v) for k, v in row.items() if k is not None})


def _csv_cell(value: str | None) -> Any:
    # A cell that holds a JSON list (["a.jpg", "b.jpg"]) becomes that list.
    if value and value.startswith("["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


def _read_folder(path: Location) -> Iterator[RawRow]:
    if isinstance(path, str):
        yield from _read_store_folder(path)
        return
    index = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                rel = os.path.relpath(os.path.join(dirpath, name), path)
                yield RawRow(index, {"image": [rel]})
                index += 1


def _read_store_folder(url: str) -> Iterator[RawRow]:
    fs, root = sources.filesystem(url)
    root = root.rstrip("/")
    try:
        names = sorted(fs.find(root))
    except Exception as e:
        raise sources.input_error(e, url) from e
    index = 0
    for name in names:
        if sources.suffix(name) in IMAGE_SUFFIXES:
            yield RawRow(index, {"image": [name[len(root) + 1 :]]})
            index += 1


def row_images(row: Any, image_key: str) -> list[str]:
    """The row's image references; a bare string is a one-image list. Raises `InputError`."""
    if not isinstance(row, dict):
        raise InputError(f"row is a {type(row).__name__}, not a JSON object", code=ErrorCode.ROW_MALFORMED)
    if image_key not in row:
        raise InputError(f"row has no {image_key!r} field", code=ErrorCode.IMAGE_KEY_MISSING)
    value = row[image_key]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list):
        raise InputError(
            f"{image_key!r} must be a string or a list of strings", code=ErrorCode.IMAGE_REF_INVALID
        )
    if not refs:
        raise InputError(f"{image_key!r} is an empty list", code=ErrorCode.IMAGE_LIST_EMPTY)
    if len(refs) > MAX_IMAGES_PER_ROW:
        raise InputError(
            f"{len(refs)} images in one row; at most {MAX_IMAGES_PER_ROW}", code=ErrorCode.TOO_MANY_IMAGES
        )
    for ref in refs:
        if not isinstance(ref, str) or not ref.strip():
            raise InputError(
                f"image reference {ref!r} is not a non-empty string", code=ErrorCode.IMAGE_REF_INVALID
            )
    return refs


def resolve_ref(ref: str, base_dir: Location) -> str:
    """A relative path becomes absolute under base_dir (a folder or a URL); URIs, object-store URLs,
    images stored in a file and absolute paths pass unchanged."""
    scheme = urlsplit(ref).scheme.lower()
    if scheme in URI_SCHEMES or scheme in STORE_SCHEMES or EmbeddedRef.parse(ref) is not None:
        return ref
    if len(scheme) > 1:
        raise InputError(
            f"unsupported image reference scheme {scheme!r} in {ref[:80]!r}", code=ErrorCode.IMAGE_REF_INVALID
        )
    path = Path(ref)
    if isinstance(base_dir, str):
        return ref if path.is_absolute() else str(sources.join(base_dir, ref))
    return str(path if path.is_absolute() else Path(os.path.normpath(base_dir / path)))


class ItemIds:
    """Item ids: a hash of the row and of the output settings, with verbatim repeats numbered.

    One output row per input row: the second copy of an identical row gets its own id. This one keeps
    the digests it has seen in memory (about 100 bytes a row); `RedisItemIds` keeps them in Redis.
    """

    def __init__(self, settings_fingerprint: str) -> None:
        self._salt = settings_fingerprint.encode()
        self._seen: set[bytes] = set()
        self._repeats: dict[bytes, int] = {}

    def next_ids(self, rows: list[Any]) -> list[str]:
        """The ids of the next rows of the input, in order."""
        digests = [
            hashlib.blake2b(canonical_json(row) + b"\0" + self._salt, digest_size=16).digest() for row in rows
        ]
        numbers = self._repeat_numbers(digests)
        return [d.hex() if n == 0 else f"{d.hex()}-{n}" for d, n in zip(digests, numbers, strict=True)]

    def _repeat_numbers(self, digests: list[bytes]) -> list[int]:
        """0 for a row's first copy, then 1, 2, ... for its verbatim repeats."""
        numbers = []
        for digest in digests:
            if digest in self._seen:
                count = self._repeats.get(digest, 1)
                self._repeats[digest] = count + 1
                numbers.append(count)
            else:
                self._seen.add(digest)
                numbers.append(0)
        return numbers

    def close(self) -> None:
        """Forgets the digests seen."""
        self._seen.clear()
        self._repeats.clear()


class RedisItemIds(ItemIds):
    """`ItemIds` whose seen digests live in Redis under ``key`` (one set, one hash, dropped by `close`
    or after ``ttl_s``), so the producer's memory stays flat however long the input is. One extra
    round trip per batch of rows, a second one only for a batch with repeats."""

    def __init__(self, settings_fingerprint: str, client: Any, key: str, ttl_s: int = 7 * 86400) -> None:
        super().__init__(settings_fingerprint)
        self._r = client
        self._seen_key, self._repeats_key = f"{key}:seen", f"{key}:repeats"
        self._ttl_s = ttl_s

    def _repeat_numbers(self, digests: list[bytes]) -> list[int]:
        # One pass owns its keys (a fresh prefix each), so reading, then adding, in one round trip is
        # exact: three commands per batch, not one per row.
        pipe = self._r.pipeline(transaction=False)
        pipe.smismember(self._seen_key, digests)
        pipe.sadd(self._seen_key, *digests)
        pipe.expire(self._seen_key, self._ttl_s)
        seen_before = pipe.execute()[0]
        numbers = [0] * len(digests)
        in_batch: set[bytes] = set()
        repeats = []
        for i, (digest, seen) in enumerate(zip(digests, seen_before, strict=True)):
            if seen or digest in in_batch:  # in input order, so a repeat within the batch is seen as one
                repeats.append(i)
            in_batch.add(digest)
        if repeats:
            pipe = self._r.pipeline(transaction=False)
            for i in repeats:
                pipe.hincrby(self._repeats_key, digests[i], 1)
            pipe.expire(self._repeats_key, self._ttl_s)
            for i, count in zip(repeats, pipe.execute()[:-1], strict=True):
                numbers[i] = int(count)
        return numbers

    def close(self) -> None:
        self._r.delete(self._seen_key, self._repeats_key)
