"""Pair quality end to end: regeneration and verification with the real vLLM engine on the tiny model,
and the per-reason rejection counts in a job's status (fake and real engine clusters)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from producer.contract import GenerationParams, ResultRecord, TaskMessage
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import EXAMPLES, CollectorThread, make_images, read_jsonl, wait_done, write_jsonl
from workers.engines.base import Engine, EngineRequest
from workers.parsing import parse_qa_output
from workers.prompts import qa_schema

# Short strings keep the random-weight model's answers well inside max_tokens.
SHORT = GenerationParams(max_question_chars=40, max_answer_chars=40)
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))


class Recording(Engine):
    """Wraps an engine: records every request and its output, and may rewrite the generated text."""

    name = "recording"

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.requests: list[EngineRequest] = []
        self.outputs: dict[str, str] = {}  # by request id, as returned (after any edit)
        self.edit: Callable[[EngineRequest, str, int], str] | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: EngineRequest) -> str:
        self.requests.append(request)
        text = await self.inner.generate(request)
        text = self.edit(request, text, len(self.requests)) if self.edit else text
        self.outputs[request.request_id] = text
        return text

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    def generation_requests(self) -> list[EngineRequest]:
        return [r for r in self.requests if is_generation(r)]


def is_generation(request: EngineRequest) -> bool:
    """A request for pairs (not a verification question)."""
    return request.json_schema is None or "qa_pairs" in request.json_schema["properties"]


@pytest.fixture(scope="module")
def real_engine(tiny_model: Path) -> Iterator[tuple[Recording, object, object]]:
    """The vLLM engine on the tiny model, in this process, as a worker runs it."""
    from workers.engines import vllm_config
    from workers.engines.vllm import VLLMEngine
    from workers.runtime import EngineRuntime
    from workers.settings import WorkerSettings

    settings = WorkerSettings(
        engine={"model": str(tiny_model), "vllm": {"max_model_len": 4096}},
        media_roots=[EXAMPLES],
        metrics_port=0,
        task_time_limit_s=300,
    )
    engine = Recording(VLLMEngine(vllm_config(settings.engine)))
    runtime = EngineRuntime(engine)
    runtime.start(600)
    yield engine, runtime, settings
    runtime.stop(120)


@pytest.fixture
def generate(real_engine) -> Iterator[tuple[Recording, Callable[..., ResultRecord]]]:
    from workers.generate import process

    engine, runtime, settings = real_engine
    engine.requests.clear()
    engine.outputs.clear()

    def run(photo: Path, **params: object) -> ResultRecord:
        message = TaskMessage(
            job_id="quality",
            item_id=photo.stem,
            row_index=0,
            images=[str(photo)],
            row={"image": [photo.name]},
            params=SHORT.model_copy(update=params),
        )
        return process(message, runtime, settings)

    yield engine, run
    engine.edit = None


@pytest.mark.engine
def test_the_schema_makes_the_random_model_write_only_valid_pairs(generate):
    engine, run = generate
    records = [run(photo) for photo in PHOTOS for _ in range(3)]
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    assert all(3 <= len(r.qa_pairs) <= 5 for r in records)
    assert all(p.question.endswith(("?", "\uff1f", "\u061f")) for r in records for p in r.qa_pairs)
    assert sum(sum(r.qa_stats.rejected.values()) for r in records) == 0
    assert all(r.qa_stats.tries == 1 for r in records)
    assert all(r.json_schema == qa_schema(SHORT) for r in engine.requests)


@pytest.mark.engine
def test_too_few_valid_pairs_make_the_real_engine_write_again_and_the_tries_merge(generate):
    engine, run = generate

    # Given a first answer of which only one pair survives (the others are cut out of the real output)
    def keep_one_pair_first(request: EngineRequest, text: str, call: int) -> str:
        if call > 1:
            return text
        first = orjson.loads(text)["qa_pairs"][0]
        return orjson.dumps({"qa_pairs": [first, {"question": "N/A", "answer": "N/A"}]}).decode()

    engine.edit = keep_one_pair_first
    record = run(PHOTOS[0])

    first, second = engine.generation_requests()
    assert record.ok, record.error
    assert record.qa_stats.tries == 2
    assert record.qa_stats.rejected == {"question_placeholder": 1}
    taken = record.qa_pairs[0].question
    assert f"- {taken}" in second.prompt and taken not in first.prompt
    assert 3 <= len(record.qa_pairs) <= 5
    assert len({p.question.lower() for p in record.qa_pairs}) == len(record.qa_pairs)


@pytest.mark.engine
def test_a_text_prompt_on_the_random_model_is_asked_again_then_fails_with_reasons(generate):
    engine, run = generate
    # Five pairs cannot fit in 16 tokens: every try falls short.
    record = run(
        PHOTOS[1], prompt_version="dataflow", min_pairs=5, max_pairs=5, max_tokens=16, generation_tries=2
    )

    assert record.error is not None and record.error.code == "qa_invalid"
    valid = int(record.error.message.split(" ", 1)[0])
    assert record.error.message.startswith(f"{valid} valid pairs, need at least 5 (rejected: ")
    assert record.qa_stats.tries == 2
    requests = engine.generation_requests()
    assert len(requests) == 2 and requests[0].request_id != requests[1].request_id
    assert all(r.json_schema is None and "Question: <question>" in r.prompt for r in requests)
    # Every pair the model wrote was kept or rejected with a reason, and a try without any counts
    # once (unparseable): nothing the model wrote is missing from the counts.
    written = [parse_qa_output(engine.outputs[r.request_id]) for r in requests]
    rejected = sum(record.qa_stats.rejected.values())
    assert valid + rejected == sum(max(1, len(w.pairs) + w.malformed) for w in written)
    for reason, count in record.qa_stats.rejected.items():
        assert f"{reason} {count}" in record.error.message


@pytest.mark.engine
def test_verification_with_the_real_engine_asks_each_question_without_its_answer(generate):
    engine, run = generate
    # Given three known pairs in place of what the random model wrote, and the real engine's
    # verification answers replaced: the first question is answered differently, the others alike
    pairs = [
        ("What colour is the roof?", "Bright red."),
        ("How many windows are there?", "Four."),
        ("Where is the door?", "On the left."),
    ]
    real_answers: list[object] = []

    def script(request: EngineRequest, text: str, call: int) -> str:
        if is_generation(request):
            return orjson.dumps({"qa_pairs": [{"question": q, "answer": a} for q, a in pairs]}).decode()
        real_answers.append(orjson.loads(text)["answer"])
        question, answer = next((q, a) for q, a in pairs if q in request.prompt)
        return orjson.dumps({"answer": "Nothing." if question == pairs[0][0] else answer}).decode()

    engine.edit = script
    record = run(PHOTOS[2], verify=True, generation_tries=1, min_pairs=2)

    # Then each question was asked once, alone, greedily and in the answer schema, which the real
    # engine kept to,
    (generation,) = engine.generation_requests()
    checks = [r for r in engine.requests if r is not generation]
    assert sorted([q for q, _ in pairs if q in r.prompt] for r in checks) == sorted([q] for q, _ in pairs)
    assert not [a for r in checks for _, a in pairs if a in r.prompt]
    assert all(set(r.json_schema["properties"]) == {"answer"} for r in checks)
    assert all(r.sampling.temperature == 0.0 for r in checks)
    assert len(real_answers) == 3 and all(isinstance(a, str) for a in real_answers)
    # and the pair whose answers disagree was dropped, the others kept.
    assert record.ok, record.error
    assert [(p.question, p.answer) for p in record.qa_pairs] == pairs[1:]
    assert (record.qa_stats.verified, record.qa_stats.agreed) == (3, 2)
    assert record.qa_stats.rejected == {"unverified": 1}


# --- the counts in a job's status -------------------------------------------------------------------


def enqueue_and_wait(cluster: Cluster, source: Path, output: Path, params: GenerationParams) -> str:
    with CollectorThread(cluster.redis_url):
        summary = enqueue_file(
            source, output, settings=ProducerSettings(redis_url=cluster.redis_url), params=params
        )
        wait_done(cluster.redis_url, summary.job_id, timeout_s=300)
    return summary.job_id


def status_json(cluster: Cluster, job_id: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", job_id, "--json"],
        env={"IMAGEQA_REDIS_URL": cluster.redis_url, "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_status_counts_rejected_pairs_by_reason(fake_cluster, media, tmp_path):
    # The fake engine writes three pairs; two of its questions are shorter than 30 characters.
    images = make_images(media, 4)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    params = SHORT.model_copy(update={"min_question_chars": 30, "min_pairs": 1})
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "out.jsonl", params)

    report = status_json(fake_cluster, job_id)
    assert (report["written"], report["failed"]) == (4, 0)
    assert report["rejected"] == {"question_too_short": 8}
    assert report["qa"] == {"pairs": 4, "tries": 4}
    assert report["agreement_rate"] is None
    assert [len(row["qa_pairs"]) for row in read_jsonl(tmp_path / "out.jsonl")] == [1, 1, 1, 1]


def test_status_shows_failed_rows_with_their_rejections_and_the_agreement_rate(fake_cluster, media, tmp_path):
    images = make_images(media, 2)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    short = SHORT.model_copy(update={"min_question_chars": 30, "generation_tries": 2})
    job_id = enqueue_and_wait(fake_cluster, source, tmp_path / "short.jsonl", short)
    report = status_json(fake_cluster, job_id)
    assert report["failures"] == {"qa_invalid": 2}
    assert report["rejected"] == {"question_too_short": 8, "duplicate_question": 2}
    assert report["qa"] == {"tries": 4}
    errors = read_jsonl(tmp_path / "short.errors.jsonl")
    assert len(errors) == 2
    assert all("question_too_short 4" in e["error"]["message"] for e in errors)

    verified = enqueue_and_wait(
        fake_cluster, source, tmp_path / "verified.jsonl", SHORT.model_copy(update={"verify": True})
    )
    report = status_json(fake_cluster, verified)
    assert report["written"] == 2 and report["agreement_rate"] == 1.0
    assert report["qa"] == {"pairs": 6, "tries": 2, "verified": 6, "agreed": 6}


@pytest.mark.engine
def test_rejections_reach_the_job_status_from_the_real_engine_worker(engine_cluster, media, tmp_path):
    photos = []
    for photo in PHOTOS:
        (media / photo.name).write_bytes(photo.read_bytes())
        photos.append(photo.name)
    source = write_jsonl(media / "in.jsonl", [{"image": name} for name in photos])
    params = SHORT.model_copy(
        update={
            "prompt_version": "dataflow",
            "min_pairs": 5,
            "max_pairs": 5,
            "max_tokens": 16,
            "generation_tries": 2,
        }
    )
    job_id = enqueue_and_wait(engine_cluster, source, tmp_path / "out.jsonl", params)

    report = status_json(engine_cluster, job_id)
    assert report["failures"] == {"qa_invalid": 3}
    assert report["qa"]["tries"] == 6
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert sorted(e["row"]["image"] for e in errors) == sorted(photos)
    # The status adds up exactly the rejections each error line lists.
    listed: Counter[str] = Counter()
    for e in errors:
        counted = e["error"]["message"].split("(rejected: ", 1)[1]
        listed.update({reason: int(n) for reason, n in re.findall(r"(\w+) (\d+)", counted)})
    assert report["rejected"] == dict(listed)
