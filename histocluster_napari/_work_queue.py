"""Jobs by key, done one at a time in a daemon thread, the front of the queue first (no Qt)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from histocluster_napari._background import lower_this_thread


class WorkQueue:
    """``do(key, job) -> result`` then ``deliver(key, result)``, both in the thread, for each
    job queued with ``put``. ``lock`` (re-entrant) also guards the owner's own state."""

    def __init__(
        self,
        thread_name: str,
        do: Callable[[Any, Any], Any],
        deliver: Callable[[Any, Any], None],
        max_queued: int | None = None,
    ) -> None:
        self._queue: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False
        self._thread_name = thread_name
        self._max_queued = max_queued
        self._do, self._deliver = do, deliver

    def put(self, items: Iterable[tuple[Hashable, Any]], front: bool) -> None:
        """Queue ``items`` in order, at the front (before what waits) or the back."""
        with self._cond:
            items = list(items)
            for key, job in reversed(items) if front else items:
                self._queue.pop(key, None)
                self._queue[key] = job
                if front:
                    self._queue.move_to_end(key, last=False)
            while self._max_queued is not None and len(self._queue) > self._max_queued:
                self._queue.popitem(last=True)  # the oldest requests wait at the back
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=self._thread_name, daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def idle(self) -> bool:
        """Nothing queued and nothing being done."""
        with self._cond:
            return not self._queue and not self._busy

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify()

    def _run(self) -> None:
        lower_this_thread()  # behind the GUI thread when the cores are contended
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key, job = self._queue.popitem(last=False)
                self._busy = True
            try:
                result = self._do(key, job)
            except Exception:  # one failed job must not stop the thread
                result = None
            finally:
                with self._cond:
                    self._busy = False
            try:
                self._deliver(key, result)
            except RuntimeError:  # the receiving QObject was deleted
                return
