import json

import pytest

from producer.contract import GenerationParams
from producer.errors import QAValidationError
from workers.prompts import build_prompt, qa_schema
from workers.qa import parse_and_check

PARAMS = GenerationParams(min_pairs=2, max_pairs=3, max_question_chars=60, max_answer_chars=40)


def answer(*pairs):
    return json.dumps({"qa_pairs": [{"question": q, "answer": a} for q, a in pairs]})


def test_valid_pairs_are_kept_with_whitespace_normalised():
    check = parse_and_check(
        answer(("What  colour is the car? ", " Red\n"), ("How many dogs?", "Two")), PARAMS
    )
    assert [(p.question, p.answer) for p in check.pairs] == [
        ("What colour is the car?", "Red"),
        ("How many dogs?", "Two"),
    ]
    assert check.rejected == []


def test_empty_duplicate_and_overlong_pairs_are_rejected_with_reasons():
    text = answer(
        ("What is shown?", "A street."),
        ("  ", "x"),
        ("Where is it?", "   "),
        ("what is SHOWN", "Again."),
        ("Why?" + "x" * 100, "Long."),
        ("Who is there?", "Nobody."),
    )
    check = parse_and_check(text, PARAMS)
    assert [p.question for p in check.pairs] == ["What is shown?", "Who is there?"]
    assert sorted(reason for reason, _ in check.rejected) == [
        "answer_empty",
        "question_duplicate",
        "question_empty",
        "question_too_long",
    ]


def test_too_few_valid_pairs_is_a_qa_invalid_error_naming_the_reasons():
    with pytest.raises(QAValidationError) as e:
        parse_and_check(answer(("What is it?", ""), ("Is it red?", "Yes")), PARAMS)
    assert e.value.code == "qa_invalid"
    assert "answer_empty" in e.value.message


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"qa_pairs": "no"}', '{"qa_pairs": [{"q": 1}]}'])
def test_unparseable_answers_are_qa_invalid(text):
    with pytest.raises(QAValidationError):
        parse_and_check(text, PARAMS)


def test_extra_pairs_beyond_the_maximum_are_dropped():
    check = parse_and_check(answer(*[(f"Question {i}?", f"Answer {i}") for i in range(5)]), PARAMS)
    assert len(check.pairs) == PARAMS.max_pairs


def test_schema_bounds_every_string_and_the_pair_count():
    schema = qa_schema(PARAMS)
    pairs = schema["properties"]["qa_pairs"]
    assert (pairs["minItems"], pairs["maxItems"]) == (2, 3)
    item = pairs["items"]["properties"]
    assert item["question"]["maxLength"] == 60 and item["answer"]["maxLength"] == 40


def test_prompt_asks_for_the_configured_count_as_json():
    text = build_prompt(PARAMS, 1)
    assert "2 to 3" in text and "JSON" in text and "images" not in text
    assert "images" in build_prompt(GenerationParams(min_pairs=4, max_pairs=4), 2)
