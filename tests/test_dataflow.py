"""The DataFlow operator API: FileStorage, ImageQAGenerate and its servings (local, cluster).

The document's own example runs on the tiny model; the same pipeline on a running cluster writes the
same rows (byte for byte with the fake engine, equal but for the generated text with the real one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from producer.broker import redis_client
from producer.contract import GenerationParams
from producer.jobs import job_status, list_jobs
from tests.conftest import Cluster
from tests.helpers import EXAMPLES, CollectorThread, make_images, read_jsonl, wait_done, write_jsonl
from workers.dataflow import (
    APIVLMServing_openai,
    ClusterServing,
    ClusterServingError,
    DataFlowError,
    FileStorage,
    ImageQAGenerate,
    LocalServing,
    StorageError,
)
from workers.engines.base import EngineRequest
from workers.engines.fake import FakeEngine

SHORT = {"max_question_chars": 40, "max_answer_chars": 40}
"""Short strings keep the random-weight model's answers well inside max_tokens."""

# The document's example; only its import lines are changed (dataflow.* -> workers.dataflow).
DOC_EXAMPLE = """
from workers.dataflow import FileStorage
from workers.dataflow import LocalModelVLMServing_vllm
from workers.dataflow import ImageQAGenerate

# Step 1: Launch local model service
serving = LocalModelVLMServing_vllm(
    hf_model_name_or_path="./models/Qwen2.5-VL-3B-Instruct",
    vllm_tensor_parallel_size=1,
    vllm_temperature=0.7,
    vllm_top_p=0.9,
    vllm_max_tokens=1024
)

# Step 2: Prepare input data
storage = FileStorage(
    first_entry_file_name="data/example_qa.jsonl",
    cache_path="./cache_local",
    file_name_prefix="imageqa",
    cache_type="jsonl",
    media_key="image",
    media_type="image"
)
storage.step()

# Step 3: Initialize and run the operator
qa_generator = ImageQAGenerate(serving)
qa_generator.run(
    storage=storage,
    multi_modal_key="image",
    output_key="qa_pairs"
)
"""


def fake_serving(**kwargs: Any) -> LocalServing:
    return LocalServing(FakeEngine(), params=GenerationParams(**SHORT), show_progress=False, **kwargs)


def run_step(serving: Any, source: Path, cache: Path, **run: Any) -> list[dict]:
    storage = FileStorage(str(source), cache_path=str(cache), file_name_prefix="qa")
    storage.step()
    assert ImageQAGenerate(serving).run(storage, **run) == [run.get("output_key", "qa_pairs")]
    return read_jsonl(cache / "qa_step1.jsonl")


def assert_pairs(pairs: Any, low: int = 3, high: int = 5) -> None:
    assert isinstance(pairs, list) and low <= len(pairs) <= high
    for pair in pairs:
        assert list(pair) == ["question", "answer"]
        assert isinstance(pair["question"], str) and pair["question"].strip()
        assert isinstance(pair["answer"], str) and pair["answer"].strip()


def without(row: dict, *keys: str) -> dict:
    return {k: v for k, v in row.items() if k not in keys}


# --- FileStorage ---------------------------------------------------------------------------------

ROWS = [
    {
        "image": ["a.jpg"],
        "id": "1",
        "meta": {"split": "train"},
        "qa_pairs": [{"question": "Q?", "answer": "A"}],
    },
    {"image": ["b.jpg", "c.jpg"], "id": "2", "meta": {"split": "test"}, "qa_pairs": []},
]


@pytest.mark.parametrize("cache_type", ["jsonl", "json", "csv", "parquet"])
def test_each_format_writes_the_named_step_file_and_reads_it_back(tmp_path, cache_type):
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    storage = FileStorage(
        str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="pre", cache_type=cache_type
    )

    storage.step()
    assert storage.read("dict") == ROWS
    written = storage.write(storage.read("dict"))
    assert written == str(tmp_path / "cache" / f"pre_step1.{cache_type}")

    storage.step()
    assert storage.read("dict") == ROWS
    frame = storage.read()  # a DataFrame by default, as in DataFlow
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(ROWS[0]) and len(frame) == 2
    # A step file is also a first entry file: its format comes from the suffix.
    again = FileStorage(written)
    again.step()
    assert again.read("dict") == ROWS


def test_steps_follow_dataflow_read_current_write_next(tmp_path):
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    storage = FileStorage(str(source), cache_path=str(tmp_path / "c"), file_name_prefix="p")
    with pytest.raises(StorageError, match=r"storage\.step\(\)"):
        storage.read()

    at_zero = storage.step()
    assert (storage.operator_step, at_zero.operator_step) == (0, 0)
    at_zero.write([{"n": 1}])
    storage.step()
    assert storage.read("dict") == [{"n": 1}]
    storage.write([{"n": 2}])
    assert read_jsonl(tmp_path / "c" / "p_step2.jsonl") == [{"n": 2}]
    assert storage.reset().operator_step == -1


def test_jsonl_rows_pass_through_byte_for_byte(tmp_path):
    lines = [
        b'{"image":"x.jpg","caption":"caf\xc3\xa9","score":0.1,"tags":["a",{"b":null}]}',
        b'{"id":7,"image":["y.jpg"]}',
        b'{"nested":{"deep":[1,2.5,true]},"image":"z.jpg","zip":"00123"}',
    ]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    storage = FileStorage(str(source), cache_path=str(tmp_path))
    storage.step()
    storage.write(storage.read("dict"))
    assert (tmp_path / "dataflow_cache_step1.jsonl").read_bytes() == source.read_bytes()


@pytest.mark.parametrize(("cache_type", "blank"), [("parquet", None), ("csv", "")])
def test_columnar_formats_keep_columns_that_only_later_rows_have(tmp_path, cache_type, blank):
    storage = FileStorage("", cache_path=str(tmp_path), cache_type=cache_type)
    storage.step()
    storage.write([{"a": "1"}, {"a": "2", "b": "x"}])
    storage.step()
    assert storage.read("dict") == [{"a": "1", "b": blank}, {"a": "2", "b": "x"}]


def test_a_dataframe_is_written_as_plain_json_values(tmp_path):
    storage = FileStorage("", cache_path=str(tmp_path))
    storage.step()
    assert storage.read("dict") == []
    frame = pd.DataFrame([{"image": ["a.jpg"], "n": 1}, {"image": ["b.jpg"], "n": 2, "note": "x"}])
    storage.write(frame)
    assert read_jsonl(tmp_path / "dataflow_cache_step1.jsonl") == [
        {"image": ["a.jpg"], "n": 1, "note": None},
        {"image": ["b.jpg"], "n": 2, "note": "x"},
    ]


def test_relative_media_resolves_against_the_input_folder_then_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    storage = FileStorage("data/rows.jsonl")

    assert storage.resolve_media("images/a.jpg") == str(tmp_path / "data" / "images" / "a.jpg")
    assert storage.resolve_media("elsewhere/b.jpg") == str(tmp_path / "elsewhere" / "b.jpg")
    # Found nowhere: named under the input folder, where the error message will point.
    assert storage.resolve_media("gone.jpg") == str(tmp_path / "data" / "gone.jpg")
    assert storage.resolve_media("/abs/c.jpg") == "/abs/c.jpg"
    assert storage.resolve_media("https://example.org/d.jpg") == "https://example.org/d.jpg"


def test_a_folder_of_images_is_a_first_entry_under_the_media_key(tmp_path):
    make_images(tmp_path / "photos", 2)
    storage = FileStorage(str(tmp_path / "photos"), media_key="picture")
    storage.step()
    assert storage.read("dict") == [{"picture": ["img000.jpg"]}, {"picture": ["img001.jpg"]}]


def test_bad_settings_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(StorageError, match="cache_type 'xlsx'"):
        FileStorage("x.jsonl", cache_type="xlsx")
    with pytest.raises(StorageError, match="media_type 'video'"):
        FileStorage("x.jsonl", media_type="video")
    missing = FileStorage(str(tmp_path / "nope.jsonl"))
    missing.step()
    with pytest.raises(StorageError, match="input not found") as info:
        missing.read()
    assert isinstance(info.value, ValueError) and info.value.code == "input_not_found"
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"image": "a.jpg"}, b"{oops"])
    storage = FileStorage(str(broken))
    storage.step()
    with pytest.raises(StorageError, match="line 2 is not valid JSON"):
        storage.read()
    with pytest.raises(StorageError, match="list of dicts"):
        storage.write(["not", "rows"])


# --- ImageQAGenerate with the fake engine --------------------------------------------------------


def test_missing_input_key_and_existing_output_key_are_clear_errors(tmp_path):
    source = write_jsonl(
        tmp_path / "rows.jsonl", [{"picture": "a.jpg"}, {"picture": "b.jpg", "qa_pairs": []}]
    )
    serving = fake_serving()
    with pytest.raises(DataFlowError, match=r"no column 'image'.*picture"):
        run_step(serving, source, tmp_path / "c")
    with pytest.raises(DataFlowError, match="already has a column 'qa_pairs'"):
        run_step(serving, source, tmp_path / "c", multi_modal_key="picture")
    with pytest.raises(ValueError, match="already has a column 'picture'"):
        run_step(
            serving, source, tmp_path / "c", multi_modal_key="picture", output_key="x", error_key="picture"
        )
    assert not (tmp_path / "c").exists(), "nothing is written when the keys are wrong"
    serving.cleanup()


def test_a_failed_row_keeps_its_place_with_an_error_and_the_rest_complete(tmp_path, caplog):
    images = make_images(tmp_path / "data", 3)
    rows = [
        {"image": images[0].name, "id": 0},
        {"image": "missing.jpg", "id": 1},
        {"image": [images[1].name], "id": 2},
        {"id": 3},
        {"image": [], "id": 4},
        {"image": images[2].name, "id": 5},
        {"image": "ftp://host/k.jpg", "id": 6},
    ]
    source = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="workers.dataflow.operator"), fake_serving() as serving:
        out = run_step(serving, source, tmp_path / "cache")

    assert [without(r, "qa_pairs", "qa_error") for r in out] == rows
    errors = {r["id"]: r["qa_error"]["code"] for r in out if "qa_error" in r}
    assert errors == {
        1: "image_not_found",
        3: "image_key_missing",
        4: "image_list_empty",
        6: "image_ref_invalid",
    }
    for row in out:
        if row["id"] in errors:
            assert row["qa_pairs"] == [] and row["qa_error"]["message"]
        else:
            assert_pairs(row["qa_pairs"])
    assert "row 1: image_not_found" in caplog.text


def test_a_row_with_several_images_sends_them_in_one_prompt(tmp_path):
    a, b = make_images(tmp_path, 2)
    source = write_jsonl(tmp_path / "rows.jsonl", [{"image": [a.name, b.name]}, {"image": a.name}])
    with fake_serving() as serving:
        out = run_step(serving, source, tmp_path / "cache")
    # The fake engine answers with the number of images it was given, and their sizes.
    assert [r["qa_pairs"][0]["answer"] for r in out] == ["2", "1"]
    assert out[0]["qa_pairs"][1]["answer"] == "96x64, 97x64"


class FirstRowsLastEngine(FakeEngine):
    """Takes longer for narrower images, so rows finish out of their order."""

    async def generate(self, request: EngineRequest) -> str:
        await asyncio.sleep((110 - request.images[0].width) * 0.004)
        return await super().generate(request)


def test_row_order_is_kept_whatever_order_rows_finish_in(tmp_path):
    images = make_images(tmp_path, 14)  # widths 96..102, twice
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    serving = LocalServing(FirstRowsLastEngine(), params=GenerationParams(**SHORT), show_progress=False)
    out = run_step(serving, source, tmp_path / "cache")
    serving.cleanup()
    assert [r["n"] for r in out] == list(range(14))
    # Each row got its own image's pairs (the fake engine names the image size).
    assert [r["qa_pairs"][1]["answer"] for r in out] == [f"{96 + i % 7}x64" for i in range(14)]


def test_cleanup_releases_the_engine_and_a_later_run_starts_it_again(tmp_path):
    (image,) = make_images(tmp_path, 1)
    source = write_jsonl(tmp_path / "rows.jsonl", [{"image": image.name}])
    engine = FakeEngine()
    serving = LocalServing(engine, show_progress=False)
    assert not engine.started, "the engine starts on first use"
    run_step(serving, source, tmp_path / "a")
    assert engine.started
    serving.cleanup()
    assert not engine.started
    serving.cleanup()  # idempotent
    assert_pairs(run_step(serving, source, tmp_path / "b")[0]["qa_pairs"])
    serving.cleanup()


def test_the_api_serving_needs_its_key_variable(monkeypatch):
    monkeypatch.delenv("DF_API_KEY", raising=False)
    with pytest.raises(DataFlowError, match="'DF_API_KEY' is not set"):
        APIVLMServing_openai(api_url="http://127.0.0.1:9/v1")


# --- ClusterServing ------------------------------------------------------------------------------


def test_cluster_and_local_servings_write_identical_step_files(fake_cluster: Cluster, media, tmp_path):
    images = make_images(media, 5)
    rows = [{"image": [p.name], "n": i} for i, p in enumerate(images)]
    rows += [
        {"image": [images[0].name, images[1].name], "n": "pair"},
        {"image": "missing.jpg", "n": "missing"},
        {"n": "no image"},
        {"image": [images[2].name], "n": 2},  # a verbatim repeat of row 2
    ]
    source = write_jsonl(media / "rows.jsonl", rows)

    with fake_serving() as local:
        run_step(local, source, tmp_path / "local")
    cluster = ClusterServing(redis_url=fake_cluster.redis_url, show_progress=False, **SHORT)
    with CollectorThread(fake_cluster.redis_url):
        out = run_step(cluster, source, tmp_path / "cluster")

    local_bytes = (tmp_path / "local" / "qa_step1.jsonl").read_bytes()
    assert (tmp_path / "cluster" / "qa_step1.jsonl").read_bytes() == local_bytes
    assert [without(r, "qa_pairs", "qa_error") for r in out] == rows
    assert [r.get("qa_error", {}).get("code") for r in out][5:8] == [
        None,
        "image_not_found",
        "image_key_missing",
    ]
    assert not list((tmp_path / "cluster" / "imageqa-cluster").iterdir()), "the job's files are removed"


def test_an_interrupted_cluster_step_resumes_its_job_when_run_again(fake_cluster: Cluster, media, tmp_path):
    images = make_images(media, 4)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)]
    source = write_jsonl(media / "rows.jsonl", rows)
    # Given a step that gave up waiting (no collector yet) while the workers went on
    cluster = ClusterServing(redis_url=fake_cluster.redis_url, timeout_s=0.2, show_progress=False, **SHORT)
    with pytest.raises(ClusterServingError, match="resumes it"):
        run_step(cluster, source, tmp_path / "cache")
    r = redis_client(fake_cluster.redis_url)
    (job_id,) = list_jobs(r)
    with CollectorThread(fake_cluster.redis_url):
        wait_done(fake_cluster.redis_url, job_id)
        # When the step runs again
        out = run_step(cluster, source, tmp_path / "cache")
    # Then it picked up the finished job instead of generating again
    status = job_status(r, job_id)
    assert status is not None and (status.enqueued, status.skipped, status.written) == (4, 4, 4)
    assert [without(row, "qa_pairs") for row in out] == rows
    for row in out:
        assert_pairs(row["qa_pairs"])


def test_cluster_serving_without_workers_times_out_with_a_hint(redis_url, tmp_path, caplog):
    (image,) = make_images(tmp_path, 1)
    source = write_jsonl(tmp_path / "rows.jsonl", [{"image": image.name}])
    cluster = ClusterServing(redis_url=redis_url, timeout_s=0.5, poll_s=0.05, show_progress=False)
    with caplog.at_level(logging.WARNING), pytest.raises(ClusterServingError, match="resumes it"):
        run_step(cluster, source, tmp_path / "cache")
    assert "no collector is reading" in caplog.text
    assert not (tmp_path / "cache" / "qa_step1.jsonl").exists()


# --- the document's example on the tiny model ----------------------------------------------------


def adapt_example(model: Path) -> str:
    """The model path -> the tiny model; short strings for its random weights."""
    code = DOC_EXAMPLE
    for old, new in (
        ('"./models/Qwen2.5-VL-3B-Instruct"', repr(str(model))),
        ("vllm_max_tokens=1024\n", "vllm_max_tokens=1024, max_question_chars=40, max_answer_chars=40\n"),
    ):
        assert code.count(old) == 1
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def doc_example(tiny_model: Path, media_root: Path) -> tuple[Path, list[dict]]:
    """Runs the document's example as a user would (``python example.py``, no ``__main__`` guard) in a
    fresh working folder under the workers' media root."""
    workspace = media_root / "doc-example"
    images = workspace / "data" / "images"
    images.mkdir(parents=True)
    for name in ("china.jpg", "flower.jpg", "grace_hopper.jpg"):
        shutil.copy(EXAMPLES / name, images / name)
    make_images(images, 2, prefix="made")
    rows = [
        {"image": ["images/china.jpg"]},
        {"image": ["images/flower.jpg"], "source": "sklearn"},
        {"image": ["images/grace_hopper.jpg", "images/made000.jpg"], "id": 3},
        {"image": "images/made001.jpg", "meta": {"split": "test"}},
    ]
    write_jsonl(workspace / "data" / "example_qa.jsonl", rows)
    (workspace / "example.py").write_text(adapt_example(tiny_model))
    env = {**os.environ, "IMAGEQA_MAX_MODEL_LEN": "4096"}  # as for the engine worker: a quicker start
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=workspace, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return workspace, rows


@pytest.mark.engine
def test_the_documented_example_writes_step1_in_the_documented_format(doc_example):
    workspace, rows = doc_example
    out = read_jsonl(workspace / "cache_local" / "imageqa_step1.jsonl")
    assert len(out) == len(rows)
    for row, written in zip(rows, out, strict=True):
        assert list(written) == [*row, "qa_pairs"], "the row's fields, unchanged, then qa_pairs"
        assert without(written, "qa_pairs") == row
        assert_pairs(written["qa_pairs"])
        assert all(len(p["question"]) <= 40 and len(p["answer"]) <= 40 for p in written["qa_pairs"])


@pytest.mark.engine
def test_the_example_on_the_cluster_writes_the_same_rows(doc_example, engine_cluster: Cluster, monkeypatch):
    workspace, rows = doc_example
    monkeypatch.chdir(workspace)
    storage = FileStorage("data/example_qa.jsonl", cache_path="./cache_cluster", file_name_prefix="imageqa")
    storage.step()
    serving = ClusterServing(redis_url=engine_cluster.redis_url, **SHORT)
    with CollectorThread(engine_cluster.redis_url):
        ImageQAGenerate(serving).run(storage=storage, multi_modal_key="image", output_key="qa_pairs")
    local = read_jsonl(workspace / "cache_local" / "imageqa_step1.jsonl")
    cluster = read_jsonl(workspace / "cache_cluster" / "imageqa_step1.jsonl")
    assert [without(r, "qa_pairs") for r in cluster] == [without(r, "qa_pairs") for r in local] == rows
    assert [list(r) for r in cluster] == [list(r) for r in local]
    for row in cluster:
        assert_pairs(row["qa_pairs"])
