"""Checks that put the kept pairs of one output to the model again: the blind check and the judge.

``--blind-check`` asks each kept question again with no image at all (temperature 0); a pair whose
blind answer agrees with its answer (`workers.qa.answers_agree`, the rule of ``--verify``) did not
need the image and is dropped as ``answerable_without_image``. ``--judge`` shows the model the
image(s) and one pair and has it give a short reason and a score from 1 to 5 (schema-constrained);
a pair scored under ``min_judge_score`` is dropped as ``judge_low``, one whose verdict cannot be read
as ``judge_unreadable``. Each check sends one request per pair, all at once (the engine batches them),
through the ``ask`` function the generation loop hands in, which keeps the item's time budget.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from PIL.Image import Image

from producer.contract import GenerationParams, JudgeNote, QAPair, QAStats
from workers.engines.base import EngineRequest, SamplingSettings
from workers.parsing import parse_answer
from workers.prompts import CHECK_TEMPERATURE, JUDGE_REASON_CHARS, PromptSpec, blind_spec, judge_spec
from workers.qa import PairPool, Rejection, answers_agree, normal

Ask = Callable[[list[EngineRequest]], list[str]]
"""Sends requests together and returns their texts in order (raises as the engine call does)."""

_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_SCORE = re.compile(r"score\W{0,5}([1-5])\b", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


@dataclass
class CheckTally:
    """What the checks found for one item, over all its tries."""

    blind_checked: int = 0
    blind_answerable: int = 0
    judge_scores: Counter[int] = field(default_factory=Counter)
    notes: dict[str, JudgeNote] = field(default_factory=dict)
    """The judge's verdict by normalised question, for the pairs it kept."""

    def stats(self, base: QAStats, pairs: list[QAPair]) -> QAStats:
        """``base`` with the checks' counts, and the verdicts of ``pairs`` (the pairs written) in order."""
        notes = [self.notes[key] for key in map(normal, (p.question for p in pairs)) if key in self.notes]
        return base.model_copy(
            update={
                "blind_checked": self.blind_checked,
                "blind_answerable": self.blind_answerable,
                "judge_scores": {str(score): n for score, n in sorted(self.judge_scores.items())},
                "judge": notes,
            }
        )


def blind_check(
    ask: Ask,
    request_id: str,
    params: GenerationParams,
    pairs: list[QAPair],
    pool: PairPool,
    tally: CheckTally,
) -> list[QAPair]:
    """Keeps the pairs whose question the model does not answer alike without the image."""
    requests = [
        _request(f"{request_id}:blind{i}", blind_spec(params, pair.question), [], params)
        for i, pair in enumerate(pairs)
    ]
    kept = []
    for pair, text in zip(pairs, ask(requests), strict=True):
        tally.blind_checked += 1
        if answers_agree(pair.answer, parse_answer(text)):
            tally.blind_answerable += 1
            pool.reject([Rejection("answerable_without_image", pair.question, pair.answer)])
        else:
            kept.append(pair)
    return kept


def judge(
    ask: Ask,
    request_id: str,
    params: GenerationParams,
    images: list[Image],
    pairs: list[QAPair],
    pool: PairPool,
    tally: CheckTally,
) -> list[QAPair]:
    """Keeps the pairs the model scores at least ``min_judge_score`` against the image(s)."""
    requests = [
        _request(
            f"{request_id}:judge{i}",
            judge_spec(params, pair.question, pair.answer, len(images)),
            images,
            params,
        )
        for i, pair in enumerate(pairs)
    ]
    kept = []
    for pair, text in zip(pairs, ask(requests), strict=True):
        note = parse_judgement(text)
        if note is None:
            pool.reject([Rejection("judge_unreadable", pair.question, pair.answer)])
            continue
        tally.judge_scores[note.score] += 1
        if note.score < params.min_judge_score:
            pool.reject([Rejection("judge_low", pair.question, pair.answer)])
            continue
        tally.notes[normal(pair.question)] = note
        kept.append(pair)
    return kept


def parse_judgement(text: str) -> JudgeNote | None:
    """The judge's verdict: ``{"reason": ..., "score": 1-5}`` (also inside other text, or with the score
    as a string), else a ``score: N`` in the text; None when there is no score from 1 to 5."""
    value: object = None
    found = _OBJECT.search(text)
    if found:
        try:
            value = orjson.loads(found.group(0))
        except orjson.JSONDecodeError:
            value = None
    if isinstance(value, dict):
        score, reason = value.get("score"), value.get("reason")
        if isinstance(score, str) and score.strip().isdigit():
            score = int(score.strip())
        if isinstance(score, int) and not isinstance(score, bool) and 1 <= score <= 5:
            return JudgeNote(score=score, reason=_reason(reason if isinstance(reason, str) else ""))
    match = _SCORE.search(text)
    if match:
        return JudgeNote(score=int(match.group(1)), reason=_reason(text[: match.start()]))
    return None


def _reason(text: str) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= JUDGE_REASON_CHARS else text[: JUDGE_REASON_CHARS - 3] + "..."


def _request(
    request_id: str, spec: PromptSpec, images: list[Image], params: GenerationParams
) -> EngineRequest:
    return EngineRequest(
        request_id=f"{request_id}:{time.monotonic_ns()}",
        images=images,
        prompt=spec.text,
        system_prompt=spec.system_prompt,
        json_schema=spec.json_schema,
        sampling=SamplingSettings(temperature=CHECK_TEMPERATURE, top_p=1.0, max_tokens=params.max_tokens),
    )
