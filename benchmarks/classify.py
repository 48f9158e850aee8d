"""Tile classifier: train time on 10k / 100k labelled tiles, and apply throughput against reading alone.

    python benchmarks/classify.py [--tiles 1000000] [--dim 512] [--rounds 2]

Builds a real feature store in a temp dir: slides of 100 x 100 all-tissue tiles whose features are
drawn around 8 class centres (float16, as extraction writes them), and a cluster run whose labels
are those classes. Then, in one run:

- train: ``engine.classify.train`` (logistic regression, 5-fold grouped CV + the final fit) with
  at most 10k and 100k labelled tiles (``--max-per-class``);
- apply vs read: ``engine.classify.apply`` over every tile, interleaved with a read-only pass
  (``FeatureStore.iter_tissue_features`` over the same store) — the ratio is apply / read tiles/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.classify import ApplyConfig, TrainConfig, apply, train
from engine.encoder_id import EncoderId
from engine.slide import ArraySlide
from engine.store import FeatureStore
from engine.tiling import TileGrid, Tiling

SIDE = 100  # tiles per slide side
K = 8


def build_store(path: Path, n_tiles: int, dim: int, seed: int = 0) -> int:
    """A store of ceil(n_tiles / SIDE^2) slides, every tile encoded; returns the tile count."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((K, dim)).astype(np.float32) * 2
    tiling = Tiling(tile_px=4, target_mpp=1.0, min_tissue=0.0)
    encoder = EncoderId("synthetic", "resnet18", dim, 224, (0.5,) * 3, (0.25,) * 3)
    store = FeatureStore.create_or_open(path, encoder, tiling)
    image = np.full((SIDE * 4, SIDE * 4, 3), (180, 60, 140), np.uint8)
    n_slides = -(-n_tiles // (SIDE * SIDE))
    labels = {}
    for s in range(n_slides):
        grid = TileGrid.from_tiling(ArraySlide(image, 1.0, f"s{s}.png"), tiling)
        sf = store.add_slide(f"s{s:04d}", grid)
        lab = rng.integers(0, K, sf.shape)
        for block in sf.blocks():
            l_ = lab[block.r0 : block.r1, block.c0 : block.c1]
            feats = centres[l_] + rng.standard_normal((*l_.shape, dim)).astype(np.float32) * 3
            sf.write_block(block, feats, np.ones(l_.shape, bool))
        labels[f"s{s:04d}"] = lab
    store.write_cluster_run("k8", centres, labels, {"algorithm": "synthetic"})
    return n_slides * SIDE * SIDE


def read_only(path: Path) -> float:
    t = time.perf_counter()
    n = sum(len(tf.rows) for tf in FeatureStore.open(path).iter_tissue_features())
    return n / (time.perf_counter() - t)


def apply_once(path: Path, model: Path, n: int) -> float:
    t = time.perf_counter()
    apply(ApplyConfig(model=str(model), store=str(path), name="bench", overwrite=True))
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiles", type=int, default=200_000, help="tiles in the store (default: %(default)s)"
    )
    p.add_argument("--dim", type=int, default=512, help="feature dimension (default: %(default)s)")
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved apply/read rounds (default: %(default)s)"
    )
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        path = tmp / "f.zarr"
        t = time.perf_counter()
        n = build_store(path, a.tiles, a.dim)
        print(f"store: {n} tiles x {a.dim} dims in {time.perf_counter() - t:.1f} s")
        classes = tuple(f"c{i}={i}" for i in range(K))
        for labelled in (10_000, 100_000):
            t = time.perf_counter()
            r = train(
                TrainConfig(store=str(path), out=str(tmp / "m"), run="k8", classes=classes,
                            max_per_class=labelled // K)
            )  # fmt: skip
            print(
                f"train on {sum(r.counts.values())} labelled tiles (5-fold CV + fit): "
                f"{time.perf_counter() - t:.1f} s, CV macro F1 {r.metrics['macro_f1']}"
            )
        model = tmp / "m.json"
        read, app = [], []
        for _ in range(a.rounds):
            read.append(read_only(path))
            app.append(apply_once(path, model, n))
        r_, a_ = float(np.median(read)), float(np.median(app))
        print(
            f"read only: {r_:,.0f} tiles/s; apply: {a_:,.0f} tiles/s; apply / read = {a_ / r_:.2f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
