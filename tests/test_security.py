"""Security: JSON-only messages (pickle is never executed), contract checks on raw messages from other
clients, and a password-protected Redis for every role."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer

from producer.broker import redis_client
from producer.contract import GenerationParams, QAPair, ResultRecord
from producer.enqueue import enqueue_file
from producer.jobs import JobRecord
from producer.results import publish
from producer.settings import ProducerSettings
from tests.helpers import CollectorThread, WorkerProcess, make_images, read_jsonl, wait_done, write_jsonl
from workers.collector import Collector
from workers.settings import CollectorSettings

PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)


class _Exploit:
    """Unpickling this creates a file: proof that a pickle payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _publish_raw(redis_url: str, body: object, serializer: str, headers: dict) -> None:
    with Connection(redis_url) as conn:
        producer = Producer(
            conn.channel(), exchange=Exchange("")
        )  # the default exchange: straight to the queue
        producer.publish(
            body, routing_key="imageqa.generate", serializer=serializer, headers=headers, declare=[]
        )


def _wait_job(cluster, media: Path, tmp_path: Path) -> list:  # type: ignore[no-untyped-def]
    (image,) = make_images(media, 1)
    source = write_jsonl(media / "in.jsonl", [{"image": image.name}])
    with CollectorThread(cluster.redis_url, output_dir=tmp_path / "adopted"):
        summary = enqueue_file(
            source,
            tmp_path / "out.jsonl",
            settings=ProducerSettings(redis_url=cluster.redis_url),
            params=PARAMS,
        )
        wait_done(cluster.redis_url, summary.job_id, timeout_s=60)
    return read_jsonl(tmp_path / "out.jsonl")


def test_a_pickle_message_is_rejected_and_never_executed(fake_cluster, media, tmp_path):
    marker = tmp_path / "pwned"
    headers = {"task": "imageqa.generate", "id": "evil-1", "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    _publish_raw(fake_cluster.redis_url, ((), {"x": _Exploit(marker)}, {}), "pickle", headers)
    # The worker refuses this very message (it logs the body, which names this test's marker file)
    # where unpickling would have run the payload, and the payload did not run,
    refused = "Refusing to deserialize untrusted content of type pickle"
    fake_cluster.worker.wait_for(lambda log: refused in log and f"touch {marker}" in log, 30)
    assert not marker.exists()
    # and the worker is still there and serves the next job.
    assert len(_wait_job(fake_cluster, media, tmp_path)) == 1


def test_messages_with_unknown_or_missing_fields(fake_cluster, media, tmp_path):
    from celery import Celery

    (image,) = make_images(media, 1)
    client = Celery("other", broker=fake_cluster.redis_url)
    client.conf.update(task_serializer="json", accept_content=["json"])
    base = {"job_id": "raw-job", "row_index": 0, "images": [str(image)], "row": {"image": str(image)}}
    client.send_task(
        "imageqa.generate", kwargs={**base, "item_id": "a", "surprise": 1}, queue="imageqa.generate"
    )
    client.send_task(
        "imageqa.generate", kwargs={**base, "item_id": "b", "images": []}, queue="imageqa.generate"
    )
    client.send_task("imageqa.generate", kwargs={"job_id": "raw-job"}, queue="imageqa.generate")  # no item id
    client.send_task("imageqa.generate", kwargs={**base, "item_id": "c"}, queue="imageqa.generate")
    with CollectorThread(fake_cluster.redis_url, output_dir=tmp_path) as collector:
        deadline = time.monotonic() + 60
        while collector.collector.rows_written + collector.collector.rows_failed < 3:
            collector.check()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    errors = {e["item_id"]: e["error"] for e in read_jsonl(tmp_path / "raw-job.errors.jsonl")}
    assert {item: error["code"] for item, error in errors.items()} == {
        "a": "message_invalid",
        "b": "message_invalid",
    }
    assert "surprise" in errors["a"]["message"]
    assert [r["row"] if "row" in r else r["image"] for r in read_jsonl(tmp_path / "raw-job.jsonl")] == [
        str(image)
    ]
    # The message without ids may be handled after the others (threads pool): wait for its log line.
    fake_cluster.worker.wait_for(lambda log: "without job_id/item_id" in log, 30)


@pytest.fixture
def password_redis(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            "s3cret-pw",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            redis_client(url).ping()
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    yield url, port
    proc.kill()
    proc.wait()


def test_every_role_works_with_a_password_protected_redis(password_redis, media, tmp_path):
    url, port = password_redis
    images = make_images(media, 3)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name} for p in images])
    env = {"IMAGEQA_REDIS_URL": url, "IMAGEQA_MEDIA_ROOTS": str(media), "IMAGEQA_ENGINE": "fake"}
    worker = WorkerProcess(env, tmp_path / "worker.log").start(60)
    collector = subprocess.Popen([sys.executable, "-m", "workers.cli", "collect"], env={**os.environ, **env})
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "enqueue",
                str(source),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--max-question-chars",
                "40",
                "--max-answer-chars",
                "40",
            ],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        wait_done(url, done.stdout.strip(), timeout_s=60)
    finally:
        collector.terminate()
        collector.wait(30)
        worker.stop()
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 3
    assert "s3cret-pw" not in worker.log()

    # A wrong password is a clear error, with the password itself not printed
    bad = {**os.environ, "IMAGEQA_REDIS_URL": f"redis://:wrong-pw@127.0.0.1:{port}/0"}
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "enqueue", str(source), "-o", str(tmp_path / "x.jsonl")],
        env=bad,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "does not answer" in out.stderr and "wrong-pw" not in out.stderr


def test_job_ids_that_differ_never_share_a_file(redis_url, tmp_path):
    r = redis_client(redis_url)
    ids = ["a_b", "a/b", "a:b", "a?b", "../a_b", "é", "è", "job", "job.errors", "x" * 300, "x" * 301]
    paths = [JobRecord(r, job_id).adopt(tmp_path).output_path for job_id in ids]
    errors = [JobRecord(r, job_id).adopt(tmp_path).errors_path for job_id in ids]
    files = [Path(p) for p in paths + errors]
    assert len(set(files)) == len(files)
    assert all(f.parent == tmp_path and len(f.name) < 255 for f in files)
    # Plain ids keep their own name.
    assert paths[0] == str(tmp_path / "a_b.jsonl") and paths[7] == str(tmp_path / "job.jsonl")


def test_the_collector_writes_jobs_with_look_alike_ids_to_separate_files(redis_url, tmp_path):
    pipe = redis_client(redis_url).pipeline(transaction=False)
    for i, job_id in enumerate(["a/b", "a:b", "a_b"]):
        pair = QAPair(question="What is it?", answer="A thing.")
        publish(pipe, ResultRecord(job_id=job_id, item_id="i", row_index=i, row={"n": i}, qa_pairs=[pair]))
    pipe.execute()
    collector = Collector(CollectorSettings(redis_url=redis_url, output_dir=tmp_path, metrics_port=0))
    collector.ensure_group()
    collector.step()
    outputs = sorted(tmp_path.glob("*.jsonl"))
    assert len(outputs) == 3
    assert sorted(row["n"] for f in outputs for row in read_jsonl(f)) == [0, 1, 2]
