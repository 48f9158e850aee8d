"""The slide's pixels read in the background are shown every TILES_STREAMING_MS while chunks
are still being read, and TILES_INTERVAL_MS after the last one (each showing is a new texture
of the whole view)."""

from __future__ import annotations

import threading

import numpy as np

from histocluster_napari._widget import (
    TILES_INTERVAL_MS,
    TILES_STREAMING_MS,
    HistoClusterWidget,
)


def test_pixels_are_shown_rarely_while_streaming_and_soon_after_the_last(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    reader, timer = widget._tiles, widget._tiles_timer
    widget._shown_pyramid = pid = 7
    release = threading.Event()

    def slow_read() -> np.ndarray:
        release.wait(30)
        return np.zeros((4, 4, 3), np.uint8)

    reader.want([((pid, 0, 0, 0), slow_read), ((pid, 0, 0, 1), slow_read)])
    assert not reader.idle()
    widget._on_tiles_arrived(pid)  # a chunk arrived, more are being read
    assert timer.isActive() and timer.interval() == TILES_STREAMING_MS
    widget._on_tiles_arrived(pid)  # another: the showing already planned is not put off
    assert timer.interval() == TILES_STREAMING_MS
    assert timer.remainingTime() > TILES_INTERVAL_MS
    widget._on_tiles_arrived(pid + 1)  # another slide's pixels: nothing planned for them
    assert timer.interval() == TILES_STREAMING_MS
    release.set()
    while not reader.idle():
        threading.Event().wait(0.01)
    widget._on_tiles_arrived(pid)  # the last chunk: shown soon
    assert timer.isActive() and timer.interval() == TILES_INTERVAL_MS
    assert timer.remainingTime() < TILES_STREAMING_MS  # restarted, not left to run out
