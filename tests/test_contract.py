import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from producer.contract import GenerationParams, ResultRecord, TaskMessage, json_schemas, output_row
from producer.errors import ContractError

MESSAGE = {
    "job_id": "j1",
    "item_id": "i1",
    "row_index": 0,
    "images": ["/data/a.jpg"],
    "row": {"image": ["a.jpg"]},
}


def test_task_message_round_trips_through_json():
    message = TaskMessage.decode(json.loads(json.dumps(MESSAGE)))
    assert TaskMessage.decode(message.model_dump(mode="json")) == message
    assert message.params == GenerationParams()


@pytest.mark.parametrize(
    "change",
    [
        {"unexpected": 1},
        {"images": []},
        {"images": [""]},
        {"row_index": -1},
        {"params": {"min_pairs": 6, "max_pairs": 5}},
        {"params": {"temperature": "hot"}},
        {"schema_version": 2},
    ],
)
def test_task_message_rejects_bad_fields(change):
    with pytest.raises(ContractError) as e:
        TaskMessage.decode({**MESSAGE, **change})
    assert e.value.code == "message_invalid"


@pytest.mark.parametrize("missing", ["job_id", "item_id", "row_index", "images", "row"])
def test_task_message_rejects_missing_fields(missing):
    with pytest.raises(ContractError):
        TaskMessage.decode({k: v for k, v in MESSAGE.items() if k != missing})


def test_task_message_is_frozen():
    message = TaskMessage.decode(MESSAGE)
    with pytest.raises(ValidationError):
        message.job_id = "other"  # type: ignore[misc]


def test_result_record_has_exactly_one_outcome():
    base = {"job_id": "j", "item_id": "i", "row_index": 0, "row": {}}
    with pytest.raises(ContractError):
        ResultRecord.decode(json.dumps(base))
    both = {**base, "qa_pairs": [], "error": {"code": "x", "message": "y"}}
    with pytest.raises(ContractError):
        ResultRecord.decode(json.dumps(both))


def test_output_row_keeps_the_row_and_adds_pairs_under_the_output_key():
    record = ResultRecord(
        job_id="j",
        item_id="i",
        row_index=0,
        row={"image": ["a.jpg"], "id": 7},
        qa_pairs=[{"question": "What is it?", "answer": "A cat."}],
    )
    assert output_row(record, "qa_pairs") == {
        "image": ["a.jpg"],
        "id": 7,
        "qa_pairs": [{"question": "What is it?", "answer": "A cat."}],
    }
    assert "pairs" in output_row(record, "pairs")


def test_params_fingerprint_changes_with_any_setting():
    base = GenerationParams()
    assert base.fingerprint() == GenerationParams().fingerprint()
    for change in ({"model": "m"}, {"min_pairs": 2}, {"temperature": 0.1}, {"prompt_version": "x"}):
        assert GenerationParams(**change).fingerprint() != base.fingerprint()


def test_schema_command_prints_the_contract_as_json_schema():
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "schema"], capture_output=True, text=True, check=True
    ).stdout
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(json_schemas()))
    assert schema["task_name"] == "imageqa.generate"
    kwargs = schema["task_kwargs"]
    assert set(kwargs["required"]) == {"job_id", "item_id", "row_index", "images", "row"}
    assert kwargs["additionalProperties"] is False
    import jsonschema

    jsonschema.validate(MESSAGE, kwargs)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**MESSAGE, "extra": 1}, kwargs)
