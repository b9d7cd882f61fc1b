"""The cluster path end to end: producer -> Redis -> real Celery worker -> collector -> JSONL.

Each test runs twice: with the instant fake engine and with the real vLLM engine on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producer.broker import redis_client
from producer.contract import QA_TYPES, GenerationParams
from producer.enqueue import enqueue_file
from producer.jobs import job_status
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import CollectorThread, make_images, read_jsonl, wait_done, write_jsonl

# Short strings keep the random-weight model's answers well inside max_tokens.
PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40, max_tokens=1024)


@pytest.fixture(params=["fake", pytest.param("engine", marks=pytest.mark.engine)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


def run_job(cluster: Cluster, input_path: Path, output: Path, params: GenerationParams = PARAMS):
    settings = ProducerSettings(redis_url=cluster.redis_url)
    with CollectorThread(cluster.redis_url):
        summary = enqueue_file(input_path, output, settings=settings, params=params)
        status = wait_done(cluster.redis_url, summary.job_id, timeout_s=300)
    return summary, status


def assert_pairs(row: dict) -> None:
    pairs = row["qa_pairs"]
    assert isinstance(pairs, list) and 3 <= len(pairs) <= 5
    for pair in pairs:
        assert set(pair) == {"question", "answer", "type"}, "the default prompt asks for question types"
        assert pair["type"] in QA_TYPES
        assert isinstance(pair["question"], str) and pair["question"].strip()
        assert isinstance(pair["answer"], str) and pair["answer"].strip()


def test_twenty_images_give_twenty_rows_of_pairs(cluster, media, tmp_path):
    images = make_images(media, 20)
    rows = [{"image": [p.name], "id": i} for i, p in enumerate(images)]
    source = write_jsonl(media / "in.jsonl", rows)
    _, status = run_job(cluster, source, tmp_path / "out.jsonl")

    out = read_jsonl(tmp_path / "out.jsonl")
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert errors == []
    assert sorted(r["id"] for r in out) == list(range(20))
    for row in out:
        assert row["image"] == rows[row["id"]]["image"]
        assert_pairs(row)
    assert (status.total, status.written, status.failed) == (20, 20, 0)


def test_rows_sharing_an_image_but_differing_elsewhere_are_two_rows(cluster, media, tmp_path):
    (image,) = make_images(media, 1)
    rows = [
        {"image": [image.name], "split": "train"},
        {"image": [image.name], "split": "test"},
        {"image": [image.name], "split": "test"},
    ]  # the verbatim repeat is its own row too
    source = write_jsonl(media / "in.jsonl", rows)
    _, status = run_job(cluster, source, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["split"] for r in out) == ["test", "test", "train"]
    assert status.written == 3


def test_enqueueing_the_same_input_again_processes_nothing_new(cluster, media, tmp_path):
    images = make_images(media, 4)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    output = tmp_path / "out.jsonl"
    first, _ = run_job(cluster, source, output)
    before = output.read_bytes()
    second, status = run_job(cluster, source, output)
    assert second.job_id == first.job_id
    assert (second.enqueued, second.skipped) == (0, 4)
    assert output.read_bytes() == before
    assert status.written == 4


def test_a_missing_image_is_an_error_row_and_the_rest_complete(cluster, media, tmp_path):
    images = make_images(media, 3)
    rows = [
        {"image": images[0].name},
        {"image": "nope.jpg"},
        b"{broken",
        {"image": images[1].name},
        {"caption": "no image"},
        {"image": images[2].name},
    ]
    source = write_jsonl(media / "in.jsonl", rows)
    _, status = run_job(cluster, source, tmp_path / "out.jsonl")
    out = read_jsonl(tmp_path / "out.jsonl")
    errors = {e["row_index"]: e["error"]["code"] for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert sorted(r["image"] for r in out) == sorted(p.name for p in images)
    assert errors == {1: "image_not_found", 2: "row_malformed", 4: "image_key_missing"}
    assert (status.written, status.failed) == (3, 3)


def test_cli_enqueue_and_status_against_the_cluster(cluster, media, tmp_path):
    images = make_images(media, 2)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    env = {"IMAGEQA_REDIS_URL": cluster.redis_url, "PATH": str(Path(sys.executable).parent)}
    with CollectorThread(cluster.redis_url):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "enqueue",
                str(source),
                "-o",
                str(tmp_path / "o.jsonl"),
                "--pairs",
                "3-5",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        job_id = done.stdout.strip()
        wait_done(cluster.redis_url, job_id, timeout_s=300)
    status = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", job_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(status.stdout)
    assert (report["state"], report["total"], report["written"]) == ("done", 2, 2)
    assert len(read_jsonl(tmp_path / "o.jsonl")) == 2


def test_status_of_unknown_job_and_unreachable_redis_are_clear_errors(redis_url):
    env = {"IMAGEQA_REDIS_URL": redis_url}
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "nope"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "no job" in out.stderr
    env = {"IMAGEQA_REDIS_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "x"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "does not answer" in out.stderr
    assert job_status(redis_client(redis_url), "nope") is None


def test_a_plain_celery_client_can_enqueue_without_this_project(cluster, media, tmp_path):
    from celery import Celery

    (image,) = make_images(media, 1)
    client = Celery("other-app", broker=cluster.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    kwargs = {
        "job_id": "other-app-job",
        "item_id": "item-1",
        "row_index": 0,
        "images": [str(image)],
        "row": {"image": [str(image)], "source": "other-app"},
        "params": {"max_question_chars": 40, "max_answer_chars": 40},
    }
    client.send_task("imageqa.generate", kwargs=kwargs, queue="imageqa.generate")
    with CollectorThread(cluster.redis_url, output_dir=tmp_path / "adopted") as collector:
        deadline = time.monotonic() + 300
        while collector.collector.rows_written + collector.collector.rows_failed == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    (row,) = read_jsonl(tmp_path / "adopted" / "other-app-job.jsonl")
    assert row["source"] == "other-app"
    assert_pairs(row)
