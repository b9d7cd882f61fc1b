"""Pair rules, prompts, schemas and answer agreement (no engine, no Redis)."""

import json

import pytest

from producer.contract import QA_TYPES, GenerationParams, QAPair, QAStats
from producer.errors import PromptError, QAValidationError
from tests.helpers import scripted_items
from workers.prompts import prompt_spec, qa_schema, retry_prompt, verify_spec
from workers.qa import REASONS, PairPool, Rejection, answers_agree, check_output, check_pairs

PARAMS = GenerationParams(min_pairs=2, max_pairs=3, max_question_chars=60, max_answer_chars=40)


def answer(*pairs):
    return json.dumps({"qa_pairs": [{"question": q, "answer": a} for q, a in pairs]})


def reason_of(question, answer, params=PARAMS):
    check = check_pairs([(question, answer)], params)
    return check.rejected[0].reason if check.rejected else None


def one_try(text, params=PARAMS):
    """The pairs of one try as `workers.generate` takes them: checked, pooled, at least min_pairs."""
    check = check_output(text, params)
    pool = PairPool(params)
    pool.reject(check.rejected)
    pool.accept(check.pairs)
    return pool.result()


def test_valid_pairs_are_kept_with_whitespace_normalised():
    check = check_output(answer(("What  colour is the car? ", " Red\n"), ("How many dogs?", "Two")), PARAMS)
    assert [(p.question, p.answer) for p in check.pairs] == [
        ("What colour is the car?", "Red"),
        ("How many dogs?", "Two"),
    ]
    assert check.rejected == []


@pytest.mark.parametrize(
    ("question", "answer", "reason"),
    [
        ("  ", "A street.", "question_empty"),
        ("?!", "A street.", "question_empty"),
        ("What is shown here?", "   ", "answer_empty"),
        ("What is shown here?", "...", "answer_empty"),
        ("<question>", "<answer>", "question_placeholder"),
        ("What is written on the [insert object]?", "Stop.", "question_placeholder"),
        ("What colour is the car?", "N/A", "answer_placeholder"),
        ("What colour is the car?", "<answer>", "answer_placeholder"),
        ("What colour is the car?", "string", "answer_placeholder"),
        ("I cannot see the image, can you describe it?", "No.", "question_refusal"),
        ("Sorry, what is in the picture?", "A dog.", "question_refusal"),
        ("What colour is the car?", "I cannot determine that from the image.", "answer_refusal"),
        ("What colour is the car?", "I'm sorry, I can't see images.", "answer_refusal"),
        ("What colour is the car?", "As an AI, I have no eyes.", "answer_refusal"),
        ("What colour is the car?", "Unknown", "answer_refusal"),
        ("What colour is the car?", "It is not possible to tell.", "answer_refusal"),
        ("What colour is the car?", "Not visible in the image.", "answer_refusal"),
        ("Why?", "Because.", "question_too_short"),
        ("What " + "very " * 20 + "big thing?", "A car.", "question_too_long"),
        ("Describe the car.", "A red car.", "not_a_question"),
        ("What colour is the car?", "Red " * 20, "answer_too_long"),
        ("What colour is the car?", "What colour is the car", "answer_restates_question"),
        ("What colour is the car?", "what colour is the car? red", "answer_restates_question"),
    ],
)
def test_each_rule_rejects_with_its_reason(question, answer, reason):
    assert reason in REASONS
    assert reason_of(question, answer) == reason


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("What colour is the car?", "Red."),
        ("How many dogs are there?", "None."),  # "none" is an answer to a count
        ("Is the door open?", "No."),
        ("What does the sign say?", "Stop, I cannot park here"),  # visible text, not a refusal
        ("Which letter is on the flag?", "A"),
        ("这辆车是什么颜色\uff1f", "红色"),  # a full-width question mark ends a question too
        ("Is the car red?", "The car is red."),  # words of the question, but an answer
    ],
)
def test_good_pairs_pass_every_rule(question, answer):
    assert reason_of(question, answer) is None


def test_rules_can_be_switched_off_and_bounds_configured():
    loose = PARAMS.model_copy(
        update={"require_question_mark": False, "reject_refusals": False, "reject_restated": False}
    )
    assert reason_of("Describe the car.", "A red car.", loose) is None
    assert reason_of("What colour is the car?", "Unknown", loose) is None
    assert reason_of("What colour is the car?", "What colour is the car", loose) is None
    # placeholders and empty texts are never data, whatever the switches say
    assert reason_of("What colour is the car?", "N/A", loose) == "answer_placeholder"
    strict = PARAMS.model_copy(update={"min_question_chars": 30, "min_answer_chars": 5})
    assert reason_of("What colour is the car?", "Red, shiny", strict) == "question_too_short"
    assert reason_of("What colour is the car in front?", "Red", strict) == "answer_too_short"


def test_duplicates_after_normalisation_and_pairs_beyond_the_maximum_are_rejected():
    text = answer(
        ("What is shown?", "A street."),
        ("what is SHOWN?", "Again."),
        ("What,  is shown ?", "Again."),
        ("Who is there?", "Nobody."),
        ("Where is it?", "In a town."),
        ("When was it taken?", "At noon."),
    )
    check = check_output(text, PARAMS)
    assert [p.question for p in check.pairs] == ["What is shown?", "Who is there?", "Where is it?"]
    assert check.reasons() == {"duplicate_question": 2, "over_max_pairs": 1}


def test_questions_kept_by_an_earlier_try_are_duplicates():
    check = check_output(
        answer(("What is shown?", "A street."), ("Who is there?", "Nobody.")), PARAMS, {"what is shown"}
    )
    assert [p.question for p in check.pairs] == ["Who is there?"]
    assert check.reasons() == {"duplicate_question": 1}


def test_too_few_valid_pairs_is_a_qa_invalid_error_counting_the_reasons():
    with pytest.raises(QAValidationError) as e:
        one_try(answer(("What is it?", ""), ("Is it red?", "Yes"), ("Is it blue", "No")))
    assert e.value.code == "qa_invalid"
    assert e.value.message == "1 valid pairs, need at least 2 (rejected: answer_empty 1, not_a_question 1)"


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"qa_pairs": "no"}'])
def test_outputs_without_pairs_are_unparseable(text):
    check = check_output(text, PARAMS)
    assert check.pairs == [] and check.reasons() == {"unparseable": 1}
    with pytest.raises(QAValidationError, match="unparseable 1"):
        one_try(text)


def test_entries_that_are_not_pairs_are_malformed():
    text = '{"qa_pairs": [{"question": "What is it?"}, {"question": "Who is there?", "answer": null}, 7]}'
    check = check_output(text, PARAMS)
    assert check.pairs == [] and check.reasons() == {"malformed": 3}


def test_a_pool_merges_tries_without_duplicates_and_caps_at_the_maximum():
    pool = PairPool(PARAMS)
    pool.accept([QAPair(question="What is shown?", answer="A street.")])
    assert not pool.enough
    with pytest.raises(QAValidationError, match="1 valid pairs"):
        pool.result()
    pool.reject([Rejection("not_a_question")])
    pool.accept(
        [
            QAPair(question="What is SHOWN?", answer="Again."),
            QAPair(question="Who is there?", answer="Nobody."),
            QAPair(question="Where is it?", answer="Here."),
            QAPair(question="When is it?", answer="Noon."),
        ]
    )
    assert [p.question for p in pool.result()] == ["What is shown?", "Who is there?", "Where is it?"]
    # Its stats carry the rejections it tallied; the generation loop counts the tries (see
    # test_too_few_pairs_are_asked_for_again_and_merged), and nothing was verified.
    rejected = {"not_a_question": 1, "duplicate_question": 1, "over_max_pairs": 1}
    assert pool.stats() == QAStats(tries=0, rejected=rejected, verified=0, agreed=0)


# --- schema and prompts ---------------------------------------------------------------------------


def test_schema_bounds_every_string_and_the_pair_count():
    schema = qa_schema(PARAMS)
    pairs = schema["properties"]["qa_pairs"]
    assert (pairs["minItems"], pairs["maxItems"]) == (2, 3)
    item = pairs["items"]["properties"]
    assert (item["question"]["minLength"], item["question"]["maxLength"]) == (8, 60)
    assert (item["answer"]["minLength"], item["answer"]["maxLength"]) == (1, 40)
    # anchored: the whole string is single-spaced visible words, and a question ends with "?"
    assert item["question"]["pattern"].startswith("^") and item["question"]["pattern"].endswith(
        "?\uff1f\u061f]$"
    )
    assert item["answer"]["pattern"].endswith(")*$")
    loose = qa_schema(PARAMS.model_copy(update={"require_question_mark": False}))
    assert loose["properties"]["qa_pairs"]["items"]["properties"]["question"]["pattern"].endswith(")*$")


def test_default_prompt_asks_for_the_count_and_the_kinds_of_question_as_json():
    text = prompt_spec(PARAMS, 1).text
    assert "2 to 3" in text and "JSON" in text and '"qa_pairs"' in text and "images" not in text
    for kind in ("how many", "colour", "where things are", "scene", "visible text", "question mark"):
        assert kind in text
    assert all(f"{name} (" in text for name in QA_TYPES) and '"type": "..."' in text
    assert "images" in prompt_spec(GenerationParams(min_pairs=4, max_pairs=4), 2).text
    spec = prompt_spec(PARAMS, 1)
    assert spec.json_schema == qa_schema(PARAMS) and spec.system_prompt


def test_the_dataflow_prompt_asks_for_text_lines_without_a_schema():
    spec = prompt_spec(PARAMS.model_copy(update={"prompt_version": "dataflow"}), 1)
    assert "Question: <question>, Answer: <answer>" in spec.text
    assert spec.json_schema is None


def test_a_user_template_gets_the_count_and_schema_filled_in_and_keeps_other_braces():
    template = (
        "Ask {count} questions ({min_pairs}-{max_pairs}) about the {image_word}. "
        'Schema: {schema}. {"x": 1} {unknown}'
    )
    params = PARAMS.model_copy(update={"prompt_template": template, "system_prompt": ""})
    spec = prompt_spec(params, 2)
    assert spec.text.startswith("Ask 2 to 3 questions (2-3) about the images. Schema: {")
    schema_text = spec.text.split("Schema: ", 1)[1].rsplit(". {", 1)[0]
    assert json.loads(schema_text) == qa_schema(params)
    assert spec.text.endswith('{"x": 1} {unknown}')
    assert spec.system_prompt is None, "an empty system prompt sends none"
    assert spec.json_schema == qa_schema(params)


def test_an_unknown_prompt_is_a_prompt_invalid_error():
    with pytest.raises(PromptError) as e:
        prompt_spec(PARAMS.model_copy(update={"prompt_version": "nope"}), 1)
    assert e.value.code == "prompt_invalid" and "qa-v2" in e.value.message


def test_a_retry_lists_the_questions_already_taken():
    assert retry_prompt("Ask.", []) == "Ask."
    text = retry_prompt("Ask.", ["What is shown?", "Who is there?"])
    assert text.startswith("Ask.") and "- What is shown?\n- Who is there?" in text


def test_the_verification_prompt_has_the_question_but_not_the_answer():
    spec = verify_spec(PARAMS, "What colour is the car?", 1)
    assert "What colour is the car?" in spec.text
    assert set(spec.json_schema["properties"]) == {"answer"}
    text_spec = verify_spec(PARAMS.model_copy(update={"prompt_version": "dataflow"}), "Is it red?", 1)
    assert text_spec.json_schema is None


def test_prompt_and_quality_settings_change_the_item_fingerprint():
    base = GenerationParams()
    changes = [
        {"prompt_version": "dataflow"},
        {"prompt_template": "Ask {count}."},
        {"prompt_template": "Ask {count} questions."},
        {"system_prompt": "Be brief."},
        {"min_question_chars": 10},
        {"require_question_mark": False},
        {"generation_tries": 1},
        {"verify": True},
    ]
    prints = {GenerationParams(**change).fingerprint() for change in changes}
    assert len(prints) == len(changes) and base.fingerprint() not in prints


def test_inconsistent_bounds_are_refused():
    with pytest.raises(ValueError, match="min_question_chars"):
        GenerationParams(min_question_chars=50, max_question_chars=40)


# --- answer agreement -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "agree"),
    [
        ("Red.", "red", True),
        ("Red", "The car is red.", True),
        ("Two dogs.", "2 dogs", True),
        ("Three", "3", True),
        ("Yes", "Yes, the door is open.", True),
        ("Yes", "No", False),
        ("No, it is closed.", "yes", False),
        ("red car", "blue car", False),
        ("On the left side", "on the right side", False),
        ("A bakery sign", "The sign says bakery", True),
        ("Red", "Blue", False),
        ("None", "0", True),
        ("", "Red", False),
    ],
)
def test_answers_agree_after_normalisation(first, second, agree):
    assert answers_agree(first, second) is agree
    assert answers_agree(second, first) is agree


# --- the generation loop, with a scripted engine ---------------------------------------------------


class Script:
    """A fake engine's ``respond``: the next output for each generation request, and the recorded
    requests; verification requests get ``verify(question)``."""

    def __init__(self, outputs, verify=None):
        self.outputs = list(outputs)
        self.verify = verify
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        if request.json_schema and set(request.json_schema["properties"]) == {"answer"}:
            question = request.prompt.split("Question: ", 1)[1].split("\n", 1)[0]
            return json.dumps({"answer": self.verify(question)})
        if isinstance(self.outputs[0], Exception):
            raise self.outputs.pop(0)
        return self.outputs.pop(0) if len(self.outputs) > 1 else self.outputs[0]

    @property
    def generation_requests(self):
        return [r for r in self.requests if "qa_pairs" in (r.json_schema or {}).get("properties", {})]


@pytest.fixture
def run_item(tmp_path):
    with scripted_items(tmp_path, PARAMS) as run:
        yield run


def test_too_few_pairs_are_asked_for_again_and_merged(run_item):
    script = Script(
        [
            answer(("What is shown?", "A street."), ("Describe it.", "Busy."), ("N/A", "N/A")),
            answer(("What is SHOWN?", "A road."), ("Who is there?", "Nobody."), ("Why?", "x")),
        ]
    )
    record = run_item(script)
    assert record.ok
    assert [(p.question, p.answer) for p in record.qa_pairs] == [
        ("What is shown?", "A street."),
        ("Who is there?", "Nobody."),
    ]
    assert record.qa_stats.tries == 2
    assert record.qa_stats.rejected == {
        "not_a_question": 1,
        "question_placeholder": 1,
        "duplicate_question": 1,
        "question_too_short": 1,
    }
    first, second = script.generation_requests
    assert first.request_id != second.request_id
    assert "- What is shown?" in second.prompt and "- What is shown?" not in first.prompt
    assert second.sampling == first.sampling, "a retry is a new request, not a new temperature"


def test_still_too_few_after_every_try_is_a_qa_invalid_row_with_the_reasons(run_item):
    record = run_item(Script([answer(("What is shown?", "A street."), ("Describe it.", "Busy."))]))
    assert record.error.code == "qa_invalid"
    assert record.error.message == (
        "1 valid pairs, need at least 2 (rejected: duplicate_question 2, not_a_question 3)"
    )
    assert record.qa_stats.tries == PARAMS.generation_tries == 3


def test_a_greedy_retry_samples_at_a_higher_temperature(run_item):
    script = Script(["no pairs here", answer(("What is shown?", "A street."), ("Who is there?", "No one."))])
    record = run_item(script, temperature=0.0, generation_tries=2)
    assert record.ok and record.qa_stats.rejected == {"unparseable": 1}
    assert [r.sampling.temperature for r in script.generation_requests] == [0.0, 0.7]


def test_verification_drops_pairs_whose_answers_disagree(run_item):
    truth = {"What is shown?": "A street", "Who is there?": "nobody", "Where is it?": "In Paris"}
    script = Script(
        [
            answer(
                ("What is shown?", "A street."), ("Who is there?", "Nobody."), ("Where is it?", "In Rome.")
            ),
            answer(("Where is it?", "In Paris."), ("What time is it?", "Noon.")),
        ],
        verify=lambda q: truth.get(q, "midnight"),
    )
    record = run_item(script, verify=True, min_pairs=3)
    assert record.ok
    assert [p.answer for p in record.qa_pairs] == ["A street.", "Nobody.", "In Paris."]
    assert (record.qa_stats.verified, record.qa_stats.agreed) == (5, 3)
    assert record.qa_stats.rejected == {"unverified": 2}
    verifications = [r for r in script.requests if r not in script.generation_requests]
    assert len(verifications) == 5
    assert all("Rome" not in r.prompt and "Nobody" not in r.prompt for r in verifications)


def test_the_fake_engine_answers_its_own_questions_when_verified(run_item):
    record = run_item(None, verify=True, max_pairs=5, min_pairs=3)
    assert record.ok and len(record.qa_pairs) == 3
    assert (record.qa_stats.verified, record.qa_stats.agreed) == (3, 3)


def test_a_text_prompt_sends_no_schema_and_is_parsed_leniently(run_item):
    script = Script(
        ["A street.\n\nQuestion: What is shown?, Answer: A street.\nQuestion: Who is there?, Answer: Nobody."]
    )
    record = run_item(script, prompt_version="dataflow")
    assert record.ok and len(record.qa_pairs) == 2
    assert script.requests[0].json_schema is None
    assert "Question: <question>, Answer: <answer>" in script.requests[0].prompt


def test_engine_failures_and_unknown_prompts_are_error_rows_and_a_dead_engine_propagates(run_item):
    from workers.engines.base import EngineDead

    record = run_item(Script([RuntimeError("boom")]))
    assert record.error.code == "engine_error" and "boom" in record.error.message
    assert record.qa_stats is None, "no answer, no pair counts"
    record = run_item(Script([answer(("What is shown?", "A street."))]), prompt_version="nope")
    assert record.error.code == "prompt_invalid"

    with pytest.raises(EngineDead):
        run_item(Script([EngineDead("gone")]))

    class EngineDeadError(Exception):
        """Only the engine decides that it is dead: another exception of that name is a failure."""

    record = run_item(Script([EngineDeadError("gone")]))
    assert record.error.code == "engine_error"


def test_command_line_options_become_generation_parameters(tmp_path):
    import typer

    from producer.cli import generation_params

    template = tmp_path / "prompt.txt"
    template.write_text("Write {count} pairs as {example}.", "utf-8")
    system = tmp_path / "system.txt"
    system.write_text("You label street photos.", "utf-8")
    params = generation_params(
        None,
        "2-4",
        prompt="dataflow",
        prompt_file=template,
        system_prompt=f"@{system}",
        min_question_chars=12,
        skip_checks=["refusal", "restated"],
        tries=5,
        verify=True,
    )
    assert (params.prompt_version, params.prompt_template) == (
        "dataflow",
        "Write {count} pairs as {example}.",
    )
    assert params.system_prompt == "You label street photos."
    assert (params.require_question_mark, params.reject_refusals, params.reject_restated) == (
        True,
        False,
        False,
    )
    assert (params.min_question_chars, params.generation_tries, params.verify) == (12, 5, True)
    for bad in ({"prompt": "nope"}, {"skip_checks": ["spelling"]}, {"prompt_file": tmp_path / "missing.txt"}):
        with pytest.raises(typer.BadParameter):
            generation_params(None, "3-5", **bad)
