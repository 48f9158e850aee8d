"""The CPU encoder with glibc's default heap vs inside ``engine.heap.retained_heap``, in one run.

    .venv/bin/python benchmarks/heap.py [--encoder resnet18-random] [--batch 64] [--rounds 4]

Rounds alternate: each encodes ``--steps`` batches of (batch, 224, 224, 3) uint8 tiles after two
warm-up batches, once with the default heap and once retained. It prints wall ms, user and
system CPU ms and minor page faults per batch, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time

import numpy as np
import torch

from engine.encode import TileEncoder
from engine.heap import retained_heap
from engine.models import load_encoder


def one_round(encode: TileEncoder, tiles: torch.Tensor, steps: int, retained: bool) -> dict:
    """Per-batch wall ms, user ms, system ms and minor faults over ``steps`` batches."""
    with retained_heap() if retained else contextlib.nullcontext():
        encode(tiles)
        encode(tiles)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            encode(tiles)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall / steps * 1000,
        "user": (r1.ru_utime - r0.ru_utime) / steps * 1000,
        "sys": (r1.ru_stime - r0.ru_stime) / steps * 1000,
        "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="resnet18-random")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args(argv)
    encode = TileEncoder(load_encoder(a.encoder), torch.device("cpu"), a.precision)
    tiles = torch.randint(0, 256, (a.batch, 224, 224, 3), dtype=torch.uint8)
    rows: dict[str, list[dict]] = {"default": [], "retained": []}
    for _ in range(a.rounds):
        for name in rows:
            rows[name].append(one_round(encode, tiles, a.steps, name == "retained"))
            r = rows[name][-1]
            print(
                f"  {name:8s} wall {r['wall']:6.0f} ms, user {r['user']:6.0f} ms, sys "
                f"{r['sys']:5.0f} ms, {r['faults']:8.0f} faults per batch",
                flush=True,
            )
    med = {n: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for n, rs in rows.items()}
    print(
        f"{a.encoder} {encode.precision}, batch {a.batch}, median of {a.rounds}: wall per batch "
        f"default / retained = {med['default']['wall'] / med['retained']['wall']:.2f}x; system "
        f"ms {med['default']['sys']:.0f} -> {med['retained']['sys']:.0f}; faults "
        f"{med['default']['faults']:.0f} -> {med['retained']['faults']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
