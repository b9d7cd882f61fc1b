"""Recovery without a person: the collector re-sends rows lost in transit, and ``imageqa retry`` sends
failed rows again, with a real Redis, a real worker (fake engine) and the collector."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.broker import celery_app, redis_client
from producer.constants import QUEUE_GENERATE, job_retrying_key
from producer.contract import ErrorInfo, GenerationParams, QAPair, ResultRecord
from producer.enqueue import enqueue_file
from producer.errors import ErrorCode
from producer.jobs import JobRecord, job_status
from producer.results import publish
from producer.retry import retry_job
from producer.settings import ProducerSettings
from tests.helpers import (
    CollectorThread,
    WorkerProcess,
    make_images,
    read_jsonl,
    run_cli,
    wait_done,
    write_jsonl,
)
from workers import collector as collector_module
from workers import retried, stall
from workers.collector import Collector
from workers.settings import CollectorSettings

PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)
URL = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/9"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(URL, *args)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A slow fake-engine worker (two tasks at a time, 0.2 s each) on database 9; yields its media root."""
    media = tmp_path_factory.mktemp("recovery-media")
    redis_client(URL).flushdb()
    env = {
        "IMAGEQA_REDIS_URL": URL,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_FAKE_DELAY_S": "0.2",
        "IMAGEQA_CONCURRENCY": "2",
        "IMAGEQA_ALLOW_PRIVATE_URLS": "1",
    }
    process = WorkerProcess(env, tmp_path_factory.mktemp("recovery-worker") / "w.log").start(60)
    yield media
    process.stop()


@pytest.fixture
def media(worker: Path, request: pytest.FixtureRequest) -> Path:
    redis_client(URL).flushdb()
    folder = worker / request.node.name
    folder.mkdir()
    return folder


def rows_by_n(output: Path) -> tuple[list[int], list[int]]:
    written = [row["n"] for row in read_jsonl(output)]
    failed = [e["row"]["n"] for e in read_jsonl(output.with_name(output.stem + ".errors.jsonl"))]
    return sorted(written), sorted(failed)


def test_the_collector_resends_a_task_lost_in_transit(media, tmp_path):
    images = make_images(media, 24)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])
    output = tmp_path / "out.jsonl"
    r = redis_client(URL)
    with CollectorThread(URL) as collector:  # the default stall settings: checks every 10 s, 30 s grace
        assert (collector.collector.settings.stall_check_s, collector.collector.settings.stall_grace_s) == (
            10,
            30,
        )
        job_id = enqueue_file(source, output, settings=ProducerSettings(redis_url=URL), params=PARAMS).job_id
        # Lose one queued task as Kombu's transport can: popped, never recorded as unacknowledged.
        lost = 0
        while not lost:
            message = r.lindex(QUEUE_GENERATE, 0)
            assert message is not None, "the queue drained before a task could be taken out"
            lost = r.lrem(QUEUE_GENERATE, 1, message)
        started = time.monotonic()
        st = wait_done(URL, job_id, timeout_s=90)  # no resend callback: only the collector re-sends
    assert st.state == "done" and st.written == 24 and st.failed == 0 and st.resent == 1
    assert time.monotonic() - started < 80
    written, failed = rows_by_n(output)
    assert written == list(range(24)) and failed == []
    report = json.loads(cli("status", job_id, "--json").stdout)
    assert report["resent"] == 1
    assert "1 rows re-sent after they were lost in transit" in " ".join(cli("status", job_id).stderr.split())


class _FlakyImages(http.server.BaseHTTPRequestHandler):
    """Serves the media folder's images, or 404 for every request while ``failing`` is set."""

    failing = threading.Event()
    folder: Path

    def do_GET(self) -> None:
        path = self.folder / self.path.lstrip("/")
        if self.failing.is_set() or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server(media: Path) -> Iterator[str]:
    _FlakyImages.folder = media
    _FlakyImages.failing.set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyImages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(5)


def test_retry_sends_transient_failures_again_and_each_row_stays_once(media, tmp_path, flaky_server):
    images = make_images(media, 9)
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images[:6])]
    rows += [{"image": f"{flaky_server}/{p.name}", "n": 6 + i} for i, p in enumerate(images[6:])]
    rows.append({"image": "gone.jpg", "n": 9})
    source = write_jsonl(media / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    with CollectorThread(URL):
        job_id = enqueue_file(source, output, settings=ProducerSettings(redis_url=URL), params=PARAMS).job_id
        st = wait_done(URL, job_id, timeout_s=60)
        assert st.written == 6 and st.failures == {"image_fetch_failed": 3, "image_not_found": 1}
        assert rows_by_n(output) == (list(range(6)), [6, 7, 8, 9])

        _FlakyImages.failing.clear()  # the image server is back
        result = cli("retry", job_id)
        assert result.returncode == 0, result.stderr
        assert "3 failed rows sent again (image_fetch_failed 3)" in " ".join(result.stderr.split())
        st = wait_done(URL, job_id, timeout_s=60)
        assert st.state == "done" and st.written == 9 and st.failed == 1 and st.retried == 3
        assert st.failures == {"image_not_found": 1}
        # Each row exactly once, across both files: the retried rows left the errors file.
        assert rows_by_n(output) == (list(range(9)), [9])

        # image_not_found is not transient: a plain retry leaves it alone, --code selects it.
        assert "0 failed rows sent again" in " ".join(cli("retry", job_id).stderr.split())
        app = celery_app(URL, 3600)
        summary = retry_job(app, redis_client(URL), job_id, [ErrorCode.IMAGE_NOT_FOUND])
        assert summary.retried == 1 and summary.by_code == {"image_not_found": 1}
        st = wait_done(URL, job_id, timeout_s=60)
    assert st.state == "done" and st.written == 9 and st.failed == 1 and st.retried == 4
    assert st.failures == {"image_not_found": 1}
    assert rows_by_n(output) == (list(range(9)), [9])
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["error"]["code"] for e in errors] == ["image_not_found"]
    report = json.loads(cli("status", job_id, "--json").stdout)
    assert report["retried"] == 4 and report["failed"] == 1 and report["written"] == 9
    assert cli("retry", job_id, "--code", "no_such_code").returncode == 2
    assert cli("retry", "no-such-job").returncode == 2


def test_retry_of_a_cancelled_job_finishes_it(media, tmp_path):
    images = make_images(media, 12)
    source = write_jsonl(media / "in.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])
    output = tmp_path / "out.jsonl"
    r = redis_client(URL)
    with CollectorThread(URL):
        job_id = enqueue_file(source, output, settings=ProducerSettings(redis_url=URL), params=PARAMS).job_id
        assert JobRecord(r, job_id).cancel()
        st = wait_done(URL, job_id, timeout_s=60)
        assert st.state == "cancelled" and st.failures.get("cancelled", 0) >= 6
        cancelled = st.failures["cancelled"]
        summary = retry_job(celery_app(URL, 3600), r, job_id)
        assert summary.retried == cancelled
        assert not JobRecord(r, job_id).is_cancelled()
        st = wait_done(URL, job_id, timeout_s=60)
    assert st.state == "done" and st.written == 12 and st.failed == 0 and st.failures == {}
    assert rows_by_n(output) == (list(range(12)), [])
    assert job_status(r, job_id) == st


class _Crash(BaseException):
    """A collector killed at this point."""


def _result(item: str, *, error: bool) -> ResultRecord:
    return ResultRecord(
        job_id="job",
        item_id=item,
        row_index=ord(item[-1]) - ord("a"),
        row={"image": ["x.jpg"], "n": item},
        qa_pairs=None if error else [QAPair(question="What is it?", answer="A thing.")],
        error=ErrorInfo(code=ErrorCode.ENGINE_ERROR, message="boom") if error else None,
        worker="test",
    )


@pytest.mark.parametrize("retry_ok", [True, False], ids=["succeeds", "fails-again"])
@pytest.mark.parametrize("crash", ["after_the_rewrite", "while_appending"])
def test_a_collector_killed_while_writing_a_retried_row_keeps_each_row_once(
    redis_url: str, tmp_path: Path, monkeypatch, crash: str, retry_ok: bool
):
    # Given a finished job with three failed rows, one of them taken back by a retry, which succeeds
    # or fails again
    r = redis_client(redis_url)
    output, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    job = JobRecord(r, "job")
    job.register(
        output_path=str(output),
        errors_path=str(errors),
        output_key="qa_pairs",
        input_path=str(tmp_path / "in.jsonl"),
        params_json=PARAMS.model_dump_json(),
    )
    pipe = r.pipeline()
    job.add_items(pipe, ["item-a", "item-b", "item-c"])
    pipe.execute()
    job.close_enqueue(0)
    settings = CollectorSettings(redis_url=redis_url, consumer="c1", metrics_port=0)
    collector = Collector(settings)
    collector.ensure_group()
    for item in ("item-a", "item-b", "item-c"):
        publish(r, _result(item, error=True))
    collector.step()
    assert len(read_jsonl(errors)) == 3 and job_status(r, "job").finished
    assert job.take_for_retry({"item-a": "engine_error"}) == ["item-a"]
    assert job.take_for_retry({"item-a": "engine_error"}) == []  # taken once only
    publish(r, _result("item-a", error=not retry_ok))

    # When the collector is killed after rewriting the errors file (before recording its new size),
    # or in the middle of appending the new line
    if crash == "after_the_rewrite":
        real = retried.drop_lines

        def drop_then_die(path: Path, items: object) -> int:
            real(path, items)  # type: ignore[arg-type]
            raise _Crash

        monkeypatch.setattr(retried, "drop_lines", drop_then_die)
    else:

        def torn_append(path: Path, lines: list[bytes]) -> None:
            if lines:
                with path.open("ab") as f:
                    f.write(lines[0][:10])
                raise _Crash

        monkeypatch.setattr(collector_module, "_append", torn_append)
    with pytest.raises(_Crash):
        collector.step()
    monkeypatch.undo()

    # Then the restarted collector writes the row once, in one file, and counts it once
    Collector(settings).start()
    written = [row["n"] for row in read_jsonl(output)]
    failed = sorted(e["item_id"] for e in read_jsonl(errors))
    if retry_ok:
        assert written == ["item-a"] and failed == ["item-b", "item-c"]
    else:
        assert written == [] and failed == ["item-a", "item-b", "item-c"]
    st = job_status(r, "job")
    assert st is not None and st.finished and st.state == "done"
    assert (st.written, st.failed, st.retried) == (1 - (not retry_ok), 2 + (not retry_ok), 1)
    assert st.failures == {"engine_error": st.failed}
    assert not r.exists(job_retrying_key("job"))


def test_a_job_is_stalled_after_two_checks_a_grace_apart_without_progress(redis_url, tmp_path, monkeypatch):
    # Given a fully enqueued job with two rows, nothing in flight, and a clock the test moves
    r = redis_client(redis_url)
    job = JobRecord(r, "job")
    job.register(
        output_path=str(tmp_path / "out.jsonl"),
        errors_path=str(tmp_path / "out.errors.jsonl"),
        output_key="qa_pairs",
        input_path=str(tmp_path / "in.jsonl"),
        params_json=PARAMS.model_dump_json(),
    )
    pipe = r.pipeline()
    job.add_items(pipe, ["item-a", "item-b"])
    pipe.execute()
    job.close_enqueue(0)
    clock = [1000.0]
    monkeypatch.setattr(stall.time, "monotonic", lambda: clock[0])
    resent: list[str] = []
    monkeypatch.setattr(stall, "resend_missing", lambda app, r, job_id, stop: resent.append(job_id) or 2)
    watch = stall.StallWatch(r, lambda: None)  # type: ignore[arg-type,return-value]

    def check_at(t: float) -> list[str]:
        clock[0] = 1000.0 + t
        found = watch.check()
        watch.join(5)
        return found

    # When a row is written between the first checks, the grace starts again
    assert check_at(0) == [] and check_at(10) == []
    pipe = r.pipeline()
    job.record_results(pipe, [_result("item-a", error=False)], new_items=False)
    pipe.execute()
    assert check_at(20) == [] and check_at(40) == []
    # and while a task is queued (for any job) nothing is stalled
    r.lpush(QUEUE_GENERATE, b"{}")
    assert check_at(60) == []
    r.delete(QUEUE_GENERATE)
    assert check_at(70) == [] and check_at(99) == []
    # Then the job is stalled at the first check 30 s after it was seen without progress
    assert check_at(100) == ["job"] and resent == ["job"]
