"""Shared test helpers: images, input files, a worker process, a collector thread."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from PIL import Image

from producer.broker import redis_client
from producer.jobs import JobStatus
from producer.wait import wait_for_job
from workers.collector import Collector
from workers.settings import CollectorSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"


def free_port() -> int:
    """A TCP port free on loopback now (for a server a test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(
    folder: Path, count: int, prefix: str = "img", size: tuple[int, int] = (96, 64)
) -> list[Path]:
    """Distinct small images (a colour gradient per index), plus the real example photos mixed in."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new(
            "RGB", (size[0] + i % 7, size[1]), ((37 * i) % 256, (91 * i) % 256, (53 * i + 40) % 256)
        )
        for x in range(0, image.width, 8):
            image.putpixel((x, (i * 3) % image.height), (255, 255, 255))
        path = folder / f"{prefix}{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write((row if isinstance(row, bytes) else orjson.dumps(row)) + b"\n")
    return path


def read_jsonl(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


class CollectorThread:
    """A collector in a thread for the length of a ``with`` block. A collector that dies fails the
    test: `check` raises as soon as it has, and leaving the block does too."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.collector = Collector(CollectorSettings(redis_url=redis_url, block_ms=100, **settings))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.collector.run(self.stop)
        except BaseException as e:
            self.error = e

    def check(self) -> None:
        """Raises if the collector thread has died."""
        if self.error is not None:
            raise AssertionError(f"the collector thread died: {self.error!r}") from self.error
        if not self.stop.is_set() and self.thread.ident is not None and not self.thread.is_alive():
            raise AssertionError("the collector thread returned before it was stopped")

    def __enter__(self) -> CollectorThread:
        self.thread.start()
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.stop.set()
        self.thread.join(10)
        if self.error is not None and exc is not None:
            # The block most likely failed because the collector died: report both.
            raise AssertionError(f"the collector thread died: {self.error!r}; then {exc!r}") from self.error
        self.check()
        if exc is None and self.thread.is_alive():
            raise AssertionError("the collector thread did not stop within 10 s")


def wait_done(redis_url: str, job_id: str, timeout_s: float = 120.0, **wait: Any) -> JobStatus:
    """`producer.wait.wait_for_job` polling every 0.1 s; ``wait`` takes its other options."""
    r = redis_client(redis_url)
    try:
        return wait_for_job(r, job_id, poll_s=0.1, timeout_s=timeout_s, **wait)
    finally:
        r.close()


class WorkerProcess:
    """A real ``imageqa worker`` (Celery, threads pool) in a subprocess; ``args``: more options."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env = {**os.environ, "IMAGEQA_METRICS_PORT": "0", **env}
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 300.0) -> WorkerProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "--loglevel", "INFO", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
            )
        self.wait_for(lambda text: " ready." in text, ready_timeout_s)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate(self.log()):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``imageqa ARGS`` as a user runs it, on the Redis at ``redis_url``; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env={**os.environ, "IMAGEQA_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
    )


@contextmanager
def scripted_items(folder: Path, params: Any, templates: Any = None) -> Iterator[Callable[..., Any]]:
    """``run(script, n_images=1, **params)``: one item through `workers.generate.process` (what a
    worker runs per task) with a scripted fake engine (``script(request) -> text``), on ``n_images`` of
    three images made in ``folder``, with ``params`` updated by the keywords; ``templates``: the
    job-wide template gate, if any. Every engine runtime is stopped when the block ends."""
    from producer.contract import TaskMessage
    from workers.engines.fake import FakeEngine
    from workers.generate import process
    from workers.runtime import EngineRuntime
    from workers.settings import WorkerSettings

    images = make_images(folder, 3)
    settings = WorkerSettings(media_roots=[folder], engine={"kind": "fake", "model": "fake"}, metrics_port=0)
    runtimes: list[EngineRuntime] = []

    def run(script: Callable[[Any], str], n_images: int = 1, **update: Any) -> Any:
        runtime = EngineRuntime(FakeEngine(respond=script))
        runtime.start(10)
        runtimes.append(runtime)
        message = TaskMessage(
            job_id="j",
            item_id="i",
            row_index=0,
            images=[str(p) for p in images[:n_images]],
            row={"image": [p.name for p in images[:n_images]]},
            params=params.model_copy(update=update),
        )
        return process(message, runtime, settings, templates)

    try:
        yield run
    finally:
        for runtime in runtimes:
            runtime.stop()
