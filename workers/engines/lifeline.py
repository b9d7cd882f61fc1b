"""Engine processes that die with the process that started them, however it dies.

vLLM runs its EngineCore in a child process, forked or spawned (spawned on CPU and once CUDA is
initialised). vLLM stops it on a clean shutdown, but a worker killed outright (SIGKILL, the OOM
killer) leaves it running under init, holding the GPU's memory, so the restarted worker cannot load
the model. ``launch`` starts the engine so that each EngineCore arms itself first thing:

- a watchdog thread kills the child (SIGKILL) once its parent process is gone, seen as
  ``os.getppid()`` changing when the child is re-parented, checked every ``WATCH_INTERVAL_S``;
- ``PR_SET_PDEATHSIG`` = SIGKILL (Linux), so the kernel kills it at once even if its Python is
  stuck. The kernel sends it when the *thread* that started the child exits, so it is set only when
  that thread lives as long as its process: the main thread, or the lifetime thread that ``launch``
  runs the engine build on.

Both hold for fork and spawn starts, inside containers and outside. The engine's own children (vLLM's
multiprocess executor workers) already exit when EngineCore does, through vLLM's death pipe.
Forkserver starts are not armed (their parent is the fork server). The watchdog works on any POSIX
system, PDEATHSIG only on Linux.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import importlib
import logging
import multiprocessing.context
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

__all__ = ["WATCH_INTERVAL_S", "guard_vllm_engine_core", "guarded", "launch", "run_on_lifetime_thread"]

log = logging.getLogger(__name__)
T = TypeVar("T")

WATCH_INTERVAL_S = 0.5
"""Seconds between the watchdog's checks that the parent process is still there."""

_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


class _Origin(NamedTuple):
    """Who started a child: the parent's pid, and whether PDEATHSIG is safe (see the module doc)."""

    pid: int
    pdeathsig: bool


_Jobs = queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]


class _Lifetime(NamedTuple):
    pid: int
    ident: int | None
    jobs: _Jobs


_lifetime: _Lifetime | None = None
_lifetime_lock = threading.Lock()
# Per thread: a forked child runs on in the thread that forked, and reads what that thread noted.
_forking = threading.local()


def guarded(target: Callable[..., T]) -> Callable[..., T]:
    """``target`` as a ``multiprocessing`` target whose child process dies with its parent.

    In a child started by fork or spawn the wrapper arms the child (watchdog, and PDEATHSIG where
    safe), then calls ``target``; called in the same process it just calls ``target``. ``target`` must
    be a module-level function: spawn sends it by name and the child imports it.
    """
    return _Guarded(target)


def guard_vllm_engine_core() -> bool:
    """Make every EngineCore process vLLM starts from now on die with this process. Idempotent.

    Wraps vLLM's engine-core entry point (``EngineCoreProc.run_engine_core``, the target vLLM hands
    to ``multiprocessing``). Returns False, with a warning, if this vLLM has no such entry.
    """
    try:
        from vllm.v1.engine.core import EngineCoreProc
    except ImportError as e:
        log.warning("vLLM's EngineCore entry not found (%s): it may outlive this process", e)
        return False
    entry = EngineCoreProc.__dict__.get("run_engine_core")
    if isinstance(entry, staticmethod) and isinstance(entry.__func__, _Guarded):
        return True
    if not isinstance(entry, staticmethod):
        log.warning("vLLM's EngineCoreProc.run_engine_core changed: EngineCore may outlive this process")
        return False
    setattr(EngineCoreProc, "run_engine_core", staticmethod(_Guarded(entry.__func__)))  # noqa: B010
    return True


def run_on_lifetime_thread(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` on this process's lifetime thread, a daemon thread that never ends before the
    process does; children started there get PDEATHSIG. Calls run one at a time, in order."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    _lifetime_jobs().put((fn, future))
    return future


def launch(build: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``build``, which starts vLLM's engine, so that its EngineCore dies with this process.

    ``guard_vllm_engine_core`` plus ``run_on_lifetime_thread``; await it with
    ``asyncio.wrap_future``.
    """
    guard_vllm_engine_core()
    return run_on_lifetime_thread(build)


class _Guarded:
    def __init__(self, target: Callable[..., Any] | tuple[str, str], origin: _Origin | None = None) -> None:
        self._target = target
        self._origin = origin  # set only when unpickled in a spawned child

    def __reduce__(self) -> tuple[Any, ...]:
        # Spawn pickles the process object in the thread that starts the child: note who that is.
        # Other pickling (forkserver, whose child is the fork server's) leaves the child unarmed.
        origin = None
        if getattr(multiprocessing.context.get_spawning_popen(), "method", None) == "spawn":
            origin = _Origin(os.getpid(), _on_lifetime_thread())
        target = self._target
        # By name: vLLM's own lookup of the entry now yields this wrapper, which pickle would refuse.
        name = target if isinstance(target, tuple) else (target.__module__, target.__qualname__)
        return (_Guarded, (name, origin))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        origin = self._origin if self._origin is not None else getattr(_forking, "origin", None)
        if origin is not None and origin.pid != os.getpid():
            _arm(origin)
        return self._resolve()(*args, **kwargs)

    def _resolve(self) -> Callable[..., Any]:
        target = self._target
        if not isinstance(target, tuple):
            return target
        module, qualname = target
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, _Guarded):  # guarded in this process too: call what it wraps
            obj = obj._target
        return obj


def _arm(origin: _Origin) -> None:
    if origin.pdeathsig:
        _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != origin.pid:  # the parent died before the child could watch it
        _die()
    threading.Thread(target=_watch, args=(origin.pid,), name="imageqa-lifeline", daemon=True).start()
    log.debug("process %d dies with its parent %d (pdeathsig=%s)", os.getpid(), origin.pid, origin.pdeathsig)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    _die()


def _die() -> None:
    # No logging first: a full stderr pipe whose reader died with the parent would block it.
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _on_lifetime_thread() -> bool:
    if threading.current_thread() is threading.main_thread():
        return True
    lifetime = _lifetime
    return lifetime is not None and lifetime.pid == os.getpid() and lifetime.ident == threading.get_ident()


def _note_forking_thread() -> None:
    _forking.origin = _Origin(os.getpid(), _on_lifetime_thread())


def _lifetime_jobs() -> _Jobs:
    global _lifetime
    with _lifetime_lock:
        if _lifetime is None or _lifetime.pid != os.getpid():  # none yet, or inherited through fork
            jobs: _Jobs = queue.SimpleQueue()
            thread = threading.Thread(target=_serve, args=(jobs,), name="imageqa-lifetime", daemon=True)
            thread.start()
            _lifetime = _Lifetime(os.getpid(), thread.ident, jobs)
        return _lifetime.jobs


def _serve(jobs: _Jobs) -> None:
    while True:
        fn, future = jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
        del fn, future  # hold nothing (an engine, say) between jobs


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_forking_thread)
