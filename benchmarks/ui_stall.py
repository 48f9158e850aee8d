"""How long the napari GUI thread stalls while a user works through a 20-slide cohort.

Run under a display (Xvfb)::

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1920x1080x24" .venv/bin/python benchmarks/ui_stall.py

napari's window is sized to ``--window`` (1920x1080: maximized on a common screen), not to the
size napari saved last; in software GL each repaint costs more the larger the window is.

A cohort of ``--slides`` slides (links to the shared CMU-1-Small-Region.svs and the project's
sample slide under distinct names) is opened in a real napari viewer with the HistoCluster
widget, and the widget is driven through the calls a user's clicks make: open the folder,
Extract all, Cluster, name a cluster, correct tiles, switch slides, change k, open a cluster's
gallery, click a gallery tile, export. A 10 ms ``QTimer`` records when the event loop runs;
the longest interval between two of its ticks is the longest stall (the goal: under 100 ms).

Mesa's shader cache (software GL, as under Xvfb) is empty by default (``--gl-cache cold``: each
shader compiled on the GUI thread as at a first launch); ``--gl-cache warm`` first fills it with
a run of its own, as every later launch finds it.

Per action it prints the longest stall, the widget's stage then running, the GUI thread's CPU
within it, the process CPU and the load average. Two opt-in ways to see where the time goes:

- ``--cprofile``: the GUI thread runs under ``cProfile`` during each action (every slot the
  event loop calls: worker events, slide shown, slide list rows, pixels arrived, napari's
  draws); per action the top functions of ours, napari, vispy, superqt and magicgui by
  cumulative time are listed. Exact call counts, but it slows the GUI thread down.
- ``--profile``: a watchdog thread samples the GUI thread's stack (``sys._current_frames()``)
  whenever it has not ticked for ``--sample-after-ms``, and the most frequent frames of our
  code (``histocluster_napari``, ``engine``) and of napari/vispy are listed. Off by default:
  walking the GUI thread's frames from another thread has crashed CPython twice (a segfault
  inside napari's notification toast), so the default run does not do it.

``--recluster-tiles 100000`` measures instead what a k change costs in the widget on a store of
that many tiles (built as ``benchmarks/recluster.py`` builds it, clustered once, opened with
``open_store``): per k change, seconds from the re-cluster's start (after the k box's
``RECLUSTER_DELAY_MS`` debounce) to the repaint handled on the GUI thread and to the run
written, and the longest GUI-thread stall meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import functools
import io
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("HISTOCLUSTER_SHARED_DATA", REPO.parent / "shared" / "data"))
SOURCES = [SHARED / "slides" / "CMU-1-Small-Region.svs", REPO / "sample_data" / "sample_slide.tiff"]
GOAL_MS = 100.0


def make_cohort(folder: Path, n: int) -> list[Path]:
    """``n`` links named ``sNN_<stem><suffix>`` to the source slides, alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [p for p in SOURCES if p.is_file()]
    if not sources:
        sys.exit(f"none of {', '.join(map(str, SOURCES))} found")
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        link = folder / f"s{i:02d}_{src.stem}{src.suffix}"
        link.symlink_to(src)
        out.append(link)
    return out


class StallMeter:
    """Ticks of a 10 ms timer on the GUI thread; the longest gap per action, and stack samples."""

    def __init__(self, widget, sample_after_ms: float, profile: bool) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.widget = widget
        self.action = "start"
        self.last = time.perf_counter()
        self.last_cpu = time.thread_time()
        self.worst: dict[str, tuple[float, str]] = {}
        self.worst_cpu: dict[str, float] = {}  # GUI-thread CPU ms within the longest stall
        self.worst_at: dict[str, float] = {}  # ms from the action's start to that stall's start
        self.over: collections.Counter = collections.Counter()  # stalls over the goal, per action
        self._action_t0 = self.last
        self.trace: SlotTrace | None = None
        self.cpu: dict[str, float] = {}  # process CPU seconds (all threads) during the action
        self.load: dict[str, float] = {}  # 1-minute load average when the action ended
        self._cpu0 = time.process_time()
        self.order: list[str] = []
        self.profiles: dict[str, cProfile.Profile] = {}  # --cprofile: the GUI thread per action
        self.samples: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.stacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.episodes: dict[tuple[str, float], collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self._stage_before = ""
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.tick)
        self.timer.start(10)
        self._main = threading.main_thread().ident
        self._after = sample_after_ms / 1000.0
        self._stop = threading.Event()
        if profile:
            threading.Thread(target=self._watch, daemon=True).start()

    def start(self, action: str) -> None:
        self.tick()
        self.end()
        self._cpu0 = time.process_time()
        self.action = action
        self._action_t0 = time.perf_counter()
        self.order.append(action)
        self.worst.setdefault(action, (0.0, ""))

    def end(self) -> None:
        """Close the running action's CPU and load figures."""
        if self.action in self.worst:
            self.cpu[self.action] = time.process_time() - self._cpu0
            self.load[self.action] = os.getloadavg()[0]

    def stage(self) -> str:
        w = self.widget
        if w is None:  # being made
            return "start"
        stage = w._stage or ("busy" if w.busy else "")
        if w.gallery_loading:
            stage = (stage + "+gallery").strip("+")
        return stage or "idle"

    def tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        gap_ms = 1000.0 * (now - self.last)
        cpu_ms = 1000.0 * (cpu - self.last_cpu)
        started = self.last
        self.last, self.last_cpu = now, cpu
        if self.trace is not None:
            self.trace.gap(self.action, started, now)
        if gap_ms > GOAL_MS:
            self.over[self.action] += 1
        if gap_ms > self.worst.get(self.action, (0.0, ""))[0]:
            self.worst_cpu[self.action] = cpu_ms
            self.worst_at[self.action] = 1000.0 * max(0.0, started - self._action_t0)
            stage = (
                self._stage_before
                if self._stage_before == self.stage()
                else (f"{self._stage_before} -> {self.stage()}")
            )
            self.worst[self.action] = (gap_ms, stage)
        self._stage_before = self.stage()

    def _watch(self) -> None:
        """Sample the GUI thread's stack while it has not ticked for a while."""
        while not self._stop.wait(0.005):
            if time.perf_counter() - self.last < self._after:
                continue
            frame = sys._current_frames().get(self._main)
            if frame is None:
                continue
            ours, chain = None, []
            for fs in traceback.extract_stack(frame)[::-1]:
                where = fs.filename
                short = f"{Path(where).name}:{fs.lineno} {fs.name}"
                if ours is None and ("histocluster_napari" in where or "/engine/" in where):
                    ours = short
                if len(chain) < 6:
                    chain.append(short)
            self.samples[self.action][ours or "(outside our code)"] += 1
            self.episodes[self.action, self.last][ours or chain[0]] += 1
            self.stacks[self.action][" < ".join(chain)] += 1

    def stop(self) -> None:
        self.tick()
        self.end()
        self._stop.set()
        self.timer.stop()


class SlotTrace:
    """``--trace``: times the widget's GUI-thread slots (its redraw parts and the slots worker
    results arrive in) and the garbage collector's passes, and lists those that ran inside each
    stall over ``min_ms``. Cheap enough to leave the stalls as they are (a perf_counter pair per
    call), unlike ``--cprofile``."""

    SLOTS = (
        "_on_event", "_on_slide_loaded", "_show_arrived_tiles", "_show_rows", "_apply_progress",
        "_on_gallery_event", "_recluster", "save_curation", "jump_to_tile", "show_slide",
        "open_folder", "extract_all", "run_cluster", "export_selected", "find_similar",
        "_draw_outlines",
    )  # fmt: skip

    def __init__(self, widget_class, min_ms: float, top_events: int = 3) -> None:
        """Wraps the slots on ``widget_class`` before a widget is made (its signals connect the
        wrapped methods); ``attach`` then wraps that widget's redraw parts."""
        import gc

        self.calls: list[tuple[float, float, float, str]] = []  # (start, wall s, cpu s, name)
        self.stalls: dict[str, list[tuple[float, float, list]]] = collections.defaultdict(list)
        self.min_ms = min_ms
        self.top_events = top_events  # the longest events listed in each stall
        for name in self.SLOTS:
            if hasattr(widget_class, name):
                setattr(widget_class, name, self._timed(getattr(widget_class, name), name))
        self._gc_start = (0.0, 0.0)
        gc.callbacks.append(self._on_gc)
        self.events: list[tuple[float, str]] = []  # (start, "EventType receiver") of every event
        self._filter = None

    def watch_events(self) -> None:
        """Note when the event loop begins to deliver each event (an application-wide event
        filter), so a stall lists the events it spent its time in: an event's time is taken to
        run until the next event begins (a handler's nested events split it)."""
        from qtpy.QtCore import QEvent, QObject
        from qtpy.QtWidgets import QApplication

        events = self.events

        class Note(QObject):
            def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
                kind, who = QEvent.Type(event.type()).name, type(obj).__name__
                if who in ("QWidget", "QObject") and hasattr(obj, "parent"):
                    parent = obj.parent()  # a plain one: named by its parent
                    who += f"<{type(parent).__name__}" if parent is not None else ""
                events.append((time.perf_counter(), f"{kind} {who}"))
                return False

        self._filter = Note()
        QApplication.instance().installEventFilter(self._filter)

    def attach(self, widget) -> None:
        parts = widget._redraw._parts
        for name in list(parts):
            parts[name] = self._timed(parts[name], f"redraw {name}")

    def _timed(self, func, name: str):
        calls = self.calls

        @functools.wraps(func)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                calls.append((t0, time.perf_counter() - t0, time.thread_time() - c0, name))

        return timed

    def _on_gc(self, phase: str, info: dict) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            self._gc_start = (time.perf_counter(), time.thread_time())
        else:
            t0, c0 = self._gc_start
            name = f"gc gen{info['generation']}"
            self.calls.append((t0, time.perf_counter() - t0, time.thread_time() - c0, name))

    def gap(self, action: str, start: float, end: float) -> None:
        """A stall from ``start`` to ``end`` (perf_counter seconds) in ``action``."""
        if 1000.0 * (end - start) >= self.min_ms:
            self.stalls[action].append((start, end))

    def _inside(self, start: float, end: float) -> list[tuple[float, float, float, str]]:
        """The timed calls that began in a stall, then its longest events."""
        inside = [c for c in self.calls if start <= c[0] < end]
        events = [e for e in self.events if start <= e[0] < end]
        spans = collections.Counter()
        for (t0, what), nxt in zip(events, [e[0] for e in events[1:]] + [end], strict=True):
            spans[what] += nxt - t0
        return inside + [
            (0.0, sec, 0.0, f"event {what}") for what, sec in spans.most_common(self.top_events)
        ]

    def report(self) -> None:
        print(
            f"\nstalls over {self.min_ms:.0f} ms and the timed slots inside (start ms, wall ms, cpu ms):"
        )
        for action, stalls in self.stalls.items():
            for start, end in stalls:
                inside = self._inside(start, end)
                named = ", ".join(
                    f"{name} {1000 * wall:.0f}"
                    if name.startswith("event ")
                    else f"{name} +{1000 * (t0 - start):.0f} {1000 * wall:.0f}/{1000 * cpu:.0f}"
                    for t0, wall, cpu, name in inside
                    if wall >= 0.002
                )
                print(f"  {action}: {1000 * (end - start):.0f} ms: {named or '(none of them)'}")


def pump(ms: int) -> None:
    """Run the Qt event loop for ``ms`` milliseconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def wait_until(cond, timeout_s: float = 900.0, what: str = "") -> None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        pump(20)


def size_window(viewer, size: str) -> None:
    """napari's window resized to ``size`` (WxH, as a maximized window on that screen), not to
    the size napari saved last time: each frame's cost in software GL grows with the window."""
    from qtpy.QtWidgets import QApplication

    width, height = (int(v) for v in size.lower().split("x"))
    screen = QApplication.primaryScreen().geometry()
    if screen.width() < width or screen.height() < height:
        print(
            f"  (the screen is {screen.width()}x{screen.height()}, smaller than the window: "
            f'run xvfb-run -s "-screen 0 {width}x{height}x24")',
            flush=True,
        )
    viewer.window._qt_window.resize(width, height)


def drive(args: argparse.Namespace, tmp: Path) -> StallMeter:
    import napari
    import numpy as np

    from histocluster_napari._widget import HistoClusterWidget

    folder = tmp / "slides"
    slides = make_cohort(folder, args.slides)
    viewer = napari.Viewer(show=True)
    size_window(viewer, args.window)
    pump(500)
    trace = SlotTrace(HistoClusterWidget, args.trace_ms, args.trace_events) if args.trace else None
    if trace is not None:
        trace.watch_events()
    meter = StallMeter(None, args.sample_after_ms, args.profile and not args.no_profile)
    meter.trace = trace
    meter.start("plugin start")  # the widget made and docked, then its start passes
    t0, c0 = time.perf_counter(), time.thread_time()
    widget = HistoClusterWidget(viewer)
    meter.widget = widget
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    pump(0)
    print(
        f"  plugin start: widget created and docked in {1000 * (time.perf_counter() - t0):.0f} "
        f"ms, GUI-thread CPU {1000 * (time.thread_time() - c0):.0f} ms",
        flush=True,
    )
    canvas, window = viewer.window._qt_viewer.canvas.native.size(), viewer.window._qt_window.size()
    print(
        f"  window {window.width()}x{window.height()} px, canvas {canvas.width()}x"
        f"{canvas.height()} px",
        flush=True,
    )
    if hasattr(widget, "layers_ready"):  # its layers made in later event-loop passes
        wait_until(lambda: widget.layers_ready, 120, "the widget's layers")
        passes = ", ".join(f"{name} {1000 * sec:.0f}" for name, sec in widget.start_passes)
        if trace is not None:  # each start pass as a timed call
            trace.calls += [
                (t, sec, 0.0, f"pass {name}")
                for t, (name, sec) in zip(widget.start_pass_began, widget.start_passes, strict=True)
            ]
        warm = getattr(widget, "warm_up_s", None)  # the passes wait for it, the GUI thread free
        if warm is not None:
            passes += f" (background warm-up: {1000 * warm:.0f} ms wall before the layer passes)"
        print(
            f"  plugin start: layers ready after {1000 * (time.perf_counter() - t0):.0f} ms, "
            f"GUI-thread CPU {1000 * (time.thread_time() - c0):.0f} ms; passes (ms): {passes}; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    pump(500)
    meter.start("settings typed in")  # encoder, tiling, k and store set, as a user would
    widget.encoder.value = args.encoder
    widget.tile_px.value, widget.target_mpp.value = args.tile_px, args.mpp
    widget.k.value = args.k
    widget.store.value = str(tmp / "cohort.zarr")
    pump(500)
    if trace is not None:
        trace.attach(widget)
    idle = lambda: not widget.busy and not getattr(widget, "drawing", False)  # noqa: E731

    def act(name: str, func, until=idle, settle_ms: int = 500) -> None:
        meter.start(name)
        t0 = time.perf_counter()
        prof = cProfile.Profile() if args.cprofile else None
        if prof is not None:
            prof.enable()  # this (the GUI) thread only: the slots the event loop runs
        func()
        wait_until(until, what=name)
        pump(settle_ms)
        if prof is not None:
            prof.disable()
            meter.profiles[name] = prof
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    rows_filled = lambda: widget.slide_list.rowCount() == len(slides)  # noqa: E731
    act("open folder", lambda: widget.open_folder(folder), rows_filled, 1500)
    act("extract all", widget.extract_all, settle_ms=1500)
    act("cluster", widget.run_cluster, lambda: idle() and widget.view is not None, 1500)
    view = widget.view
    assert view is not None, widget.status.value
    act("name a cluster", lambda: widget.table.set_name(0, "tumour"))

    def correct() -> None:
        sid = widget._current
        labels = widget.clusters_layer
        tissue = np.argwhere(view.labels[sid] >= 0)
        widget.correction_class.reset_choices()
        widget.correction_class.value = "tumour"
        for (r, c), action in zip(tissue[:2], ("move", "exclude"), strict=False):
            widget.correct_tile_at(tuple(labels.data_to_world((r, c))), action)

    act("correct 2 tiles", correct)
    order = [view.slide_ids[i % len(view.slide_ids)] for i in (1, 2, 7, 12, 19, 0)]
    for sid in order:
        act(f"switch slide ({sid})", lambda sid=sid: widget.slide_list.slide_chosen.emit(sid))
    new_k = args.k + 1
    act(
        f"change k to {new_k}",
        lambda: setattr(widget.k, "value", new_k),
        lambda: idle() and widget.view is not None and widget.view.k == new_k,
        1500,
    )
    view = widget.view
    cluster = int(np.argmax(view.totals))
    gallery_full = lambda: widget.gallery.count() > 0 and not widget.gallery_loading  # noqa: E731
    act("open gallery", lambda: widget.table.cellClicked.emit(cluster, 1), gallery_full, 1000)

    def click_other() -> None:
        tiles = widget.gallery.tiles()
        i = next((i for i, t in enumerate(tiles) if t[0] != widget._current), 0)
        widget.gallery.click(i)

    act("click a gallery tile", click_other)
    found = lambda: getattr(widget, "similar_hits", ()) is not None  # noqa: E731 (older: at once)
    act("find similar", lambda: widget.find_similar(), found)  # the clicked tile's, as Shift-F
    widget.curation.select(cluster, True)
    widget.curation.name_cluster(cluster, "tumour")
    widget.export_dir.value = str(tmp / "export")
    act("export", widget.export_selected, settle_ms=1000)
    meter.stop()
    print(f"  final status: {widget.status.value[:200]}")
    viewer.close()
    return meter


def recluster_in_widget(args: argparse.Namespace, tmp: Path) -> None:
    """k changes in the widget on a store of ``--recluster-tiles`` tiles: seconds from the
    re-cluster's start (the k spin box's delay over) to the repaint handled on the GUI thread,
    and to the run written; the longest GUI stall of each change."""
    import importlib.util

    import napari

    from histocluster_napari import _session
    from histocluster_napari._widget import HistoClusterWidget

    spec = importlib.util.spec_from_file_location(
        "recluster_bench", REPO / "benchmarks" / "recluster.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    t0 = time.perf_counter()
    path, ids = bench.build_store(tmp, args.recluster_tiles, 512, 16)
    _session.cluster_store(path, ids, args.k)  # the run the widget opens
    n = sum(int(_open_store(path).slide(s).selected.sum()) for s in ids)
    print(f"store of {n} tiles over {len(ids)} slides built in {time.perf_counter() - t0:.0f} s")
    viewer = napari.Viewer(show=True)
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    wait_until(lambda: widget.layers_ready, 120, "the widget's layers")
    widget.open_store(path)
    wait_until(lambda: widget.view is not None and not widget.busy, what="the store's run")
    pump(1000)
    meter = StallMeter(widget, args.sample_after_ms, False)
    marks: dict[str, float] = {}
    recluster, paint = widget._recluster, widget._paint_view

    def started() -> None:
        marks["start"] = time.perf_counter()
        recluster()

    def painted(view) -> None:
        paint(view)
        marks["paint"] = time.perf_counter()

    widget._recluster_timer.timeout.disconnect()
    widget._recluster_timer.timeout.connect(started)
    widget._paint_view = painted
    print(
        f"{'k':>4} {'repaint s':>10} {'written s':>10} {'stall ms':>9} {'gui cpu':>8} {'load':>5}"
    )
    for k in [args.k + 2, args.k + 4, args.k + 1, args.k + 3]:
        marks.clear()
        name = f"k={k}"
        meter.start(name)
        widget.k.value = k
        wait_until(
            lambda k=k: not widget.busy and widget.view.k == k and "start" in marks, what=name
        )
        done = time.perf_counter()
        pump(300)
        meter.end()
        ms, _ = meter.worst[name]
        print(
            f"{k:>4} {marks['paint'] - marks['start']:>10.2f} {done - marks['start']:>10.2f} "
            f"{ms:>6.0f} ms {meter.worst_cpu.get(name, 0.0):>5.0f} ms {os.getloadavg()[0]:>5.2f}",
            flush=True,
        )
    meter.stop()
    viewer.close()


def _open_store(path: Path):
    from engine.store import FeatureStore

    return FeatureStore.open(path)


def report(meter: StallMeter, load_before: tuple, load_after: tuple, top: int) -> None:
    print()
    print(
        "longest stall: wall ms between two ticks of the GUI thread's timer; of which GUI-thread "
        "CPU ms (the rest: waiting for a core, GL in Mesa's threads, I/O); at: when it began, ms "
        "after the action's start; process CPU s of the whole action (all threads); 1-min load "
        f"average at its end; over: how many stalls of the action were over {GOAL_MS:.0f} ms."
    )
    print(
        f"{'action':<34} {'stall':>8} {'gui cpu':>8} {'at':>8} {'proc cpu':>9} {'load':>5} "
        f"{'over':>4}  stage running"
    )
    worst_all = (0.0, "", "")
    for action in meter.order:
        ms, stage = meter.worst[action]
        flag = "" if ms <= GOAL_MS else "  > goal"
        cpu_ms = meter.worst_cpu.get(action, 0.0)
        proc, load = meter.cpu.get(action, 0.0), meter.load.get(action, 0.0)
        at = meter.worst_at.get(action, 0.0)
        print(
            f"{action:<34} {ms:>5.0f} ms {cpu_ms:>5.0f} ms {at:>5.0f} ms {proc:>7.1f} s "
            f"{load:>5.2f} {meter.over[action]:>4}  {stage}{flag}"
        )
        if ms > worst_all[0]:
            worst_all = (ms, action, stage)
    ms, action, stage = worst_all
    verdict = "meets" if ms <= GOAL_MS else "misses"
    print(
        f"\nlongest stall overall: {ms:.0f} ms ({action}, {stage}) — {verdict} the {GOAL_MS:.0f} ms goal"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*load_before))
    print("load average after:  {:.2f} {:.2f} {:.2f}".format(*load_after))
    for action, prof in meter.profiles.items():
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).sort_stats("cumulative")
        stats.print_stats(r"histocluster_napari|napari/|vispy|superqt|magicgui", top)
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        body = lines[next(i for i, ln in enumerate(lines) if "ncalls" in ln) :]
        print(f"\nGUI thread under cProfile, {action} (top {top} by cumulative time):")
        print("\n".join("  " + ln for ln in body))
    if not meter.samples:
        return
    print("\nwhere the GUI thread was while stalled (stack samples every 5 ms):")
    for action in meter.order:
        if not meter.samples.get(action):
            continue
        print(f"  {action}:")
        for where, n in meter.samples[action].most_common(top):
            print(f"    {5 * n:>6} ms  {where}")
        for chain, n in meter.stacks[action].most_common(3):
            print(f"    {5 * n:>6} ms  [{chain}]")
        episodes = [(sum(c.values()), c) for (a, _), c in meter.episodes.items() if a == action]
        n, longest = max(episodes, key=lambda e: e[0])
        print(
            f"    the longest stall's samples ({5 * n} ms): "
            + "; ".join(f"{where} {5 * m} ms" for where, m in longest.most_common(4))
        )


def use_gl_cache(args: argparse.Namespace, tmp: Path) -> str:
    """Point Mesa's shader cache where ``--gl-cache`` says (before any GL context exists) and,
    for ``warm``, fill it with a first run of the benchmark in a child process. With Mesa's
    llvmpipe, a shader's first compile costs the GUI thread up to hundreds of ms; cached, a
    few. Returns what the run used, for the report."""
    if args.gl_cache == "user":
        return "the user's own (as it is)"
    folder = tmp / "mesa_shader_cache"
    os.environ["MESA_SHADER_CACHE_DIR"] = str(folder)
    os.environ.pop("MESA_SHADER_CACHE_DISABLE", None)
    if args.gl_cache == "cold":
        return f"cold (empty: {folder})"
    argv = ["--gl-cache", "user", "--slides", str(args.slides), "--encoder", args.encoder]
    argv += ["--tile-px", str(args.tile_px), "--mpp", str(args.mpp), "--k", str(args.k)]
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"ui_stall: the run that fills the shader cache failed:\n{done.stderr}")
    return f"warm (filled by a first run, {time.perf_counter() - t0:.0f} s: {folder})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=20)
    parser.add_argument("--encoder", default="resnet18-random")
    parser.add_argument("--tile-px", type=int, default=64)
    parser.add_argument("--mpp", type=float, default=4.0, help="tile um/px (coarse: few tiles)")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--sample-after-ms", type=float, default=40.0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the GUI thread's stack while it stalls (has crashed inside napari twice)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="(the default; kept for old command lines)"
    )
    parser.add_argument(
        "--cprofile", action="store_true", help="cProfile the widget's GUI-thread slots"
    )
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument(
        "--window",
        default="1920x1080",
        help="napari's window, WxH (default: a maximized window on a 1920x1080 screen)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="time the widget's slots and GC passes in each stall"
    )
    parser.add_argument("--trace-ms", type=float, default=70.0, help="stalls --trace lists")
    parser.add_argument(
        "--trace-events", type=int, default=3, help="the longest events --trace lists per stall"
    )
    parser.add_argument(
        "--gl-cache",
        choices=("cold", "warm", "user"),
        default="cold",
        help="Mesa's shader cache (software GL): cold, an empty one, as at a first launch (the "
        "default); warm, one a first run of this benchmark (in a child process) filled, as at "
        "every later launch; user, the user's own (~/.cache/mesa_shader_cache), as it is",
    )
    parser.add_argument(
        "--recluster-tiles",
        type=int,
        default=0,
        help="instead: time k changes in the widget on a store of this many tiles (100000)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ui_stall-") as tmp:
        os.environ["HISTOCLUSTER_CACHE"] = str(Path(tmp) / "cache")
        if args.recluster_tiles:
            recluster_in_widget(args, Path(tmp))
            return 0
        gl_cache = use_gl_cache(args, Path(tmp))
        load_before = os.getloadavg()
        print(
            f"{args.slides} slides, tile {args.tile_px} px at {args.mpp} um/px, k={args.k}; "
            f"GL shader cache: {gl_cache}"
        )
        meter = drive(args, Path(tmp))
        report(meter, load_before, os.getloadavg(), args.top)
        if meter.trace is not None:
            meter.trace.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
