"""The map of 100,000 tiles (engine.embed): time to ready, stage by stage, and lookup latency.

A real feature store over the CMU slide's real tile grid (32 px at 0.5 um/px) under as many
slide ids as it takes to hold ``--n`` tissue tiles, each holding ``--dim``-d features drawn
from a Gaussian mixture of ``--components`` components (what an encoder's clusters look like),
clustered by engine.cluster (not timed). Then ``engine.embed.run`` is timed, wall and CPU
(all threads), per progress stage: sample (stratified draw + feature reads), fit (PCA + kNN
graph + UMAP), transform (every other tile), mosaic (64 x 64 cells read from the slide). The
map view's per-event operations are timed after it: ``TileMap.nearest`` (hover/click),
``TileMap.index_of`` (slide cursor -> map point) and a lasso of a quarter of the map.

    .venv/bin/python benchmarks/embed.py                     # 100,000 tiles, umap and pca
    .venv/bin/python benchmarks/embed.py --n 20000 --methods pca

Goal (issue 17): map of 100k tiles ready in <= 60 s on 2 cores (sample + fit + transform),
hover/click <= 100 ms. The machine's load average is printed: the CPU time is the figure that
does not depend on other processes sharing the cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def build_store(path: Path, n: int, dim: int, components: int, seed: int) -> tuple[int, int]:
    """Write the synthetic store; (slides, tiles)."""
    from engine.encoder_id import EncoderId
    from engine.slide import open_slide
    from engine.store import FeatureStore
    from engine.tiling import TileGrid

    encoder = EncoderId(
        name="synthetic", arch="resnet18", dim=dim, input_px=224, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim)).astype(np.float32) * 0.6
    weights = rng.dirichlet(np.ones(components) * 2)
    with open_slide(CMU) as s:
        grid = TileGrid(s, target_mpp=0.5, tile_px=32)
        store = FeatureStore.create_or_open(path, encoder, grid.tiling)
        total, i = 0, 0
        while total < n:
            sf = store.add_slide(f"s{i:03d}", grid)
            rows, cols = np.nonzero(sf.selected)
            m = min(len(rows), n - total)
            rows, cols = rows[:m], cols[:m]
            comp = rng.choice(components, m, p=weights)
            slide_shift = rng.standard_normal(dim).astype(np.float32) * 0.1  # a stain batch
            feats = (
                centres[comp]
                + slide_shift
                + rng.standard_normal((m, dim)).astype(np.float32) * 0.25
            )
            sf.write_tiles(rows, cols, feats)
            total, i = total + m, i + 1
    return i, total


class StageClock:
    """A progress callback recording each stage's first and last call (wall and CPU)."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, float]] = {}
        self.last: dict[str, tuple[float, float]] = {}
        self.calls = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = (time.perf_counter(), time.process_time())
        self.first.setdefault(stage, now)
        self.last[stage] = now
        self.calls += 1


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--components", type=int, default=12)
    p.add_argument("--sample", type=int, default=50_000)
    p.add_argument("--methods", default="umap,pca")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from engine.cluster import main as cluster_main
    from engine.embed import EmbedConfig, run
    from engine.lasso import lasso_tiles
    from engine.store import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.zarr"
        t = time.perf_counter()
        n_slides, n_tiles = build_store(path, args.n, args.dim, args.components, args.seed)
        rc = cluster_main(
            [str(path), "--k", "8", "--name", "k8", "--quiet", "--exemplars", "0", "--no-overlays"]
        )
        assert rc == 0
        print(
            f"store: {n_tiles} tiles of {args.dim}-d over {n_slides} slide ids, clustered k=8 "
            f"(setup {time.perf_counter() - t:.0f} s, not timed)"
        )
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
        for method in args.methods.split(","):
            clock = StageClock()
            w0, c0 = time.perf_counter(), time.process_time()
            result = run(
                EmbedConfig(
                    store=path,
                    run="k8",
                    method=method,
                    sample=args.sample,
                    seed=args.seed,
                    overwrite=True,
                ),
                progress=clock,
            )
            w1, c1 = time.perf_counter(), time.process_time()
            stages = ["sample", "fit", "transform", "mosaic"]
            ends = [clock.first.get(s) for s in stages[1:]] + [(w1, c1)]
            print(
                f"\n{method}: {result.n_tiles} tiles, fitted on {result.n_sample}; "
                f"{clock.calls} progress calls; load average after: {os.getloadavg()[0]:.1f}"
            )
            print("stage       wall s    cpu s")
            start = (w0, c0)
            ready = None
            for s, end in zip(stages, ends, strict=True):
                if s not in clock.first or end is None:
                    continue
                print(f"{s:<10} {end[0] - start[0]:7.1f}  {end[1] - start[1]:7.1f}")
                if s == "transform":
                    ready = (end[0] - w0, end[1] - c0)
                start = end
            print(f"{'total':<10} {w1 - w0:7.1f}  {c1 - c0:7.1f}")
            if ready:
                print(
                    f"map ready (sample + fit + transform): {ready[0]:.1f} s wall, {ready[1]:.1f} s CPU "
                    f"(goal <= 60 s)"
                )
            tm = result.tile_map
            rng = np.random.default_rng(1)
            x0, y0, x1, y1 = tm.bounds
            t = time.perf_counter()
            tm.nearest(x0, y0)
            first = time.perf_counter() - t
            pts = rng.uniform([x0, y0], [x1, y1], (1000, 2))
            t = time.perf_counter()
            for x, y in pts:
                tm.nearest(x, y)
            hover = (time.perf_counter() - t) / len(pts)
            t = time.perf_counter()
            tm.index_of(*tm.tile(0))
            first_index = time.perf_counter() - t
            t = time.perf_counter()
            for i in rng.integers(0, len(tm), 1000):
                tm.index_of(*tm.tile(int(i)))
            index = (time.perf_counter() - t) / 1000
            poly = np.array(
                [[x0, y0], [(x0 + x1) / 2, y0], [(x0 + x1) / 2, (y0 + y1) / 2], [x0, (y0 + y1) / 2]]
            )
            t = time.perf_counter()
            sel = lasso_tiles(tm, poly)
            lasso = time.perf_counter() - t
            n_sel = sum(len(r) for r, _ in sel.values())
            print(
                f"hover/click nearest: first {first * 1e3:.1f} ms (builds the tree), then {hover * 1e3:.3f} ms; "
                f"slide tile -> map point: first {first_index * 1e3:.1f} ms, then {index * 1e3:.4f} ms; "
                f"lasso of a quarter ({n_sel} tiles): {lasso * 1e3:.1f} ms"
            )
            del tm, result
        FeatureStore.open(path)  # the store is still readable


if __name__ == "__main__":
    main()
