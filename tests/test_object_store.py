"""Rows and images in an object store: a real S3 API (moto's server on 127.0.0.1), the producer reading
``s3://`` inputs, and real workers fetching the image bytes themselves with the standard AWS variables."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from pathlib import Path

import boto3
import datasets
import orjson
import pytest

from producer.broker import redis_client
from producer.constants import QUEUE_GENERATE
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.errors import ErrorCode, ImageError
from producer.inputs import read_rows, resolve_ref
from producer.settings import ProducerSettings
from producer.sources import location, parent
from tests.conftest import ObjectStore
from tests.helpers import EXAMPLES, CollectorThread, make_images, read_jsonl, run_cli, wait_done
from workers.images import read_bytes
from workers.settings import ImageSettings

SHORT = GenerationParams(max_question_chars=40, max_answer_chars=40)


@pytest.fixture
def bucket(object_store: ObjectStore, request: pytest.FixtureRequest) -> str:
    """A new empty bucket in the test store, named after the test."""
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def put(bucket: str, key: str, data: bytes) -> str:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def upload_images(bucket: str, prefix: str, paths: list[Path]) -> list[str]:
    return [put(bucket, f"{prefix}/{p.name}", p.read_bytes()) for p in paths]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def image_dataset(paths: list[Path]) -> datasets.Dataset:
    """A Hugging Face dataset with an Image feature: the images' bytes inside the table."""
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    return datasets.Dataset.from_dict({"image": images, "caption": [p.stem for p in paths]}).cast_column(
        "image", datasets.Image()
    )


def parquet_bytes(ds: datasets.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.to_parquet(buffer)
    return buffer.getvalue()


def sizes(rows: list[dict]) -> list[str]:
    """The image size the fake engine reports in each output row ("WxH")."""
    return sorted(
        next(p["answer"] for p in r["qa_pairs"] if p["question"] == "What size is the image?") for r in rows
    )


def test_enqueue_from_a_bucket_reads_rows_and_images_there(fake_cluster, bucket, tmp_path):
    # Given rows in a bucket naming images beside them (relative), elsewhere in the bucket, and missing
    images = make_images(tmp_path / "img", 3)
    upload_images(bucket, "job/img", images[:2])
    (elsewhere,) = upload_images(bucket, "other", images[2:])
    rows_url = put(
        bucket,
        "job/rows.jsonl",
        jsonl(
            [
                {"image": "img/img000.jpg"},
                {"image": ["img/img001.jpg"]},
                {"image": elsewhere},
                {"image": "img/gone.jpg"},
            ]
        ),
    )
    out = tmp_path / "out.jsonl"

    # When the user enqueues the bucket URL for the running cluster
    with CollectorThread(fake_cluster.redis_url):
        done = run_cli(fake_cluster.redis_url, "enqueue", rows_url, "-o", str(out), "--pairs", "3")
        assert done.returncode == 0, done.stderr
        st = wait_done(fake_cluster.redis_url, done.stdout.strip().splitlines()[-1])

    # Then the workers read each image from the bucket; the missing one is an error row
    assert (st.done, st.failed) == (4, 1)
    written = read_jsonl(out)
    assert sizes(written) == sorted(f"{96 + i % 7}x64" for i in range(3))
    assert sorted(str(r["image"]) for r in written) == sorted(
        ["img/img000.jpg", "['img/img001.jpg']", elsewhere]
    )
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["row"]["image"], e["error"]["code"]) for e in errors] == [("img/gone.jpg", "image_not_found")]
    assert f"s3://{bucket}/job/img/gone.jpg" in errors[0]["error"]["message"]


def queued_kwargs(redis_url: str) -> list[tuple[int, dict]]:
    """(size in Redis, task kwargs) of each ``imageqa.generate`` message waiting in the queue."""
    r = redis_client(redis_url)
    try:
        messages = r.lrange(QUEUE_GENERATE, 0, -1)
    finally:
        r.close()
    return [(len(m), orjson.loads(base64.b64decode(orjson.loads(m)["body"]))[1]) for m in messages]


def test_a_datasets_parquet_in_a_bucket_is_sent_as_references(object_store, bucket, redis_url, tmp_path):
    # Given a Hugging Face dataset (Image feature: the bytes are inside the Parquet file) in a bucket
    images = sorted(EXAMPLES.glob("*.jpg")) + make_images(tmp_path / "img", 2)
    url = put(bucket, "ds/train.parquet", parquet_bytes(image_dataset(images)))

    # When it is enqueued (on a Redis no worker reads, to look at the queue)
    summary = enqueue_file(
        url, tmp_path / "o.jsonl", settings=ProducerSettings(redis_url=redis_url), params=SHORT
    )

    # Then each task names its Parquet cell, stays small, and carries no image bytes
    queued = queued_kwargs(redis_url)
    assert summary.enqueued == 5 and len(queued) == 5
    assert all(size < 4000 for size, _ in queued)
    assert min(p.stat().st_size for p in images[:3]) > 50_000, "photos far larger than a message"
    assert sorted(k["images"][0] for _, k in queued) == [
        f"{url}#parquet:col=image&rg=0&row={i}" for i in range(5)
    ]
    assert sorted(k["row"]["caption"] for _, k in queued) == [p.stem for p in images]


def test_the_workers_read_each_image_from_a_datasets_parquet_in_a_bucket(fake_cluster, bucket, tmp_path):
    images = make_images(tmp_path / "img", 5)
    url = put(bucket, "ds/train.parquet", parquet_bytes(image_dataset(images)))
    out = tmp_path / "out.jsonl"

    with CollectorThread(fake_cluster.redis_url):
        done = run_cli(fake_cluster.redis_url, "enqueue", url, "-o", str(out), "--pairs", "3")
        assert done.returncode == 0, done.stderr
        st = wait_done(fake_cluster.redis_url, done.stdout.strip().splitlines()[-1])

    assert (st.done, st.failed) == (5, 0)
    written = read_jsonl(out)
    assert sizes(written) == sorted(f"{96 + i % 7}x64" for i in range(5))
    assert sorted(r["caption"] for r in written) == [p.stem for p in images]
    assert all(r["image"].startswith(f"{url}#parquet:") for r in written)


def test_a_rerun_of_a_datasets_parquet_skips_every_row(fake_cluster, bucket, tmp_path):
    images = make_images(tmp_path / "img", 3)
    url = put(bucket, "train.parquet", parquet_bytes(image_dataset(images + images[:1])))
    out = tmp_path / "out.jsonl"
    settings = ProducerSettings(redis_url=fake_cluster.redis_url)
    with CollectorThread(fake_cluster.redis_url):
        first = enqueue_file(url, out, settings=settings, params=SHORT)
        wait_done(fake_cluster.redis_url, first.job_id)
        again = enqueue_file(url, out, settings=settings, params=SHORT)
    assert (first.enqueued, again.skipped, again.enqueued) == (4, 4, 0)
    assert len(read_jsonl(out)) == 4, "the repeated image is its own row, and each row is written once"


def test_missing_inputs_and_refused_stores_give_clear_errors(object_store, bucket, tmp_path, redis_url):
    # A rows file that is not there: one clear line, not a traceback
    done = run_cli(redis_url, "enqueue", f"s3://{bucket}/nope.jsonl", "-o", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2
    assert "input not found" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr

    # A worker reads only the stores it is allowed to
    url = put(bucket, "a.jpg", make_images(tmp_path, 1)[0].read_bytes())
    only_other = ImageSettings(allowed_stores=["s3://another-bucket", "gs"])
    with pytest.raises(ImageError) as refused:
        read_bytes(url, only_other)
    assert refused.value.code == ErrorCode.STORAGE_DENIED
    assert read_bytes(url, ImageSettings(allowed_stores=[f"s3://{bucket}"]))[:2] == b"\xff\xd8"
    with pytest.raises(ImageError) as none:
        read_bytes(url, ImageSettings(allowed_stores=[]))
    assert none.value.code == ErrorCode.STORAGE_DENIED
    with pytest.raises(ImageError) as missing:
        read_bytes(f"s3://{bucket}/b.jpg", ImageSettings())
    assert missing.value.code == ErrorCode.IMAGE_NOT_FOUND
    with pytest.raises(ImageError) as too_large:
        read_bytes(url, ImageSettings(max_image_bytes=100))
    assert too_large.value.code == ErrorCode.IMAGE_TOO_LARGE


@pytest.mark.engine
def test_the_real_engine_reads_images_from_a_bucket_and_from_a_datasets_parquet(
    engine_cluster, bucket, tmp_path
):
    images = make_images(tmp_path / "img", 4)
    upload_images(bucket, "rows/img", images[:2])
    rows_url = put(bucket, "rows/rows.jsonl", jsonl([{"image": f"img/{p.name}"} for p in images[:2]]))
    parquet_url = put(bucket, "ds/train.parquet", parquet_bytes(image_dataset(images[2:])))
    settings = ProducerSettings(redis_url=engine_cluster.redis_url)
    params = GenerationParams(model=engine_cluster.model, max_question_chars=40, max_answer_chars=40)

    with CollectorThread(engine_cluster.redis_url):
        jobs = {
            name: enqueue_file(url, tmp_path / f"{name}.jsonl", settings=settings, params=params)
            for name, url in (("rows", rows_url), ("parquet", parquet_url))
        }
        for job in jobs.values():
            wait_done(engine_cluster.redis_url, job.job_id, timeout_s=600)

    for name in jobs:
        assert read_jsonl(tmp_path / f"{name}.errors.jsonl") == []
        rows = read_jsonl(tmp_path / f"{name}.jsonl")
        assert len(rows) == 2
        for row in rows:
            assert 3 <= len(row["qa_pairs"]) <= 5
            assert all(p["question"].strip() and p["answer"].strip() for p in row["qa_pairs"])


def test_rows_over_http_resolve_images_beside_them_and_keep_the_address_rules(tmp_path):
    # Given rows served over http on a loopback address, naming an image beside them
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "rows.jsonl").write_bytes(jsonl([{"image": "img/a.jpg", "n": 1}]))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/job"
        (raw,) = read_rows(f"{base}/rows.jsonl")
    finally:
        server.shutdown()
        server.server_close()

    # Then the producer reads the row and resolves the image against the rows' folder
    assert raw.row == {"image": "img/a.jpg", "n": 1}
    ref = resolve_ref(raw.row["image"], parent(location(f"{base}/rows.jsonl")))
    assert ref == f"{base}/img/a.jpg"
    # And a worker still refuses an image on a private address
    with pytest.raises(ImageError) as refused:
        read_bytes(ref, ImageSettings())
    assert refused.value.code == ErrorCode.URL_NOT_ALLOWED
