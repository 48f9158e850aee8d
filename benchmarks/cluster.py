"""Streamed mini-batch K-means (engine.kmeans) against scikit-learn's full KMeans, side by side.

Synthetic features from a known Gaussian mixture (unequal weights and spreads), L2-normalised
as ``engine.cluster`` does by default. Both methods see the same float32 matrix, use k-means++
with one initialisation and the same seed; each is timed for fit + assignment of every row and
scored by the adjusted Rand index against the true mixture component. The streamed method
runs with engine.cluster's defaults (fit on a 200,000-row random sample, 2048-row batches,
3 mini-batch passes, then at most 10 Lloyd passes over the sample) and assigns all rows; it
reports progress to a callback as ``engine.cluster`` does (the count of calls is printed).

    .venv/bin/python benchmarks/cluster.py                 # 1,000,000 x 512, k = 16
    .venv/bin/python benchmarks/cluster.py --seeds 0,1,2   # three mixtures, mean ARI
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


HELP = {
    "n": "feature vectors",
    "dim": "feature dimension",
    "k": "components = clusters",
    "separation": "distance of component means from the origin in noise sd; lower overlaps more",
    "sample": "rows the streamed fit uses, as engine.cluster --sample",
    "batch_size": "mini-batch rows",
    "chunk_rows": "rows per streamed chunk",
    "threads": "BLAS/OpenMP threads, 0 = library default",
}
"""The command-line flags: one per ``Config`` field (``--batch-size`` for ``batch_size``)."""


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


def run_streamed(x: np.ndarray, cfg: Config) -> tuple[np.ndarray, float, float, dict]:
    from engine.kmeans import KMeansSettings, assign, fit_streamed_kmeans

    def source():
        for s in range(0, len(x), cfg.chunk_rows):
            yield x[s : s + cfg.chunk_rows]

    calls = [0]

    def progress(stage: str, done: int, total: int) -> None:  # what a GUI's Cancel check costs
        calls[0] += 1

    t0, c0 = time.perf_counter(), time.process_time()
    settings = KMeansSettings(cfg.k, sample=cfg.sample, seed=cfg.seed, batch_size=cfg.batch_size)
    fit = fit_streamed_kmeans(source, settings, n_total=len(x), progress=progress)
    t1 = time.perf_counter()
    labels = np.concatenate([assign(c, fit.centroids, distances=False)[0] for c in source()])
    t2, c2 = time.perf_counter(), time.process_time()
    info = {"fit_s": round(t1 - t0, 2), "assign_s": round(t2 - t1, 2), "passes": fit.passes}
    info["progress_calls"] = calls[0]
    return labels, t2 - t0, c2 - c0, {**info, "steps": fit.steps, "n_fit": fit.n_fit}


def run_full(x: np.ndarray, cfg: Config) -> tuple[np.ndarray, float, float, dict]:
    from sklearn.cluster import KMeans

    t0, c0 = time.perf_counter(), time.process_time()
    km = KMeans(n_clusters=cfg.k, n_init=1, random_state=cfg.seed).fit(x)
    labels = km.predict(x)
    t1, c1 = time.perf_counter(), time.process_time()
    return labels, t1 - t0, c1 - c0, {"iterations": int(km.n_iter_)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    for name, what in HELP.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(getattr(d, name)),
            default=getattr(d, name),
            help=f"{what} (default %(default)s)",
        )
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds; each draws its own mixture and seeds both methods (default 0)",
    )
    p.add_argument("--skip-full", action="store_true", help="time only the streamed K-means")
    a = p.parse_args(argv)
    seeds = [int(v) for v in a.seeds.split(",")]

    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    if a.threads:
        threadpool_limits(a.threads)
    results: dict[str, list[tuple[float, float, float]]] = {}
    print(f"{'seed':>4}  {'method':<36} {'wall s':>8} {'cpu s':>8} {'ARI':>7}  details", flush=True)
    for seed in seeds:
        cfg = Config(
            a.n, a.dim, a.k, seed, a.separation, a.sample, a.batch_size, a.chunk_rows, a.threads
        )
        x, truth = make_mixture(cfg)
        runs = [("streamed mini-batch (engine.kmeans)", run_streamed)]
        if not a.skip_full:
            runs.append(("full KMeans (sklearn, n_init=1)", run_full))
        for name, fn in runs:
            labels, wall, cpu, info = fn(x, cfg)
            ari = adjusted_rand_score(truth, labels)
            results.setdefault(name, []).append((wall, cpu, ari))
            print(f"{seed:>4}  {name:<36} {wall:>8.2f} {cpu:>8.2f} {ari:>7.4f}  {info}", flush=True)
        del x
    print(
        f"data: {a.n} x {a.dim} float32 ({a.n * a.dim * 4 / 2**30:.2f} GiB), k={a.k}, "
        f"separation={a.separation}, seeds={seeds}, cpus={os.cpu_count()}; "
        "times are fit + assignment of every row"
    )
    for name, rs in results.items():
        wall, cpu, aris = np.array(rs).T
        print(
            f"mean  {name:<36} {wall.mean():>8.2f} {cpu.mean():>8.2f} {aris.mean():>7.4f}"
            f"  (ARI sd {aris.std():.4f})"
        )
    if len(results) == 2:
        (s_wall, s_cpu, s_ari), (f_wall, f_cpu, f_ari) = (np.array(r).T for r in results.values())
        speed, cpu_speed = f_wall.sum() / s_wall.sum(), f_cpu.sum() / s_cpu.sum()
        gap = f_ari.mean() - s_ari.mean()
        ok = speed >= 10 and gap <= 0.02
        print(
            f"speed-up {speed:.1f}x wall ({cpu_speed:.1f}x cpu), mean ARI(full) - ARI(streamed) = "
            f"{gap:+.4f}  -> goal (>= 10x, gap <= 0.02) {'met' if ok else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
