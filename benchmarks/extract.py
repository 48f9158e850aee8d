"""Extraction at the machine's limit on the generated 40x slide (issue 16), in one run.

    .venv/bin/python benchmarks/extract.py [SLIDE] [--scale 0.5] [--big-scale 1.0]
        [--rounds 2] [--ceiling-tiles 512] [--read-tiles 1024] [--workers N]
        [--encoder SPEC] [--precision auto] [--reader auto] [--batch-size 64]
        [--startup-slide CMU] [--startup-runs 3]

Without SLIDE it uses the slide ``benchmarks/make_40x_slide.py`` writes (0.25 um/px, made once
into ``$TMPDIR/histocluster-bench`` and reused; ``--scale 1`` is the real-sized 88,800 x 71,208
px slide, ``--scale 0.5`` a quarter of its area), tiled as ``engine.extract`` does by default
(224 px at 0.5 um/px, every tile read at 448 px and shrunk). Interleaved rounds, each:

- ceiling: ``TileEncoder`` (the extractor's normalise + model, same precision) on
  ``--ceiling-tiles`` of the slide's tiles already decoded in memory, same batches;
- read only: ``--read-tiles`` of the planned batches read by the same reader workers as
  extraction (``--workers``), nothing encoded;
- end to end: ``python -m engine.extract``'s ``run`` in a fresh process (``extract_process.py``)
  into a fresh store: its encode loop's tiles/s, CPU seconds per tile (main + readers),
  start-up (process launch to the encode loop's first batch encoded) and peak RSS.

A last ceiling and read-only pass close the rounds; each end-to-end run is compared with the mean
of the measurements either side of it. Packed limit = what the encoder (on all C cores) and the
readers give when they share the C cores perfectly: ``C / (C/ceiling + 1/read-per-core)``
tiles/s (issue 16: ``1 / (2/enc + 1/read)`` per core pair). Then one end-to-end run on a slide
of 4x the area (``--big-scale``, default twice ``--scale``) for peak RSS, and ``--startup-runs``
runs on the small CMU slide for start-up. Goals: end to end (the loop) >= 0.95 of the packed
limit; peak RSS within 10% between the two slide sizes; start-up <= 1.5 s on the small slide.
The defaults take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as engine.extract runs (before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from make_40x_slide import make_40x_slide
from side_by_side import ceiling, middle, plan_of, print_table, read_only, tiles_in_memory

from engine.encode import TileEncoder, cpu_supports_bf16, resolve_precision
from engine.extract import ExtractConfig, auto_workers
from engine.extract_encode import BATCH_MULTIPLE
from engine.models import default_encoder_spec, load_encoder
from engine.tile_reader import READERS

HERE = Path(__file__).resolve().parent
CMU = HERE.parent.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
CHILD = HERE / "extract_process.py"


def in_fresh_process(cfg: ExtractConfig) -> dict[str, Any]:
    """``extract_process.py`` on ``cfg`` into a fresh store; its JSON line (see that script)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, out=str(Path(tmp) / "features.zarr"), quiet=True)
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(dataclasses.asdict(cfg)))
        env = {**os.environ, "HISTOCLUSTER_BENCH_T0": repr(time.time())}
        done = subprocess.run(
            [sys.executable, str(CHILD), str(config)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"extract_process.py failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def packed(ceil: float, read: float, cores: int) -> float:
    """Tiles/s of the encoder (``ceil`` on ``cores``) and readers (``read`` per core) perfectly
    sharing ``cores``: ``cores / (cores/ceil + 1/read)``."""
    return cores / (cores / ceil + 1 / read)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slide", nargs="?", help="a slide (default: the generated 40x slide)")
    p.add_argument("--scale", type=float, default=0.5, help="generated slide's sides (0.5)")
    p.add_argument("--big-scale", type=float, help="4x-area slide for peak RSS (2 x --scale)")
    p.add_argument("--rounds", type=int, default=2, help="end-to-end runs (2)")
    p.add_argument("--ceiling-tiles", type=int, default=512)
    p.add_argument("--read-tiles", type=int, default=1024)
    p.add_argument("--workers", type=int, default=auto_workers())
    p.add_argument("--encoder", default=default_encoder_spec())
    p.add_argument("--precision", default="auto")
    p.add_argument("--reader", choices=READERS, default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--startup-slide", default=str(CMU))
    p.add_argument("--startup-runs", type=int, default=3)
    p.add_argument("--bench-dir", default=str(Path(tempfile.gettempdir()) / "histocluster-bench"))
    a = p.parse_args(argv)
    big_scale = a.big_scale or 2 * a.scale
    slide = Path(a.slide) if a.slide else make_40x_slide(a.bench_dir, scale=a.scale)
    cfg = ExtractConfig(
        slides=[str(slide)],
        out="",
        encoder=a.encoder,
        batch_size=a.batch_size,
        workers=a.workers,
        device="cpu",
        precision=a.precision,
        reader=a.reader,
    )
    cores = torch.get_num_threads()
    precision = resolve_precision(a.precision, torch.device("cpu"))
    print(
        f"torch {torch.__version__}, {cores} threads, {os.cpu_count()} CPUs, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_supports_bf16()}, "
        f"load average {os.getloadavg()[0]:.2f}; encoder {a.encoder}, {precision}, batch "
        f"{a.batch_size}, workers {a.workers}, reader {a.reader}, {a.rounds} rounds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_of(cfg, Path(tmp))
    reads = middle(plan, a.read_tiles)
    batches, _ = tiles_in_memory(cfg, a.ceiling_tiles)
    encoder = TileEncoder(
        load_encoder(a.encoder), torch.device("cpu"), a.precision, batch_multiple=BATCH_MULTIPLE
    )
    print(
        f"{slide.name}: {plan.n_tiles} tissue tiles of {cfg.tile_px} px at {cfg.mpp} um/px; "
        f"ceiling on {sum(len(b) for b in batches)} tiles, read-only on {reads.n_tiles}",
        flush=True,
    )

    def side() -> tuple[tuple[float, float], tuple[float, float]]:
        c = ceiling(encoder, batches)
        r = read_only(reads, a.workers)[:2]
        print(f"  ceiling {c[0]:.1f} tiles/s, read only {r[0]:.1f} tiles/s", flush=True)
        return c, r

    sides = [side()]
    runs = []
    for k in range(a.rounds):
        runs.append(in_fresh_process(cfg))
        r = runs[-1]
        print(
            f"  round {k + 1}: loop {r['loop']:.1f} tiles/s, start-up {r['first_batch']:.2f} s, "
            f"peak RSS {r['rss_main_mib']:.0f} MiB (+ worker {r['rss_worker_mib']:.0f}), load "
            f"average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        sides.append(side())
    per_core = max(1, a.workers)
    rows = []
    for k, r in enumerate(runs):
        (c0, cc0), (r0, rc0) = sides[k]
        (c1, cc1), (r1, rc1) = sides[k + 1]
        ceil, read = (c0 + c1) / 2, (r0 + r1) / 2
        lim = packed(ceil, read / per_core, cores)
        rows.append(
            {
                "round": k + 1,
                "ceiling": ceil,
                "read": read,
                "packed": lim,
                "loop": r["loop"],
                "run": r["run"],
                "loop/packed": r["loop"] / lim,
                "loop/ceiling": r["loop"] / ceil,
                "ms CPU/tile": r["loop_cpu_per_tile"] * 1000,
                "enc+read ms": ((cc0 + cc1) / 2 + (rc0 + rc1) / 2) * 1000,
                "cpu ratio": ((cc0 + cc1) / 2 + (rc0 + rc1) / 2) / r["loop_cpu_per_tile"],
                "start-up s": r["first_batch"],
                "RSS MiB": r["rss_main_mib"],
            }
        )
    cols = list(rows[0])[1:]
    median = {"round": "median", **{c: float(np.median([row[c] for row in rows])) for c in cols}}
    print()
    print_table([*rows, median], cols, first="round")
    print(
        "tiles/s: ceiling = encoder only on decoded tiles (all cores), read = read only with "
        f"{a.workers} worker(s), packed = {cores}/({cores}/ceiling + 1/read-per-core), loop = "
        "end to end (encode loop), run = whole run in-process (tissue, encoder load, workers "
        "included); ms CPU/tile = the loop's CPU (main + workers) vs enc+read = ceiling + "
        "read-only CPU per tile, cpu ratio = enc+read / ms CPU/tile (the packed limit in CPU "
        "seconds, meaningful when other jobs share the cores); start-up = process launch to "
        "first batch encoded."
    )
    print(
        f"goal loop/packed >= 0.95: {median['loop/packed']:.3f} (wall), "
        f"{median['cpu ratio']:.3f} (CPU seconds); load average {os.getloadavg()[0]:.2f}"
    )

    big = make_40x_slide(a.bench_dir, scale=big_scale)
    b = in_fresh_process(dataclasses.replace(cfg, slides=[str(big)]))
    small_rss = max(r["rss_main_mib"] for r in runs)
    small_worker = max(r["rss_worker_mib"] for r in runs)
    print(
        f"peak RSS: {slide.name} {small_rss:.0f} MiB main + {small_worker:.0f} MiB worker "
        f"({runs[0]['tiles']} tiles); {big.name} (4x area) {b['rss_main_mib']:.0f} MiB main + "
        f"{b['rss_worker_mib']:.0f} MiB worker ({b['tiles']} tiles, loop {b['loop']:.1f} tiles/s, "
        f"start-up {b['first_batch']:.2f} s); ratio main {b['rss_main_mib'] / small_rss:.3f}, "
        f"worker {b['rss_worker_mib'] / small_worker:.3f} (goal within 10%)"
    )

    small = [
        in_fresh_process(dataclasses.replace(cfg, slides=[a.startup_slide]))
        for _ in range(a.startup_runs)
    ]
    keys = ("interpreter", "imported", "tissue", "encode", "first_batch", "end")
    med = {k: float(np.median([s[k] for s in small])) for k in keys}
    print(
        f"start-up on {Path(a.startup_slide).name} ({small[0]['tiles']} tiles), median of "
        f"{len(small)}, seconds since launch: "
        + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
        + f"; load average {os.getloadavg()[0]:.2f} (goal first_batch <= 1.5 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
