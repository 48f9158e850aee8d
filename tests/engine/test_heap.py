"""engine.heap: inside retained_heap a freed big block is reused, not page-faulted in again."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from engine import heap
from engine.heap import default_heap, retained_heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="not glibc: retained_heap does nothing")

_BLOCK = 64 << 20  # above glibc's largest mmap threshold (32 MiB): mmapped afresh by default


def _faults_of_one_block() -> int:
    """Minor page faults taken by allocating, filling and freeing one 64 MiB block."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(_BLOCK, dtype=np.uint8)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_block_is_reused_inside_and_given_back_after() -> None:
    with retained_heap():
        _faults_of_one_block()  # the heap grows once
        assert _faults_of_one_block() <= 8  # then the same pages serve again
        with retained_heap():  # nested: the inner exit keeps the outer's policy
            pass
        assert _faults_of_one_block() <= 8
    # Outside, the block is mmapped (and faulted in) again: 16384 faults of 4 KiB pages, or 32
    # of 2 MiB transparent huge pages.
    assert _faults_of_one_block() >= 32


def test_default_heap_undoes_an_inherited_retained_heap() -> None:
    """What a reader worker forked inside the loop's retained heap calls first."""
    with retained_heap():
        _faults_of_one_block()
        assert _faults_of_one_block() <= 8
        default_heap()
        assert _faults_of_one_block() >= 32
    with retained_heap():  # and the policy can be entered again afterwards
        _faults_of_one_block()
        assert _faults_of_one_block() <= 8
