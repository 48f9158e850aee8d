"""What a k change costs in the napari widget, headless, on a real store of ~100k tiles.

    .venv/bin/python benchmarks/recluster.py [--tiles 100000] [--dim 512] [--ks 6,8,12]
                                             [--rounds 2] [--tile-px 16]

Builds, in a temp dir, a real ``FeatureStore`` over real slide grids: copies (symlinks) of
``../shared/data/slides/CMU-1-Small-Region.svs`` under several slide ids, cut into ``--tile-px``
tiles at 0.5 um/px with the default tissue rule, as many slides as reach ``--tiles`` tissue
tiles. Every tissue tile holds a float16 feature drawn around one of 10 random centres (as
extraction writes them; ``--noise`` sets how much the 10 overlap). The slides are real files, so the exemplar tiles are read from them
exactly as the widget reads them.

Then it calls what the widget calls when k changes, ``histocluster_napari._session.recluster``
(-> ``cluster_store`` -> ``engine.cluster.run_clustering``, whose ``on_result`` hook carries
the names over in memory and builds the view, which ``on_view`` hands to the caller to paint
before the run is written; then the run and its curation are written), for each k of
``--ks``, in interleaved rounds, in two modes:

- ``plain``: a fresh ``engine.cluster.ClusterFeatures`` for every k change (the features read
  from the store each time, as the session did before it held them);
- ``cached``: the session's one ``ClusterFeatures`` held across k changes (what it does).

and prints the seconds of each stage (median over rounds and ks):

    check      store opened, run name chosen, slides checked (up to the first report)
    features   the tiles' features read into memory (none when the cache holds them)
    kmeans     the fit: seeding, mini-batch and Lloyd passes
    assign     every tile's label and the nearest tiles of each centroid
    exemplars  the exemplar tiles read from the slides (or the cache)
    carry      the curation carried over (engine.curation_match.carry_over, runs in memory)
    view       the widget's ClusterView built from the result in memory
    write      the run's arrays, exemplars.png and attrs written (after the repaint)
    save       the curation saved beside the run

then ``repaint`` (call to ``on_view``: what the user waits for, against the 1 s goal) and
``total`` (call to return: the run listed and its curation saved), each with the process CPU
seconds (``repaint cpu``, ``cpu``: steadier when other processes share the cores; zarr's
threads make the total's exceed its wall time) and the load average. Each mode
first makes one untimed k change (the cache's first read, imports). Labels of both modes are
checked equal (same seed, same labels).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from engine import cluster as engine_cluster
from engine.encoder_id import EncoderId
from engine.slide import open_slide
from engine.store import FeatureStore
from engine.tiling import TileGrid, Tiling
from histocluster_napari import _session

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
CENTRES = 10
STAGES = ("check", "features", "kmeans", "assign", "exemplars", "carry", "view", "write", "save")
GOAL_S = 1.0


def build_store(
    tmp: Path, n_tiles: int, dim: int, tile_px: int, noise: float = 0.6, seed: int = 0
) -> tuple[Path, list[str]]:
    """A store of real CMU-slide grids (symlinked copies) with clustered float16 features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    tiling = Tiling(tile_px=tile_px, target_mpp=0.5)
    encoder = EncoderId("synthetic", "resnet18", dim, 224, (0.5,) * 3, (0.25,) * 3)
    path = tmp / "features.zarr"
    store = FeatureStore.create_or_open(path, encoder, tiling)
    (tmp / "slides").mkdir()
    ids: list[str] = []
    total = 0
    grid = None
    while total < n_tiles:
        sid = f"slide{len(ids):02d}"
        link = tmp / "slides" / f"{sid}.svs"
        link.symlink_to(CMU)
        with open_slide(link) as slide:
            if grid is None:
                grid = TileGrid.from_tiling(slide, tiling)
            sf = store.add_slide(sid, TileGrid.from_tiling(slide, tiling))
        selected = sf.selected
        lab = rng.integers(0, CENTRES, sf.shape)
        for block in sf.blocks():
            sel = selected[block.r0 : block.r1, block.c0 : block.c1]
            l_ = lab[block.r0 : block.r1, block.c0 : block.c1]
            jitter = rng.standard_normal((*l_.shape, dim), dtype=np.float32) * noise
            feats = np.maximum(centres[l_] + jitter, 0)  # ReLU-like, as a CNN's features
            sf.write_block(block, feats * sel[..., None], sel)
        ids.append(sid)
        total += int(selected.sum())
    return path, ids


class Timer:
    """Stage seconds of one k change, from progress reports and wrapped session calls."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.spans: dict[str, float] = defaultdict(float)
        self.cpu = 0.0
        self.cpu0 = 0.0

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.marks.setdefault(stage, now)
        self.marks[stage + ":last"] = now

    def painted(self, view) -> None:
        self.marks.setdefault("paint", time.perf_counter())
        self.marks.setdefault("paint:cpu", time.process_time())

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans[name] += time.perf_counter() - t
                self.marks.setdefault(name + ":start", t)
                self.marks[name + ":end"] = time.perf_counter()

        return timed

    def stages(self, t0: float, t1: float) -> dict[str, float]:
        m = self.marks
        run1 = m["run:end"]
        f0 = m.get("features")
        k0 = m["kmeans"]
        a0, a1 = m["assign"], m["assign:last"]
        e0, e1 = m.get("exemplars", a1), m.get("exemplars:last", a1)
        carry, view = self.spans["carry"], self.spans["view"]
        out = {
            "check": (f0 if f0 is not None else k0) - t0,
            "features": k0 - f0 if f0 is not None else 0.0,
            "kmeans": a0 - k0,
            "assign": a1 - a0,
            "exemplars": e1 - e0,
            "carry": carry,
            "view": view,
            "write": (e0 - a1) + (run1 - e1) - carry - view,
            "save": t1 - run1,
        }
        out["repaint"] = m.get("paint", t1) - t0
        out["total"] = t1 - t0
        out["cpu"] = self.cpu
        out["repaint cpu"] = m.get("paint:cpu", self.cpu0 + self.cpu) - self.cpu0
        return out


def one_change(view, k: int, features) -> tuple[object, dict[str, float]]:
    """``_session.recluster(view, k)`` with its stages timed (``features``: the session's cache
    for this call; a fresh one each call is the plain mode)."""
    timer = Timer()
    saved = (engine_cluster.run_clustering, _session._carried, _session._result_view)
    saved_features = _session.FEATURES
    _session.FEATURES = features if features is not None else engine_cluster.ClusterFeatures()
    engine_cluster.run_clustering = timer.wrap("run", saved[0])
    _session._carried = timer.wrap("carry", saved[1])
    _session._result_view = timer.wrap("view", saved[2])
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        timer.cpu0 = c0
        new = _session.recluster(view, k, progress=timer.progress, on_view=timer.painted)
        t1 = time.perf_counter()
        timer.cpu = time.process_time() - c0
    finally:
        engine_cluster.run_clustering, _session._carried, _session._result_view = saved
        _session.FEATURES = saved_features
    return new, timer.stages(t0, t1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=100_000, help="tissue tiles (default %(default)s)")
    p.add_argument("--dim", type=int, default=512, help="feature dimension (default %(default)s)")
    p.add_argument("--ks", default="6,8,12", help="k values, comma-separated (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default %(default)s)")
    p.add_argument("--tile-px", type=int, default=16, help="tile side in px (default %(default)s)")
    p.add_argument(
        "--noise",
        type=float,
        default=0.6,
        help="feature noise sd around the 10 unit-variance centres; 1.5 and more overlaps "
        "them as real tissue classes do, so the Lloyd passes run to their cap "
        "(default %(default)s)",
    )
    p.add_argument(
        "--modes",
        default="plain,cached",
        help="modes to time, comma-separated (default %(default)s)",
    )
    a = p.parse_args(argv)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    ks = [int(v) for v in a.ks.split(",")]
    modes = a.modes.split(",")
    if "cached" in modes and not hasattr(engine_cluster, "ClusterFeatures"):
        modes = [m for m in modes if m != "cached"]
    tmp = Path(tempfile.mkdtemp())
    os.environ.setdefault("HISTOCLUSTER_CACHE", str(tmp / "cache"))
    try:
        t = time.perf_counter()
        path, ids = build_store(tmp, a.tiles, a.dim, a.tile_px, a.noise)
        store = FeatureStore.open(path)
        n = store.n_tissue_tiles()
        print(
            f"store: {n:,} tissue tiles x {a.dim} dims over {len(ids)} slides "
            f"({a.tile_px}-px tiles of {CMU.name}), built in {time.perf_counter() - t:.1f} s; "
            f"cpus {os.cpu_count()}",
            flush=True,
        )
        view = _session.cluster_store(path, ids, ks[0])  # the first Cluster click
        caches = {m: (engine_cluster.ClusterFeatures() if m == "cached" else None) for m in modes}
        views = {m: view for m in modes}
        for m in modes:  # untimed: the cache's first read, imports and first touches
            views[m], _ = one_change(view, ks[-1], caches[m])
        rows: dict[str, list[dict[str, float]]] = defaultdict(list)
        labels: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
        cols = (*STAGES, "repaint", "total", "repaint cpu", "cpu")
        print(f"{'round':>5} {'mode':<7} {'k':>3} " + " ".join(f"{c:>9}" for c in cols))
        for r in range(a.rounds):
            for k in ks:
                for m in modes:
                    views[m], st = one_change(views[m], k, caches[m])
                    rows[m].append(st)
                    labels[(m, r, k)] = views[m].labels
                    cells = " ".join(f"{st[c]:>9.3f}" for c in cols)
                    print(f"{r:>5} {m:<7} {k:>3} {cells}", flush=True)
        for (m, r, k), lab in labels.items():
            ref = labels[(modes[0], 0, k)]
            same = all(np.array_equal(lab[s], ref[s]) for s in ref)
            print(f"labels {'equal' if same else 'DIFFER'}: mode {m} round {r} k {k}")
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"median seconds per k change (load average {load}):")
        for m in modes:
            med = {c: float(np.median([st[c] for st in rows[m]])) for c in cols}
            cells = " ".join(f"{c} {med[c]:.3f}" for c in STAGES)
            print(
                f"  {m:<7} {cells}\n          repaint {med['repaint']:.3f} s"
                f" (process cpu {med['repaint cpu']:.3f} s) -> goal <= {GOAL_S} s"
                f" {'met' if med['repaint'] <= GOAL_S else 'NOT met'};"
                f" run written {med['total']:.3f} s (process cpu {med['cpu']:.3f} s)"
            )
        if len(modes) == 2:
            a_, b_ = (float(np.median([st["repaint"] for st in rows[m]])) for m in modes)
            print(f"  repaint {modes[0]} / {modes[1]} = {a_ / b_:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
