"""The lenient parser: a corpus of realistic model outputs in every supported shape, property tests
that it never raises, and the ``imageqa parse-qa`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.parsing import QUESTION_MARKS, parse_answer, parse_qa_output

CORPUS_PATH = Path(__file__).parent / "data" / "qa_outputs.jsonl"
CORPUS = [json.loads(line) for line in CORPUS_PATH.read_text("utf-8").splitlines() if line.strip()]
SHAPES = {
    "json", "json_fenced", "json_embedded", "json_partial", "tagged", "table", "labelled", "lines", "none",
}  # fmt: skip


def test_the_corpus_covers_every_shape():
    assert {case["shape"] for case in CORPUS} == SHAPES


@pytest.mark.parametrize("case", CORPUS, ids=[case["name"] for case in CORPUS])
def test_corpus_outputs_give_their_pairs(case):
    parsed = parse_qa_output(case["output"])
    assert parsed.shape == case["shape"]
    assert [list(pair) for pair in parsed.pairs] == case["pairs"]


def test_prose_with_a_letter_and_colon_is_not_a_pair():
    assert parse_qa_output("Plan A: go left at the bakery.").pairs == []
    options = "Which colour is the bus?\na) red\nb) blue"
    assert parse_qa_output(options).pairs == [("Which colour is the bus?", "a) red")]


@pytest.mark.parametrize("mark", list(QUESTION_MARKS), ids=["ascii", "full-width", "arabic"])
@pytest.mark.parametrize(
    ("template", "shape"),
    [
        ("1. What is shown{mark} A cat.\n2. Who is there{mark} Nobody.", "lines"),
        ("What is shown{mark}\nA cat.\nWho is there{mark}\nNobody.", "lines"),
        ("Q: What is shown{mark} A: A cat. Q: Who is there{mark} A: Nobody.", "labelled"),
        ('{{"What is shown{mark}": "A cat.", "Who is there{mark}": "Nobody."}}', "json"),
    ],
)
def test_every_question_mark_ends_a_question(template, shape, mark):
    parsed = parse_qa_output(template.format(mark=mark))
    assert parsed.shape == shape
    assert parsed.pairs == [(f"What is shown{mark}", "A cat."), (f"Who is there{mark}", "Nobody.")]


def test_a_conversation_pairs_each_user_turn_with_the_next_assistant_turn():
    turns = [
        {"role": "system", "content": "You label images."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Who is there?"},
        {"role": "user", "content": "Where is it?"},
        {"role": "assistant", "content": "In a garden."},
        {"role": "assistant", "content": "Anything else?"},
    ]
    parsed = parse_qa_output(json.dumps(turns))
    assert parsed.pairs == [("What is shown?", "A cat."), ("Where is it?", "In a garden.")]
    assert parsed.malformed == 2, "a user turn without its answer, an answer without its question"


def test_role_words_inside_prose_are_not_turns():
    assert parse_qa_output("The user: a man in a red coat.\nThe assistant: nobody.").pairs == []
    truncated = (
        "<question>What is shown?</question><answer>A cat.</answer>"
        "<question>Who is there?</question><answer>No"
    )
    assert parse_qa_output(truncated).pairs == [("What is shown?", "A cat."), ("Who is there?", "No")]


def test_valid_json_without_pairs_is_not_read_as_text():
    parsed = parse_qa_output('{"qa_pairs": [{"question": "What is it?"}, 7]}')
    assert (parsed.shape, parsed.pairs, parsed.malformed) == ("json", [], 2)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ('{"answer": "Red."}', "Red."),
        ('{"Answer": 3}', "3"),
        ('"Two dogs"', "Two dogs"),
        ('```json\n{"answer": "Blue"}\n```', "Blue"),
        ("Answer: **A bakery.**\n\nI hope this helps.", "A bakery."),
        ("  A red bus.  ", "A red bus."),
        ("<think>Let me look.</think>Yes", "Yes"),
        ('{"qa_pairs": []}', ""),
        ("", ""),
    ],
)
def test_a_single_answer_is_read_from_json_or_text(text, answer):
    assert parse_answer(text) == answer


# --- properties ----------------------------------------------------------------------------------

# Fragments of every syntax the parser looks for, so that random text reaches its deep paths.
FRAGMENTS = st.sampled_from(
    [
        "{", "}", "[", "]", '"', "'", ":", ",", "\\", "\n", "\n\n", " ", "?", "\uff1f", "**", "__", "#", "1.",
        "2)", "- ", "```", "```json\n", "<think>", "</think>", '"question"', '"answer"', '"qa_pairs"',
        "Question:", "Answer:", "Q1:", "A1:", "Q:", "A:", "question", "answer", "Question 1\n", "null",
        "true", "3", "What is it?", "Red.", "\u0000", "\ufeff", "\r\n", "é", "漢",
    ]
)  # fmt: skip
SOUPS = st.lists(st.one_of(FRAGMENTS, st.text(max_size=8)), max_size=60).map("".join)


def _assert_well_formed(parsed):
    assert parsed.shape in SHAPES
    assert parsed.malformed >= 0
    for question, answer in parsed.pairs:
        assert isinstance(question, str) and isinstance(answer, str)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=2000))
def test_arbitrary_text_never_raises(text):
    _assert_well_formed(parse_qa_output(text))
    assert isinstance(parse_answer(text), str)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(SOUPS)
def test_text_made_of_syntax_fragments_never_raises(text):
    _assert_well_formed(parse_qa_output(text))
    assert isinstance(parse_answer(text), str)


JSON_KEYS = st.sampled_from(["question", "answer", "q", "A", "qa_pairs", "x"]) | st.text(max_size=5)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100)
@given(JSON_VALUES)
def test_arbitrary_json_never_raises(value):
    text = json.dumps(value)
    _assert_well_formed(parse_qa_output(text))
    _assert_well_formed(parse_qa_output(f"Here you go:\n```json\n{text}\n```\nDone."))


def test_deeply_nested_and_huge_outputs_are_handled():
    _assert_well_formed(parse_qa_output("[" * 100_000))
    _assert_well_formed(parse_qa_output("{" * 5000 + '"question": "a?", "answer": "b"'))
    _assert_well_formed(parse_qa_output(" " * 300_000 + "x"))
    _assert_well_formed(parse_qa_output('"question":"' * 20_000))
    _assert_well_formed(parse_qa_output("Q1: " * 20_000))


# Words that cannot form a label, a fence or JSON, so the round trip is exact.
WORD = st.text(alphabet="abcdefghijklmnoprstuvwxyz0123456789éß", min_size=1, max_size=8).filter(
    lambda w: w not in {"q", "a"}
)
SENTENCE = st.lists(WORD, min_size=1, max_size=6).map(" ".join)
PAIRS = st.lists(st.tuples(SENTENCE.map(lambda s: s + "?"), SENTENCE), min_size=1, max_size=6)


@given(PAIRS)
def test_pairs_written_as_json_come_back(pairs):
    objects = [{"question": q, "answer": a} for q, a in pairs]
    assert parse_qa_output(json.dumps({"qa_pairs": objects})).pairs == pairs
    assert parse_qa_output("Sure:\n```json\n" + json.dumps(objects, indent=1) + "\n```").pairs == pairs


TEXT_LINES = st.sampled_from(
    [
        "Question: {q}, Answer: {a}",
        "Question: {q}\nAnswer: {a}\n",
        "Q{n}: {q}\nA{n}: {a}",
        "{n}. **Question:** {q}\n   **Answer:** {a}\n",
        "{n}. {q} {a}",
        "<question>{q}</question><answer>{a}</answer>",
        "<q>{q}</q>\n<a>{a}</a>",
        "User: {q}\nAssistant: {a}",
        "Human: {q} GPT: {a}",
    ]
)


@given(PAIRS, TEXT_LINES)
def test_pairs_written_as_text_come_back(pairs, line):
    text = "\n".join(line.format(q=q, a=a, n=n) for n, (q, a) in enumerate(pairs, 1))
    assert parse_qa_output(text).pairs == pairs


# --- imageqa parse-qa --------------------------------------------------------------------------------


def test_parse_qa_prints_the_valid_pairs_and_reasons_for_each_output(tmp_path):
    outputs = [case["output"] for case in CORPUS] + [
        json.dumps(
            {"qa_pairs": [{"question": "What is it?", "answer": "N/A"}, {"question": "Why?", "answer": "x"}]}
        ),
    ]
    source = tmp_path / "outputs.jsonl"
    source.write_text("".join(json.dumps(o) + "\n" for o in outputs), "utf-8")

    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "parse-qa", str(source), "--pairs", "2-5"],
        capture_output=True,
        text=True,
        check=True,
    )

    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == len(outputs)
    by_line = {r["line"]: r for r in reports}
    for number, case in enumerate(CORPUS, 1):
        if case["name"] == "empty":
            assert by_line[number]["reasons"] == {"unparseable": 1}
            continue
        report = by_line[number]
        assert report["shape"] == case["shape"]
        assert report["ok"] is (len(case["pairs"]) >= 2)
        assert [[p["question"], p["answer"]] for p in report["qa_pairs"]] == case["pairs"]
    last = by_line[len(outputs)]
    assert last["ok"] is False and last["qa_pairs"] == []
    assert last["reasons"] == {"answer_placeholder": 1, "question_too_short": 1}
    assert {"reason": "answer_placeholder", "question": "What is it?", "answer": "N/A"} in last["rejected"]
    assert "rejected:" in done.stderr and "unparseable" in done.stderr
