"""The widget's canvas parts are drawn one per event-loop pass, in order, each once."""

from __future__ import annotations

import pytest

from histocluster_napari._redraw import Redraw

pytestmark = pytest.mark.gui


def test_parts_are_drawn_one_per_pass_in_their_order_each_once(qtbot):
    drawn: list[str] = []
    passes: list[int] = []
    redraw = Redraw([(n, lambda n=n: drawn.append(n)) for n in ("image", "labels", "mark")])
    redraw.want("mark", "labels")
    redraw.want("image", "labels")  # wanted twice: drawn once
    assert redraw.pending and drawn == []  # nothing in the caller's pass
    assert redraw.wanted("image") and redraw.wanted("mark")

    def tick() -> None:  # a zero timer started after each part: one part per pass
        passes.append(len(drawn))

    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(0)
    qtbot.waitUntil(lambda: not redraw.pending, timeout=5000)
    timer.stop()
    assert drawn == ["image", "labels", "mark"]
    assert 1 in passes and 2 in passes  # the event loop ran between the parts


def test_flush_draws_what_is_wanted_now_and_unknown_parts_are_refused(qtbot):
    drawn: list[str] = []
    redraw = Redraw([(n, lambda n=n: drawn.append(n)) for n in ("image", "labels")])
    redraw.want("labels")
    redraw.flush()
    assert drawn == ["labels"] and not redraw.pending
    with pytest.raises(KeyError):
        redraw.want("outline")
    redraw.want("image")
    redraw.drop("image")
    qtbot.wait(50)
    assert drawn == ["labels"]
