"""Running suspects alone, so a crash is blamed on the item that causes it.

A worker crash takes every in-flight task with it. When the messages come back (Kombu marks them
redelivered), each is a suspect, and every start of a suspect counts as an attempt. Its starts
before the last allowed one (``IMAGEQA_MAX_ATTEMPTS``) run beside the others: nearly every crash is
a preempted or killed worker, whose tasks should come back at full speed. The last allowed start runs
alone (no other request in the engine), so only an item that crashes a worker by itself reaches the
limit and becomes a ``poison_item``, and the innocent items that shared its crashes finish on their
isolated start.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class IsolationGate:
    """Many normal tasks at once, or one suspect alone; waiting suspects go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._exclusive = False
        self._suspects_waiting = 0

    @contextmanager
    def normal(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._suspects_waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._suspects_waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and self._running == 0)
            self._suspects_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
