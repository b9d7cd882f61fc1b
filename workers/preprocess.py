"""Image loading on processes of its own, so a worker feeds its engine with more than one core.

Reading, decoding, transposing and downscaling an image (`workers.images.load_image`) is most of a
worker's CPU work per image: a 12 MP phone JPEG costs ~65 ms of one core, against a few ms for Celery,
the prompt and the checks. In the worker's process all of it shares one GIL. `ImagePool` runs
``load_image`` in ``size`` child processes instead; each child reads the image's bytes itself (nothing
goes through Redis) and sends back the downscaled RGB image only (at most ``max_pixels``, 3 MB for
1 MP), which the engine takes as it is.

The children are spawned (a fork of a threaded worker could inherit held locks) from the process's
lifetime thread and armed by `workers.engines.lifeline`: they die with the worker however it dies,
SIGKILL included. A child that dies mid-image (a decoder crash) breaks the pool: it is rebuilt and the
images in flight are tried once more; an image that breaks the new pool too becomes an
``image_unreadable`` error. `load_images` is the one entry: the pool of this process if one is
started, else in-process.

Pixels come back through shared memory, not the pool's pipe: measured on one core, the worker's own CPU
per 1 MP image fell from 8.0 ms (pickled through the pipe) to 3.1 ms.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import shared_memory
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


def default_pool_size() -> int:
    """The CPUs this process may run on, when there are at least two; else 0 (load in-process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus if cpus >= 2 else 0


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
    """``size`` processes that run `load_image`; `load` may be called from many threads at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = self._build()

    def stop(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        """The children's process ids (for tests and diagnostics)."""
        executor = self._executor
        return [] if executor is None else list(executor._processes)

    def load(self, refs: list[str], settings: ImageSettings) -> list[Image]:
        executor = self._require()
        futures = [self._submit(executor, ref, settings) for ref in refs]
        outcomes = []
        for ref, future in zip(refs, futures, strict=True):
            try:
                outcomes.append(future.result())
            except BrokenProcessPool:
                outcomes.append(self._retry(executor, ref, settings))
        images, errors = [], []
        for outcome in outcomes:  # every image, also after an error: each holds a shared memory block
            try:
                images.append(_unwrap(outcome))
            except ImageError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return images

    def _retry(self, broken: ProcessPoolExecutor, ref: str, settings: ImageSettings) -> _Outcome:
        executor = self._rebuild(broken)
        try:
            return self._submit(executor, ref, settings).result()
        except BrokenProcessPool:
            self._rebuild(executor)
            return ("error", ErrorCode.IMAGE_UNREADABLE, "the image crashed the image decoder")

    def _submit(self, executor: ProcessPoolExecutor, ref: str, settings: ImageSettings) -> Future[_Outcome]:
        try:
            return executor.submit(_load, ref, settings)
        except BrokenProcessPool:
            return self._rebuild(executor).submit(_load, ref, settings)

    def _require(self) -> ProcessPoolExecutor:
        executor = self._executor
        if executor is None:
            raise RuntimeError("the image pool is not running")
        return executor

    def _rebuild(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """A new executor in place of ``broken`` (once, however many threads saw it break)."""
        with self._lock:
            if self._executor is broken:
                log.warning("an image process died; starting the image pool again")
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._build()
            return self._require()

    def _build(self) -> ProcessPoolExecutor:
        # Started on the lifetime thread, so the children's PDEATHSIG fires only when the worker dies.
        def build() -> ProcessPoolExecutor:
            executor = ProcessPoolExecutor(
                self.size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=lifeline.guarded(_child_init),
            )
            # The executor starts a child per submit while none is idle: start them all here.
            for ready in [executor.submit(os.getpid) for _ in range(self.size)]:
                ready.result()
            return executor

        return lifeline.run_on_lifetime_thread(build).result()


_Outcome = tuple[str, object, object]


def _child_init() -> None:
    logging.getLogger("PIL").setLevel(logging.WARNING)


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
