"""The quality report: one self-contained HTML page about a job's output, for people to read.

It shows the rows written and failed, failures by error code, rejected pairs by reason, the checks'
figures (verification, blind check, judge histogram), the question types and the most common
question templates, and a sample of rows with thumbnails of their images and their pairs (and some
failed rows with their error).

Figures come from the job's status in Redis when there is one (``status``: `JobStatus.as_dict`),
which counts everything, rejected pairs included. Without it they come from the files alone: the
output and errors JSONL give rows, failures, pairs and types, and rows written with their
``qa_meta`` add their rejection, blind-check and judge counts. The files are read once, as a stream;
the sample is a seeded reservoir sample, so memory stays small for any output size.

Everything the model or the input wrote is untrusted: the page is rendered with Jinja2's autoescape,
and its Content-Security-Policy allows no script and no image but the embedded ``data:`` thumbnails.
Thumbnails are made with Pillow from local images (paths, ``file://``, ``data:`` URIs); a remote or
unreadable image shows a placeholder and never fails the report.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jinja2
import orjson
from PIL import Image, ImageOps

from workers.qa import normal

DEFAULT_SAMPLE_ROWS = 12
"""Rows shown with their images and pairs."""
DEFAULT_SAMPLE_ERRORS = 5
"""Failed rows shown with their error."""
THUMBNAIL_PX = 160
"""Longest side of a thumbnail, in pixels."""
MAX_THUMBNAIL_SOURCE_BYTES = 64 * 1024 * 1024
"""A local image larger than this is shown as a placeholder rather than decoded."""
TOP_TEMPLATES = 10
"""Most common templates (or question openings) listed."""
_FIELD_CHARS = 300


@dataclass
class Thumb:
    """One image of a sample row: a ``data:`` URI, or the reason there is none."""

    src: str | None
    label: str


@dataclass
class SampleRow:
    thumbs: list[Thumb]
    fields: list[tuple[str, str]]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None


@dataclass
class FileFigures:
    """What the output and errors files hold."""

    written: int = 0
    failed: int = 0
    pairs: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    qa: Counter[str] = field(default_factory=Counter)
    judge_scores: Counter[str] = field(default_factory=Counter)
    types: Counter[str] = field(default_factory=Counter)
    openings: Counter[str] = field(default_factory=Counter)
    unreadable_lines: int = 0


def build_report(
    output_path: Path,
    *,
    errors_path: Path | None = None,
    status: dict[str, Any] | None = None,
    output_key: str = "qa_pairs",
    image_key: str = "image",
    media_base: Path | None = None,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    sample_errors: int = DEFAULT_SAMPLE_ERRORS,
    seed: int = 0,
) -> str:
    """The report page for the job that wrote ``output_path``, as HTML text.

    ``errors_path`` defaults to ``OUT.errors.jsonl``; relative image paths resolve against
    ``media_base`` (default: the output's folder). Missing files count as empty.
    """
    errors_path = errors_path or output_path.with_name(output_path.stem + ".errors.jsonl")
    media_base = media_base or output_path.parent
    rng = random.Random(seed)
    files = FileFigures()
    written: list[dict[str, Any]] = []
    for i, row in enumerate(_rows(output_path, files)):
        _count_written(row, files, output_key)
        _keep(written, row, i, sample_rows, rng)
    failed: list[dict[str, Any]] = []
    for i, record in enumerate(_rows(errors_path, files)):
        _count_failed(record, files)
        _keep(failed, record, i, sample_errors, rng)
    return _ENV.get_template(TEMPLATE).render(
        title=f"Quality report: {output_path.name}",
        output_path=str(output_path),
        errors_path=str(errors_path),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        figures=_figures(status, files),
        rows=[_sample_row(row, output_key, image_key, media_base) for row in written],
        errors=[_error_row(record, image_key, media_base) for record in failed],
        unreadable_lines=files.unreadable_lines,
    )


def _rows(path: Path, files: FileFigures) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                yield value
            else:
                files.unreadable_lines += 1


def _keep(
    sample: list[dict[str, Any]], row: dict[str, Any], index: int, size: int, rng: random.Random
) -> None:
    """Reservoir sampling: after ``index + 1`` rows each is in ``sample`` with the same chance."""
    if len(sample) < size:
        sample.append(row)
        return
    j = rng.randrange(index + 1)
    if j < size:
        sample[j] = row


def _count_written(row: dict[str, Any], files: FileFigures, output_key: str) -> None:
    files.written += 1
    pairs = row.get(output_key)
    for pair in pairs if isinstance(pairs, list) else ():
        if not isinstance(pair, dict):
            continue
        files.pairs += 1
        if isinstance(pair.get("type"), str):
            files.types[pair["type"]] += 1
        question = pair.get("question")
        if isinstance(question, str):
            files.openings[" ".join(normal(question).split()[:3])] += 1
    _count_meta(row, files)


def _count_failed(record: dict[str, Any], files: FileFigures) -> None:
    files.failed += 1
    error = record.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    files.failures[str(code or "unknown")] += 1
    _count_meta(record, files)


def _count_meta(row: dict[str, Any], files: FileFigures) -> None:
    """Adds the counts a row's ``qa_meta.qa_stats`` carries (rows written with their metadata)."""
    stats = _qa_stats(row)
    for reason, n in _int_dict(stats.get("rejected")).items():
        files.rejected[reason] += n
    for score, n in _int_dict(stats.get("judge_scores")).items():
        files.judge_scores[score] += n
    for name in ("tries", "verified", "agreed", "blind_checked", "blind_answerable"):
        value = stats.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            files.qa[name] += value


def _qa_stats(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("qa_meta")
    stats = meta.get("qa_stats") if isinstance(meta, dict) else None
    return stats if isinstance(stats, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int_dict(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


# --- the figures --------------------------------------------------------------------------------


def _figures(status: dict[str, Any] | None, files: FileFigures) -> dict[str, Any]:
    """The page's figures: the job's status where there is one, else what the files hold."""
    st = status or {}
    qa = _int_dict(st.get("qa")) if status else dict(files.qa)
    pairs = qa.get("pairs", 0) if status else files.pairs
    written = st.get("written", files.written)
    failed = st.get("failed", files.failed)
    verified, agreed = qa.get("verified", 0), qa.get("agreed", 0)
    blind = _dict(st.get("blind")) or None
    if blind is None:
        checked, answerable = qa.get("blind_checked", 0), qa.get("blind_answerable", 0)
        rate = round(answerable / checked, 4) if checked else None
        blind = {"checked": checked, "answerable": answerable, "answerable_rate": rate}
    judge = _int_dict(st.get("judge_scores")) if status else dict(files.judge_scores)
    types = _int_dict(st.get("types")) if isinstance(st.get("types"), dict) else dict(files.types)
    diversity = _dict(st.get("diversity"))
    top = [
        (str(t[0]), int(t[1]))
        for t in diversity.get("top_templates") or ()
        if isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[1], int)
    ]
    return {
        "source": "status" if status else "files",
        "job_id": st.get("job_id"),
        "state": st.get("state"),
        "total": st.get("total", written + failed),
        "written": written,
        "failed": failed,
        "pairs": pairs,
        "pairs_per_row": round(pairs / written, 2) if written else None,
        "tries": qa.get("tries"),
        "failures": _ranked(_int_dict(st.get("failures")) if status else dict(files.failures)),
        "rejected": _ranked(_int_dict(st.get("rejected")) if status else dict(files.rejected)),
        "agreement_rate": round(agreed / verified, 4) if verified else None,
        "verified": verified,
        "blind": blind,
        "judge": _bars({str(score): judge.get(str(score), 0) for score in range(1, 6)}) if judge else [],
        "judged": sum(judge.values()),
        "types": _bars(dict(_ranked(types))),
        "templates": top or _ranked(dict(files.openings))[:TOP_TEMPLATES],
        "templates_from_status": bool(top),
        "distinct_question_share": diversity.get("distinct_question_share"),
    }


def _ranked(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _bars(counts: dict[str, int]) -> list[tuple[str, int, float]]:
    """(label, count, width in percent of the largest count)."""
    top = max(counts.values(), default=0)
    return [(label, n, round(100 * n / top, 1) if top else 0.0) for label, n in counts.items()]


# --- the sample ---------------------------------------------------------------------------------


def _sample_row(row: dict[str, Any], output_key: str, image_key: str, media_base: Path) -> SampleRow:
    pairs = row.get(output_key)
    pairs = [p for p in pairs if isinstance(p, dict)] if isinstance(pairs, list) else []
    notes = _qa_stats(row).get("judge")
    notes = notes if isinstance(notes, list) and len(notes) == len(pairs) else [None] * len(pairs)
    shown = []
    for pair, note in zip(pairs, notes, strict=True):
        shown.append(
            {
                "question": _text(pair.get("question")),
                "answer": _text(pair.get("answer")),
                "type": _text(pair.get("type")) if pair.get("type") is not None else "",
                "score": note.get("score") if isinstance(note, dict) else None,
                "reason": _text(note.get("reason")) if isinstance(note, dict) else "",
            }
        )
    hidden = {output_key, image_key, "qa_meta"}
    return SampleRow(
        thumbs=[thumbnail(ref, media_base) for ref in _image_refs(row.get(image_key))],
        fields=[(str(k), _short(v)) for k, v in row.items() if k not in hidden],
        pairs=shown,
    )


def _error_row(record: dict[str, Any], image_key: str, media_base: Path) -> SampleRow:
    row = record.get("row")
    row = row if isinstance(row, dict) else {"row": row}
    error = _dict(record.get("error"))
    return SampleRow(
        thumbs=[thumbnail(ref, media_base) for ref in _image_refs(row.get(image_key))],
        fields=[(str(k), _short(v)) for k, v in row.items() if k != image_key],
        error={"code": _text(error.get("code")), "message": _text(error.get("message"))},
    )


def _image_refs(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def thumbnail(ref: Any, media_base: Path) -> Thumb:
    """A small JPEG ``data:`` URI of a local image, or a placeholder saying why there is none."""
    label = _short(ref, 120)
    if isinstance(ref, dict):  # a Hugging Face image struct: {"bytes": ..., "path": ...}
        ref = ref.get("path")
    if not isinstance(ref, str) or not ref:
        return Thumb(None, "no image reference")
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if not header.endswith(";base64"):
                return Thumb(None, "data URI without base64")
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        else:
            parsed = urlparse(ref)
            if parsed.scheme == "file":
                path = Path(unquote(parsed.path))
            elif len(parsed.scheme) > 1:  # http(s), s3, gs, hf ... (one letter: a Windows drive)
                return Thumb(None, f"remote image, not fetched: {label}")
            else:
                path = Path(ref) if Path(ref).is_absolute() else media_base / ref
            if not path.is_file():
                return Thumb(None, f"image not found: {label}")
            if path.stat().st_size > MAX_THUMBNAIL_SOURCE_BYTES:
                return Thumb(None, f"image too large to show: {label}")
            source = path
        with Image.open(source) as image:
            image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))
            shown = ImageOps.exif_transpose(image).convert("RGB")
        shown.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        shown.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError) as e:
        return Thumb(None, f"image unreadable ({type(e).__name__}): {label}")
    return Thumb("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), label)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _short(value: Any, limit: int = _FIELD_CHARS) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True, undefined=jinja2.StrictUndefined
)
TEMPLATE = "report.html"
"""The page's Jinja2 template, beside this module."""


def job_report(
    output_path: Path | None,
    *,
    r: Any = None,
    job_id: str | None = None,
    images_from: Path | None = None,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> tuple[Path, str, str | None]:
    """The report of a job's output: (the output path, the page, the job id or None).

    With a Redis client ``r`` the job is ``job_id``, else the newest one writing ``output_path``; its
    status gives the figures and its recorded input the image folder and key. Without one (or no
    such job) the figures come from the files. Raises ``ValueError`` for an unknown ``job_id``.
    """
    from producer.jobs import JobRecord, job_status, job_writing

    status = source = None
    if r is not None:
        if job_id is None and output_path is not None:
            job_id = job_writing(r, str(output_path.resolve()))
        if job_id is not None:
            status = job_status(r, job_id)
            if status is None:
                raise ValueError(f"no job {job_id!r}")
            source = JobRecord(r, job_id).source()
    if output_path is None:
        if status is None:
            raise ValueError("name the output file, or a job that Redis knows")
        output_path = Path(status.output_path)
    page = build_report(
        output_path,
        errors_path=Path(status.errors_path) if status and status.errors_path else None,
        status=status.as_dict() if status else None,
        output_key=status.output_key if status else "qa_pairs",
        image_key=source.image_key if source else "image",
        media_base=images_from or (_local(source.media_base) if source else None),
        sample_rows=sample_rows,
        seed=seed,
    )
    return output_path, page, status.job_id if status else None


def write_report(html_path: Path, page: str) -> None:
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(page, encoding="utf-8")


def _local(base: str | Path) -> Path | None:
    """A job's media folder when it is on this machine (thumbnails of remote images are placeholders)."""
    return base if isinstance(base, Path) else None
