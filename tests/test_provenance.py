"""Every output row carries ``qa_meta``: which task made it (job, item, row index), with which model,
prompt and sampling settings, on which worker, in how long and in how many tries; the DataFlow
operator adds it only when asked.

The cluster tests run twice: with the instant fake engine and with the real vLLM engine on the tiny
model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from producer.broker import redis_client
from producer.constants import job_items_key
from producer.contract import PROMPT_VERSION, GenerationParams
from producer.enqueue import enqueue_file
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import CollectorThread, make_images, read_jsonl, wait_done, write_jsonl
from workers.dataflow import FileStorage, ImageQAGenerate, LocalServing
from workers.engines.fake import FakeEngine

SYSTEM = "You annotate photographs for a training set."
TEMPLATE = "Write {count} question-answer pairs about the {image_word}. Reply with JSON only: {example}"
EXAMPLE = '{"qa_pairs": [{"question": "...", "answer": "..."}]}'


@pytest.fixture(params=["fake", pytest.param("engine", marks=pytest.mark.engine)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


def sha16(system: str, text: str) -> str:
    return hashlib.sha256(f"{system}\0{text}".encode()).hexdigest()[:16]


def test_each_output_row_says_how_it_was_made(cluster: Cluster, media, tmp_path):
    # Given rows of one and of two images, and a prompt of the user's own
    images = make_images(media, 5)
    rows = [{"image": [p.name], "id": i} for i, p in enumerate(images[:4])]
    rows.append({"image": [images[0].name, images[4].name], "id": 4})
    source = write_jsonl(media / "in.jsonl", rows)
    params = GenerationParams(
        max_question_chars=40,
        max_answer_chars=40,
        temperature=0.5,
        top_p=0.8,
        max_tokens=900,
        prompt_template=TEMPLATE,
        system_prompt=SYSTEM,
    )

    # When the job runs on the cluster
    with CollectorThread(cluster.redis_url):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=cluster.redis_url),
            params=params,
        )
        wait_done(cluster.redis_url, summary.job_id, timeout_s=300)

    # Then every row names its task, model, prompt, settings, worker, time and tries
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(row["id"] for row in out) == list(range(5))
    items = {m.decode() for m in redis_client(cluster.redis_url).smembers(job_items_key(summary.job_id))}
    one = sha16(SYSTEM, TEMPLATE.format(count="3 to 5", image_word="image", example=EXAMPLE))
    two = sha16(SYSTEM, TEMPLATE.format(count="3 to 5", image_word="images", example=EXAMPLE))
    for row in out:
        meta = row["qa_meta"]
        assert meta["job_id"] == summary.job_id and meta["item_id"] in items
        assert meta["row_index"] == row["id"]
        assert meta["model"] == cluster.model
        assert meta["prompt_name"] == "custom"
        assert meta["prompt_hash"] == (two if len(row["image"]) == 2 else one)
        assert meta["sampling"] == {"temperature": 0.5, "top_p": 0.8, "max_tokens": 900}
        assert meta["params_fingerprint"] == params.fingerprint()
        assert meta["worker"] and meta["elapsed_s"] > 0
        assert meta["qa_stats"]["tries"] >= 1 and isinstance(meta["qa_stats"]["rejected"], dict)
    assert len({row["qa_meta"]["item_id"] for row in out}) == 5
    if cluster.model != "fake":  # a local checkpoint: a hash of its files stands for its revision
        revisions = {row["qa_meta"]["model_revision"] for row in out}
        assert len(revisions) == 1 and revisions.pop().startswith("files:")


def test_the_default_prompt_is_named_and_shared_by_rows_of_one_image(fake_cluster: Cluster, media, tmp_path):
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    with CollectorThread(fake_cluster.redis_url):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=fake_cluster.redis_url),
            params=GenerationParams(),
        )
        wait_done(fake_cluster.redis_url, summary.job_id)
    metas = [row["qa_meta"] for row in read_jsonl(tmp_path / "out.jsonl")]
    assert {m["prompt_name"] for m in metas} == {PROMPT_VERSION}
    assert len({m["prompt_hash"] for m in metas}) == 1
    assert sorted(m["row_index"] for m in metas) == [0, 1, 2]


def test_the_operator_keeps_its_row_shape_and_adds_meta_only_when_asked(tmp_path):
    images = make_images(tmp_path / "data", 2)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)] + [{"image": "missing.jpg", "n": 2}]
    source = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    serving = LocalServing(FakeEngine(), params=GenerationParams(), model_name="fake", show_progress=False)
    with serving:
        plain = _step(serving, source, tmp_path / "plain")
        with_meta = _step(serving, source, tmp_path / "meta", meta_key="qa_meta")

    assert [set(row) for row in plain] == [{"image", "n", "qa_pairs"}] * 2 + [
        {"image", "n", "qa_pairs", "qa_error"}
    ]
    for row in with_meta[:2]:
        assert row["qa_meta"]["row_index"] == row["n"]
        assert row["qa_meta"]["model"] == "fake" and row["qa_meta"]["prompt_name"] == PROMPT_VERSION
        assert row["qa_meta"]["qa_stats"]["tries"] == 1
    assert with_meta[2]["qa_error"]["code"] == "image_not_found"


def _step(serving: LocalServing, source: Path, cache: Path, **run: str) -> list[dict]:
    storage = FileStorage(str(source), cache_path=str(cache), file_name_prefix="qa")
    storage.step()
    ImageQAGenerate(serving).run(storage, **run)
    return read_jsonl(cache / "qa_step1.jsonl")
