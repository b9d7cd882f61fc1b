"""Diversity across a job: question templates, the job-wide template-share gate in Redis (exact counts,
near-duplicate templates counted together), and the ``diversity`` figures of ``imageqa status --json``."""

from __future__ import annotations

import json

import pytest

from producer.broker import redis_client
from producer.contract import QAPair
from producer.jobs import JobRecord
from producer.templates import question_template
from tests import test_qa
from tests.helpers import make_images, scripted_items, write_jsonl
from tests.test_qa import Script
from tests.test_quality_engine import SHORT, enqueue_and_wait, status_json
from workers.diversity import WARMUP_PAIRS, TemplateGate


@pytest.mark.parametrize(
    ("question", "template"),
    [
        ("What colour is the bus?", "what colour is the *"),
        ("What colour is the red double-decker bus?", "what colour is the *"),
        ("How many people are waiting at the stop?", "how many * are * at the *"),
        ("What does the sign above the door say?", "what does the * above the * say"),
        ("Is the 2nd light on?", "is the * on"),
        ("How many of the 12 windows are open?", "how many of the # * are *"),
    ],
)
def test_a_template_masks_the_content_words(question, template):
    assert question_template(question) == template


THINGS = [
    "car", "van", "cat", "dog", "hat", "kite", "boat", "door", "wall", "roof", "sign", "bike", "lamp",
    "sofa", "cup", "vase", "rug", "coat", "shoe", "bag", "tram",
]  # fmt: skip


def pair(question):
    return QAPair(question=question, answer="x")


def test_the_gate_drops_pairs_over_the_share_after_the_warm_up_with_exact_counts(redis_url):
    gate = TemplateGate(redis_client(redis_url))
    colours = [pair(f"What colour is the {thing}?") for thing in THINGS[:WARMUP_PAIRS]]
    kept, dropped = gate.admit("job", colours, 0.5)
    assert len(kept) == WARMUP_PAIRS and dropped == [], "no share rule before the warm-up"

    kept, dropped = gate.admit(
        "job", [pair("What colour is the bus?"), pair("How many dogs are there?")], 0.5
    )
    assert [p.question for p in kept] == ["How many dogs are there?"]
    assert [(r.reason, r.question) for r in dropped] == [("template_overused", "What colour is the bus?")]

    counts = [pair(f"How many {thing} are there?") for thing in ("cats", "cars", "men", "boats", "birds")]
    counts += [pair(f"Where is the {thing}?") for thing in ("cat", "car", "man", "boat", "bird", "kite")]
    kept, dropped = gate.admit("job", counts, 0.5)
    assert (len(kept), dropped) == (11, []), "32 pairs, 20 of one template: at the share"
    # 20 of 32 pairs: one more colour question is over half, also worded as a near-duplicate.
    kept, dropped = gate.admit("job", [pair("What is the colour of the boat?")], 0.5)
    assert kept == [] and [r.reason for r in dropped] == ["template_overused"]
    kept, _ = gate.admit("other-job", [pair("What colour is the bus?")], 0.5)
    assert len(kept) == 1, "every job has its own counts"

    JobRecord(redis_client(redis_url), "job").reset()
    assert gate.admit("job", [pair("What colour is the bus?")], 0.01)[0], "reset forgets the counts"


@pytest.fixture
def run_gated(tmp_path, redis_url):
    """One item through `workers.generate.process` with a scripted engine and the template gate."""
    with scripted_items(tmp_path, test_qa.PARAMS, TemplateGate(redis_client(redis_url))) as run:
        yield run


def test_a_scripted_row_counts_its_overused_pairs_and_is_asked_again(run_gated, redis_url):
    gate = TemplateGate(redis_client(redis_url))
    gate.admit("j", [pair(f"What colour is the {thing}?") for thing in THINGS[:WARMUP_PAIRS]], 1.0)
    output = json.dumps(
        {
            "qa_pairs": [
                {"question": "What colour is the bus?", "answer": "Red.", "type": "attribute"},
                {"question": "How many people wait?", "answer": "Three.", "type": "count"},
            ]
        }
    )
    script = Script(
        [
            output,
            json.dumps(
                {"qa_pairs": [{"question": "Where is the bus?", "answer": "Left.", "type": "spatial"}]}
            ),
        ]
    )
    record = run_gated(script, max_template_share=0.5)
    assert record.ok
    assert [p.question for p in record.qa_pairs] == ["How many people wait?", "Where is the bus?"]
    assert record.qa_stats.rejected == {"template_overused": 1}
    assert record.qa_stats.tries == 2


def test_status_shows_the_distinct_question_share_and_the_top_templates(fake_cluster, media, tmp_path):
    # The fake engine asks "How many images (<digest>)?" (one per image), "What size is the image?"
    # and "What colour dominates the picture?" of every image.
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "out.jsonl", SHORT)

    report = status_json(fake_cluster, job_id)
    assert report["qa"]["pairs"] == 9
    assert report["diversity"]["distinct_question_share"] == round(5 / 9, 4)
    top = report["diversity"]["top_templates"]
    assert ["what size is the *", 3] in top and ["what colour * the *", 3] in top
    assert sum(n for _, n in top) == 9


def test_the_template_share_drops_pairs_across_the_job(fake_cluster, media, tmp_path):
    # Ten rows of the fake engine's three templates, at most a fifth of the job each: the first 20
    # pairs are kept (the warm-up: six rows and two pairs of a seventh), every later one is over the
    # share. The seventh row asks twice more (its two kept questions come back as duplicates) and
    # fails like the last three, whose three tries are all dropped.
    images = make_images(media, 10)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    params = SHORT.model_copy(update={"max_template_share": 0.2})
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "out.jsonl", params)

    report = status_json(fake_cluster, job_id)
    assert (report["written"], report["failed"]) == (6, 4)
    assert report["rejected"] == {"template_overused": 1 + 2 + 27, "duplicate_question": 4}
    assert report["failures"] == {"qa_invalid": 4}
    assert report["qa"]["pairs"] == 18


@pytest.mark.engine
def test_types_and_template_share_run_end_to_end_on_the_real_engine(engine_cluster, media, tmp_path):
    from producer.contract import QA_TYPES
    from tests.helpers import EXAMPLES, read_jsonl
    from workers.qa import REASONS

    photos = sorted(EXAMPLES.glob("*.jpg"))
    for photo in photos:  # the worker reads images under its media root only
        (media / photo.name).write_bytes(photo.read_bytes())
    rows = [{"image": photo.name} for photo in photos]
    source = write_jsonl(media / "in.jsonl", rows)
    params = SHORT.model_copy(
        update={"types": {"count": 1}, "min_types": 2, "max_template_share": 0.5, "generation_tries": 5}
    )
    job_id = enqueue_and_wait(engine_cluster, source, tmp_path / "out.jsonl", params)

    report = status_json(engine_cluster, job_id)
    written = read_jsonl(tmp_path / "out.jsonl")
    failed = read_jsonl(tmp_path / "out.errors.jsonl")
    assert (report["written"], report["failed"]) == (len(written), len(failed))
    assert len(written) + len(failed) == len(rows)
    for row in written:  # constrained decoding writes a type from the taxonomy for every pair
        kinds = [pair["type"] for pair in row["qa_pairs"]]
        assert set(kinds) <= set(QA_TYPES) and "count" in kinds and len(set(kinds)) >= 2
    assert all(e["error"]["code"] == "qa_invalid" for e in failed), failed
    assert all("missing types" in e["error"]["message"] for e in failed)
    assert sum(report["types"].values()) == report["qa"].get("pairs", 0)
    assert set(report["rejected"]) <= REASONS
    diversity = report["diversity"]
    if written:
        assert 0 < diversity["distinct_question_share"] <= 1
        assert 0 < sum(n for _, n in diversity["top_templates"]) <= report["qa"]["pairs"]
