"""A worker's engine never outlives it: SIGKILL the worker alone, and its engine processes exit.

The mechanism (``workers.engines.lifeline``) on its own first, under fork and spawn and from each kind
of starting thread; then a real ``imageqa worker`` with the real vLLM engine on the tiny model.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, WorkerProcess
from workers.engines import lifeline

# A parent that starts one guarded child sleeping 600 s, prints the child's pid, then waits to die.
# argv: start method, starting thread ("main", "lifetime", or "ended": a thread that has finished).
PARENT = textwrap.dedent(
    """
    import multiprocessing, sys, threading, time
    from workers.engines import lifeline

    def start():
        child = multiprocessing.get_context(sys.argv[1]).Process(
            target=lifeline.guarded(time.sleep), args=(600,)
        )
        child.start()
        return child

    if __name__ == "__main__":
        if sys.argv[2] == "main":
            child = start()
        elif sys.argv[2] == "lifetime":
            child = lifeline.run_on_lifetime_thread(start).result()
        else:
            started = []
            thread = threading.Thread(target=lambda: started.append(start()))
            thread.start()
            thread.join()
            child = started[0]
        print(child.pid, flush=True)
        time.sleep(600)
    """
)


def gone(proc: psutil.Process) -> bool:
    """Exited (a zombie waiting for init to reap it has exited too)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in procs if not gone(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@contextlib.contextmanager
def guarded_child(
    tmp_path: Path, method: str, thread: str
) -> Iterator[tuple[subprocess.Popen[str], psutil.Process]]:
    script = tmp_path / "parent.py"  # a file: spawn re-imports the parent's main module by path
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), method, thread], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    children: list[psutil.Process] = []
    try:
        assert parent.stdout is not None
        children.append(psutil.Process(int(parent.stdout.readline())))
        yield parent, children[0]
    finally:
        parent.kill()
        parent.wait(10)
        kill_all(children)


@pytest.mark.parametrize("thread", ["main", "lifetime", "ended"])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_guarded_child_dies_with_its_sigkilled_parent(tmp_path, method, thread):
    with guarded_child(tmp_path, method, thread) as (parent, child):
        # The starting thread may end (the "ended" case) without taking the child with it.
        time.sleep(1.0)
        assert not gone(child), "the child died while its parent lived"

        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        assert not wait_gone([child], 5.0), f"child {child.pid} outlived its parent"


def test_guarded_in_process_is_a_plain_call():
    def double(x: int) -> int:
        return 2 * x

    assert lifeline.guarded(double)(21) == 42


def test_the_lifetime_thread_runs_calls_in_order_and_reports_errors():
    first = lifeline.run_on_lifetime_thread(lambda: 1)
    failing = lifeline.run_on_lifetime_thread(lambda: 1 / 0)
    assert first.result(5) == 1
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert lifeline.run_on_lifetime_thread(lambda: 2).result(5) == 2


@pytest.mark.engine
def test_a_sigkilled_workers_engine_process_exits(tmp_path, tiny_model, redis_url, media_root):
    env = {
        "IMAGEQA_REDIS_URL": redis_url,
        "IMAGEQA_MEDIA_ROOTS": str(media_root),
        "IMAGEQA_ENGINE": "vllm",
        "IMAGEQA_MODEL": str(tiny_model),
        "IMAGEQA_MAX_MODEL_LEN": "4096",
        "IMAGEQA_CONCURRENCY": "4",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log")
    descendants: list[psutil.Process] = []
    try:
        worker.start(600)
        assert worker.proc is not None
        descendants = psutil.Process(worker.proc.pid).children(recursive=True)
        engines = [p for p in descendants if "EngineCore" in " ".join(p.cmdline())]
        assert engines, f"no EngineCore process among {[p.cmdline() for p in descendants]}"

        worker.proc.send_signal(signal.SIGKILL)  # the worker alone, not its process group
        assert worker.proc.wait(30) == -signal.SIGKILL

        left = wait_gone(descendants, 15.0)
        assert not left, f"outlived the worker: {[(p.pid, ' '.join(p.cmdline()).strip()) for p in left]}"
    finally:
        worker.stop(10)
        kill_all(descendants)
