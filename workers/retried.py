"""The collector's side of ``imageqa retry``: a retried row's old errors-file line goes when its new
result is written, so each row stays in exactly one file, once.

Crash safety, with the collector's write marker (see `workers.collector`): the marker records the
errors file's size before the batch; the file is then rewritten without the retried rows' lines (a
temporary file, fsynced, renamed over it, the folder fsynced) and the marker's size is set to the
rewritten file's size *before* anything is appended. A collector killed before that update finds a
file no longer than the recorded size and truncates nothing; one killed after it truncates only what
was appended. Either way the batch is handled again, and the rewrite, keyed by item id, is idempotent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Sequence
from contextlib import suppress
from pathlib import Path

import orjson
import redis

from producer.jobs import JobRecord


def retried_items(r: redis.Redis, batches: Sequence[tuple[JobRecord, Collection[str]]]) -> list[list[str]]:
    """For each (job, item ids about to be written), the ids a retry took back, in one round trip."""
    if not batches:
        return []
    pipe = r.pipeline(transaction=False)
    for job, item_ids in batches:
        job.retrying_flags(pipe, item_ids)
    return [
        [item_id for item_id, flag in zip(item_ids, flags, strict=True) if flag]
        for (_, item_ids), flags in zip(batches, pipe.execute(), strict=True)
    ]


def drop_lines(path: Path, item_ids: Collection[str]) -> int:
    """Rewrites the errors file ``path`` without the lines of ``item_ids``, atomically; returns its
    size after. Untouched when none of its lines is theirs."""
    if not path.exists():
        return 0
    drop = set(item_ids)
    kept: list[bytes] = []
    dropped = 0
    with path.open("rb") as f:
        for line in f:
            if _item_id(line) in drop:
                dropped += 1
            else:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
    if not dropped:
        return path.stat().st_size
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def _item_id(line: bytes) -> str | None:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return entry.get("item_id") if isinstance(entry, dict) else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
