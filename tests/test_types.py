"""Question types: the taxonomy in the prompt and the schema, the type rules, per-row quotas with a
scripted engine (exact drops, and a regeneration that asks for the missing types), and the type
distribution in a job's status."""

from __future__ import annotations

import json

import pytest
import typer

from producer.cli import generation_params, parse_types
from producer.contract import QA_TYPES, GenerationParams, QAPair, ResultRecord, output_row
from tests import test_qa
from tests.helpers import make_images, read_jsonl, write_jsonl
from tests.test_qa import Script
from tests.test_quality_engine import SHORT, enqueue_and_wait, status_json
from workers.prompts import prompt_spec, qa_schema
from workers.qa import check_output, question_type

run_item = test_qa.run_item  # the scripted-engine fixture: one item through `workers.generate`
PARAMS = GenerationParams(min_pairs=2, max_pairs=3, max_question_chars=60, max_answer_chars=40)


def typed(*pairs):
    """A model output: (question, answer, type) triples; a type of None leaves the key out."""
    items = [{"question": q, "answer": a} | ({"type": t} if t is not None else {}) for q, a, t in pairs]
    return json.dumps({"qa_pairs": items})


def test_the_default_schema_asks_every_pair_for_a_type_from_the_taxonomy():
    item = qa_schema(PARAMS)["properties"]["qa_pairs"]["items"]
    assert item["properties"]["type"] == {"type": "string", "enum": list(QA_TYPES)}
    assert item["required"] == ["question", "answer", "type"]
    assert list(QA_TYPES) == [
        "object", "count", "attribute", "spatial", "text", "action", "scene", "reasoning",
    ]  # fmt: skip


def test_older_prompts_stay_untyped_unless_the_job_sets_type_quotas():
    v2 = PARAMS.model_copy(update={"prompt_version": "qa-v2"})
    assert "type" not in qa_schema(v2)["properties"]["qa_pairs"]["items"]["properties"]
    assert "type" not in prompt_spec(v2, 1).text
    quotas = v2.model_copy(update={"types": {"count": 1}})
    spec = prompt_spec(quotas, 1)
    assert "type" in spec.json_schema["properties"]["qa_pairs"]["items"]["required"]
    assert "Include at least 1 count question." in spec.text and "spatial (where things are" in spec.text


def test_the_prompt_asks_for_the_quotas():
    params = PARAMS.model_copy(update={"types": {"count": 1, "spatial": 2}, "min_types": 3})
    text = prompt_spec(params, 1).text
    assert text.endswith(
        "Include at least 1 count question, 2 spatial questions and questions of at least 3 different types."
    )


@pytest.mark.parametrize(
    ("label", "kind"),
    [
        ("count", "count"), ("Counting", "count"), ("OCR", "text"), ("color", "attribute"),
        ("Spatial relation", "spatial"), ("scene_question", "scene"), ("activity", "action"),
        ("feelings", None), ("", None), (None, None),
    ],
)  # fmt: skip
def test_type_labels_are_read_with_synonyms(label, kind):
    assert question_type(label) == kind


def test_an_unknown_type_is_rejected_and_a_missing_one_only_when_types_are_required():
    output = typed(("How many cars are there?", "Two.", "Counting"), ("Is it sunny?", "Yes.", "feelings"))
    output_untyped = typed(("What is shown?", "A street.", None))
    check = check_output(output, PARAMS)
    assert [(p.question, p.type) for p in check.pairs] == [("How many cars are there?", "count")]
    assert check.reasons() == {"type_invalid": 1}
    assert check_output(output_untyped, PARAMS).pairs[0].type is None
    quotas = PARAMS.model_copy(update={"min_types": 1})
    assert check_output(output_untyped, quotas).reasons() == {"type_missing": 1}


def test_output_rows_show_the_type_when_known_and_dataflow_rows_keep_their_shape():
    record = ResultRecord(
        job_id="j",
        item_id="i",
        row_index=0,
        row={"image": ["a.jpg"]},
        qa_pairs=[
            QAPair(question="How many?", answer="2", type="count"),
            QAPair(question="Why?", answer="x"),
        ],
    )
    assert output_row(record, "qa_pairs")["qa_pairs"] == [
        {"question": "How many?", "answer": "2", "type": "count"},
        {"question": "Why?", "answer": "x"},
    ]
    from workers.dataflow.operator import _output_row
    from workers.dataflow.servings import RowResult

    row = _output_row(0, {"image": "a.jpg"}, RowResult(pairs=record.qa_pairs, error=None), "qa", "error")
    assert row["qa"] == [{"question": "How many?", "answer": "2"}, {"question": "Why?", "answer": "x"}]


def test_quotas_are_checked_when_the_job_is_defined():
    with pytest.raises(ValueError, match="unknown question types"):
        GenerationParams(types={"colour": 1})
    with pytest.raises(ValueError, match="at most max_pairs"):
        GenerationParams(max_pairs=3, types={"count": 2, "spatial": 2})
    with pytest.raises(ValueError, match="min_types"):
        GenerationParams(max_pairs=3, min_types=4)
    assert parse_types("count=1, spatial=2,text") == {"count": 1, "spatial": 2, "text": 1}
    with pytest.raises(typer.BadParameter):
        parse_types("count=one")
    params = generation_params(types="count=1,spatial=1", min_types=3, max_template_share=0.3)
    assert (params.types, params.min_types, params.max_template_share) == ({"count": 1, "spatial": 1}, 3, 0.3)
    assert params.fingerprint() != generation_params().fingerprint()


# --- quotas in the generation loop, with a scripted engine -----------------------------------------


def test_a_row_keeps_room_for_its_missing_types_and_asks_for_them_again(run_item):
    script = Script(
        [
            typed(
                ("What colour is the bus?", "Red.", "attribute"),
                ("What colour is the door?", "Blue.", "attribute"),  # no room left: type_surplus
                ("How many people wait?", "Three.", "count"),
            ),
            typed(
                ("Is it sunny?", "Yes.", "feelings"),  # type_invalid
                ("What is shown?", "A street.", None),  # type_missing
                ("Where is the bus?", "At the stop.", "spatial"),
            ),
        ]
    )
    record = run_item(script, types={"count": 1, "spatial": 1})
    assert record.ok
    assert [(p.question, p.type) for p in record.qa_pairs] == [
        ("What colour is the bus?", "attribute"),
        ("How many people wait?", "count"),
        ("Where is the bus?", "spatial"),
    ]
    assert record.qa_stats.tries == 2, "two pairs were enough, but the spatial one was missing"
    assert record.qa_stats.rejected == {"type_surplus": 1, "type_invalid": 1, "type_missing": 1}
    first, second = script.generation_requests
    assert "Include at least 1 count question, 1 spatial question." in first.prompt
    assert "Still missing: Include at least 1 spatial question." in second.prompt
    assert "Still missing" not in first.prompt and "count question" not in second.prompt.split("Still")[1]


def test_a_row_without_its_distinct_types_after_every_try_is_qa_invalid(run_item):
    same = typed(
        ("What is on the table?", "A cup.", "object"),
        ("What is on the chair?", "A cat.", "object"),
    )
    script = Script([same])
    record = run_item(script, min_types=2)
    assert record.error.code == "qa_invalid"
    assert record.error.message == (
        "2 valid pairs, need at least 2; missing types: 1 more distinct (rejected: duplicate_question 4)"
    )
    assert "questions of at least 1 different types" in script.generation_requests[1].prompt


# --- the type distribution in a job's status -------------------------------------------------------


def test_status_shows_the_jobs_type_distribution(fake_cluster, media, tmp_path):
    # The fake engine answers a typed schema with one count and two attribute pairs.
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    params = SHORT.model_copy(update={"types": {"count": 1}, "min_types": 2})
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "out.jsonl", params)

    report = status_json(fake_cluster, job_id)
    assert (report["written"], report["failed"]) == (3, 0)
    assert report["types"] == {"count": 3, "attribute": 6}
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(p["type"] for row in rows for p in row["qa_pairs"]) == ["attribute"] * 6 + ["count"] * 3
