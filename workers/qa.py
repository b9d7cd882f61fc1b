"""Parsing the model's answer and checking every pair."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from producer.contract import GenerationParams, QAPair
from producer.errors import QAValidationError

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


class _RawPair(BaseModel):
    model_config = ConfigDict(extra="ignore")
    question: str
    answer: str


class _RawAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    qa_pairs: list[_RawPair]


@dataclass
class QACheck:
    pairs: list[QAPair]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(reason, question) for each dropped pair."""


def parse_and_check(text: str, params: GenerationParams) -> QACheck:
    """Parses a JSON answer and keeps the valid pairs; raises `QAValidationError` if too few remain."""
    try:
        raw = _RawAnswer.model_validate(orjson.loads(text))
    except (orjson.JSONDecodeError, ValidationError) as e:
        raise QAValidationError(f"model answer is not the expected JSON: {str(e)[:300]}") from e
    check = QACheck(pairs=[])
    seen: set[str] = set()
    for pair in raw.qa_pairs:
        question = _SPACE.sub(" ", pair.question).strip()
        answer = _SPACE.sub(" ", pair.answer).strip()
        reason = _reject_reason(question, answer, params, seen)
        if reason:
            check.rejected.append((reason, question))
            continue
        seen.add(_normal(question))
        check.pairs.append(QAPair(question=question, answer=answer))
    check.pairs = check.pairs[: params.max_pairs]
    if len(check.pairs) < params.min_pairs:
        reasons = ", ".join(sorted({reason for reason, _ in check.rejected})) or "too few pairs"
        raise QAValidationError(
            f"{len(check.pairs)} valid pairs, need at least {params.min_pairs} (rejected: {reasons})"
        )
    return check


def _reject_reason(question: str, answer: str, params: GenerationParams, seen: set[str]) -> str | None:
    if not question:
        return "question_empty"
    if not answer:
        return "answer_empty"
    if len(question) > params.max_question_chars:
        return "question_too_long"
    if len(answer) > params.max_answer_chars:
        return "answer_too_long"
    if _normal(question) in seen:
        return "question_duplicate"
    return None


def _normal(text: str) -> str:
    return _SPACE.sub(" ", _PUNCT.sub("", text.lower())).strip()
