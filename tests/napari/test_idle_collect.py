"""IdleCollector: one full GC pass, only once the widget says it is idle."""

from __future__ import annotations

import gc

from histocluster_napari._idle_collect import IDLE_COLLECT_MS, IdleCollector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_collects_once_idle_and_not_before(qtbot) -> None:
    gc.disable()  # only the collector's own pass may free the cycle
    try:
        idle = {"now": False}
        collector = IdleCollector(lambda: idle["now"])
        cycle = _Cycle()
        alive = [id(o) for o in gc.get_objects() if o is cycle]
        del cycle
        collector.soon()
        collector.soon()  # a second ask while waiting changes nothing
        qtbot.wait(2 * IDLE_COLLECT_MS + 100)
        assert collector.collected == 0  # still busy: waits
        assert any(id(o) in alive for o in gc.get_objects() if isinstance(o, _Cycle))
        idle["now"] = True
        qtbot.waitUntil(lambda: collector.collected == 1, timeout=3 * IDLE_COLLECT_MS)
        assert not [o for o in gc.get_objects() if isinstance(o, _Cycle)]
        qtbot.wait(IDLE_COLLECT_MS + 100)
        assert collector.collected == 1  # once per soon()
    finally:
        gc.enable()


def test_stop_cancels(qtbot) -> None:
    collector = IdleCollector(lambda: True)
    collector.soon()
    collector.stop()
    qtbot.wait(IDLE_COLLECT_MS + 200)
    assert collector.collected == 0
