"""Running redelivered items alone, so a crash is blamed on the item that causes it.

A worker crash takes every in-flight task with it. When the messages come back (Kombu marks them
redelivered), each is a suspect: it runs alone (no other request in the engine), and only starts that
happen count as attempts. So the item that crashes the worker reaches the attempt limit, and the
innocent items that shared its first crash finish normally on their isolated retry.
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
