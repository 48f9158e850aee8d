"""Streamed mini-batch K-means (engine.kmeans) against scikit-learn's full KMeans, side by side.

Synthetic features from a known Gaussian mixture (unequal weights and spreads), L2-normalised
as ``engine.cluster`` does by default. Both methods see the same float32 matrix, use k-means++
with one initialisation and the same seed; each is timed for fit + assignment of every row and
scored by the adjusted Rand index against the true mixture component.

    .venv/bin/python benchmarks/cluster.py                 # 1,000,000 x 512, k = 16
    .venv/bin/python benchmarks/cluster.py --n 200000      # quicker

Goal: >= 10x faster than full KMeans with ARI within 0.02 of it.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Config:
    n: int = 1_000_000
    dim: int = 512
    k: int = 16
    seed: int = 0
    separation: float = 4.0
    sample: int = 200_000
    batch_size: int = 2048
    chunk_rows: int = 16_384
    threads: int = 0


def make_mixture(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit-norm features and (n,) int64 true components.

    Component means are random directions of length ``separation`` noise standard deviations
    (noise sd 1/8 per dimension, times a per-component spread of 0.7-1.3); weights are
    Dirichlet(2), so clusters differ in size and width and overlap somewhat.
    """
    rng = np.random.default_rng(cfg.seed)
    means = rng.standard_normal((cfg.k, cfg.dim)).astype(np.float32)
    means *= cfg.separation / 8 / np.linalg.norm(means, axis=1, keepdims=True)
    spreads = rng.uniform(0.7, 1.3, cfg.k).astype(np.float32)
    weights = rng.dirichlet(np.full(cfg.k, 2.0))
    labels = rng.choice(cfg.k, size=cfg.n, p=weights).astype(np.int64)
    x = np.empty((cfg.n, cfg.dim), dtype=np.float32)
    step = 65_536
    for s in range(0, cfg.n, step):
        z = labels[s : s + step]
        block = rng.standard_normal((len(z), cfg.dim), dtype=np.float32) * (spreads[z, None] / 8)
        block += means[z]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s : s + step] = block
    return x, labels


def run_streamed(x: np.ndarray, cfg: Config) -> tuple[np.ndarray, float, dict]:
    from engine.kmeans import assign, fit_streamed_kmeans

    def source():
        for s in range(0, len(x), cfg.chunk_rows):
            yield x[s : s + cfg.chunk_rows]

    t0 = time.perf_counter()
    fit = fit_streamed_kmeans(
        source, cfg.k, n_total=len(x), sample=cfg.sample, seed=cfg.seed, batch_size=cfg.batch_size
    )
    t1 = time.perf_counter()
    labels = np.concatenate([assign(c, fit.centroids)[0] for c in source()])
    t2 = time.perf_counter()
    return (
        labels,
        t2 - t0,
        {
            "fit_s": t1 - t0,
            "assign_s": t2 - t1,
            "passes": fit.passes,
            "steps": fit.steps,
            "n_fit": fit.n_fit,
        },
    )


def run_full(x: np.ndarray, cfg: Config) -> tuple[np.ndarray, float, dict]:
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(n_clusters=cfg.k, n_init=1, random_state=cfg.seed).fit(x)
    labels = km.predict(x)
    t1 = time.perf_counter()
    return labels, t1 - t0, {"iterations": int(km.n_iter_)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    p.add_argument("--n", type=int, default=d.n, help="feature vectors (default %(default)s)")
    p.add_argument("--dim", type=int, default=d.dim, help="feature dimension (default %(default)s)")
    p.add_argument(
        "--k", type=int, default=d.k, help="mixture components = clusters (default %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="data and clustering seed (default %(default)s)"
    )
    p.add_argument(
        "--separation",
        type=float,
        default=d.separation,
        help="mixture mean scale; lower overlaps more (default %(default)s)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=d.sample,
        help="rows the streamed fit uses, as engine.cluster --sample (default %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="mini-batch rows (default %(default)s)"
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=d.chunk_rows,
        help="rows per streamed chunk (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="BLAS/OpenMP threads, 0 = library default (default %(default)s)",
    )
    p.add_argument("--skip-full", action="store_true", help="time only the streamed K-means")
    a = p.parse_args(argv)
    cfg = Config(
        a.n, a.dim, a.k, a.seed, a.separation, a.sample, a.batch_size, a.chunk_rows, a.threads
    )

    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(cfg.threads) if cfg.threads else None
    print(f"config: {cfg}  cpus={os.cpu_count()}")
    t0 = time.perf_counter()
    x, truth = make_mixture(cfg)
    print(
        f"data: {x.shape} float32 ({x.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )

    rows = []
    labels, secs, info = run_streamed(x, cfg)
    rows.append(
        ("streamed mini-batch (engine.kmeans)", secs, adjusted_rand_score(truth, labels), info)
    )
    if not a.skip_full:
        labels, secs, info = run_full(x, cfg)
        rows.append(
            ("full KMeans (sklearn, n_init=1)", secs, adjusted_rand_score(truth, labels), info)
        )
    print(f"{'method':<38} {'fit+assign s':>12} {'ARI':>7}  details")
    for name, secs, ari, info in rows:
        print(f"{name:<38} {secs:>12.2f} {ari:>7.4f}  {info}")
    if len(rows) == 2:
        speed = rows[1][1] / rows[0][1]
        gap = rows[1][2] - rows[0][2]
        ok = speed >= 10 and gap <= 0.02
        print(
            f"speed-up {speed:.1f}x, ARI(full) - ARI(streamed) = {gap:+.4f}  -> goal (>=10x, <=0.02) {'met' if ok else 'NOT met'}"
        )
    if limits is not None:
        limits.unregister() if hasattr(limits, "unregister") else None


if __name__ == "__main__":
    main()
