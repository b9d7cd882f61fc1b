"""One warm engine per process, on a background asyncio loop shared by every task thread.

Celery's threads pool runs many tasks at once; each submits its request to this loop and waits on a
future, so the engine sees all of them together and batches them continuously.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from workers.engines.base import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")


class EngineRuntime:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="imageqa-engine-loop", daemon=True
        )
        self._started = False

    def start(self, timeout_s: float | None = None) -> None:
        self._thread.start()
        self.run(self.engine.start(), timeout_s)
        self._started = True

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Runs ``coro`` on the engine loop and waits; on timeout the coroutine is cancelled."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"engine request took longer than {timeout_s} s") from None

    def stop(self, timeout_s: float = 60.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            if self._started:
                self.run(self.engine.shutdown(), timeout_s)
        except Exception:
            log.exception("engine shutdown failed")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            self._started = False
