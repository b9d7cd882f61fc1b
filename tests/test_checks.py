"""The blind check and the judge (`workers.checks`): exact drops with a scripted engine, the counts in a
job's status with the fake engine's cluster, and the real vLLM engine end to end."""

from __future__ import annotations

import json

import pytest

from producer.contract import GenerationParams
from tests.helpers import make_images, read_jsonl, run_cli, scripted_items, write_jsonl
from tests.test_quality_engine import SHORT, enqueue_and_wait, status_json
from workers.checks import parse_judgement
from workers.prompts import blind_spec, judge_schema, judge_spec

PARAMS = GenerationParams(min_pairs=1, max_pairs=4, max_question_chars=60, max_answer_chars=40)
PAIRS = [
    ("What colour is the car?", "Red."),
    ("Is the sky blue?", "Yes."),
    ("How many dogs are there?", "Two dogs."),
    ("What is written on the sign?", "STOP"),
]


def pairs_output(pairs=PAIRS):
    return json.dumps({"qa_pairs": [{"question": q, "answer": a} for q, a in pairs]})


def asked(request) -> str:
    return request.prompt.split("Question: ", 1)[1].split("\n", 1)[0]


class Scripted:
    """A fake engine's ``respond`` that tells generation, blind, verification and judge requests apart
    and answers each from a table; it records every request by kind."""

    def __init__(self, output=None, blind=None, judge=None):
        self.output = output or pairs_output()
        self.blind = blind or {}
        self.judge = judge or {}
        self.requests: dict[str, list] = {"generate": [], "blind": [], "verify": [], "judge": []}

    def __call__(self, request):
        props = set((request.json_schema or {}).get("properties", {}))
        if props == {"reason", "score"}:
            self.requests["judge"].append(request)
            verdict = self.judge.get(asked(request), (5, "fine"))
            return (
                verdict
                if isinstance(verdict, str)
                else json.dumps({"reason": verdict[1], "score": verdict[0]})
            )
        if props == {"answer"} and not request.images:
            self.requests["blind"].append(request)
            return json.dumps({"answer": self.blind.get(asked(request), "I cannot know.")})
        if props == {"answer"}:
            self.requests["verify"].append(request)
            return json.dumps({"answer": dict(PAIRS).get(asked(request), "?")})
        self.requests["generate"].append(request)
        return self.output


@pytest.fixture
def run_item(tmp_path):
    with scripted_items(tmp_path, PARAMS) as run:
        yield run


def test_the_blind_check_drops_the_pairs_answered_alike_without_the_image(run_item):
    # Given a model that, without the image, guesses the sky's colour and the dog count right (in
    # other words), and the car's colour wrong
    script = Scripted(
        blind={"Is the sky blue?": "yes", "How many dogs are there?": "2", "What colour is the car?": "Blue"}
    )
    record = run_item(script, blind_check=True)

    assert record.ok, record.error
    assert [p.question for p in record.qa_pairs] == [
        "What colour is the car?",
        "What is written on the sign?",
    ]
    assert record.qa_stats.rejected == {"answerable_without_image": 2}
    assert (record.qa_stats.blind_checked, record.qa_stats.blind_answerable) == (4, 2)
    # Each kept question was asked once, alone, without any image, its answer or the prompt's words,
    # greedily and in the one-answer schema.
    blind = script.requests["blind"]
    assert sorted(asked(r) for r in blind) == sorted(q for q, _ in PAIRS)
    assert all(r.images == [] for r in blind)
    assert not [r for r in blind for _, a in PAIRS if f"Answer: {a}" in r.prompt or a in r.prompt]
    assert all(r.sampling.temperature == 0.0 for r in blind)
    assert all(r.json_schema == blind_spec(PARAMS, "x").json_schema for r in blind)
    assert not script.requests["judge"] and not script.requests["verify"]


def test_the_blind_check_removes_every_image_of_a_multi_image_row(run_item):
    script = Scripted(blind={"Is the sky blue?": "No."})
    record = run_item(script, n_images=3, blind_check=True)
    assert record.ok and len(record.qa_pairs) == 4
    assert record.qa_stats.rejected == {}
    assert (record.qa_stats.blind_checked, record.qa_stats.blind_answerable) == (4, 0)
    (generation,) = script.requests["generate"]
    assert len(generation.images) == 3
    assert [len(r.images) for r in script.requests["blind"]] == [0, 0, 0, 0]


def test_a_row_left_short_by_the_blind_check_is_asked_again_and_the_new_pairs_are_checked_too(run_item):
    script = Scripted(
        output=pairs_output(PAIRS[:2]),
        blind={"Is the sky blue?": "Yes", "What colour is the car?": "red"},
    )
    record = run_item(script, blind_check=True, min_pairs=1, generation_tries=2)
    # Both pairs are answerable blind on both tries; the second try's are duplicates of nothing kept,
    # so they are checked again and dropped again.
    assert record.error is not None and record.error.code == "qa_invalid"
    assert record.qa_stats.rejected == {"answerable_without_image": 4}
    assert record.qa_stats.blind_checked == 4 and record.qa_stats.tries == 2
    assert "answerable_without_image 4" in record.error.message


def test_the_judge_drops_low_scores_and_puts_its_verdicts_beside_the_pairs(run_item):
    script = Scripted(
        judge={
            "What colour is the car?": (4, "Correct colour."),
            "Is the sky blue?": (2, "The sky is grey."),
            "How many dogs are there?": (5, "Two dogs are visible."),
            "What is written on the sign?": "no verdict here",
        }
    )
    record = run_item(script, judge=True)

    assert record.ok, record.error
    assert [p.question for p in record.qa_pairs] == ["What colour is the car?", "How many dogs are there?"]
    assert record.qa_stats.rejected == {"judge_low": 1, "judge_unreadable": 1}
    assert record.qa_stats.judge_scores == {"2": 1, "4": 1, "5": 1}
    assert [(n.score, n.reason) for n in record.qa_stats.judge] == [
        (4, "Correct colour."),
        (5, "Two dogs are visible."),
    ]
    # The judge saw the image and the whole pair, and answered in the score schema.
    judged = script.requests["judge"]
    assert len(judged) == 4 and all(len(r.images) == 1 for r in judged)
    assert all(f"Question: {q}\nAnswer: {a}\n" in r.prompt for r, (q, a) in zip(judged, PAIRS, strict=True))
    assert all(r.json_schema == judge_schema() and r.sampling.temperature == 0.0 for r in judged)


def test_the_minimum_judge_score_is_a_setting(run_item):
    script = Scripted(judge={q: (i + 1, "r") for i, (q, _) in enumerate(PAIRS)})  # scores 1, 2, 3, 4
    strict = run_item(script, judge=True, min_judge_score=4)
    assert [p.question for p in strict.qa_pairs] == [PAIRS[3][0]]
    assert strict.qa_stats.rejected == {"judge_low": 3}
    lenient = run_item(script, judge=True, min_judge_score=1)
    assert len(lenient.qa_pairs) == 4 and lenient.qa_stats.rejected == {}
    assert lenient.qa_stats.judge_scores == {"1": 1, "2": 1, "3": 1, "4": 1}


def test_the_checks_run_in_order_each_on_what_the_previous_kept(run_item):
    script = Scripted(blind={"Is the sky blue?": "yes"}, judge={"How many dogs are there?": (1, "No dogs.")})
    record = run_item(script, verify=True, blind_check=True, judge=True)
    assert [p.question for p in record.qa_pairs] == [
        "What colour is the car?",
        "What is written on the sign?",
    ]
    assert record.qa_stats.rejected == {"answerable_without_image": 1, "judge_low": 1}
    assert (len(script.requests["verify"]), len(script.requests["blind"]), len(script.requests["judge"])) == (
        4,
        4,
        3,
    )
    assert len(record.qa_stats.judge) == 2


def test_checks_are_off_by_default_and_change_the_item_fingerprint(run_item):
    script = Scripted()
    record = run_item(script)
    assert len(record.qa_pairs) == 4 and script.requests["blind"] == script.requests["judge"] == []
    assert record.qa_stats.judge == [] and record.qa_stats.blind_checked == 0
    prints = {
        GenerationParams(**change).fingerprint()
        for change in ({}, {"blind_check": True}, {"judge": True}, {"judge": True, "min_judge_score": 4})
    }
    assert len(prints) == 4


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ('{"reason": "Correct.", "score": 4}', (4, "Correct.")),
        ('Here: {"score": "5", "reason": "Right"} done', (5, "Right")),
        ("The answer is wrong.\nScore: 2", (2, "The answer is wrong.")),
        ('{"reason": "x", "score": 9}', None),
        ('{"reason": "x", "score": true}', None),
        ("no verdict", None),
    ],
)
def test_judge_verdicts_are_read_leniently(text, verdict):
    note = parse_judgement(text)
    assert (None if note is None else (note.score, note.reason)) == verdict


def test_the_judge_prompt_carries_the_pair_and_the_scale():
    spec = judge_spec(PARAMS, "What colour is the car?", "Red.", 2)
    assert "Question: What colour is the car?\nAnswer: Red.\n" in spec.text
    assert "Look at the images." in spec.text and "5:" in spec.text and "1:" in spec.text
    assert spec.json_schema["properties"]["score"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert spec.json_schema["properties"]["reason"]["maxLength"] == 200
    blind = blind_spec(PARAMS, "Is it red?")
    assert "image" not in blind.text and "Question: Is it red?" in blind.text


def test_command_line_options_become_check_parameters():
    import typer

    from producer.cli import generation_params

    params = generation_params(None, "3-5", blind_check=True, judge=True, min_judge_score=4)
    assert (params.blind_check, params.judge, params.min_judge_score) == (True, True, 4)
    with pytest.raises(typer.BadParameter):
        generation_params(None, "3-5", judge=True, min_judge_score=6)


# --- the counts in a job's status -------------------------------------------------------------------


def test_status_counts_the_blind_check_and_the_judge_histogram(fake_cluster, media, tmp_path):
    # Given 3 rows of one image and 2 rows of two images: the fake engine guesses "1" image when it
    # sees none (right for one image, wrong for two) and, as a judge, scores its three questions
    # 5 (count), 4 (colour) and 2 (size).
    images = make_images(media, 7)
    rows = [{"image": p.name} for p in images[:3]] + [
        {"image": [a.name, b.name]} for a, b in (images[3:5], images[5:7])
    ]
    source = write_jsonl(media / "in.jsonl", rows)
    params = SHORT.model_copy(update={"blind_check": True, "judge": True, "min_pairs": 1})
    output = tmp_path / "out.jsonl"
    job_id = enqueue_and_wait(fake_cluster, source, output, params)

    report = status_json(fake_cluster, job_id)
    assert (report["written"], report["failed"], report["total"]) == (5, 0, 5)
    assert report["rejected"] == {"answerable_without_image": 3, "judge_low": 5}
    assert report["blind"] == {"checked": 15, "answerable": 3, "answerable_rate": 0.2}
    assert report["judge_scores"] == {"2": 5, "4": 5, "5": 2}
    assert report["qa"]["pairs"] == 3 * 1 + 2 * 2
    # Every row landed once, with the judge's verdict for each pair it kept.
    written = read_jsonl(output)
    assert sorted(str(r["image"]) for r in written) == sorted(str(r["image"]) for r in rows)
    assert not read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(len(r["qa_pairs"]) for r in written) == [1, 1, 1, 2, 2]

    text = " ".join(run_cli(fake_cluster.redis_url, "status", job_id).stderr.split())  # unwrapped
    assert "answerable without the image: 3 of 15 pairs" in text
    assert "judge scores 2: 5, 4: 5, 5: 2" in text


def test_a_job_without_the_checks_reports_none(fake_cluster, media, tmp_path):
    images = make_images(media, 2)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "out.jsonl", SHORT)
    report = status_json(fake_cluster, job_id)
    assert report["blind"] == {"checked": 0, "answerable": 0, "answerable_rate": None}
    assert report["judge_scores"] == {}


# --- the real engine ----------------------------------------------------------------------------------


@pytest.mark.engine
def test_the_real_engine_answers_blind_and_judge_requests_and_the_job_completes(
    engine_cluster, media, tmp_path
):
    from tests.helpers import EXAMPLES

    photos = []
    for photo in sorted(EXAMPLES.glob("*.jpg")):
        (media / photo.name).write_bytes(photo.read_bytes())
        photos.append(photo.name)
    rows = [{"image": name} for name in photos] + [{"image": photos[:2]}]
    source = write_jsonl(media / "in.jsonl", rows)
    params = SHORT.model_copy(
        update={"blind_check": True, "judge": True, "min_pairs": 1, "min_judge_score": 1}
    )
    output = tmp_path / "out.jsonl"
    job_id = enqueue_and_wait(engine_cluster, source, output, params)

    report = status_json(engine_cluster, job_id)
    written, errors = read_jsonl(output), read_jsonl(tmp_path / "out.errors.jsonl")
    # Every row landed exactly once, in the output or the errors file.
    assert sorted(str(r["image"]) for r in written + [e["row"] for e in errors]) == sorted(
        str(r["image"]) for r in rows
    )
    assert report["state"] == "done" and report["written"] + report["failed"] == len(rows)
    # Every pair the model wrote and the rules kept was checked blind; with a minimum score of 1 every
    # pair that the random model's blind answer did not match was scored, and kept.
    blind = report["blind"]
    assert blind["checked"] >= len(rows) and blind["checked"] == report["qa"]["pairs"] + blind["answerable"]
    assert blind["answerable"] == report["rejected"].get("answerable_without_image", 0)
    assert sum(report["judge_scores"].values()) == report["qa"]["pairs"]
    assert set(report["judge_scores"]) <= {"1", "2", "3", "4", "5"}
    assert "judge_low" not in report["rejected"] and "judge_unreadable" not in report["rejected"]
    assert blind["answerable_rate"] == round(blind["answerable"] / blind["checked"], 4)
