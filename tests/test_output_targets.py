"""Outputs by suffix and place: Parquet, ``--no-meta`` JSONL and object storage (a real S3 API:
moto's server on loopback) are made from the collector's journal once the job completes, in input
order, written once even when the collector is killed before or after."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import fsspec
import pytest

from producer.broker import redis_client
from producer.constants import JOB_FINISHED_AT
from producer.contract import PROMPT_VERSION, GenerationParams
from producer.enqueue import enqueue_file
from producer.jobs import JobRecord, job_status
from producer.settings import ProducerSettings
from tests.conftest import Cluster, ObjectStore
from tests.helpers import CollectorThread, make_images, read_jsonl, run_cli, wait_done, write_jsonl
from workers.collector import Collector
from workers.settings import CollectorSettings

PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)


@pytest.fixture(params=["fake", pytest.param("engine", marks=pytest.mark.engine)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


@pytest.fixture
def s3_server(object_store: ObjectStore) -> str:
    """The session's S3 server (`tests.conftest.object_store`); the AWS variables point at it."""
    return object_store.endpoint_url


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    name = "out-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(name):
        fs.mkdir(name)
    return name


def _input(media: Path, count: int = 5) -> tuple[Path, list[dict]]:
    images = make_images(media, count)
    rows: list[dict] = [{"image": [p.name], "id": i} for i, p in enumerate(images)]
    rows.insert(2, {"image": ["missing.jpg"], "id": "missing"})
    return write_jsonl(media / "in.jsonl", rows), rows


def _enqueue(redis_url: str, source: Path, output: str, **kw: object) -> str:
    return enqueue_file(
        source, output, settings=ProducerSettings(redis_url=redis_url), params=PARAMS, **kw
    ).job_id  # type: ignore[arg-type]


def _load(path: str | Path, cache: Path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(cache))


def test_a_parquet_output_is_written_in_input_order_when_the_job_completes(cluster: Cluster, media, tmp_path):
    source, _ = _input(media)
    out = tmp_path / "out.parquet"
    with CollectorThread(cluster.redis_url, output_dir=tmp_path / "adopted"):
        job_id = _enqueue(cluster.redis_url, source, str(out))
        status = wait_done(cluster.redis_url, job_id, timeout_s=300)

    # The rows, in input order, with their pairs and qa_meta as structs; the failed row in the errors file
    ds = _load(out, tmp_path / "hf")
    assert ds["id"] == list(range(5))
    assert [m["row_index"] for m in ds["qa_meta"]] == [0, 1, 3, 4, 5]
    for row, meta in zip(ds["qa_pairs"], ds["qa_meta"], strict=True):
        assert 3 <= len(row) <= 5 and all(p["question"] and p["answer"] for p in row)
        assert (
            meta["model"] == cluster.model
            and meta["prompt_name"] == PROMPT_VERSION
            and meta["qa_stats"]["tries"] >= 1
        )
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["row_index"], e["error"]["code"]) for e in errors] == [(2, "image_not_found")]
    # The journal it was made from stays beside it, for a rerun or a retry
    assert len(read_jsonl(tmp_path / "out.parquet.journal.jsonl")) == 5
    assert status.finished and status.output == str(out) and status.published_at is not None
    shown = run_cli(cluster.redis_url, "status", job_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["output"] == str(out)


def test_no_meta_leaves_qa_meta_out_and_export_ordered_still_works(fake_cluster: Cluster, media, tmp_path):
    source, _ = _input(media)
    out = tmp_path / "plain.jsonl"
    with CollectorThread(fake_cluster.redis_url):
        done = run_cli(fake_cluster.redis_url, "enqueue", str(source), "-o", str(out), "--no-meta")
        assert done.returncode == 0, done.stderr
        wait_done(fake_cluster.redis_url, done.stdout.strip())

    written = read_jsonl(out)
    assert [set(row) for row in written] == [{"image", "id", "qa_pairs"}] * 5
    assert [row["id"] for row in written] == [0, 1, 2, 3, 4]
    llava = tmp_path / "llava.jsonl"
    exported = run_cli(fake_cluster.redis_url, "export", str(out), "--ordered", "-o", str(llava))
    assert exported.returncode == 0, exported.stderr
    assert [r["image"] for r in read_jsonl(llava)] == [row["image"][0] for row in written]


def test_an_s3_output_is_uploaded_with_its_errors_next_to_it(fake_cluster: Cluster, media, tmp_path, bucket):
    source, _ = _input(media)
    target = f"s3://{bucket}/runs/out.parquet"
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path / "collector"):
        job_id = _enqueue(fake_cluster.redis_url, source, target)
        status = wait_done(fake_cluster.redis_url, job_id)

    assert status.output == target and status.errors == f"s3://{bucket}/runs/out.errors.jsonl"
    with fsspec.open(target, "rb") as f:
        local = tmp_path / "downloaded.parquet"
        local.write_bytes(f.read())
    assert [m["row_index"] for m in _load(local, tmp_path / "hf")["qa_meta"]] == [0, 1, 3, 4, 5]
    with fsspec.open(status.errors, "rt") as f:
        assert '"image_not_found"' in f.read()
    # The journal and local errors file are in the collector's output folder
    assert (
        len(read_jsonl(Path(status.output_path))) == 5
        and Path(status.output_path).parent == tmp_path / "collector"
    )
    # And the upload exports straight from the bucket
    shown = run_cli(fake_cluster.redis_url, "status", job_id, "--json")
    assert json.loads(shown.stdout)["output"] == target
    llava = tmp_path / "llava.json"
    exported = run_cli(
        fake_cluster.redis_url, "export", target, "--format", "llava", "--ordered", "-o", str(llava)
    )
    assert exported.returncode == 0, exported.stderr
    assert (
        len(
            datasets.load_dataset(
                "json", data_files=str(llava), split="train", cache_dir=str(tmp_path / "hf")
            )
        )
        == 5
    )


def test_a_collector_killed_before_the_upload_uploads_once_after_a_restart(
    fake_cluster: Cluster, media, tmp_path, bucket, monkeypatch
):
    # Given a job whose every row a collector wrote, the collector dying before it could upload
    source, _ = _input(media, 3)
    target = f"s3://{bucket}/out.jsonl"
    settings = CollectorSettings(redis_url=fake_cluster.redis_url, output_dir=tmp_path / "c", metrics_port=0)
    dying = Collector(settings)
    monkeypatch.setattr(Collector, "publish_pending", lambda self: None)
    dying.start()
    job_id = _enqueue(fake_cluster.redis_url, source, target)
    r = redis_client(fake_cluster.redis_url)
    deadline = time.monotonic() + 60
    while not r.hexists(JobRecord(r, job_id).key, JOB_FINISHED_AT):
        dying.step(block_ms=100)
        assert time.monotonic() < deadline, "the job did not complete"
    monkeypatch.undo()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(target)
    st = job_status(r, job_id)
    assert st is not None and not st.finished, "a job is not finished before its output is written"

    # When a collector starts again, it uploads the output
    Collector(settings).start()
    fs.invalidate_cache()
    assert fs.exists(target)
    with fsspec.open(target, "rt") as f:
        assert [row["id"] for row in map(json.loads, f.read().splitlines())] == [0, 1, 2]
    st = job_status(r, job_id)
    assert st is not None and st.finished and st.published_at is not None

    # And a collector started after that leaves the uploaded output alone
    fs.rm(target)
    Collector(settings).start()
    fs.invalidate_cache()
    assert not fs.exists(target)


def test_an_upload_that_fails_is_shown_and_made_by_a_later_try(
    fake_cluster: Cluster, media, tmp_path, s3_server
):
    source, _ = _input(media, 2)
    target = "s3://no-such-bucket-yet/out.jsonl"
    settings = CollectorSettings(redis_url=fake_cluster.redis_url, output_dir=tmp_path / "c", metrics_port=0)
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path / "c"):
        job_id = _enqueue(fake_cluster.redis_url, source, target)
        status = wait_done(fake_cluster.redis_url, job_id)
    # The wait ends with the failure, which status shows; the rows are in the journal
    assert status.publish_error and "no-such-bucket-yet" in status.publish_error
    shown = run_cli(fake_cluster.redis_url, "status", job_id)
    assert "not written yet" in shown.stderr and "tries again" in shown.stderr
    assert len(read_jsonl(Path(status.output_path))) == 2

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("no-such-bucket-yet")
    Collector(settings).publish_pending()
    st = job_status(redis_client(fake_cluster.redis_url), job_id)
    assert st is not None and st.published_at is not None and not st.publish_error
    with fsspec.open(target, "rt") as f:
        assert len(f.read().splitlines()) == 2
