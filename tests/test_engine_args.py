"""vLLM's engine arguments on `worker`, `run` and the DataFlow serving: the common ones under vLLM's
names, any other through ``--engine-args`` checked against vLLM's ``AsyncEngineArgs``; a row with more
images than the engine takes fails as ``too_many_images``; a model that cannot be loaded stops the
worker (and ``run``) at once with one line saying what to do."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from producer.contract import GenerationParams, TaskMessage
from producer.enqueue import enqueue_file
from producer.errors import EngineArgsError, ErrorCode, ModelUnavailable
from producer.settings import ProducerSettings
from tests.conftest import REDIS_BASE, _flushed
from tests.helpers import (
    ROOT,
    CollectorThread,
    WorkerProcess,
    make_images,
    read_jsonl,
    wait_done,
    write_jsonl,
)
from workers.engine_options import engine_options
from workers.engines.fake import FakeEngine
from workers.engines.vllm_args import check_engine_args, parse_engine_args
from workers.generate import process
from workers.runtime import EngineRuntime
from workers.settings import RunSettings, VLLMSettings, WorkerSettings, environ

SHORT = ["--max-question-chars", "40", "--max-answer-chars", "40"]
KNOBS_DB = 12
FAIL_FAST_S = 60.0
"""Generous bound for a refusal: the mechanism is the check before the engine starts (which on this
machine takes 30-40 s before failing on a missing model), not a timeout."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("IMAGEQA_") and name != "IMAGEQA_TEST_REDIS":
            monkeypatch.delenv(name)


def imageqa(*args: str, timeout_s: float = 600, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``imageqa ARGS`` as a user runs it, with ``env`` over a clean environment; and its duration."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEQA_")}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**clean, "COLUMNS": "80", **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    return done, time.monotonic() - started


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a refused command; no traceback."""
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


# --- Reading engine arguments (no vLLM) ---------------------------------------------------------


def test_engine_args_are_read_from_json_or_a_file_in_either_spelling(tmp_path):
    assert parse_engine_args('{"max-model-len": 4096, "--enable-prefix-caching": true}') == {
        "max_model_len": 4096,
        "enable_prefix_caching": True,
    }
    (tmp_path / "args.json").write_text('{"max_logprobs": 8}')
    (tmp_path / "args.yaml").write_text("kv_cache_dtype: fp8\nlimit_mm_per_prompt:\n  image: 2\n")
    assert parse_engine_args(f"@{tmp_path / 'args.json'}") == {"max_logprobs": 8}
    assert parse_engine_args(f"@{tmp_path / 'args.yaml'}") == {
        "kv_cache_dtype": "fp8",
        "limit_mm_per_prompt": {"image": 2},
    }
    assert parse_engine_args("") == {} == parse_engine_args(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"max_model_len": 4096', "--engine-args is not a JSON object (Expecting ',' delimiter"),
        ("[1, 2]", "engine arguments must be a JSON object of name: value"),
        ("@/no/such/args.json", "cannot read engine arguments from /no/such/args.json"),
        ('{"max-model-len": 1, "max_model_len": 2}', "engine argument max_model_len is given twice"),
        ('{"model": "other"}', "engine argument model cannot be given here: give the model with --model"),
    ],
)
def test_malformed_engine_args_say_what_is_wrong(text, message):
    with pytest.raises(EngineArgsError, match=re.escape(message)):
        parse_engine_args(text)


def test_engine_args_that_have_a_setting_of_their_own_go_there(monkeypatch, tmp_path):
    args = tmp_path / "engine.json"
    args.write_text(json.dumps({"max_num_seqs": 8, "limit_mm_per_prompt": {"image": 2}, "max_logprobs": 4}))
    monkeypatch.setenv("IMAGEQA_ENGINE_ARGS", f"@{args}")

    vllm = WorkerSettings().engine.vllm

    assert (vllm.max_num_seqs, vllm.max_images_per_prompt) == (8, 2)
    assert vllm.engine_args == {"max_logprobs": 4}
    assert WorkerSettings().engine.max_images() == 2


def test_an_engine_argument_given_twice_with_two_values_is_refused(monkeypatch):
    monkeypatch.setenv("IMAGEQA_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("IMAGEQA_ENGINE_ARGS", '{"max_num_seqs": 16}')
    with pytest.raises(ValueError, match=r"engine argument max_num_seqs is given twice: 16 .* and '8'"):
        VLLMSettings()


def test_a_child_process_reads_back_the_engine_arguments(monkeypatch):
    given = WorkerSettings(
        engine={
            "model": "m",
            "vllm": {
                "quantization": "awq",
                "trust_remote_code": True,
                "engine_args": {"limit_mm_per_prompt": {"image": 3, "video": 1}, "max_logprobs": 4},
            },
        }
    )
    assert given.engine.vllm.max_images_per_prompt == 3
    for name, value in environ(given).items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings() == given


def test_command_line_engine_options_go_over_the_environment(monkeypatch):
    from workers.cli import worker_settings

    monkeypatch.setenv("IMAGEQA_MAX_NUM_SEQS", "32")
    monkeypatch.setenv("IMAGEQA_DTYPE", "float16")
    vllm = engine_options(
        max_num_seqs=8,
        max_model_len=4096,
        tensor_parallel_size=2,
        trust_remote_code=True,
        limit_mm_per_prompt="image=2,video=1",
        engine_args='{"enable_prefix_caching": false, "max_logprobs": 4}',
    )

    settings = worker_settings("m", "vllm", None, vllm).engine.vllm

    assert (settings.max_num_seqs, settings.max_model_len, settings.tensor_parallel_size) == (8, 4096, 2)
    assert (settings.dtype, settings.trust_remote_code, settings.enable_prefix_caching) == (
        "float16",
        True,
        False,
    )
    assert settings.max_images_per_prompt == 2
    assert settings.engine_args == {"max_logprobs": 4, "limit_mm_per_prompt": {"video": 1}}


def test_malformed_engine_options_end_the_command_with_one_line():
    done, _ = imageqa("worker", "--engine", "fake", "--engine-args", '{"max_model_len": 4096')
    assert done.returncode == 2
    assert error_line(done).startswith("error: --engine-args is not a JSON object (Expecting ',' delimiter")
    done, _ = imageqa("worker", "--engine", "fake", "--limit-mm-per-prompt", "image=two")
    assert done.returncode == 2
    assert "expected '{\"image\": 2}' or image=2" in error_line(done)


# --- Checked against vLLM's AsyncEngineArgs ------------------------------------------------------


def test_unknown_engine_arguments_are_refused_naming_the_closest():
    with pytest.raises(
        EngineArgsError, match=r"unknown vLLM engine argument 'max_model_length': did you mean max_model_len"
    ):
        check_engine_args({"max_model_length": 4096})
    with pytest.raises(EngineArgsError, match=r"'prefix_caching': did you mean enable_prefix_caching"):
        check_engine_args({"prefix_caching": True})
    with pytest.raises(EngineArgsError, match=r"'zzz': see `vllm serve --help`"):
        check_engine_args({"zzz": 1})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_model_len": "long"}, "engine argument max_model_len: Input should be a valid integer"),
        ({"dtype": "bf16"}, "engine argument dtype: Input should be 'auto', 'half', 'float16', 'bfloat16'"),
        ({"limit_mm_per_prompt": {"image": "two"}}, "engine argument limit_mm_per_prompt.image:"),
        ({"compilation_config": {"no_such_option": 1}}, "engine argument compilation_config.no_such_option:"),
    ],
)
def test_values_are_checked_against_vllms_own_field_types(args, message):
    with pytest.raises(EngineArgsError, match=re.escape(message)):
        check_engine_args(args)


def test_valid_engine_arguments_come_back_as_vllm_takes_them():
    from vllm.config import CompilationConfig

    checked = check_engine_args({"--max-num-seqs": "8", "max-logprobs": 4, "compilation_config": {"mode": 0}})
    assert checked["max_num_seqs"] == 8 and checked["max_logprobs"] == 4
    assert isinstance(checked["compilation_config"], CompilationConfig)


def test_the_engine_config_carries_every_argument(tiny_model):
    from workers.engines import vllm_config

    settings = WorkerSettings(
        engine={
            "model": str(tiny_model),
            "vllm": {
                "revision": "main",
                "enable_prefix_caching": False,
                "engine_args": {"limit_mm_per_prompt": {"image": 2, "video": 1}, "max_logprobs": 4},
            },
        }
    )

    kwargs = vllm_config(settings.engine).engine_kwargs()

    assert kwargs["limit_mm_per_prompt"] == {"image": 2, "video": 1}
    assert (kwargs["revision"], kwargs["enable_prefix_caching"], kwargs["max_logprobs"]) == ("main", False, 4)
    with pytest.raises(EngineArgsError, match="engine argument dtype"):
        vllm_config(WorkerSettings(engine={"model": "m", "vllm": {"dtype": "bf16"}}).engine)


# --- too_many_images ----------------------------------------------------------------------------


def test_a_row_over_the_engines_image_limit_fails_before_its_images_are_loaded():
    settings = WorkerSettings(engine={"kind": "vllm", "model": "m", "vllm": {"max_images_per_prompt": 2}})
    runtime = EngineRuntime(FakeEngine(model="m"))
    runtime.start()
    try:
        message = TaskMessage.decode(
            {
                "job_id": "j",
                "item_id": "i",
                "row_index": 0,
                "images": ["gone1.jpg", "gone2.jpg", "gone3.jpg"],
                "row": {},
            }
        )
        record = process(message, runtime, settings)
    finally:
        runtime.stop()
    assert record.error is not None and record.error.code == ErrorCode.TOO_MANY_IMAGES  # not image_not_found
    assert record.error.message == (
        "3 images in one row; this worker's engine takes at most 2 per prompt (--limit-mm-per-prompt)"
    )


# --- A model that cannot be loaded ---------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["worker", "run"])
def test_a_hub_model_not_cached_with_the_hub_offline_stops_at_once(command, tmp_path):
    args = ["run", str(tmp_path), "-o", str(tmp_path / "out.jsonl")] if command == "run" else ["worker"]
    make_images(tmp_path, 2)

    done, took_s = imageqa(
        *args,
        "--model",
        "acme/no-such-vl",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        IMAGEQA_CACHE_DIR=str(tmp_path / "cache"),
        IMAGEQA_REDIS_URL=f"{REDIS_BASE}/{KNOBS_DB}",
    )

    assert done.returncode == 2
    cache = tmp_path / "hf" / "hub"
    assert error_line(done) == (
        f"error: model acme/no-such-vl is not in the local Hugging Face cache ({cache}) and "
        "HF_HUB_OFFLINE is set: download it with `hf download acme/no-such-vl` where the hub is reachable, "
        "or pass --model /path/to/folder"
    )
    assert took_s < FAIL_FAST_S
    assert not (tmp_path / "cache" / "run").exists(), "run refused before it started a worker"


def test_run_with_the_default_model_and_no_hub_stops_at_once(tmp_path):
    # A new user on a machine without the model and without the hub: `imageqa run imgs -o out.jsonl`.
    make_images(tmp_path / "imgs", 2)
    done, took_s = imageqa(
        "run",
        str(tmp_path / "imgs"),
        "-o",
        str(tmp_path / "out.jsonl"),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}",  # the hub cannot be reached
        IMAGEQA_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert done.returncode == 2
    line = error_line(done)
    assert line.startswith("error: model Qwen/Qwen2.5-VL-3B-Instruct is not in the local Hugging Face cache")
    assert "and the hub (http://127.0.0.1:" in line and "cannot be reached (" in line
    assert line.endswith(
        "download it with `hf download Qwen/Qwen2.5-VL-3B-Instruct` where the hub is reachable, "
        "or pass --model /path/to/folder"
    )
    assert took_s < FAIL_FAST_S


@pytest.mark.parametrize("content", ["nothing", "config only"])
def test_a_folder_without_a_model_stops_the_worker_at_once(tmp_path, content):
    folder = tmp_path / "model"
    folder.mkdir()
    if content == "config only":
        (folder / "config.json").write_text("{}")
    done, took_s = imageqa("worker", "--model", str(folder), IMAGEQA_REDIS_URL=f"{REDIS_BASE}/{KNOBS_DB}")
    assert done.returncode == 2
    expected = (
        f"error: model folder {folder} holds no model (no config.json): pass --model a checkpoint folder"
        if content == "nothing"
        else f"error: model folder {folder} has a config.json but no weights (*.safetensors, *.bin)"
    )
    assert error_line(done).startswith(expected)
    assert took_s < FAIL_FAST_S


class FakeHub(BaseHTTPRequestHandler):
    """The hub's model info API for three models: one public, one gated, the rest not there."""

    def do_GET(self) -> None:
        model = self.path.removeprefix("/api/models/").split("/revision/")[0]
        if model in ("acme/public-vl", "acme/gated-vl"):
            body = json.dumps({"id": model, "gated": "auto" if "gated" in model else False}).encode()
            self.send_response(200)
        else:
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield endpoint
    server.shutdown()
    server.server_close()


def test_the_hub_says_whether_a_model_it_is_asked_for_exists(hub):
    from workers.preflight import check_model

    check_model("acme/public-vl")  # not cached, but the hub has it: vLLM downloads it
    with pytest.raises(
        ModelUnavailable, match=f"model acme/missing-vl is not on the hub \\({hub}\\): check the id"
    ):
        check_model("acme/missing-vl")
    with pytest.raises(
        ModelUnavailable, match=f"model acme/gated-vl is gated: accept its terms at {hub}/acme/gated-vl"
    ):
        check_model("acme/gated-vl")


def test_a_cached_model_needs_no_hub(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    from workers.preflight import check_model

    snapshot = tmp_path / "hub-cache" / "models--acme--cached-vl" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="only partly in the local Hugging Face cache"):
        check_model("acme/cached-vl")
    (snapshot / "model.safetensors").write_bytes(b"")
    check_model("acme/cached-vl")
    check_model("acme/cached-vl", {"load_format": "dummy"})


def test_the_dataflow_serving_takes_the_same_engine_arguments(tiny_model, tmp_path):
    from workers.dataflow import LocalModelVLMServing_vllm
    from workers.dataflow.servings import RowInput, RunContext

    serving = LocalModelVLMServing_vllm(
        str(tiny_model),
        vllm_max_model_len=4096,
        vllm_limit_mm_per_prompt=2,
        vllm_max_num_seqs=8,
        vllm_enable_prefix_caching=False,
        engine_args={"max_logprobs": 4},
        show_progress=False,
    )
    kwargs = serving.engine.config.engine_kwargs()  # type: ignore[attr-defined]
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"], kwargs["max_logprobs"]) == (4096, 8, 4)
    assert kwargs["limit_mm_per_prompt"]["image"] == 2 and kwargs["enable_prefix_caching"] is False
    assert serving.max_in_flight == 16
    with pytest.raises(EngineArgsError, match="did you mean max_model_len"):
        LocalModelVLMServing_vllm(str(tiny_model), engine_args={"max_model_length": 1})

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = LocalModelVLMServing_vllm(str(empty), show_progress=False)
    with pytest.raises(ModelUnavailable, match="holds no model"):
        missing.generate([RowInput(0, {"image": "a.jpg"}, ["a.jpg"])], RunContext("image", "qa", tmp_path))


# --- With the real engine -----------------------------------------------------------------------


@pytest.mark.engine
def test_an_unknown_engine_argument_stops_the_worker_and_run_relays_it(tiny_model, tmp_path):
    make_images(tmp_path / "imgs", 2)
    bad = ["--model", str(tiny_model), "--engine-args", '{"max_model_length": 4096}']
    expected = "error: unknown vLLM engine argument 'max_model_length': did you mean max_model_len"

    worker, _ = imageqa("worker", *bad, IMAGEQA_REDIS_URL=f"{REDIS_BASE}/{KNOBS_DB}")
    run, _ = imageqa(
        "run",
        str(tmp_path / "imgs"),
        "-o",
        str(tmp_path / "o.jsonl"),
        *bad,
        IMAGEQA_CACHE_DIR=str(tmp_path / "c"),
    )

    for done in (worker, run):
        assert done.returncode == 2
        assert error_line(done).startswith(expected)


@pytest.mark.engine
def test_worker_options_reach_the_engine_and_rows_over_its_image_limit_fail(tiny_model, media_root, tmp_path):
    # Given a worker whose engine takes at most two images per prompt, set by vLLM's own option names
    redis_url = _flushed(f"{REDIS_BASE}/{KNOBS_DB}")
    media = media_root / "knobs"
    images = make_images(media, 4)
    worker = WorkerProcess(
        {"IMAGEQA_REDIS_URL": redis_url, "IMAGEQA_MEDIA_ROOTS": str(media_root), "IMAGEQA_CONCURRENCY": "16"},
        tmp_path / "worker.log",
        args=(
            "--model",
            str(tiny_model),
            "--max-model-len",
            "4096",
            "--max-num-seqs",
            "8",
            "--limit-mm-per-prompt",
            '{"image": 2}',
            "--engine-args",
            '{"enable_prefix_caching": false, "max_num_batched_tokens": 4096}',
        ),
    )
    worker.start(600)
    try:
        # Then the engine runs with them, as vLLM resolved them
        (ready,) = re.findall(r"engine ready: (\{.*\})", worker.log())
        engine = json.loads(ready)
        assert (engine["max_model_len"], engine["max_num_seqs"], engine["max_num_batched_tokens"]) == (
            4096,
            8,
            4096,
        )
        assert engine["limit_mm_per_prompt"] == {"image": 2, "video": 0}
        assert engine["enable_prefix_caching"] is False

        # When a job has a row of three images (one of them missing) among rows of one and two
        rows = [
            {"image": [images[0].name], "id": 0},
            {"image": [images[1].name, images[2].name, "missing.jpg"], "id": 1},
            {"image": [images[2].name, images[3].name], "id": 2},
        ]
        source = write_jsonl(media / "in.jsonl", rows)
        params = GenerationParams(max_question_chars=40, max_answer_chars=40)
        with CollectorThread(redis_url):
            summary = enqueue_file(
                source, tmp_path / "out.jsonl", settings=ProducerSettings(redis_url=redis_url), params=params
            )
            status = wait_done(redis_url, summary.job_id, timeout_s=300)
    finally:
        assert worker.stop(120) == 0, worker.log()[-3000:]

    # Then that row fails as too_many_images, without loading its images, and the rest completes
    (error,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["row"]["id"] == 1 and error["error"]["code"] == "too_many_images"
    assert error["error"]["message"].startswith("3 images in one row; this worker's engine takes at most 2")
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out.jsonl")) == [0, 2]
    assert (status.total, status.written, status.failed) == (3, 2, 1)


@pytest.mark.engine
def test_run_takes_the_engine_options_too(tiny_model, tmp_path):
    folder = tmp_path / "in"
    images = make_images(folder, 3)
    write_jsonl(folder / "rows.jsonl", [{"image": [p.name for p in images]}, {"image": images[0].name}])

    done, _ = imageqa(
        "run",
        str(folder / "rows.jsonl"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--model",
        str(tiny_model),
        "--max-model-len",
        "4096",
        "--limit-mm-per-prompt",
        "image=2",
        "--engine-args",
        '{"max_num_seqs": 4}',
        *SHORT,
        IMAGEQA_CACHE_DIR=str(tmp_path / "cache"),
    )

    assert done.returncode == 0, done.stderr
    assert "1 rows written, 1 rows failed" in done.stderr
    (error,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["error"]["code"] == "too_many_images"
    (log,) = (tmp_path / "cache" / "run").glob("worker-*.log")
    (ready,) = re.findall(r"engine ready: (\{.*\})", log.read_text())
    engine = json.loads(ready)
    assert (engine["max_model_len"], engine["max_num_seqs"], engine["limit_mm_per_prompt"]["image"]) == (
        4096,
        4,
        2,
    )


def test_run_settings_hand_the_engine_arguments_to_the_worker(monkeypatch):
    from workers.cli import worker_settings

    run = RunSettings(
        worker=worker_settings("m", None, None, engine_options(engine_args='{"max_logprobs": 4}'))
    )
    for name, value in environ(run.worker).items():
        monkeypatch.setenv(name, value)
    assert WorkerSettings().engine.vllm.engine_args == {"max_logprobs": 4}


@pytest.mark.engine
def test_run_says_in_one_line_why_the_engine_did_not_start(tiny_model, tmp_path):
    # A context longer than the model's: vLLM refuses it while the engine starts, not before.
    make_images(tmp_path / "imgs", 2)
    done, _ = imageqa(
        "run",
        str(tmp_path / "imgs"),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--model",
        str(tiny_model),
        "--max-model-len",
        "100000000",
        IMAGEQA_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert done.returncode == 2
    line = error_line(done)
    assert line.startswith("error: the worker's engine failed to start: ")
    assert "max_model_len" in line and "(worker log: " in line
