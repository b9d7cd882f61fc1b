"""The Python API other applications call (`producer.enqueue_rows`, `producer.wait`), ``imageqa
enqueue``'s output, and job files (``--config job.yaml``) for ``enqueue`` and ``run``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import orjson
import pytest
import redis

import producer
from producer.broker import celery_app, redis_client
from producer.constants import QUEUE_GENERATE
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.errors import ImageQAError
from producer.jobs import JobStatus, job_status
from producer.resend import resend_missing
from producer.settings import ProducerSettings
from tests.conftest import Cluster
from tests.helpers import CollectorThread, make_images, read_jsonl, run_cli, write_jsonl
from tests.test_run import canonical, imageqa_run


def queued(r: redis.Redis) -> list[dict]:
    """The task messages waiting in the queue: their headers (task id) and their kwargs."""
    messages = []
    for raw in r.lrange(QUEUE_GENERATE, 0, -1):
        message = orjson.loads(raw)
        body = orjson.loads(base64.b64decode(message["body"]))
        messages.append({"id": message["headers"]["id"], "kwargs": body[1]})
    return messages


def test_the_api_is_exported_with_its_documentation():
    assert callable(producer.enqueue_rows) and callable(producer.wait)
    assert "returns the job id" in producer.enqueue_rows.__doc__
    assert "JobStatus" in producer.wait.__doc__
    assert {"enqueue_rows", "wait", "GenerationParams", "JobStatus"} <= set(producer.__all__)


@pytest.fixture(params=["fake", pytest.param("engine", marks=pytest.mark.engine)])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


def test_rows_from_a_generator_become_a_job_that_wait_follows_to_the_end(
    cluster: Cluster, media: Path, tmp_path: Path
):
    # Given images on disk, named relative to a folder, and an application's generator of rows
    images = make_images(media, 4)
    rows = [{"image": p.name, "id": i} for i, p in enumerate(images)]
    rows.append({"image": "missing.jpg", "id": 4})
    rows.append({"id": 5})  # no image
    out = tmp_path / "qa.jsonl"
    seen: list[JobStatus] = []

    with CollectorThread(cluster.redis_url):
        # When it enqueues them without a file, then waits with a progress callback
        job_id = producer.enqueue_rows(
            (row for row in rows),
            output=out,
            media_base=media,
            redis_url=cluster.redis_url,
            max_pairs=4,
            temperature=0.5,
            max_question_chars=40,
            max_answer_chars=40,
        )
        final = producer.wait(job_id, progress=seen.append, redis_url=cluster.redis_url, timeout_s=120)

    # Then every row lands once: four in the output, the two bad ones in the errors file
    assert final.finished and (final.state, final.written, final.failed) == ("done", 4, 2)
    assert final.failures == {"image_not_found": 1, "image_key_missing": 1}
    assert sorted(row["id"] for row in read_jsonl(out)) == [0, 1, 2, 3]
    assert all(3 <= len(row["qa_pairs"]) <= 4 for row in read_jsonl(out))
    errors = read_jsonl(tmp_path / "qa.errors.jsonl")
    assert sorted(e["row"]["id"] for e in errors) == [4, 5]
    # The callback saw the job's progress up to its end
    assert seen[-1].done == 6 and seen == sorted(seen, key=lambda st: st.done)
    # And sending the same rows again continues the same job: nothing is written twice
    again = producer.enqueue_rows(
        rows,
        output=out,
        media_base=media,
        redis_url=cluster.redis_url,
        max_pairs=4,
        temperature=0.5,
        max_question_chars=40,
        max_answer_chars=40,
    )
    assert again == job_id
    st = job_status(redis_client(cluster.redis_url), job_id)
    assert st is not None and (st.skipped, st.total, st.done) == (6, 6, 6)
    assert len(read_jsonl(out)) == 4


def test_an_unknown_generation_setting_names_the_closest_one(tmp_path: Path):
    with pytest.raises(ValueError, match="'max_pair' \\(did you mean 'max_pairs'\\?\\)"):
        producer.enqueue_rows([{"image": "a.jpg"}], output=tmp_path / "o.jsonl", max_pair=3)
    with pytest.raises(TypeError, match="wrap one row in a list"):
        producer.enqueue_rows({"image": "a.jpg"}, output=tmp_path / "o.jsonl")


def test_rows_lost_in_transit_are_sent_again_from_the_rows_kept_with_the_job(redis_url: str, tmp_path: Path):
    r = redis_client(redis_url)
    app = celery_app(redis_url, 30)
    rows = [{"image": f"/data/{i}.jpg"} for i in range(3)]
    kept = producer.enqueue_rows(rows, output=tmp_path / "kept.jsonl", redis_url=redis_url)
    sent = {m["id"] for m in queued(r)}
    assert len(sent) == 3

    # When the queue loses every task (a broker that lost them, workers killed mid-delivery)
    r.delete(QUEUE_GENERATE)
    assert resend_missing(app, r, kept) == 3

    # Then the same rows are queued again, as the same items, with no file to read them from
    again = queued(r)
    assert {m["id"] for m in again} == sent
    assert sorted(m["kwargs"]["row"]["image"] for m in again) == [row["image"] for row in rows]
    st = job_status(r, kept)
    assert st is not None and st.resent == 3

    # Rows not kept cannot be sent again from here: a clear error says who can
    r.delete(QUEUE_GENERATE)
    lean = producer.enqueue_rows(rows, output=tmp_path / "lean.jsonl", redis_url=redis_url, keep_rows=False)
    with pytest.raises(ImageQAError, match=r"keep_rows=False.*same rows and job id"):
        resend_missing(app, r, lean)


def test_enqueue_prints_the_job_id_first_and_names_it_before_any_row_is_sent(redis_url: str, tmp_path: Path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"image": f"/data/{i}.jpg"} for i in range(3)])
    r = redis_client(redis_url)
    at_announce: list[int] = []

    summary = enqueue_file(
        source,
        tmp_path / "out.jsonl",
        settings=ProducerSettings(redis_url=redis_url),
        params=GenerationParams(),
        on_job=lambda job_id: at_announce.append(r.llen(QUEUE_GENERATE)),
    )
    assert at_announce == [0] and r.llen(QUEUE_GENERATE) == 3

    r.flushdb()
    done = run_cli(redis_url, "enqueue", str(source), "-o", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [summary.job_id]
    assert "3 rows: 3 enqueued" in done.stderr


def test_a_job_file_gives_the_same_job_and_items_as_the_flags_and_flags_win(redis_url: str, tmp_path: Path):
    folder = tmp_path / "job"
    folder.mkdir()
    write_jsonl(folder / "in.jsonl", [{"image": f"/data/{i}.jpg"} for i in range(5)])
    flags = [
        str(folder / "in.jsonl"),
        "-o",
        str(folder / "out" / "qa.jsonl"),
        "--pairs",
        "2-4",
        "--max-tokens",
        "512",
        "--skip-check",
        "refusal",
        "--verify",
        "--format",
        "jsonl",
    ]
    # Relative paths resolve against the job file's folder; either spelling of a flag is a key
    (folder / "job.yaml").write_text(
        "input: in.jsonl\noutput: out/qa.jsonl\npairs: 2-4\nmax_tokens: 512\n"
        "skip-check: [refusal]\nverify: true\nformat: jsonl\n"
    )
    r = redis_client(redis_url)

    by_flags = run_cli(redis_url, "enqueue", *flags)
    assert by_flags.returncode == 0, by_flags.stderr
    tasks = queued(r)
    r.flushdb()
    by_file = run_cli(redis_url, "enqueue", "--config", str(folder / "job.yaml"))
    assert by_file.returncode == 0, by_file.stderr

    assert by_file.stdout == by_flags.stdout
    assert sorted(m["id"] for m in queued(r)) == sorted(m["id"] for m in tasks)
    params = queued(r)[0]["kwargs"]["params"]
    assert (params["min_pairs"], params["max_pairs"], params["max_tokens"]) == (2, 4, 512)
    assert (params["reject_refusals"], params["verify"]) == (False, True)

    # An option on the command line wins over the file
    r.flushdb()
    over = run_cli(redis_url, "enqueue", "--config", str(folder / "job.yaml"), "--max-tokens", "256")
    assert over.returncode == 0, over.stderr
    assert {m["kwargs"]["params"]["max_tokens"] for m in queued(r)} == {256}


@pytest.mark.parametrize("command", ["enqueue", "run"])
def test_an_unknown_key_in_a_job_file_names_the_closest_option(command: str, redis_url: str, tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text("input: in.jsonl\noutput: o.jsonl\nmax-token: 64\n")
    done = run_cli(redis_url, command, "--config", str(job))
    assert done.returncode == 2
    message = " ".join(done.stderr.replace("│", " ").split())
    assert "unknown option 'max-token'" in message and "did you mean 'max-tokens'?" in message


def test_run_with_a_job_file_writes_the_same_rows_as_with_flags(tmp_path: Path):
    folder = tmp_path / "photos"
    make_images(folder, 3)
    flags = [str(folder), "-o", str(tmp_path / "flags.jsonl"), "--engine", "fake", "--pairs", "2-3"]
    (tmp_path / "job.yaml").write_text(
        json.dumps({"input": "photos", "output": "file.jsonl", "engine": "fake", "pairs": "2-3"})
    )

    by_flags = imageqa_run(flags, tmp_path)
    by_file = imageqa_run(["--config", str(tmp_path / "job.yaml")], tmp_path)

    assert by_flags.returncode == 0, by_flags.stderr
    assert by_file.returncode == 0, by_file.stderr
    rows = read_jsonl(tmp_path / "file.jsonl")
    assert len(rows) == 3 and canonical(rows) == canonical(read_jsonl(tmp_path / "flags.jsonl"))
