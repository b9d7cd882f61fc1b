"""The message contract between producers, workers and the collector.

Everything on the wire is JSON. `TaskMessage` is the kwargs of the Celery task ``imageqa.generate``;
`ResultRecord` is what a worker appends to the results stream. Both are frozen pydantic models that
reject unknown fields, so a message is decoded and checked in exactly one place. ``imageqa schema``
prints their JSON Schema for applications in other languages.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer.errors import ContractError

SCHEMA_VERSION: Literal[1] = 1
PROMPT_VERSION = "qa-v3"
"""Version of the default prompt; part of every item id, so a new prompt regenerates everything."""
PROMPT_NAMES = ("qa-v3", "qa-v2", "qa-v1", "dataflow")
"""Built-in prompts a worker knows (``prompt_version``): the default JSON prompt (pairs with their
question type), its untyped predecessors, and a DataFlow-style prompt that asks for
``Question: ... Answer: ...`` lines."""
QA_TYPES: dict[str, str] = {
    "object": "what a thing is, or whether something is present",
    "count": "how many of something there are",
    "attribute": "a colour, shape, size, material or state",
    "spatial": "where things are, relative to each other or in the frame",
    "text": "visible text, numbers or signs (OCR)",
    "action": "what a person or animal is doing",
    "scene": "the place, setting, time of day or weather",
    "reasoning": "a conclusion from several visible facts",
}
"""The question types a pair may carry (``QAPair.type``), with what each asks about."""
MAX_PROMPT_CHARS = 20_000
"""Longest user prompt template or system prompt, in characters."""

MAX_IMAGES_PER_ROW = 16
MAX_IMAGE_REF_CHARS = 8 * 1024 * 1024
"""A `data:` URI carries the image inline; this caps its size (and the message's)."""
MAX_ROW_BYTES = 16 * 1024 * 1024
"""An input row (as canonical JSON) larger than this is an error row, not a task."""
MAX_JOB_TOTAL = 1_000_000_000
"""Largest ``job_total`` a task message may declare."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationParams(_Frozen):
    """Everything that changes what the model writes for an image."""

    model: str | None = Field(
        default=None, description="Model the producer expects; null means whatever the worker serves."
    )
    prompt_version: str = Field(
        default=PROMPT_VERSION,
        min_length=1,
        max_length=64,
        description="Built-in prompt (see PROMPT_NAMES); ignored when prompt_template is set.",
    )
    prompt_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="A user prompt that replaces the built-in one. Placeholders: {count}, {min_pairs}, "
        "{max_pairs}, {schema} (the JSON schema of the answer), {example}, {image_word} "
        "(image/images), {max_question_chars}, {max_answer_chars}; other braces stay as written.",
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="Replaces the default system prompt; an empty string sends no system message.",
    )
    min_pairs: int = Field(default=3, ge=1, le=50)
    max_pairs: int = Field(default=5, ge=1, le=50)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(default=1024, ge=16, le=32768)
    max_question_chars: int = Field(default=300, ge=8, le=4000)
    max_answer_chars: int = Field(default=500, ge=1, le=8000)
    min_question_chars: int = Field(default=8, ge=1, le=4000)
    min_answer_chars: int = Field(default=1, ge=1, le=8000)
    require_question_mark: bool = Field(default=True, description="A question must end with '?'.")
    reject_refusals: bool = Field(
        default=True, description="Reject refusals and non-answers ('I cannot ...', 'unknown', ...)."
    )
    reject_restated: bool = Field(default=True, description="Reject an answer that repeats its question.")
    generation_tries: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Generation requests per item at most: while fewer than min_pairs valid pairs are "
        "collected the model is asked again and the valid pairs of all tries are merged.",
    )
    verify: bool = Field(
        default=False,
        description="Ask the model each question again without the answer; drop pairs whose answers "
        "disagree.",
    )
    types: dict[str, int] = Field(
        default_factory=dict,
        description="Least number of pairs of each question type (QA_TYPES) in every row; the model "
        "is asked for them, and again for the missing ones.",
    )
    min_types: int = Field(
        default=0, ge=0, le=len(QA_TYPES), description="Least number of distinct question types per row."
    )
    max_template_share: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Drop a pair (template_overused) whose question template already has this share "
        "of the job's kept pairs (near-duplicate templates count together).",
    )
    blind_check: bool = Field(
        default=False,
        description="Ask the model each kept question again without the image(s); drop pairs it still "
        "answers alike (answerable_without_image).",
    )
    judge: bool = Field(
        default=False,
        description="Have the model score each kept pair against the image(s) from 1 to 5 with a short "
        "reason; drop pairs scored under min_judge_score (judge_low).",
    )
    min_judge_score: int = Field(
        default=3, ge=1, le=5, description="Lowest judge score a pair may have to be kept (with judge)."
    )

    @model_validator(mode="after")
    def _pairs_range(self) -> GenerationParams:
        if self.min_pairs > self.max_pairs:
            raise ValueError(f"min_pairs ({self.min_pairs}) is greater than max_pairs ({self.max_pairs})")
        for name in ("question", "answer"):
            low, high = getattr(self, f"min_{name}_chars"), getattr(self, f"max_{name}_chars")
            if low > high:
                raise ValueError(f"min_{name}_chars ({low}) is greater than max_{name}_chars ({high})")
        unknown = sorted(set(self.types) - set(QA_TYPES))
        if unknown:
            raise ValueError(f"unknown question types {unknown} (known: {', '.join(QA_TYPES)})")
        if any(n < 1 for n in self.types.values()) or sum(self.types.values()) > self.max_pairs:
            raise ValueError(
                f"types ask for 1 or more pairs each, at most max_pairs ({self.max_pairs}) in all"
            )
        if self.min_types > self.max_pairs:
            raise ValueError(f"min_types ({self.min_types}) is greater than max_pairs ({self.max_pairs})")
        return self

    @property
    def wants_types(self) -> bool:
        """True when rows need pairs of given types (``types`` or ``min_types``)."""
        return bool(self.types) or self.min_types > 0

    def fingerprint(self) -> str:
        """A stable hash of the parameters: two equal fingerprints mean the same output settings."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json"))).hexdigest()[:16]


class TaskMessage(_Frozen):
    """Kwargs of the Celery task ``imageqa.generate``: one input row to turn into QA pairs."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str = Field(min_length=1, max_length=128)
    item_id: str = Field(min_length=1, max_length=128)
    row_index: int = Field(ge=0)
    images: list[str] = Field(
        min_length=1,
        max_length=MAX_IMAGES_PER_ROW,
        description="Image references: an absolute path, file://, http(s)://, a data: URI, an object-store "
        "URL (s3://, gs://, az://, hf://) or an image inside a file: FILE#parquet:col=C&rg=G&row=R, "
        "FILE#arrow:col=C&row=R (&item=I in a list cell) or SHARD#tar:offset=O&size=S.",
    )
    row: dict[str, Any] = Field(description="The original input row, copied to the output unchanged.")
    params: GenerationParams = Field(default_factory=GenerationParams)
    enqueued_at: float | None = Field(
        default=None, description="Unix time of enqueueing (for queue-wait metrics)."
    )
    job_total: int | None = Field(
        default=None,
        ge=1,
        le=MAX_JOB_TOTAL,
        description="For an application that enqueues without registering the job: how many rows "
        "(distinct item ids) the job has. The collector marks the job done, and announces it, once "
        "that many are written. Give the same value in every message of the job; the first one "
        "the collector sees stands.",
    )

    @model_validator(mode="after")
    def _refs(self) -> TaskMessage:
        for ref in self.images:
            if not ref or len(ref) > MAX_IMAGE_REF_CHARS:
                raise ValueError("image reference is empty or too long")
        return self

    def summary(self) -> str:
        """A short description for monitors (Flower's task kwargs column), cheap to build."""
        images = ", ".join(ref if len(ref) <= 80 else ref[:40] + "..." + ref[-30:] for ref in self.images)
        return f"{{job {self.job_id}, item {self.item_id}, row {self.row_index}, images [{images}]}}"

    @classmethod
    def decode(cls, data: Any) -> TaskMessage:
        """Checks a received message; raises `ContractError` (code ``message_invalid``)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ContractError(f"task message does not match the contract: {_short(e)}") from e


class QAPair(_Frozen):
    question: str
    answer: str
    type: str | None = Field(default=None, description="The question type (QA_TYPES), when known.")


class ErrorInfo(_Frozen):
    code: str
    message: str


class JudgeNote(_Frozen):
    """The judge's verdict on one pair."""

    score: int = Field(ge=1, le=5)
    reason: str = ""


class QAStats(_Frozen):
    """How one item's pairs came about; the collector adds these up in the job's counters."""

    tries: int = Field(default=0, ge=0, description="Generation requests sent to the engine.")
    rejected: dict[str, int] = Field(default_factory=dict, description="Rejected pairs by reason.")
    verified: int = Field(default=0, ge=0, description="Pairs put to the verification pass.")
    agreed: int = Field(default=0, ge=0, description="Verified pairs whose two answers agreed.")
    blind_checked: int = Field(default=0, ge=0, description="Pairs asked again without the image.")
    blind_answerable: int = Field(
        default=0, ge=0, description="Blind-checked pairs the model answered alike without the image."
    )
    judge_scores: dict[str, int] = Field(
        default_factory=dict, description="Judged pairs by score ('1' to '5'), kept or dropped."
    )
    judge: list[JudgeNote] = Field(
        default_factory=list,
        description="The judge's score and reason for each pair written, in the order of the pairs.",
    )


class Provenance(_Frozen):
    """How a worker made a row's pairs, beyond its model and name: enough to trace the row to its
    settings and make it again (``qa_meta`` in the output)."""

    model_revision: str | None = Field(
        default=None, description="The served checkpoint's revision (hub commit or a hash of its files)."
    )
    prompt_name: str = Field(description="Built-in prompt name, or 'custom' for a prompt_template.")
    prompt_hash: str = Field(
        description="Hash of the full rendered prompt (system prompt and user text): equal for rows made "
        "with the same prompt."
    )
    sampling: dict[str, float | int] = Field(
        default_factory=dict, description="temperature, top_p and max_tokens of the generation requests."
    )
    params_fingerprint: str | None = Field(
        default=None, description="`GenerationParams.fingerprint` of the task's parameters."
    )


class ResultRecord(_Frozen):
    """What a worker (or a producer, for a row it could not enqueue) appends to the results stream."""

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: str
    item_id: str
    row_index: int
    row: Any = Field(default=None, description="The input row; left out of the error of a message too large.")
    qa_pairs: list[QAPair] | None = None
    error: ErrorInfo | None = None
    qa_stats: QAStats | None = None
    model: str | None = None
    worker: str | None = None
    elapsed_s: float | None = None
    job_total: int | None = Field(default=None, ge=1, description="The task message's ``job_total``.")
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> ResultRecord:
        if (self.qa_pairs is None) == (self.error is None):
            raise ValueError("a result has either qa_pairs or an error")
        return self

    @property
    def ok(self) -> bool:
        return self.error is None

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def decode(cls, data: bytes | str) -> ResultRecord:
        try:
            return cls.model_validate(orjson.loads(data))
        except (ValidationError, orjson.JSONDecodeError) as e:
            raise ContractError(f"result record does not match the contract: {_short(e)}") from e


META_KEY = "qa_meta"
"""Key of an output row's provenance object (`output_meta`)."""


def output_row(record: ResultRecord, output_key: str, *, meta: bool = False) -> dict[str, Any]:
    """The output line for a successful record: the original row plus the pairs under output_key,
    and with ``meta`` its provenance under `META_KEY`."""
    row = dict(record.row) if isinstance(record.row, dict) else {"row": record.row}
    row[output_key] = [p.model_dump(exclude_none=True) for p in record.qa_pairs or []]
    if meta:
        row[META_KEY] = output_meta(record)
    return row


def output_meta(record: ResultRecord) -> dict[str, Any]:
    """How the record's row was made: its job, item and row index, the model and its revision, the
    prompt's name and hash, the sampling settings, the worker, the generation seconds and the whole
    `QAStats` (tries, rejected pairs by reason, ...). Every key is present in every row (null when
    unknown), so the rows of a file share one shape."""
    made = record.provenance
    return {
        "job_id": record.job_id,
        "item_id": record.item_id,
        "row_index": record.row_index,
        "model": record.model,
        "model_revision": made.model_revision if made else None,
        "prompt_name": made.prompt_name if made else None,
        "prompt_hash": made.prompt_hash if made else None,
        "sampling": dict(made.sampling) if made else None,
        "params_fingerprint": made.params_fingerprint if made else None,
        "worker": record.worker,
        "elapsed_s": record.elapsed_s,
        "qa_stats": record.qa_stats.model_dump(mode="json") if record.qa_stats else None,
    }


def error_row(record: ResultRecord) -> dict[str, Any]:
    """The errors-file line for a failed record."""
    assert record.error is not None
    return {
        "row_index": record.row_index,
        "item_id": record.item_id,
        "row": record.row,
        "error": record.error.model_dump(),
    }


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def json_schemas() -> dict[str, Any]:
    """The JSON Schema of the task message and the result record, for other languages."""
    return {
        "task_name": "imageqa.generate",
        "task_kwargs": TaskMessage.model_json_schema(),
        "result_record": ResultRecord.model_json_schema(),
    }


def _short(e: Exception) -> str:
    text = str(e).replace("\n", "; ")
    return text if len(text) < 500 else text[:497] + "..."
