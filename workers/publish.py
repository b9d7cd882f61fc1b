"""A complete job's final output, made from the collector's journal (see `producer.outputs`).

The journal holds each row once, with its ``qa_meta``. Publishing reads it, puts the rows in input
order (by ``qa_meta.row_index``), drops ``qa_meta`` for a ``--no-meta`` job, and writes JSONL or
Parquet (`workers.export.rows_table`): a local file is written beside and renamed into place, an
object is uploaded whole (object stores make it visible only once complete); the errors file is
uploaded next to a remote output. The job record marks the output written (`JobRecord.mark_published`)
only afterwards, so a collector killed in between writes it again, whole, when it restarts; once
marked, a restart leaves it alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from producer.contract import META_KEY
from producer.errors import OutputError
from producer.jobs import JobConfig
from producer.outputs import is_parquet, is_remote
from workers.export import in_input_order, open_target, write_parquet, write_records

log = logging.getLogger(__name__)


def publish(config: JobConfig) -> int:
    """Writes the final output of a complete job with ``config``; returns its rows. Raises
    `OutputError` when the journal cannot be read or the output cannot be written."""
    started = time.monotonic()
    rows = in_input_order(_journal(Path(config.output_path)))
    if not config.meta:
        for row in rows:
            row.pop(META_KEY, None)
    target = config.final_output
    _write(
        target, lambda path: write_parquet(rows, path) if is_parquet(target) else write_records(rows, path)
    )
    if config.final_errors:
        errors = Path(config.errors_path)
        data = errors.read_bytes() if errors.exists() else b""
        _write(config.final_errors, lambda path: _put(path, data))
    log.info("wrote %d rows to %s in %.2f s", len(rows), target, time.monotonic() - started)
    return len(rows)


def _journal(path: Path) -> list[dict[str, Any]]:
    """The journal's rows, each item once (a Redis that lost its record of a job's first batch may
    have had that batch written twice: see `workers.collector`)."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise OutputError(f"cannot read the journal {path}: {e}") from e
    rows, seen = [], set()
    for line in data.splitlines():
        if not line.strip():
            continue
        row = orjson.loads(line)
        meta = row.get(META_KEY) if isinstance(row, dict) else None
        item = meta.get("item_id") if isinstance(meta, dict) else None
        if item is not None and item in seen:
            continue
        seen.add(item)
        rows.append(row)
    return rows


def _write(target: str, write: Callable[[str], object]) -> None:
    """Runs ``write(path)`` on ``target`` itself if it is remote, else on a file beside it that then
    replaces it, so no reader sees half a file."""
    if is_remote(target):
        write(target)
        return
    final = Path(target)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _put(target: str, data: bytes) -> None:
    try:
        with open_target(target) as f:
            f.write(data)
    except Exception as e:
        raise OutputError(f"cannot write {target}: {type(e).__name__}: {e}") from e
