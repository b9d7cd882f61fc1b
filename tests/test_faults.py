"""Faults done for real: killed workers and collectors, a crashed Redis, a dead engine, poison items,
graceful shutdown. After each, every input row is in the output or errors file exactly once."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from producer.broker import redis_client
from producer.contract import GenerationParams
from producer.enqueue import enqueue_file
from producer.jobs import nothing_in_flight
from producer.settings import ProducerSettings
from tests.helpers import (
    ROOT,
    CollectorThread,
    WorkerProcess,
    make_images,
    read_jsonl,
    wait_done,
    write_jsonl,
)
from workers.collector import Collector
from workers.settings import CollectorSettings

FAULT_DB_URL = os.environ.get("IMAGEQA_TEST_REDIS", "redis://127.0.0.1:6379") + "/10"
PARAMS = GenerationParams(max_question_chars=40, max_answer_chars=40)
DELIVERY_SETTINGS = ("IMAGEQA_VISIBILITY_TIMEOUT_S", "IMAGEQA_RESTORE_INTERVAL_S", "IMAGEQA_BROKER_URL")
"""Left at their defaults (whatever the shell has set): the fault tests run what users run."""


@pytest.fixture
def fault_redis() -> str:
    client = redis_client(FAULT_DB_URL)
    client.flushdb()
    return FAULT_DB_URL


def worker(tmp_path: Path, redis_url: str, media: Path, name: str, **env: str) -> WorkerProcess:
    base = {
        "IMAGEQA_REDIS_URL": redis_url,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_MODEL": "fake",
        "IMAGEQA_CONCURRENCY": "8",
    }
    process = WorkerProcess({**base, **env}, tmp_path / f"{name}.log")
    for key in DELIVERY_SETTINGS:
        if key not in env:
            process.env.pop(key, None)
    return process


def job_input(media: Path, count: int, **image_size: int) -> Path:
    size = (image_size.get("w", 96), image_size.get("h", 64))
    images = make_images(media, count, size=size)
    return write_jsonl(media / "in.jsonl", [{"image": p.name, "n": i} for i, p in enumerate(images)])


def enqueue(redis_url: str, source: Path, output: Path) -> str:
    return enqueue_file(source, output, settings=ProducerSettings(redis_url=redis_url), params=PARAMS).job_id


def lines_written(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_exactly_once(output: Path, rows: int, allowed_errors: dict[str, int] | None = None) -> None:
    out = [orjson.loads(line) for line in output.read_bytes().splitlines()]  # a torn line fails here
    errors_path = output.with_name(output.stem + ".errors.jsonl")
    errors = (
        [orjson.loads(line) for line in errors_path.read_bytes().splitlines()] if errors_path.exists() else []
    )
    seen = Counter([r["n"] for r in out] + [e["row"]["n"] for e in errors])
    assert sorted(seen) == list(range(rows)), f"missing rows: {set(range(rows)) - set(seen)}"
    assert max(seen.values()) == 1, f"duplicated rows: {[n for n, c in seen.items() if c > 1]}"
    assert Counter(e["error"]["code"] for e in errors) == Counter(allowed_errors or {})


def report(fault: str, output: Path, rows: int, killed_at: float) -> None:
    """Prints rows lost and duplicated (output and errors files together) and the seconds from the
    kill to the last row written."""
    files = [output, output.with_name(output.stem + ".errors.jsonl")]
    lines = [orjson.loads(line) for path in files if path.exists() for line in path.read_bytes().splitlines()]
    seen = Counter(row["n"] if "n" in row else row["row"]["n"] for row in lines)
    lost = rows - len(seen)
    duplicated = sum(c - 1 for c in seen.values())
    after_s = max(path.stat().st_mtime for path in files if path.exists()) - killed_at
    print(f"\nFAULT {fault}: lost={lost} duplicated={duplicated} kill_to_last_row_s={after_s:.1f}")


def wait_done_resending(
    redis_url: str, job_id: str, source: Path, output: Path, timeout_s: float = 120, **wait
):  # type: ignore[no-untyped-def]
    def resend(_status: object) -> None:
        assert enqueue(redis_url, source, output) == job_id

    return wait_done(redis_url, job_id, timeout_s, resend=resend, resend_after_s=6, **wait)


def test_a_killed_worker_loses_nothing_and_repeats_nothing(fault_redis, media, tmp_path):
    source, output = job_input(media, 40), tmp_path / "out.jsonl"
    first = worker(tmp_path, fault_redis, media, "first", IMAGEQA_FAKE_DELAY_S="0.3").start(60)
    with CollectorThread(fault_redis):
        job_id = enqueue(fault_redis, source, output)
        wait_for(lambda: lines_written(output) >= 8, what="first rows")
        assert first.proc is not None
        first.proc.kill()  # SIGKILL, with up to 8 tasks in flight, of the worker process only
        assert first.proc.wait(30) == -signal.SIGKILL
        killed_at = time.time()
        second = worker(tmp_path, fault_redis, media, "second").start(60)
        try:
            # A message the killed worker had popped but not yet recorded is gone with it (Kombu's
            # Redis transport); the documented recovery is enqueueing again, which sends only those.
            status = wait_done_resending(fault_redis, job_id, source, output)
        finally:
            second.stop()
    report("worker", output, 40, killed_at)
    assert_exactly_once(output, 40)
    assert status.written == 40


def test_a_collector_killed_mid_batch_leaves_no_loss_duplicate_or_torn_line(fault_redis, media, tmp_path):
    # Given every result of a job waiting in the stream, and a collector writing batches of 7
    rows = 300
    source, output = job_input(media, rows), tmp_path / "out.jsonl"
    fast = worker(tmp_path, fault_redis, media, "w").start(60)
    r = redis_client(fault_redis)
    try:
        job_id = enqueue(fault_redis, source, output)
        wait_for(lambda: r.xlen("imageqa:results") >= rows, what="all results")
    finally:
        fast.stop()
    marker_key = f"imageqa:job:{job_id}:writing"
    env = {
        **os.environ,
        "IMAGEQA_REDIS_URL": fault_redis,
        "IMAGEQA_BATCH_SIZE": "7",
        "IMAGEQA_CONSUMER": "c1",
        "IMAGEQA_METRICS_PORT": "0",
    }
    collect = [sys.executable, "-m", "workers.cli", "collect"]
    # When it is SIGKILLed while a batch is being written (between its marker and its commit),
    # again and again further into the job, the kill timing retried until three kills land
    # mid-batch and one of them leaves appended lines Redis has no record of
    mid_batch, past_committed, killed_at = 0, 0, 0.0
    for _attempt in range(40):
        if mid_batch >= 3 and past_committed >= 1:
            break
        started = time.time()
        proc = subprocess.Popen(collect, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        target = 60 * min(mid_batch, 3)  # each kill further into the job: 0, 60, 120, 180 rows committed
        try:
            # The collector runs in short random slices and is frozen in between; a frozen collector
            # whose marker says "writing" is between its marker and its commit, however busy the
            # machine is, and the kill lands there.
            while time.monotonic() < deadline:
                time.sleep(random.uniform(0, 0.004))
                proc.send_signal(signal.SIGSTOP)
                time.sleep(0.02)  # what it sent before it stopped reaches Redis
                written = int(r.hget(f"imageqa:job:{job_id}", "written") or 0)
                assert written < rows, f"written first: {mid_batch} kills mid-batch, {past_committed} past"
                if written >= target and _writing_since(r, marker_key, started):
                    break
                proc.send_signal(signal.SIGCONT)
        finally:
            proc.kill()  # only the collector: it is what the test is about
            proc.wait(30)
        killed_at = time.time()
        if _writing_since(r, marker_key, started):  # the marker the kill froze: it landed mid-batch
            mid_batch += 1
            committed_bytes = int(r.hget(marker_key, "output_size") or 0)
            past_committed += (output.stat().st_size if output.exists() else 0) > committed_bytes
    assert mid_batch >= 3 and past_committed >= 1, (mid_batch, past_committed)
    assert lines_written(output) < rows, "the kills must land before the job is written"
    # Then a collector started again finishes the job with every row once and no torn line
    proc = subprocess.Popen(collect, env=env, cwd=ROOT)
    try:
        wait_done(fault_redis, job_id, timeout_s=120)
    finally:
        proc.terminate()
        proc.wait(30)
    report(
        f"collector ({mid_batch} kills mid-batch, {past_committed} past the committed size)",
        output,
        rows,
        killed_at,
    )
    assert_exactly_once(output, rows)


def _writing_since(r, marker_key: str, t: float) -> bool:  # type: ignore[no-untyped-def]
    """Whether the collector's write marker says a batch is being written, set after ``t``."""
    state, set_at = r.hmget(marker_key, ["state", "t"])
    return state == b"writing" and float(set_at) > t


def test_recovery_truncates_a_write_that_was_never_committed(fault_redis, media, tmp_path, monkeypatch):
    # Given a collector that dies after appending and fsyncing a batch but before recording it
    source, output = job_input(media, 5), tmp_path / "out.jsonl"
    fast = worker(tmp_path, fault_redis, media, "w").start(60)
    try:
        job_id = enqueue(fault_redis, source, output)
        r = redis_client(fault_redis)
        wait_for(lambda: r.xlen("imageqa:results") >= 5, what="results")
    finally:
        fast.stop()
    dying = Collector(CollectorSettings(redis_url=fault_redis, consumer="c1"))

    def die(*_args, **_kwargs):
        raise SystemExit("killed between write and commit")

    monkeypatch.setattr(dying, "_commit", die)
    with pytest.raises(SystemExit):
        dying.start()
        dying.step()
    assert lines_written(output) == 5  # the lines are on disk, but Redis does not know
    with output.open("ab") as f:
        f.write(b'{"torn": ')  # and a torn line after them
    monkeypatch.undo()

    # When the same consumer starts again
    Collector(CollectorSettings(redis_url=fault_redis, consumer="c1")).start()

    # Then the interrupted write is undone and redone: five rows, once each, all whole
    assert_exactly_once(output, 5)
    assert wait_done(fault_redis, job_id, timeout_s=5).written == 5


REDIS_PORTS = {"crash": 6401, "inspect": 6402}  # ports of this module's own redis-servers


class CrashableRedis:
    """A redis-server of the test's own, persisted as users run it (``appendonly yes``, ``appendfsync
    everysec``, as in docker-compose.yml and the embedded Redis), that the test can SIGKILL."""

    def __init__(self, data: Path, port: int) -> None:
        self.data = data
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, port: int) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--dir",
            str(self.data),
        ]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command(self.port), stdout=subprocess.DEVNULL)
        wait_for(lambda: _pings(self.url), 30, "redis start")

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no flush, no goodbye to the clients
        self.proc.wait(30)

    def aof_bytes(self) -> int:
        return self._incr_aof().stat().st_size

    def lose_writes_after(self, size: int) -> int:
        """What a machine crash does under ``everysec``: the writes of the last second never reached
        the disk. Cuts the append-only file back to ``size``; returns the bytes cut."""
        aof = self._incr_aof()
        cut = aof.stat().st_size - size
        os.truncate(aof, size)  # maybe mid-command: Redis loads the whole commands before the cut
        return cut

    def inspect(self, read):  # type: ignore[no-untyped-def]
        """Loads the data on another port no worker or collector knows, runs ``read(client)``."""
        port = REDIS_PORTS["inspect"]
        proc = subprocess.Popen(self.command(port), stdout=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_for(lambda: _pings(url), 30, "redis inspect start")
            return read(redis_client(url))
        finally:
            proc.kill()  # leaves the files as they were loaded
            proc.wait(30)

    def _incr_aof(self) -> Path:
        (aof,) = (self.data / "appendonlydir").glob("*.incr.aof")
        return aof


def _pings(url: str) -> bool:
    try:
        return bool(redis_client(url).ping())
    except Exception:
        return False


@pytest.fixture
def crashable_redis(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed for the Redis crash tests")
    data = tmp_path / "redis-data"
    data.mkdir()
    server = CrashableRedis(data, REDIS_PORTS["crash"])
    server.start()
    yield server
    if server.proc is not None:
        server.proc.kill()
        server.proc.wait()


@pytest.mark.parametrize("lost_s", [0.0, 1.0], ids=["process-crash", "machine-crash-loses-last-second"])
def test_a_redis_crash_mid_job_loses_nothing_and_repeats_nothing(crashable_redis, media, tmp_path, lost_s):
    """A SIGKILLed Redis keeps every write it acknowledged (they are in the kernel's page cache);
    a machine crash under ``everysec`` loses about the last second of them. Either way, after Redis
    restarts on its data: no row is lost (rows whose tasks vanished are sent again by re-running the
    enqueue), no row is written twice (rows written in the lost second are cut and written again)."""
    server = crashable_redis
    rows = 200
    source, output = job_input(media, rows), tmp_path / "out.jsonl"
    workers = [worker(tmp_path, server.url, media, "w0", IMAGEQA_FAKE_DELAY_S="0.2").start(60)]
    exits: list[int | None] = []

    def supervise(_status: object) -> None:
        """Restarts a worker that exited, as the compose file's restart policy does."""
        proc = workers[-1].proc
        assert proc is not None
        if proc.poll() is not None:
            exits.append(proc.returncode)
            workers.append(worker(tmp_path, server.url, media, f"w{len(exits)}").start(60))

    try:
        with CollectorThread(server.url):
            job_id = enqueue(server.url, source, output)
            wait_for(lambda: lines_written(output) >= 30, what="first rows")
            aof_before = server.aof_bytes()
            time.sleep(lost_s)
            # Given Redis killed while workers and the collector are busy with the job
            server.crash()
            killed_at = time.time()
            on_disk = lines_written(output)
            assert 0 < on_disk < rows, "the crash must land mid-job"
            if lost_s:
                assert server.lose_writes_after(aof_before) > 0
                # the crash did lose the record of rows that are on disk
                recorded = server.inspect(lambda r: r.scard(f"imageqa:job:{job_id}:done"))
                assert recorded < on_disk, (recorded, on_disk)
            time.sleep(1.0)
            # When it restarts on the same data and port
            server.start()
            status = wait_done_resending(
                server.url, job_id, source, output, timeout_s=180, on_progress=supervise
            )
    finally:
        for w in workers:
            w.stop()
    # A worker may exit with status 1 when Redis goes away under it (Kombu closes the lost
    # connection's channel while tasks still ack on it: "Unrecoverable error: AttributeError"); a
    # supervisor restarts it. It must exit, not hang, and with a failure status.
    assert all(code == 1 for code in exits), exits
    print(f"\nworkers that exited on the Redis crash: {len(exits)}")
    # Then every row is in the output exactly once, and the job counts each once
    report("redis " + ("machine crash" if lost_s else "process crash"), output, rows, killed_at)
    assert_exactly_once(output, rows)
    assert status.written == rows


def test_a_worker_celery_stops_on_an_error_exits_with_a_failure_status(fault_redis, media):
    # Given a worker whose consumer fails as Kombu's did when Redis crashed under it
    script = (
        "import sys\n"
        "import celery.worker.consumer.consumer as consumer\n"
        "def fail(self):\n"
        "    raise AttributeError(\"'NoneType' object has no attribute 'hostname'\")\n"
        "consumer.Consumer.start = fail\n"
        "from workers.cli import main\n"
        "sys.argv = ['imageqa', 'worker']\n"
        "main()\n"
    )
    env = {
        **os.environ,
        "IMAGEQA_REDIS_URL": fault_redis,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "fake",
        "IMAGEQA_MODEL": "fake",
        "IMAGEQA_METRICS_PORT": "0",
    }
    # When Celery stops it ("Unrecoverable error")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, timeout=120)
    # Then it exits 1, for a supervisor that restarts only failed processes
    assert b"Unrecoverable error" in done.stderr + done.stdout
    assert done.returncode == 1


def test_a_poison_item_becomes_an_error_row_after_bounded_attempts(fault_redis, media, tmp_path):
    # Given a job where one image crashes the worker process every time it is processed
    images = make_images(media, 6)
    from PIL import Image

    Image.new("RGB", (13, 17), "red").save(media / "poison.png")
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)] + [{"image": "poison.png", "n": 6}]
    source, output = write_jsonl(media / "in.jsonl", rows), tmp_path / "out.jsonl"
    env = {"IMAGEQA_FAKE_FAULTS": '{"13x17": "crash"}', "IMAGEQA_MAX_ATTEMPTS": "2"}
    with CollectorThread(fault_redis):
        job_id = enqueue(fault_redis, source, output)
        # When a supervisor restarts the worker each time it dies
        restarts, killed_at = 0, 0.0
        deadline = time.monotonic() + 180
        while True:
            w = worker(tmp_path, fault_redis, media, f"w{restarts}", **env).start(60)
            assert w.proc is not None
            idle_since = None
            while w.proc.poll() is None and not _done(fault_redis, job_id):
                assert time.monotonic() < deadline, "the poison item looped"
                if nothing_in_flight(redis_client(fault_redis)):  # lost in transit: enqueue again
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 6:
                        enqueue(fault_redis, source, output)
                        idle_since = None
                else:
                    idle_since = None
                time.sleep(0.1)
            if _done(fault_redis, job_id):
                w.stop()
                break
            assert w.proc.returncode == 13
            killed_at = killed_at or time.time()
            restarts += 1
    # Then the job finishes with the poison row as an error after max_attempts crashes
    assert restarts == 2
    report("poison item (from the first crash)", output, 7, killed_at)
    assert_exactly_once(output, 7, {"poison_item": 1})


def test_a_hanging_request_times_out_as_an_error_row(fault_redis, media, tmp_path):
    images = make_images(media, 3)
    from PIL import Image

    Image.new("RGB", (11, 19), "blue").save(media / "hang.png")
    rows = [{"image": p.name, "n": i} for i, p in enumerate(images)] + [{"image": "hang.png", "n": 3}]
    source, output = write_jsonl(media / "in.jsonl", rows), tmp_path / "out.jsonl"
    w = worker(
        tmp_path,
        fault_redis,
        media,
        "w",
        IMAGEQA_FAKE_FAULTS='{"11x19": "hang"}',
        IMAGEQA_TASK_TIME_LIMIT_S="32",
    ).start(60)
    try:
        with CollectorThread(fault_redis):
            enqueued_at = time.time()
            wait_done(fault_redis, enqueue(fault_redis, source, output), timeout_s=60)
    finally:
        w.stop()
    report("hang (from the enqueue)", output, 4, enqueued_at)
    assert_exactly_once(output, 4, {"engine_timeout": 1})


def test_sigterm_finishes_or_requeues_in_flight_tasks(fault_redis, media, tmp_path):
    source, output = job_input(media, 30), tmp_path / "out.jsonl"
    first = worker(
        tmp_path, fault_redis, media, "first", IMAGEQA_FAKE_DELAY_S="1.0", IMAGEQA_CONCURRENCY="4"
    ).start(60)
    with CollectorThread(fault_redis):
        job_id = enqueue(fault_redis, source, output)
        wait_for(lambda: lines_written(output) >= 4, what="first rows")
        killed_at = time.time()
        assert first.stop(60) == 0  # SIGTERM: a warm shutdown, exit status 0
        done_by_first = lines_written(output)
        assert done_by_first < 30
        second = worker(tmp_path, fault_redis, media, "second").start(60)
        try:
            wait_done(fault_redis, job_id, timeout_s=120)
        finally:
            second.stop()
    report("SIGTERM", output, 30, killed_at)
    assert_exactly_once(output, 30)


def _done(redis_url: str, job_id: str) -> bool:
    from producer.jobs import job_status

    st = job_status(redis_client(redis_url), job_id)
    return st is not None and st.finished


@pytest.mark.engine
def test_a_dead_engine_exits_the_worker_and_its_tasks_are_redelivered(
    fault_redis, media, tmp_path, tiny_model
):
    source, output = job_input(media, 12), tmp_path / "out.jsonl"
    env = {
        "IMAGEQA_ENGINE": "vllm",
        "IMAGEQA_MODEL": str(tiny_model),
        "IMAGEQA_MAX_MODEL_LEN": "4096",
    }
    first = worker(tmp_path, fault_redis, media, "first", **env).start(300)
    assert first.proc is not None
    with CollectorThread(fault_redis):
        job_id = enqueue(fault_redis, source, output)
        wait_for(lambda: lines_written(output) >= 1, timeout_s=120, what="first rows")
        engine_core = subprocess.run(
            ["pgrep", "-f", "VLLM::EngineCore", "-P", str(first.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert engine_core, "no EngineCore child process found"
        for pid in engine_core:
            os.kill(int(pid), signal.SIGKILL)
        killed_at = time.time()
        assert first.proc.wait(120) == 70, first.log()[-3000:]  # non-zero: a supervisor restarts it
        second = worker(tmp_path, fault_redis, media, "second", **env).start(300)
        try:
            wait_done_resending(fault_redis, job_id, source, output, timeout_s=300)
        finally:
            stopped = second.stop(120)
    assert stopped == 0, second.log()[-3000:]
    report("dead engine", output, 12, killed_at)
    assert_exactly_once(output, 12)


def _cli(*args: str) -> list[str]:
    """The ``imageqa`` command as a user runs it (this checkout's code first on the path)."""
    return [str(Path(sys.executable).parent / "imageqa"), *args]


def _cli_enqueue(env: dict[str, str], source: Path, output: Path) -> str:
    done = subprocess.run(
        _cli(
            "enqueue",
            str(source),
            "-o",
            str(output),
            "--max-question-chars",
            "40",
            "--max-answer-chars",
            "40",
        ),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]  # the job id, printed first


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in found]


@pytest.mark.engine
def test_enqueue_worker_and_collect_as_three_processes_on_the_real_engine(fault_redis, tmp_path, tiny_model):
    """`imageqa enqueue`, `imageqa worker` and `imageqa collect` run as a user runs them, on the tiny
    model; then the worker process (only it) is SIGKILLed mid-job and a new one finishes the job."""
    media = tmp_path / "media"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "IMAGEQA_REDIS_URL": fault_redis,
        "IMAGEQA_MEDIA_ROOTS": str(media),
        "IMAGEQA_ENGINE": "vllm",
        "IMAGEQA_MODEL": str(tiny_model),
        "IMAGEQA_MAX_MODEL_LEN": "4096",
        "IMAGEQA_METRICS_PORT": "0",
    }
    rows = 6
    first_in = write_jsonl(
        media / "first.jsonl",
        [{"image": p.name, "n": i} for i, p in enumerate(make_images(media, rows, "a"))],
    )
    second_in = write_jsonl(
        media / "second.jsonl",
        [{"image": p.name, "n": i} for i, p in enumerate(make_images(media, rows, "b"))],
    )
    first_out, second_out = tmp_path / "first.out.jsonl", tmp_path / "second.out.jsonl"
    r = redis_client(fault_redis)
    engines: list[int] = []
    collector = subprocess.Popen(
        _cli("collect"),
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=tmp_path.joinpath("collect.log").open("wb"),
    )
    workers = [WorkerProcess(env, tmp_path / "worker1.log")]
    try:
        # Given a job enqueued before any worker runs
        first_job = _cli_enqueue(env, first_in, first_out)
        workers[0].start(600)
        assert workers[0].proc is not None
        # Then every row is written once, with its pairs
        wait_done(fault_redis, first_job, timeout_s=300)
        assert_exactly_once(first_out, rows)
        for row in read_jsonl(first_out):
            assert row["qa_pairs"] and all(pair["question"] and pair["answer"] for pair in row["qa_pairs"])

        # When the worker process is SIGKILLed while it holds the next job's tasks
        second_job = _cli_enqueue(env, second_in, second_out)
        wait_for(lambda: r.hlen("unacked") > 0, 60, "tasks delivered to the worker")
        engines = _children(workers[0].proc.pid)
        workers[0].proc.kill()
        assert workers[0].proc.wait(30) == -signal.SIGKILL
        killed_at = time.time()
        held = r.hlen("unacked")
        assert held > 0 and lines_written(second_out) < rows, "the kill must land mid-job"
        workers.append(WorkerProcess(env, tmp_path / "worker2.log").start(600))

        # Then the new worker gets the dead one's tasks after the visibility timeout, and the job
        # finishes with every row exactly once (re-running the enqueue for tasks lost in transit)
        def resend(_status: object) -> None:
            assert _cli_enqueue(env, second_in, second_out) == second_job

        wait_done(fault_redis, second_job, timeout_s=300, resend=resend, resend_after_s=6)
    finally:
        for w in workers:
            w.stop(120)
        collector.terminate()
        collector.wait(30)
        for pid in engines:  # the dead worker's engine, should it have outlived it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    report(f"worker on the real engine ({held} tasks held)", second_out, rows, killed_at)
    assert_exactly_once(second_out, rows)
    assert all(row["qa_pairs"] for row in read_jsonl(second_out))
