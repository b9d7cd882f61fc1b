"""What the benchmark scripts share: /proc readings, child processes, a private Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import redis

from producer.broker import redis_client
from producer.contract import GenerationParams, QAPair, QAStats, ResultRecord
from producer.enqueue import default_errors_path, enqueue_file
from producer.jobs import JobRecord, JobStatus, job_status
from producer.results import publish
from producer.settings import ProducerSettings

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_children: list[subprocess.Popen[bytes]] = []


# --- /proc readings ---------------------------------------------------------------------------


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    figures = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


def proc_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_child(proc: subprocess.Popen[bytes], poll: Callable[[], None] | None, every_s: float = 0.2) -> int:
    """Waits for ``proc`` with ``wait4``, calling ``poll`` every ``every_s``; returns the child's peak
    RSS in bytes (``ru_maxrss``: its VmHWM at exit, however briefly the peak lasted)."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss * 1024
        if poll is not None:
            poll()
        time.sleep(every_s)


# --- processes and Redis ----------------------------------------------------------------------


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, **kwargs)
    _children.append(proc)
    return proc


def adopt(proc: subprocess.Popen[bytes]) -> None:
    """Makes `stop_children` stop ``proc`` too (a child started elsewhere)."""
    _children.append(proc)


def stop_children() -> None:
    """Terminates every child this script started that still runs (by its own pid)."""
    for proc in _children:
        if proc.returncode is None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def private_redis(folder: Path) -> Iterator[str]:
    """A throw-away ``redis-server`` (no persistence) on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH: install it, or pass --redis-url")
    for _ in range(3):
        port = free_port()
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
        with (folder / f"redis-{port}.log").open("wb") as log:
            proc = spawn([*command, "--save", "", "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        client = redis_client(url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        try:
            yield url
        finally:
            with suppress(redis.RedisError):  # shutdown drops the connection under the client
                client.shutdown(nosave=True)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            client.close()
        return
    raise SystemExit(f"redis-server did not start; see {folder}/redis-*.log")


def result_record(job_id: str, i: int, image: str) -> ResultRecord:
    """A worker's result for row ``i``: three pairs, as the fake engine writes them."""
    return ResultRecord(
        job_id=job_id,
        item_id=f"{i:032x}",
        row_index=i,
        row={"image": [image], "n": i},
        qa_pairs=[
            QAPair(question=f"How many images ({i:08x})?", answer="1"),
            QAPair(question="What size is the image?", answer="96x64"),
            QAPair(question="What colour dominates the picture?", answer="blue"),
        ],
        qa_stats=QAStats(tries=1),
        model="fake",
        worker="bench@localhost",
        elapsed_s=0.01,
    )


def put_results(r: redis.Redis, job_id: str, output: Path, rows: int, images: list[str]) -> None:
    """Registers a job writing to ``output`` and puts ``rows`` of its results on the results stream,
    as workers would, for a collector to write."""
    JobRecord(r, job_id).register(
        output_path=str(output),
        errors_path=str(default_errors_path(output)),
        output_key="qa_pairs",
        input_path=str(output.with_suffix(".in.jsonl")),
        params_json=GenerationParams().model_dump_json(),
    )
    for chunk in range(0, rows, 1000):
        pipe = r.pipeline(transaction=False)
        for i in range(chunk, min(rows, chunk + 1000)):
            publish(pipe, result_record(job_id, i, images[i % len(images)]))
        pipe.execute()


def collect_job(
    redis_url: str, source: Path, folder: Path, tag: str, params: GenerationParams
) -> tuple[float, JobStatus]:
    """Enqueues ``source`` to running workers, with a collector in a thread, and waits until the job
    finishes; returns (seconds from the first row sent to the last written, the job's status)."""
    from workers.collector import Collector
    from workers.settings import CollectorSettings

    collector = Collector(
        CollectorSettings(
            redis_url=redis_url,
            block_ms=50,
            consumer=f"bench-{tag}",
            output_dir=folder / "unregistered",
            metrics_port=0,
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, args=(stop,), daemon=True)
    thread.start()
    r = redis_client(redis_url)
    started = time.perf_counter()
    summary = enqueue_file(
        source, folder / f"out-{tag}.jsonl", settings=ProducerSettings(redis_url=redis_url), params=params
    )
    while not (status := job_status(r, summary.job_id)) or not status.finished:
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    return elapsed, status


def wait_ready(log_path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    """Waits until the worker started with its log at ``log_path`` says it is ready; exits the bench
    with the log's tail if the worker stops first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited:\n{log_path.read_text(errors='replace')[-3000:]}")
        if " ready." in log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit("worker not ready")
