"""Prompts and the JSON schemas that constrain the model's answer.

A prompt is a built-in template named by ``GenerationParams.prompt_version`` or the user's own
``prompt_template``; either way its text is part of the item id. Built-in templates declare whether
the answer is JSON (then the request carries `qa_schema`, and engines with constrained decoding can
only write schema-valid output) or free text (no schema; `workers.parsing` reads whatever comes).

The schema encodes every pair rule that a pattern can express (length bounds, no blank or
whitespace-padded strings, a letter or digit, a final question mark), so constrained decoding cannot
produce a pair that `workers.qa` would reject for those reasons. Patterns are written for
llguidance (vLLM's ``guidance`` backend): ``\\w`` is ASCII there, hence ``\\p{L}\\p{N}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from producer.contract import QA_TYPES, GenerationParams
from producer.errors import PromptError
from workers.parsing import QUESTION_MARKS

SYSTEM_PROMPT = "You are a careful annotator who writes question-answer pairs about images."
GREEDY_RETRY_TEMPERATURE = 0.7
"""A regeneration with temperature 0 would repeat the same answer; it samples at this temperature."""
VERIFY_TEMPERATURE = 0.0
"""The verification pass takes the model's most likely answer."""
CHECK_TEMPERATURE = 0.0
"""The blind check and the judge take the model's most likely answer too."""
JUDGE_REASON_CHARS = 200
"""Longest reason the judge may give for its score, in characters."""

# Words of visible characters (no space, no control character) separated by single spaces, without
# padding, with at least one letter or digit: what `workers.qa` keeps after collapsing whitespace.
_CHAR = r"[^\s\p{Cc}]"
_WORDS = rf"(?:{_CHAR}+ )*{_CHAR}*[\p{{L}}\p{{N}}]{_CHAR}*(?: {_CHAR}+)*"
_EXAMPLE = '{"qa_pairs": [{"question": "...", "answer": "..."}]}'
_TYPED_EXAMPLE = '{"qa_pairs": [{"question": "...", "answer": "...", "type": "..."}]}'


@dataclass(frozen=True)
class Template:
    text: str
    json_output: bool
    """True: the answer is JSON and the request carries the schema. False: free text."""
    system_prompt: str = SYSTEM_PROMPT
    typed: bool = False
    """True: every pair carries its question type (`QA_TYPES`), in the text and the schema."""


_TEMPLATES: dict[str, Template] = {
    "qa-v3": Template(
        "Look at the {image_word}. Write {count} question-answer pairs about what is visible, each of "
        "a different type where possible. Give every pair its type, one of: {types}. "
        "Every question must be answerable from the {image_word} alone, without outside knowledge, "
        "must end with a question mark and must differ from the others. Every answer must be short, "
        "specific and correct: never a refusal, a placeholder or the question repeated. "
        "Reply with JSON only, in the form {example}.",
        json_output=True,
        typed=True,
    ),
    # The default before question types, kept so that tasks enqueued with it still run.
    "qa-v2": Template(
        "Look at the {image_word}. Write {count} question-answer pairs about what is visible, each of "
        "a different kind where possible: objects and their counts, colours and other attributes, "
        "spatial relations between things, the scene and the activity in it, and any visible text. "
        "Every question must be answerable from the {image_word} alone, without outside knowledge, "
        "must end with a question mark and must differ from the others. Every answer must be short, "
        "specific and correct: never a refusal, a placeholder or the question repeated. "
        "Reply with JSON only, in the form {example}.",
        json_output=True,
    ),
    # The first default, kept so that tasks enqueued with it still run.
    "qa-v1": Template(
        "Look at the {image_word}. Write {count} diverse question-answer pairs about what is visible: "
        "objects and counts, colours and attributes, spatial relations, the scene and activity, and any "
        "visible text. Each question must be answerable from the {image_word} alone and end with a "
        "question mark; each answer must be short and correct. Reply with JSON only, in the form "
        "{example}.",
        json_output=True,
    ),
    # DataFlow's own style: a description first, then plain-text pairs (parsed leniently).
    "dataflow": Template(
        "Please provide a detailed and comprehensive description of the {image_word}, then extract "
        "{count} question-answer pairs from it. Each question must be answerable from the "
        "{image_word} alone and end with a question mark. Return each pair on its own line in the "
        "format: Question: <question>, Answer: <answer>",
        json_output=False,
        system_prompt="You are an image caption generator and question-answer pair extractor. Describe "
        "the image with its main content and details, then extract question-answer pairs whose answers "
        "come from that description.",
    ),
}
_PLACEHOLDER = re.compile(
    r"\{(count|min_pairs|max_pairs|schema|example|image_word|max_question_chars|max_answer_chars|types)\}"
)


@dataclass(frozen=True)
class PromptSpec:
    """Everything a generation request needs besides the images."""

    text: str
    system_prompt: str | None
    json_schema: dict[str, Any] | None


def prompt_spec(params: GenerationParams, n_images: int) -> PromptSpec:
    """The prompt for ``params``: the user's template if set, else the named built-in one.

    Raises `PromptError` (``prompt_invalid``) for an unknown built-in name.
    """
    template = _template(params)
    schema = qa_schema(params) if template.json_output else None
    system = template.system_prompt if params.system_prompt is None else params.system_prompt
    text = render(template.text, params, n_images)
    if params.wants_types:
        text += "\n" + type_request(params.types, params.min_types, typed_template=template.typed)
    return PromptSpec(
        text=text,
        system_prompt=system or None,
        json_schema=schema,
    )


def _template(params: GenerationParams) -> Template:
    if params.prompt_template is not None:
        return Template(params.prompt_template, json_output=True)
    try:
        return _TEMPLATES[params.prompt_version]
    except KeyError:
        known = ", ".join(_TEMPLATES)
        raise PromptError(f"unknown prompt {params.prompt_version!r} (known: {known})") from None


def render(template: str, params: GenerationParams, n_images: int) -> str:
    """Fills the known ``{placeholders}``; any other brace (a JSON example, say) stays as written."""
    values = {
        "count": pair_count(params),
        "min_pairs": str(params.min_pairs),
        "max_pairs": str(params.max_pairs),
        "schema": json.dumps(qa_schema(params), ensure_ascii=False, separators=(",", ":")),
        "example": _TYPED_EXAMPLE if typed(params) else _EXAMPLE,
        "types": type_list(),
        "image_word": "images" if n_images > 1 else "image",
        "max_question_chars": str(params.max_question_chars),
        "max_answer_chars": str(params.max_answer_chars),
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def pair_count(params: GenerationParams) -> str:
    if params.min_pairs == params.max_pairs:
        return str(params.min_pairs)
    return f"{params.min_pairs} to {params.max_pairs}"


def retry_prompt(
    text: str,
    accepted_questions: Sequence[str],
    missing_types: Mapping[str, int] | None = None,
    more_types: int = 0,
) -> str:
    """The prompt of a regeneration: the same request, asking for questions not yet accepted and
    for the question types the row still lacks."""
    if accepted_questions:
        listed = "\n".join(f"- {q}" for q in accepted_questions)
        text = f"{text}\n\nThese questions are taken already; write different ones:\n{listed}"
    if missing_types or more_types:
        text += "\n\nStill missing: " + type_request(missing_types or {}, more_types, typed_template=True)
    return text


def type_list() -> str:
    """The taxonomy as the prompts name it: ``object (what a thing is ...), count (...), ...``."""
    return ", ".join(f"{name} ({meaning})" for name, meaning in QA_TYPES.items())


def type_request(counts: Mapping[str, int], distinct: int, *, typed_template: bool) -> str:
    """A sentence asking for pairs of given types and for a number of distinct types."""
    wanted = []
    if counts:
        wanted.append(", ".join(f"{n} {kind} question{'s' if n > 1 else ''}" for kind, n in counts.items()))
    if distinct:
        wanted.append(f"questions of at least {distinct} different types")
    sentence = f"Include at least {' and '.join(wanted)}."
    if not typed_template:
        sentence += f" Give every pair its type, one of: {type_list()}."
    return sentence


def typed(params: GenerationParams) -> bool:
    """Whether pairs carry a type: the template asks for it, or the job sets type quotas."""
    return params.wants_types or (params.prompt_template is None and _template(params).typed)


def qa_schema(params: GenerationParams) -> dict[str, Any]:
    """The answer's JSON schema. Every string has ``maxLength``: without it random or rambling output
    runs to max_tokens."""
    question = _text(params.min_question_chars, params.max_question_chars, params.require_question_mark)
    pair: dict[str, Any] = {
        "question": question,
        "answer": _text(params.min_answer_chars, params.max_answer_chars, False),
    }
    if typed(params):
        pair["type"] = {"type": "string", "enum": list(QA_TYPES)}
    return {
        "type": "object",
        "properties": {
            "qa_pairs": {
                "type": "array",
                "minItems": params.min_pairs,
                "maxItems": params.max_pairs,
                "items": {
                    "type": "object",
                    "properties": pair,
                    "required": list(pair),
                    "additionalProperties": False,
                },
            }
        },
        "required": ["qa_pairs"],
        "additionalProperties": False,
    }


def verify_spec(params: GenerationParams, question: str, n_images: int) -> PromptSpec:
    """The verification request: the question alone, answered again without the generated answer."""
    image_word = "images" if n_images > 1 else "image"
    text = (
        f"Look at the {image_word} and answer this question about it in a few words, from what is "
        f"visible only.\nQuestion: {question}\n"
    )
    return _answer_spec(params, text)


def _answer_spec(params: GenerationParams, text: str) -> PromptSpec:
    """A request for one short answer: JSON ``{"answer": ...}`` or plain text, as the prompt writes."""
    if _template(params).json_output:
        schema: dict[str, Any] | None = {
            "type": "object",
            "properties": {"answer": _text(params.min_answer_chars, params.max_answer_chars, False)},
            "required": ["answer"],
            "additionalProperties": False,
        }
        text += 'Reply with JSON only, in the form {"answer": "..."}.'
    else:
        schema = None
        text += "Reply with the answer only."
    system = SYSTEM_PROMPT if params.system_prompt is None else params.system_prompt
    return PromptSpec(text=text, system_prompt=system or None, json_schema=schema)


def _text(min_chars: int, max_chars: int, question: bool) -> dict[str, Any]:
    end = f"[{QUESTION_MARKS}]" if question else ""
    return {
        "type": "string",
        "minLength": min_chars,
        "maxLength": max_chars,
        "pattern": f"^{_WORDS}{end}$",
    }


def blind_spec(params: GenerationParams, question: str) -> PromptSpec:
    """The blind check's request: the question alone, sent with no image. A model that still answers
    it as the pair does did not need the image. It is told to guess: a refusal would hide that."""
    text = (
        "Answer this question in a few words. If you cannot be sure, give your best guess.\n"
        f"Question: {question}\n"
    )
    return _answer_spec(params, text)


def judge_spec(params: GenerationParams, question: str, answer: str, n_images: int) -> PromptSpec:
    """The judge's request: one pair and the image(s); the answer is a reason and a score of 1-5,
    always as JSON (the score is read by a program, whatever the generation prompt's format)."""
    image_word = "images" if n_images > 1 else "image"
    text = (
        f"Look at the {image_word}. Rate this question-answer pair about it from 1 to 5:\n"
        f"5: the question is about what the {image_word} shows and the answer is correct and specific;\n"
        "4: correct, with a minor flaw;\n"
        f"3: acceptable, but vague, generic or answerable without the {image_word};\n"
        "2: the answer is partly wrong, or the question is barely about what is visible;\n"
        "1: wrong, unanswerable from what is visible, or nonsense.\n"
        f"Question: {question}\nAnswer: {answer}\n"
        'Reply with JSON only, in the form {"reason": "<one short sentence>", "score": <1 to 5>}.'
    )
    system = SYSTEM_PROMPT if params.system_prompt is None else params.system_prompt
    return PromptSpec(text=text, system_prompt=system or None, json_schema=judge_schema())


def judge_schema() -> dict[str, Any]:
    """The judge's answer: a short reason first (the score follows from it), then the score."""
    return {
        "type": "object",
        "properties": {
            "reason": _text(1, JUDGE_REASON_CHARS, False),
            "score": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["reason", "score"],
        "additionalProperties": False,
    }
