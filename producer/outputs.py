"""Where a job's rows go: the collector's journal, the errors file and the final output.

The collector appends every row exactly once, with its ``qa_meta``, to a local JSONL *journal*
(crash-safe: write markers, fsync, see `workers.collector`). A plain local ``.jsonl`` output with
``qa_meta`` is its own journal, written as rows arrive. Any other output is made from the journal
once the job completes, in input order (`workers.publish`):

- ``OUT.parquet`` (or ``.pq``): Parquet; the journal is ``OUT.parquet.journal.jsonl`` beside it;
- ``--no-meta``: the rows without ``qa_meta``; journal beside it as above;
- a URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ... anything fsspec opens): uploaded, the errors
  file next to it (``OUT.errors.jsonl``); the journal and the local errors file live in the
  collector's ``IMAGEQA_OUTPUT_DIR`` (the producer cannot know the collector's disk).

The journal stays after the job completes: rerunning or retrying the job makes the output from it
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PARQUET_SUFFIXES = (".parquet", ".pq")
JOURNAL_SUFFIX = ".journal.jsonl"


@dataclass(frozen=True)
class OutputPlan:
    journal_path: str
    """Local JSONL the collector appends rows to; empty: one the collector picks in its output folder."""
    errors_path: str
    """Local errors JSONL; empty with ``journal_path``."""
    final_output: str
    """The output made when the job completes; empty: the journal is the output."""
    final_errors: str
    """Where the errors file is uploaded when the job completes; empty: it stays local."""
    meta: bool


def is_remote(target: str) -> bool:
    """True for a URL other than ``file://`` (a one-letter scheme is a Windows drive)."""
    scheme = urlsplit(target).scheme
    return len(scheme) > 1 and scheme != "file"


def is_parquet(target: str) -> bool:
    return target.lower().endswith(PARQUET_SUFFIXES)


def errors_for(target: str) -> str:
    """``dir/out.jsonl`` or ``dir/out.parquet`` -> ``dir/out.errors.jsonl`` (for paths and URLs)."""
    head, sep, name = target.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}{sep}{stem}.errors.jsonl"


def plan_output(output: str | Path, *, meta: bool = True, errors_path: Path | None = None) -> OutputPlan:
    """Where the collector writes a job whose output is ``output`` (a path or a URL)."""
    text = str(output)
    if is_remote(text):
        return OutputPlan("", "", text, errors_for(text), meta)
    path = Path(text.removeprefix("file://")).resolve()
    errors = str((errors_path or Path(errors_for(str(path)))).resolve())
    if meta and not is_parquet(text):
        return OutputPlan(str(path), errors, "", "", meta)
    return OutputPlan(str(path) + JOURNAL_SUFFIX, errors, str(path), "", meta)
