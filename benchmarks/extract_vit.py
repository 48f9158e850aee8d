"""ViT extraction throughput: end-to-end tiles/s vs the encoder-only ceiling, ViT-S/16 and ViT-B/16.

    .venv/bin/python benchmarks/extract_vit.py [SLIDE] [--models lunit-dino-vits16,kaiko-vitb16]
        [--tile-px 224] [--mpp 1.0] [--stride-px 160] [--batch-size 16] [--workers N]
        [--rounds 2] [--device cpu] [--precisions auto]

The two registry entries that are plain timm ViTs (Lunit DINO ViT-S/16, kaiko ViT-B/16) with
random weights of their full architecture, written to a temporary file in the released format and
passed as ``NAME:PATH`` (the same loading path as a downloaded release). Per model and precision:

- ceiling: ``TileEncoder`` (normalisation + resize to 224 + model: the code the extractor runs) on
  the slide's tiles already decoded in memory, the same batches;
- end-to-end: ``engine.extract.run`` into a fresh store: the encode loop (reader workers decoding,
  encoding, zarr writes) and the whole run (plus tissue mask, encoder load, worker start-up).

Ratios as ``benchmarks/extract.py`` gives them for ResNet-18: loop/ceil and run/ceil in wall-clock
tiles/s (each run against the mean of the ceilings measured either side of it), and cpu ceil/run
(CPU s per tile, main process plus readers), which stays meaningful when other jobs share the
cores. ``--precisions auto`` is what extraction runs by default (bf16 on CUDA and on CPUs with
native bf16, else fp32); name several (``fp32,bf16``) to compare. The defaults (224-px tiles at
1 um/px, stride 160 px, on the CMU slide: about 25 tiles) keep a run to a few minutes on 2 CPU
cores; on a GPU pass ``--device cuda --mpp 0.5 --stride-px 112 --batch-size 128`` for a steady
state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from functools import partial
from pathlib import Path

import torch
from side_by_side import ceiling, end_to_end, interleaved, print_table, tiles_in_memory

from engine.encode import TileEncoder, cpu_supports_bf16, resolve_precision
from engine.encoders import REGISTRY
from engine.extract import ExtractConfig, auto_workers
from engine.extract_encode import BATCH_MULTIPLE
from engine.models import load_encoder
from engine.vit import build_model

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
MODELS = ("lunit-dino-vits16", "kaiko-vitb16")


def released_random_file(name: str, folder: Path) -> Path:
    """The entry's full timm architecture, seeded random weights, saved as its release is."""
    e = REGISTRY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(e)
    path = folder / name / str(e.filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.model.state_dict(), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slide", nargs="?", default=str(CMU))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated timm entries")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--mpp", type=float, default=1.0)
    p.add_argument("--stride-px", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=auto_workers())
    p.add_argument("--rounds", type=int, default=2, help="end-to-end runs per setting")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default="auto", help="comma-separated: auto, fp32, bf16, fp16")
    a = p.parse_args()
    slide = Path(a.slide)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in REGISTRY or REGISTRY[m].family != "timm":
            p.error(f"--models: {m} is not a timm registry entry")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_supports_bf16()}, "
        f"load average {os.getloadavg()[0]:.1f}; device {a.device}, batch {a.batch_size}, "
        f"workers {a.workers}, {a.rounds} rounds; {a.tile_px}-px tiles at {a.mpp} um/px, "
        f"stride {a.stride_px or a.tile_px} px, resized to 224 px"
    )
    table = []
    with tempfile.TemporaryDirectory(prefix="histocluster-vit-bench-") as tmp:
        for name in models:
            spec = f"{name}:{released_random_file(name, Path(tmp))}"
            same = ("tile_px", "mpp", "stride_px", "batch_size", "workers", "device")
            base = ExtractConfig(
                slides=[str(slide)], out="", encoder=spec, **{k: getattr(a, k) for k in same}
            )
            batches, read_cpu = tiles_in_memory(base)
            print(
                f"{name} ({REGISTRY[name].arch}): {sum(len(b) for b in batches)} tiles; reading + "
                f"decoding costs {read_cpu * 1000:.1f} ms CPU per tile",
                flush=True,
            )
            for precision in [s.strip() for s in a.precisions.split(",") if s.strip()]:
                shown = resolve_precision(precision, torch.device(a.device))
                cfg = dataclasses.replace(base, precision=precision)
                enc = TileEncoder(
                    load_encoder(spec),
                    torch.device(a.device),
                    precision,
                    batch_multiple=BATCH_MULTIPLE,
                )
                row = {"setting": f"{name} {shown}" + (" (auto)" if precision == "auto" else "")}
                row.update(
                    interleaved(partial(ceiling, enc, batches), partial(end_to_end, cfg), a.rounds)
                )
                table.append(row)
                print(row, flush=True)

    print()
    print_table(table, ["ceil", "loop", "run", "loop/ceil", "run/ceil", "cpu ceil/run"])
    print(
        "ceil/loop/run in tiles/s (means); ratios are medians over rounds, each run against the "
        "ceilings either side; cpu ceil/run = encoder-only CPU s per tile / whole-run CPU s per tile "
        "(main + reader workers, incl. tissue mask and start-up). Goal loop/ceil >= 0.9."
    )


if __name__ == "__main__":
    main()
