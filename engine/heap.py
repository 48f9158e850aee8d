"""Keeping freed memory in the process's heap while a CPU encoder loop runs (glibc only).

A CPU forward pass of ResNet-18 on a batch of 64 tiles allocates a few hundred MB of activations
and frees them again. glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and gives the heap's free top back to the kernel, so every batch page-faults those
pages in again: about 120,000 faults and 0.3 s of system time per batch on a 2-core CPU, a
quarter of the loop's CPU time. Inside :func:`retained_heap` glibc serves every block from the
heap and keeps what is freed, so the second batch reuses the first one's pages (no faults). The
heap then holds the loop's peak; on exit it is trimmed and glibc's defaults are restored.
Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["default_heap", "retained_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024}
"""glibc's documented defaults (restoring them leaves the mmap threshold fixed at 128 KiB)."""
_NEVER_TRIM = 1 << 62

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """The C library already loaded in this process (``dlopen(NULL)``), when it is glibc.

    Not ``ctypes.util.find_library``: it runs ``ldconfig -p`` in a subprocess, a fork of this
    process at whatever size it has then (and that child's peak RSS is the parent's).
    """
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no dlopen(NULL)
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


_LIBC = _glibc()


def _set(params: dict[int, int]) -> None:
    assert _LIBC is not None
    for param, value in params.items():
        _LIBC.mallopt(param, min(value, 2**31 - 1))


@contextmanager
def retained_heap() -> Iterator[None]:
    """Inside: freed memory stays in this process's heap (no per-block mmap, no trimming).

    Process-wide; nests and may be entered from several threads (the outermost exit restores).
    """
    global _depth
    if _LIBC is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.malloc_trim(0)  # what came before (a tissue mask) leaves no free pages behind
            _set({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NEVER_TRIM})
    try:
        yield
    finally:
        with _lock:
            _depth = max(0, _depth - 1)  # default_heap() may have reset it
            if _depth == 0:
                _set(_DEFAULTS)
                _LIBC.malloc_trim(0)


def default_heap() -> None:
    """glibc's defaults again in this process, whatever it inherited: for a worker forked inside
    :func:`retained_heap` whose own allocations are small (a tile reader), so that its RSS does
    not keep its high-water mark."""
    global _depth
    if _LIBC is None:
        return
    with _lock:
        _depth = 0
        _set(_DEFAULTS)
        _LIBC.malloc_trim(0)
