"""Image loading on processes of its own, so a worker feeds its engine with more than one core.

Reading, decoding, transposing and downscaling an image (`workers.images.load_image`) is most of a
worker's CPU work per image: a 12 MP phone JPEG costs ~65 ms of one core, against a few ms for Celery,
the prompt and the checks. In the worker's process all of it shares one GIL. `ImagePool` runs
``load_image`` in ``size`` child processes instead; each child reads the image's bytes itself (nothing
goes through Redis) and sends back the downscaled RGB image only (at most ``max_pixels``, 3 MB for
1 MP), which the engine takes as it is.

The children are spawned (a fork of a threaded worker could inherit held locks) from the process's
lifetime thread and armed by `workers.engines.lifeline`: they die with the worker however it dies,
SIGKILL included. A child that dies mid-image (a decoder crash) is replaced and the image tried once
more on another; an image that kills that one too becomes an ``image_unreadable`` error.
`load_images` is the one entry: the pool of this process if one is started, else in-process.

Pixels come back through shared memory, not the pipe: measured on one core, the worker's own CPU per
1 MP image fell from 8.0 ms (pickled through the pipe) to 2.4 ms.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import threading
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import cast

import PIL.Image
from PIL.Image import Image

from producer.errors import ErrorCode, ImageError, ImageQAError
from workers.engines import lifeline
from workers.images import load_image
from workers.settings import ImageSettings

__all__ = ["ImagePool", "default_pool_size", "load_images", "start_pool", "stop_pool"]

log = logging.getLogger(__name__)

_pool: ImagePool | None = None


MIN_POOL_CPUS = 4
"""Fewer CPUs than this: no pool by default. Measured on 2 CPUs the pool cost ~10 % more CPU per image
and gained no images/s; its gain is on hosts with more cores than one worker process can use."""


def default_pool_size() -> int:
    """The CPUs this process may run on, when there are at least `MIN_POOL_CPUS`; else 0 (in-process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus if cpus >= MIN_POOL_CPUS else 0


def load_images(refs: list[str], settings: ImageSettings) -> list[Image]:
    """The images of ``refs``, loaded by this process's pool if one runs, else here. Raises `ImageError`."""
    pool = _pool
    if pool is None:
        return [load_image(ref, settings) for ref in refs]
    return pool.load(refs, settings)


def start_pool(size: int) -> ImagePool | None:
    """Starts this process's image pool of ``size`` children (0: none, images load in-process)."""
    global _pool
    if size <= 0:
        return None
    pool = ImagePool(size)
    pool.start()
    _pool = pool
    return pool


def stop_pool() -> None:
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.stop()


class ImagePool:
    """``size`` processes that run `load_image`; `load` may be called from many threads at once.

    Each child has a pipe of its own; a task thread takes an idle child, sends it the reference and
    waits for the answer on that pipe: no thread in between (a process pool executor's two hand-over
    threads cost the worker ~4 ms of CPU per image here)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: queue.SimpleQueue[_Child | None] = queue.SimpleQueue()
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._children = [_Child.start() for _ in range(self.size)]
            for child in self._children:
                self._idle.put(child)
            self._running = True

    def stop(self) -> None:
        with self._lock:
            children, self._children = self._children, []
            self._running = False
        self._idle.put(None)  # wakes any thread still waiting for a child
        for child in children:
            child.stop()

    def pids(self) -> list[int]:
        """The children's process ids (for tests and diagnostics)."""
        with self._lock:
            return [child.process.pid for child in self._children if child.process.pid is not None]

    def load(self, refs: list[str], settings: ImageSettings) -> list[Image]:
        outcomes = [self._load(ref, settings) for ref in refs]
        images, errors = [], []
        for outcome in outcomes:  # every image, also after an error: each holds a shared memory block
            try:
                images.append(_unwrap(outcome))
            except ImageError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return images

    def _load(self, ref: str, settings: ImageSettings) -> _Outcome:
        for _ in range(2):  # a child that dies mid-image is replaced and the image tried once more
            child = self._idle.get()
            if child is None:
                self._idle.put(None)
                raise RuntimeError("the image pool is not running")
            try:
                child.conn.send((ref, settings))
                outcome: _Outcome = child.conn.recv()
            except (EOFError, OSError):
                self._replace(child)
                continue
            self._idle.put(child)
            return outcome
        return ("error", ErrorCode.IMAGE_UNREADABLE, "the image crashed the image decoder")

    def _replace(self, dead: _Child) -> None:
        log.warning("image process %s died; starting another", dead.process.pid)
        dead.stop()
        with self._lock:
            if not self._running:
                return
            child = _Child.start()
            self._children = [c for c in self._children if c is not dead] + [child]
        self._idle.put(child)


class _Child:
    """One image process and the worker's end of its pipe."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @classmethod
    def start(cls) -> _Child:
        # Started on the lifetime thread, so the child's PDEATHSIG fires only when the worker dies.
        def spawn() -> _Child:
            context = multiprocessing.get_context("spawn")  # a fork could inherit another thread's lock
            ours, theirs = context.Pipe()
            process = context.Process(
                target=lifeline.guarded(_serve), args=(theirs,), name="imageqa-images", daemon=True
            )
            process.start()
            theirs.close()
            return cls(process, ours)

        return lifeline.run_on_lifetime_thread(spawn).result()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


_Outcome = tuple[str, object, object]


def _serve(conn: Connection) -> None:
    """A child's loop: a reference and settings in, an outcome out, until told to stop."""
    logging.getLogger("PIL").setLevel(logging.WARNING)
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        conn.send(_load(*request))


def _load(ref: str, settings: ImageSettings) -> _Outcome:
    """In a child: the loaded image's pixels in a new shared memory block, with what makes them an
    image again; or the error as plain values (an exception with a keyword-only ``code`` would not
    survive pickling). The worker copies the pixels out and removes the block."""
    try:
        image = load_image(ref, settings)
    except ImageQAError as e:
        return ("error", e.code, e.message)
    pixels = image.tobytes()
    block = shared_memory.SharedMemory(create=True, size=max(1, len(pixels)))
    try:
        _buffer(block)[: len(pixels)] = pixels
    except BaseException:
        block.close()
        block.unlink()
        raise
    block.close()
    return ("ok", (block.name, image.mode, image.size, image.info), None)


def _unwrap(outcome: _Outcome) -> Image:
    kind, value, message = outcome
    if kind != "ok":
        raise ImageError(str(message), code=ErrorCode(value))
    name, mode, size, info = cast("tuple[str, str, tuple[int, int], dict[str, object]]", value)
    block = shared_memory.SharedMemory(name=name)
    try:
        image = PIL.Image.frombytes(mode, size, _buffer(block))
    finally:
        block.close()
        block.unlink()
    image.info.update(info)
    return image


def _buffer(block: shared_memory.SharedMemory) -> memoryview:
    buf = block.buf
    assert buf is not None  # None only once closed
    return buf
