"""The widget's workers run behind the GUI thread: a lower nice value per thread (Linux)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from qtpy.QtCore import Qt

from histocluster_napari._background import BACKGROUND_NICE, in_background, lower_this_thread
from tests.napari.test_widget import open_with_widget, wait_idle

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_thread(func):
    """``func()`` run in a new thread; its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(func()))
    t.start()
    t.join()
    return out[0]


@linux_only
def test_a_worker_lowers_its_own_thread_only():
    main_before = nice_of_this_thread()
    seen = in_thread(in_background(nice_of_this_thread))
    assert seen == max(BACKGROUND_NICE, main_before)
    assert nice_of_this_thread() == main_before  # the caller's thread keeps its priority
    # never raised back: a thread already lower stays where it is
    assert in_thread(lambda: (lower_this_thread(15), lower_this_thread(5))[1]) == 15


@linux_only
@pytest.mark.gui
def test_the_cluster_job_runs_behind_the_gui_thread(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    _, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    seen: list[tuple[int, int]] = []

    def on_event(event: tuple) -> None:  # runs in the thread that emits it: the worker
        seen.append((threading.get_native_id(), nice_of_this_thread()))

    widget._bridge.event.connect(on_event, Qt.ConnectionType.DirectConnection)
    gui = (threading.get_native_id(), nice_of_this_thread())
    assert widget.run_cluster() is not None
    wait_idle(qtbot, widget)
    assert widget.view is not None, widget.status.value
    from_worker = {s for s in seen if s[0] != gui[0]}
    assert from_worker and all(nice >= BACKGROUND_NICE for _, nice in from_worker)
    assert nice_of_this_thread() == gui[1]
