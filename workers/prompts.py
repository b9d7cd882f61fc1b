"""The default prompt and the JSON schema that constrains the model's answer."""

from __future__ import annotations

from typing import Any

from producer.contract import PROMPT_VERSION, GenerationParams

SYSTEM_PROMPT = "You are a careful annotator who writes question-answer pairs about images."

_TEMPLATES = {
    PROMPT_VERSION: (
        "Look at the image{plural}. Write {count} diverse question-answer pairs about what is visible: "
        "objects and counts, colours and attributes, spatial relations, the scene and activity, and any "
        "visible text. Each question must be answerable from the image{plural} alone and end with a "
        "question mark; each answer must be short and correct. Reply with JSON only, in the form "
        '{{"qa_pairs": [{{"question": "...", "answer": "..."}}]}}.'
    ),
}


def build_prompt(params: GenerationParams, n_images: int) -> str:
    try:
        template = _TEMPLATES[params.prompt_version]
    except KeyError as e:
        raise ValueError(f"unknown prompt version {params.prompt_version!r}") from e
    count = (
        str(params.min_pairs)
        if params.min_pairs == params.max_pairs
        else f"{params.min_pairs} to {params.max_pairs}"
    )
    return template.format(count=count, plural="s" if n_images > 1 else "")


def qa_schema(params: GenerationParams) -> dict[str, Any]:
    """Every string has ``maxLength``: without it random or rambling output runs to max_tokens."""
    return {
        "type": "object",
        "properties": {
            "qa_pairs": {
                "type": "array",
                "minItems": params.min_pairs,
                "maxItems": params.max_pairs,
                "items": {
                    "type": "object",
                    "properties": {
                        "question": _text(params.max_question_chars),
                        "answer": _text(params.max_answer_chars),
                    },
                    "required": ["question", "answer"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["qa_pairs"],
        "additionalProperties": False,
    }


def _text(max_chars: int) -> dict[str, Any]:
    # "pattern" (unanchored) demands one non-space character: no blank strings.
    return {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": "\\S"}
