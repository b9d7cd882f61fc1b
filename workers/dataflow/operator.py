"""`ImageQAGenerate`: DataFlow's image question-answer operator, with the output its document shows."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from producer.contract import ErrorInfo
from producer.errors import DataFlowError, ErrorCode, InputError
from producer.inputs import resolve_ref, row_images
from workers.dataflow.servings import RowInput, RowResult, RunContext, Serving

log = logging.getLogger(__name__)


class ImageQAGenerate:
    """Writes question-answer pairs about each row's images.

    ``ImageQAGenerate(llm_serving).run(storage, multi_modal_key="image", output_key="qa_pairs")``
    reads the storage's current step and writes the next one: every input row, in order, with its
    fields unchanged plus ``output_key``: ``[{"question": str, "answer": str}, ...]``. A row's images
    (a list of references, or one string) all go into one prompt. A row that fails (a missing or
    unreadable image, an answer without enough valid pairs) is kept with ``output_key: []`` and
    ``error_key: {"code": ..., "message": ...}`` and logged; the other rows are unaffected.

    ``llm_serving`` is a `LocalModelVLMServing_vllm`, `APIVLMServing_openai`, `ClusterServing` or
    any `LocalServing`. ``storage`` is a `FileStorage` or anything with DataFlow's ``read(output_type)``
    and ``write(data)``; without ``resolve_media`` relative paths resolve against the working folder.
    """

    def __init__(self, llm_serving: Serving) -> None:
        self.llm_serving = llm_serving

    def run(
        self,
        storage: Any,
        multi_modal_key: str = "image",
        output_key: str = "qa_pairs",
        error_key: str = "qa_error",
        meta_key: str | None = None,
    ) -> list[str]:
        """Generates for every row of the current step and writes the next step; returns
        ``[output_key]``. With ``meta_key`` (say ``"qa_meta"``) each row also gets how its pairs were
        made under that key: model, prompt name and hash, sampling settings, tries, rejected pairs,
        worker, generation seconds (see ``imageqa``'s ``qa_meta``); without it the rows keep the
        documented shape. Raises `DataFlowError` (a ``ValueError``) when no row has
        ``multi_modal_key`` or a row already has ``output_key``, ``error_key`` or ``meta_key``."""
        rows: list[dict[str, Any]] = storage.read(output_type="dict")
        _check_keys(rows, multi_modal_key, output_key, error_key, meta_key)
        resolve: Callable[[str], str] = getattr(storage, "resolve_media", None) or _resolve_in_cwd
        results: list[RowResult | None] = [None] * len(rows)
        inputs = []
        for index, row in enumerate(rows):
            try:
                refs = _image_refs(row, multi_modal_key)
                inputs.append(RowInput(index=index, row=row, images=[resolve(ref) for ref in refs]))
            except InputError as e:
                results[index] = RowResult(error=ErrorInfo(code=e.code, message=e.message))
        workdir = Path(getattr(storage, "cache_path", None) or tempfile.gettempdir())
        context = RunContext(image_key=multi_modal_key, output_key=output_key, workdir=workdir)
        for row_input, result in zip(inputs, self.llm_serving.generate(inputs, context), strict=True):
            results[row_input.index] = result
        output = [_output_row(i, row, results[i], output_key, error_key) for i, row in enumerate(rows)]
        if meta_key is not None:
            for row, done in zip(output, results, strict=True):
                row[meta_key] = done.meta if done is not None else None
        path = storage.write(output)
        failed = sum(error_key in row for row in output)
        log.info(
            "ImageQAGenerate: %d rows, %d with pairs, %d failed -> %s",
            len(rows),
            len(rows) - failed,
            failed,
            path,
        )
        return [output_key]


def _check_keys(
    rows: list[dict[str, Any]], image_key: str, output_key: str, error_key: str, meta_key: str | None
) -> None:
    if not rows:
        return
    columns = dict.fromkeys(key for row in rows for key in row)
    if image_key not in columns:
        shown = ", ".join(list(columns)[:20])
        raise DataFlowError(f"input has no column {image_key!r} (multi_modal_key); its columns: {shown}")
    for key, name in ((output_key, "output_key"), (error_key, "error_key"), (meta_key, "meta_key")):
        if key is not None and key in columns:
            raise DataFlowError(
                f"input already has a column {key!r}; choose another {name} so it is not overwritten"
            )


def _image_refs(row: dict[str, Any], image_key: str) -> list[str]:
    """The row's image references; raises `InputError` with the reason (missing, empty, not strings)."""
    value = row.get(image_key)
    tolist = getattr(value, "tolist", None)  # image lists read through pandas arrive as numpy arrays
    return row_images({image_key: tolist()} if callable(tolist) else row, image_key)


def _resolve_in_cwd(ref: str) -> str:
    return resolve_ref(ref, Path.cwd())


def _output_row(
    index: int, row: dict[str, Any], result: RowResult | None, output_key: str, error_key: str
) -> dict[str, Any]:
    if result is not None and result.pairs is not None:
        return {**row, output_key: [pair.model_dump(include={"question", "answer"}) for pair in result.pairs]}
    error = result.error if result is not None and result.error is not None else _no_result()
    log.warning("row %d: %s: %s", index, error.code, error.message)
    return {**row, output_key: [], error_key: error.model_dump()}


def _no_result() -> ErrorInfo:  # pragma: no cover - every serving returns one result per row
    return ErrorInfo(code=ErrorCode.INTERNAL_ERROR, message="the serving returned no result for this row")
