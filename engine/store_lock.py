"""One writer per feature store: ``<store>.lock`` beside it, locked while extracting.

The lock file names its holder (pid, host, start time) so a second process is told who is
writing. It is a POSIX record lock (``lockf``): the kernel releases it when the holder exits,
however it exits (SIGKILL included), and forked children (DataLoader workers that may outlive a
killed parent for a moment) do not hold it, so a crashed run never leaves a stale lock behind.
Within one process, a second lock on the same store is refused too (a set of held paths).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from engine.errors import HistoclusterError

__all__ = ["StoreLock", "lock_path"]

_READ_HOLDER_S = 1.0  # how long to wait for a fresh holder to write its name
_HELD: set[str] = set()  # lock files this process holds


def lock_path(store: str | Path) -> Path:
    """``<store>.lock``: the lock file of the store at ``store``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


class StoreLock:
    """An exclusive lock on a store for one process (a context manager).

    ``acquire`` raises ``HistoclusterError`` naming the process that holds the lock; an
    ``OSError`` (a read-only or missing location) is raised as is.
    """

    def __init__(self, store: str | Path, what: str = "an extraction") -> None:
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.what = what
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:  # another lock of this process (POSIX locks do not see it; and reading
            # the file here would close a descriptor of it, which drops this process's lock)
            raise self._busy(f"another extraction in this process (pid {os.getpid()})")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise self._busy(self._holder()) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        _HELD.add(key)
        self._key = key
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "what": self.what,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def _busy(self, holder: str) -> HistoclusterError:
        return HistoclusterError(
            f"{self.store}: {holder} is writing this store — wait for it to finish "
            f"(or stop it), or choose another --out; the lock is {self.path}"
        )

    def _holder(self) -> str:
        """Words for the process holding the lock, from the lock file (it may be writing it yet)."""
        deadline = time.monotonic() + _READ_HOLDER_S
        while True:
            try:
                holder = json.loads(self.path.read_text())
                return (
                    f"{holder.get('what', 'another process')} (pid {holder['pid']} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')})"
                )
            except (OSError, ValueError, KeyError, TypeError):
                if time.monotonic() > deadline:
                    return "another process"
                time.sleep(0.05)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD.discard(self._key)
            os.close(fd)  # closing releases the record lock

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
