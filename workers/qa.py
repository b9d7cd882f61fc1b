"""Checking question-answer pairs: every rejected pair gets a reason, every kept pair is clean.

The rules are configured by `GenerationParams` (length bounds, and switches for the question mark,
refusal and restatement rules) and applied by the pydantic model `CheckedPair`, whose errors carry
the reason code as their type. Rejection reasons, in the order they are tested:

``malformed`` an entry with no question or no answer text; ``question_empty``/``answer_empty`` no
letter or digit; ``question_placeholder``/``answer_placeholder`` template text (``<question>``,
``N/A``, ``...``); ``question_refusal``/``answer_refusal`` a refusal or non-answer (``I cannot ...``,
``unknown``, ``as an AI ...``); ``question_too_short``/``question_too_long``/``answer_too_short``/
``answer_too_long`` length bounds (after whitespace is collapsed); ``not_a_question`` no final
question mark; ``answer_restates_question`` the answer is the question again; ``duplicate_question``
the same question as a kept one (after normalisation); ``over_max_pairs`` beyond ``max_pairs``;
``unverified`` the verification pass answered differently. ``unparseable`` counts outputs with
no pairs at all. Question types (`QA_TYPES`): ``type_invalid`` a type outside the taxonomy (after
synonyms: ``ocr`` is ``text``, ``color`` is ``attribute``, ...); ``type_missing`` no type while the
job sets type quotas; ``type_surplus`` a valid pair left out to keep room for the types a row still
lacks. ``template_overused`` is the job-wide template share (`workers.diversity`).
``answerable_without_image``, ``judge_low`` and ``judge_unreadable`` come from the
optional checks of `workers.checks`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from producer.contract import QA_TYPES, GenerationParams, QAPair, QAStats
from producer.errors import QAValidationError
from workers.parsing import QUESTION_MARKS, parse_qa_output

REASONS = frozenset(
    {
        "unparseable", "malformed", "question_empty", "answer_empty", "question_placeholder",
        "answer_placeholder", "question_refusal", "answer_refusal", "question_too_short",
        "question_too_long", "not_a_question", "answer_too_short", "answer_too_long",
        "answer_restates_question", "duplicate_question", "over_max_pairs", "unverified",
        "type_invalid", "type_missing", "type_surplus", "template_overused",
        "answerable_without_image", "judge_low", "judge_unreadable",
    }
)  # fmt: skip
"""Every rejection reason (stable codes: they are counted per job as ``rejected:<reason>``)."""
_SPACE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")  # control characters count as space
_PUNCT = re.compile(r"[^\w\s]|_")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u201c": '"', "\u201d": '"'})
_PLACEHOLDERS = frozenset(
    {
        "n/a", "n.a.", "n.a", "n / a", "tbd", "todo", "xxx", "...", "…", "null", "undefined", "string",
        "question", "answer", "your question", "your answer", "question here", "answer here",
        "your question here", "your answer here", "insert question", "insert answer", "placeholder",
        "lorem ipsum", "sample question", "sample answer",
    }
)  # fmt: skip
_TEMPLATE_MARK = re.compile(
    r"<\s*/?\s*(?:question|answer|your [^>]*|insert [^>]*)\s*>"
    r"|\[\s*(?:question|answer|insert [^\]]*|your [^\]]*)\s*\]"
    r"|\{\{?\s*(?:question|answer)\s*\}?\}"
    r"|lorem ipsum",
    re.IGNORECASE,
)
_REFUSAL = re.compile(
    r"^(?:sorry|i'm sorry|i am sorry|apologies|my apologies|unfortunately)\b"
    r"|^(?:i|we) (?:cannot|can't|can not|could not|couldn't|am unable to|'m unable to|am not able to"
    r"|do not|don't) (?:see|view|tell|determine|identify|answer|provide|know|help|access|make out"
    r"|read|say|be sure|process|analy[sz]e)\b"
    r"|^(?:i|we)(?:'m| am) (?:unable|not able|not sure|uncertain)\b"
    r"|\bas an ai\b|\b(?:ai|language) model\b"
    r"|\b(?:no|without (?:the|an?)) image (?:is |was )?(?:provided|available|attached|given|shown)\b"
    r"|^there is no image\b"
)
_NON_ANSWER = re.compile(
    r"^(?:unknown|unclear|uncertain|not sure|unanswerable|indeterminate|not applicable"
    r"|not (?:clearly |fully )?(?:visible|shown|discernible|determinable|specified|provided|known)"
    r"|(?:cannot|can't|can not) (?:be )?(?:determined?|tell|say|see|know|identif(?:y|ied))"
    r"|impossible to (?:tell|say|determine|know|see)|no (?:information|answer|way to (?:tell|know))"
    r"|(?:it is|it's) (?:not possible|impossible|unclear|hard|difficult) to (?:tell|say|determine|know"
    r"|see))\b"
)


_TYPE_SYNONYMS = {
    "objects": "object", "object recognition": "object", "identification": "object", "presence": "object",
    "existence": "object", "recognition": "object", "counting": "count", "quantity": "count",
    "number": "count", "numbers": "count", "attributes": "attribute", "color": "attribute",
    "colour": "attribute", "shape": "attribute", "size": "attribute", "material": "attribute",
    "position": "spatial", "location": "spatial", "spatial relation": "spatial",
    "spatial relations": "spatial", "relation": "spatial", "ocr": "text", "text ocr": "text",
    "reading": "text", "visible text": "text", "activity": "action", "actions": "action",
    "setting": "scene", "environment": "scene", "weather": "scene", "inference": "reasoning",
    "commonsense": "reasoning", "logic": "reasoning", "why": "reasoning",
}  # fmt: skip


def question_type(value: str | None) -> str | None:
    """The taxonomy name (`QA_TYPES`) of a type label a model wrote, or None when it names none.
    Case, punctuation and common synonyms ("OCR", "color", "counting") are forgiven."""
    if value is None:
        return None
    key = normal(value).replace("_", " ")
    key = key.removesuffix(" question").removesuffix(" questions")
    return key if key in QA_TYPES else _TYPE_SYNONYMS.get(key)


class CheckedPair(BaseModel):
    """A pair that passed every rule. Validate with ``context={"params": GenerationParams}``; a
    failure is a `ValidationError` whose first error type is the rejection reason."""

    model_config = ConfigDict(frozen=True)
    question: str
    answer: str

    @field_validator("question", "answer", mode="before")
    @classmethod
    def _collapse(cls, value: object) -> object:
        return _SPACE.sub(" ", value).strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> CheckedPair:
        params: GenerationParams = (info.context or {}).get("params") or GenerationParams()
        reason = rejection_reason(self.question, self.answer, params)
        if reason is not None:
            raise PydanticCustomError(reason, "pair rejected: {reason}", {"reason": reason})
        return self


def rejection_reason(question: str, answer: str, params: GenerationParams) -> str | None:
    """The first rule that the (whitespace-collapsed) pair breaks, or None. Duplicates and the pair
    count are rules over many pairs: see `check_pairs`."""
    q_norm, a_norm = normal(question), normal(answer)
    if not q_norm:
        return "question_empty"
    if not a_norm:
        return "answer_empty"
    if _is_placeholder(question):
        return "question_placeholder"
    if _is_placeholder(answer):
        return "answer_placeholder"
    if params.reject_refusals and _is_refusal(question):
        return "question_refusal"
    if params.reject_refusals and (_is_refusal(answer) or _NON_ANSWER.search(_canonical(answer))):
        return "answer_refusal"
    if len(question) < params.min_question_chars:
        return "question_too_short"
    if len(question) > params.max_question_chars:
        return "question_too_long"
    if params.require_question_mark and not question.endswith(tuple(QUESTION_MARKS)):
        return "not_a_question"
    if len(answer) < params.min_answer_chars:
        return "answer_too_short"
    if len(answer) > params.max_answer_chars:
        return "answer_too_long"
    if params.reject_restated and (
        a_norm == q_norm or (len(q_norm.split()) >= 3 and f" {q_norm} " in f" {a_norm} ")
    ):
        return "answer_restates_question"
    return None


@dataclass(frozen=True)
class Rejection:
    reason: str
    question: str = ""
    answer: str = ""


@dataclass
class QACheck:
    """The outcome of checking one model output: kept pairs, rejected pairs, and the output's shape."""

    pairs: list[QAPair]
    rejected: list[Rejection] = field(default_factory=list)
    shape: str = "json"

    def reasons(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejected))


def check_output(text: str, params: GenerationParams, seen: set[str] | None = None) -> QACheck:
    """Parses a raw model output leniently and checks its pairs. Never raises.

    ``seen`` holds normalised questions already kept (by an earlier try): repeats are duplicates.
    """
    parsed = parse_qa_output(text)
    check = check_pairs(parsed.pairs, params, seen, types=parsed.pair_types())
    check.shape = parsed.shape
    check.rejected[:0] = [Rejection("malformed")] * parsed.malformed
    if not parsed.pairs and not parsed.malformed:
        check.rejected.append(Rejection("unparseable"))
    return check


def check_pairs(
    pairs: Iterable[tuple[str, str]],
    params: GenerationParams,
    seen: set[str] | None = None,
    types: Iterable[str | None] = (),
) -> QACheck:
    """Keeps the pairs that pass every rule, in order; at most ``max_pairs`` (with type quotas, the
    pool chooses among them: `PairPool.accept`). ``types`` are the labels the model gave, by position."""
    check = QACheck(pairs=[])
    seen = set(seen or ())
    labels = list(types)
    for i, (question, answer) in enumerate(pairs):
        label = labels[i] if i < len(labels) else None
        try:
            pair = CheckedPair.model_validate(
                {"question": question, "answer": answer}, context={"params": params}
            )
        except ValidationError as e:
            reason = e.errors()[0]["type"]
            reason = reason if reason in REASONS else "malformed"
            check.rejected.append(Rejection(reason, _short(question), _short(answer)))
            continue
        kind = question_type(label)
        if label is not None and kind is None and label.strip():
            check.rejected.append(Rejection("type_invalid", pair.question, pair.answer))
            continue
        if kind is None and params.wants_types:
            check.rejected.append(Rejection("type_missing", pair.question, pair.answer))
            continue
        key = normal(pair.question)
        if key in seen:
            check.rejected.append(Rejection("duplicate_question", pair.question, pair.answer))
            continue
        if len(check.pairs) >= params.max_pairs and not params.wants_types:
            check.rejected.append(Rejection("over_max_pairs", pair.question, pair.answer))
            continue
        seen.add(key)
        check.pairs.append(QAPair(question=pair.question, answer=pair.answer, type=kind))
    return check


def shortage(
    valid: int, params: GenerationParams, reasons: dict[str, int], missing: TypeNeed | None = None
) -> QAValidationError:
    counted = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())) or "none"
    lacking = f"; missing types: {missing.describe()}" if missing else ""
    return QAValidationError(
        f"{valid} valid pairs, need at least {params.min_pairs}{lacking} (rejected: {counted})"
    )


@dataclass(frozen=True)
class TypeNeed:
    """What a row still lacks: pairs of given types, and more distinct types."""

    counts: dict[str, int] = field(default_factory=dict)
    distinct: int = 0

    def __bool__(self) -> bool:
        return bool(self.counts) or self.distinct > 0

    @property
    def slots(self) -> int:
        """Pairs it takes at least."""
        return sum(self.counts.values()) + self.distinct

    def describe(self) -> str:
        parts = [f"{kind} {n}" for kind, n in self.counts.items()]
        if self.distinct:
            parts.append(f"{self.distinct} more distinct")
        return ", ".join(parts)


def type_need(params: GenerationParams, kinds: Iterable[str | None]) -> TypeNeed:
    """What pairs of ``kinds`` still lack of ``params.types`` and ``params.min_types``."""
    have = Counter(k for k in kinds if k is not None)
    counts = {kind: n - have[kind] for kind, n in params.types.items() if have[kind] < n}
    # Types a quota still needs will be distinct ones too; count only the rest.
    distinct = max(0, params.min_types - len(set(have) | set(counts)))
    return TypeNeed(counts, distinct)


class PairPool:
    """The pairs of one item, merged over several tries, with the tally of what was rejected."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.pairs: list[QAPair] = []
        self.seen: set[str] = set()
        self.reasons: Counter[str] = Counter()
        self.tries = 0
        self.verified = 0
        self.agreed = 0

    @property
    def enough(self) -> bool:
        return len(self.pairs) >= self.params.min_pairs and not self.missing()

    def missing(self) -> TypeNeed:
        """The types this row still lacks (empty without ``types``/``min_types``)."""
        return type_need(self.params, (p.type for p in self.pairs))

    def reject(self, rejections: Iterable[Rejection]) -> None:
        self.reasons.update(r.reason for r in rejections)

    def admissible(self, pairs: Iterable[QAPair]) -> tuple[list[QAPair], list[Rejection]]:
        """Which of ``pairs`` `accept` would keep, and why it would drop the others; changes nothing."""
        kept: list[QAPair] = []
        dropped: list[Rejection] = []
        seen = set(self.seen)
        for pair in pairs:
            key = normal(pair.question)
            room = self.params.max_pairs - len(self.pairs) - len(kept)
            if key in seen:
                dropped.append(Rejection("duplicate_question", pair.question, pair.answer))
            elif room <= 0:
                dropped.append(Rejection("over_max_pairs", pair.question, pair.answer))
            elif not self._fits(kept, pair, room):
                dropped.append(Rejection("type_surplus", pair.question, pair.answer))
            else:
                seen.add(key)
                kept.append(pair)
        return kept, dropped

    def _fits(self, kept: list[QAPair], pair: QAPair, room: int) -> bool:
        """A pair fits while the room left after it still holds every pair of a type still needed."""
        if not self.params.wants_types:
            return True
        kinds = [p.type for p in self.pairs + kept]
        before, after = type_need(self.params, kinds), type_need(self.params, [*kinds, pair.type])
        return after.slots < before.slots or room - 1 >= after.slots

    def accept(self, pairs: Iterable[QAPair]) -> None:
        kept, dropped = self.admissible(pairs)
        self.reject(dropped)
        for pair in kept:
            self.seen.add(normal(pair.question))
            self.pairs.append(pair)

    def result(self) -> list[QAPair]:
        """The pairs; raises `QAValidationError` when fewer than ``min_pairs`` or types are missing."""
        if not self.enough:
            raise shortage(len(self.pairs), self.params, dict(self.reasons), self.missing())
        return list(self.pairs)

    def stats(self) -> QAStats:
        return QAStats(
            tries=self.tries, rejected=dict(self.reasons), verified=self.verified, agreed=self.agreed
        )


# Agreement of two answers (verification pass).
_WORD_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
_NUMBERS = {word: str(i) for i, word in enumerate(_WORD_NUMBERS.split(" "))}
_NUMBERS.update({"none": "0", "no one": "0", "nobody": "0", "single": "1", "a couple": "2", "pair": "2"})
_FILLER = frozenset(
    {"a", "an", "the", "is", "are", "was", "were", "be", "it", "its", "it's", "this", "that", "these"}
    | {"those", "there", "they", "of"}
)
_YES = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO = frozenset({"no", "nope", "false", "not", "incorrect"})
AGREEMENT_MIN_F1 = 0.8
"""Two answers agree when their content words overlap with at least this F1 (see `answers_agree`)."""


def answers_agree(first: str, second: str) -> bool:
    """Whether two answers to one question say the same thing.

    Both are lowercased, stripped of punctuation, articles and forms of "to be", and number words
    become digits ("Two dogs." ~ "2 dogs"). Yes/no answers agree when their polarity does. Otherwise
    they agree when one's words all occur in the other ("Red" ~ "The car is red") or when the word
    overlap (F1 of the two word bags) reaches `AGREEMENT_MIN_F1`: one differing word in three is
    a disagreement ("on the left side" !~ "on the right side").
    """
    a, b = _answer_words(first), _answer_words(second)
    polarity_a, polarity_b = _polarity(a), _polarity(b)
    if polarity_a and polarity_b:
        return polarity_a == polarity_b
    if polarity_a or polarity_b:
        return False
    a, b = [w for w in a if w not in _FILLER] or a, [w for w in b if w not in _FILLER] or b
    if not a or not b:
        return a == b
    if set(a) <= set(b) or set(b) <= set(a):
        return True
    common = sum((Counter(a) & Counter(b)).values())
    if not common:
        return False
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall) >= AGREEMENT_MIN_F1


def _answer_words(text: str) -> list[str]:
    text = " " + normal(text) + " "
    for phrase, digit in _NUMBERS.items():
        if " " in phrase:
            text = text.replace(f" {phrase} ", f" {digit} ")
    return [_NUMBERS.get(word, word) for word in text.split()]


def _polarity(words: list[str]) -> str | None:
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO and (len(words) == 1 or words[0] != "not"):
        return "no"
    return None


def normal(text: str) -> str:
    """Lowercase, compatibility-normalised, without punctuation, single-spaced: for comparisons."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def _canonical(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES).lower()
    return _SPACE.sub(" ", text).strip()


def _is_placeholder(text: str) -> bool:
    bare = _canonical(text).strip(f" \"'*_()[]{{}}<>:;,.!-{QUESTION_MARKS}")
    return (
        bare in _PLACEHOLDERS or _canonical(text) in _PLACEHOLDERS or _TEMPLATE_MARK.search(text) is not None
    )


def _is_refusal(text: str) -> bool:
    return _REFUSAL.search(_canonical(text)) is not None


def _short(text: object, limit: int = 200) -> str:
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
