"""Finished outputs as training files: LLaVA, ShareGPT, OpenAI chat ``messages`` or Parquet.

``imageqa export OUT --format F [--ordered] -o FILE`` reads an output (JSONL or Parquet, a local
path or any fsspec URL: ``s3://``, ``gs://``, ``hf://``, ...) and writes one record per row:

- ``llava``: ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}``; the first question carries one ``<image>`` per image;
  ``image`` is a string when every row has one image, else a list in every row;
- ``sharegpt``: ``{"id", "conversations": [...], "images": [...]}`` (the same turns; LLaMA-Factory's
  multimodal ShareGPT layout);
- ``messages``: ``{"id", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
  {"url": ...}}, {"type": "text", "text": "Q"}]}, {"role": "assistant", "content": [{"type": "text",
  "text": "A"}]}, ...]}``; every content is a list of parts, so the rows share one shape;
- ``parquet``: the rows themselves, as `rows_table` types them.

A target ending in ``.json`` gets one JSON array (LLaVA's own layout), any other JSONL. The ``id``
is the row's item id (from ``qa_meta``), else its ``id`` field, else its place in the file.
``ordered`` sorts by ``qa_meta.row_index``: input order. A row without ``qa_meta`` has no index;
outputs the collector writes when a job completes (``--no-meta``, Parquet, object storage) are in
input order already, so such a file is kept as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from producer.contract import META_KEY
from producer.errors import OutputError
from producer.outputs import is_parquet, is_remote

log = logging.getLogger(__name__)

FORMATS = ("llava", "sharegpt", "messages", "parquet")
IMAGE_TOKEN = "<image>"
Row = dict[str, Any]


def read_output(source: str) -> list[Row]:
    """The rows of a finished output: Parquet by suffix, else JSONL; raises `OutputError`."""
    import fsspec

    try:
        if is_parquet(source):
            import pyarrow.parquet as pq

            with fsspec.open(source, "rb") as f:
                return list(pq.read_table(f).to_pylist())
        with fsspec.open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise OutputError(f"{source}: no such output") from None
    except Exception as e:  # pyarrow, fsspec and the object stores each raise their own
        raise OutputError(f"cannot read {source}: {type(e).__name__}: {e}") from e
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise OutputError(f"{source}: line {number} is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise OutputError(f"{source}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def in_input_order(rows: list[Row]) -> list[Row]:
    """The rows sorted by ``qa_meta.row_index``; rows without one keep the file's order (see the
    module's note), and a file that mixes both is refused."""
    indexes = [_row_index(row) for row in rows]
    known = sum(index is not None for index in indexes)
    if known == 0:
        if rows:
            log.warning("the rows carry no qa_meta.row_index; kept in the file's order")
        return rows
    if known < len(rows):
        raise OutputError(
            f"{len(rows) - known} of {len(rows)} rows have no qa_meta.row_index: "
            "cannot put them in input order"
        )
    return [row for _, row in sorted(zip(indexes, rows, strict=True), key=lambda pair: pair[0] or 0)]


def _row_index(row: Row) -> int | None:
    meta = row.get(META_KEY)
    index = meta.get("row_index") if isinstance(meta, dict) else None
    return index if isinstance(index, int) else None


def to_llava(rows: list[Row], image_key: str, pairs_key: str) -> list[Row]:
    """LLaVA conversations, one record per row with pairs."""
    convos = _conversations(rows, image_key, pairs_key)
    single = all(len(images) == 1 for _, images, _ in convos)
    return [
        {"id": rid, "image": images[0] if single else images, "conversations": _turns(images, pairs)}
        for rid, images, pairs in convos
    ]


def to_sharegpt(rows: list[Row], image_key: str, pairs_key: str) -> list[Row]:
    """ShareGPT conversations with an ``images`` list, one record per row with pairs."""
    return [
        {"id": rid, "conversations": _turns(images, pairs), "images": images}
        for rid, images, pairs in _conversations(rows, image_key, pairs_key)
    ]


def to_messages(rows: list[Row], image_key: str, pairs_key: str) -> list[Row]:
    """OpenAI chat ``messages``: the images as ``image_url`` parts of the first user turn."""
    records = []
    for rid, images, pairs in _conversations(rows, image_key, pairs_key):
        messages: list[Row] = []
        for i, (question, answer) in enumerate(pairs):
            parts: list[Row] = (
                [{"type": "image_url", "image_url": {"url": ref}} for ref in images] if i == 0 else []
            )
            parts.append({"type": "text", "text": question})
            messages.append({"role": "user", "content": parts})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        records.append({"id": rid, "messages": messages})
    return records


def _turns(images: list[str], pairs: list[tuple[str, str]]) -> list[Row]:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        prefix = "".join(f"{IMAGE_TOKEN}\n" for _ in images) if i == 0 else ""
        turns.append({"from": "human", "value": prefix + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _conversations(
    rows: list[Row], image_key: str, pairs_key: str
) -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """(id, image references, (question, answer) pairs) of every row with pairs; rows without
    images or pairs are skipped with a warning."""
    out = []
    skipped = 0
    for place, row in enumerate(rows):
        images = row.get(image_key)
        images = [images] if isinstance(images, str) else images
        pairs = row.get(pairs_key)
        if not images or not isinstance(images, list) or not pairs or not isinstance(pairs, list):
            skipped += 1
            continue
        meta = row.get(META_KEY)
        rid = meta.get("item_id") if isinstance(meta, dict) and meta.get("item_id") else row.get("id", place)
        qa = [(str(p["question"]), str(p["answer"])) for p in pairs if isinstance(p, dict)]
        out.append((str(rid), [str(ref) for ref in images], qa))
    if skipped:
        log.warning("%d rows have no %r or no %r and were left out", skipped, image_key, pairs_key)
    return out


CONVERTERS: dict[str, Callable[[list[Row], str, str], list[Row]]] = {
    "llava": to_llava,
    "sharegpt": to_sharegpt,
    "messages": to_messages,
}


def rows_table(rows: list[Row]) -> Any:
    """A pyarrow table of ``rows``: one column per key of any row (null where a row lacks it),
    typed by pyarrow (``qa_pairs`` a list of structs, ``qa_meta`` a struct whose ``rejected`` has a
    field per reason seen). A column whose values share no type (a number here, text there) is
    stored as JSON text. Empty objects become null: Parquet has no struct without fields."""
    import pyarrow as pa

    columns: dict[str, Any] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [_no_empty(row.get(key)) for row in rows]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            log.warning("column %r has values of different types; stored as JSON text", key)
            columns[key] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
            )
    return pa.table(columns)


def _no_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _no_empty(v) for k, v in value.items()} or None
    if isinstance(value, list):
        return [_no_empty(v) for v in value]
    return value


def write_parquet(rows: list[Row], target: str) -> None:
    """Writes ``rows`` as one Parquet file at ``target`` (a path or fsspec URL)."""
    import pyarrow.parquet as pq

    table = rows_table(rows)
    _write(target, lambda f: pq.write_table(table, f))


def write_records(records: Iterable[Row], target: str) -> None:
    """Writes ``records`` as a JSON array if ``target`` ends in ``.json``, else as JSONL."""
    items = list(records)
    if target.lower().endswith(".json"):
        data = orjson.dumps(items, option=orjson.OPT_INDENT_2) + b"\n"
    else:
        data = b"".join(orjson.dumps(item) + b"\n" for item in items)
    _write(target, lambda f: f.write(data))


def _write(target: str, write: Callable[[Any], object]) -> None:
    try:
        with open_target(target) as f:
            write(f)
    except Exception as e:
        raise OutputError(f"cannot write {target}: {type(e).__name__}: {e}") from e


def open_target(target: str) -> Any:
    """``target`` opened for writing: a local file in folders made as needed, or an object (whose
    bucket must exist: it is not created)."""
    import fsspec

    return fsspec.open(target, "wb", auto_mkdir=not is_remote(target))


def export(
    source: str,
    target: str,
    fmt: str,
    *,
    ordered: bool = False,
    image_key: str = "image",
    pairs_key: str = "qa_pairs",
) -> int:
    """Converts the output ``source`` to ``fmt`` at ``target``; returns the records written."""
    if fmt not in FORMATS:
        raise OutputError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    rows = read_output(source)
    if ordered:
        rows = in_input_order(rows)
    if fmt == "parquet":
        write_parquet(rows, target)
        return len(rows)
    records = CONVERTERS[fmt](rows, image_key, pairs_key)
    write_records(records, target)
    return len(records)
