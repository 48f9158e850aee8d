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
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.encode import TileEncoder, cpu_supports_bf16, resolve_precision
from engine.encoders import REGISTRY
from engine.extract import ExtractConfig, auto_workers, make_plan, run
from engine.models import load_encoder
from engine.slide import open_slide, slide_id
from engine.store import FeatureStore
from engine.tiling import TileGrid
from engine.vit import build_model

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
MODELS = ("lunit-dino-vits16", "kaiko-vitb16")


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (reader workers), user + system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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


def tiles_in_memory(
    slide_path: Path, spec: str, grid_args: dict, batch_size: int
) -> tuple[list[torch.Tensor], float]:
    """The batches the extractor encodes, as (B,tile,tile,3) uint8 tensors already decoded, and the
    CPU seconds per tile that reading + decoding them took."""
    with tempfile.TemporaryDirectory() as tmp, open_slide(slide_path) as slide:
        grid = TileGrid(slide, **grid_args)
        store = FeatureStore.create_or_open(
            Path(tmp) / "f.zarr", load_encoder(spec).identity(), grid.tiling
        )
        store.add_slide(slide_id(slide_path), grid)
        plan = make_plan(store, [slide_id(slide_path)], batch_size)
        cpu = time.process_time()
        out = []
        for i in range(len(plan)):
            rows = plan.rows[plan.start[i] : plan.stop[i]]
            cols = plan.cols[plan.start[i] : plan.stop[i]]
            tiles = [grid.read_tile(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
            out.append(torch.from_numpy(np.stack(tiles)))
        return out, (time.process_time() - cpu) / max(1, plan.n_tiles)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(encode: TileEncoder, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(tiles/s, CPU s/tile) of ``encode`` over ``batches``, after a warm-up batch."""
    encode(batches[0][:4])
    _sync(encode.device)
    n, t, c = 0, time.perf_counter(), _cpu_s()
    for b in batches:
        encode(b)
        n += len(b)
    _sync(encode.device)
    return n / (time.perf_counter() - t), (_cpu_s() - c) / n


def end_to_end(
    slide: Path, spec: str, grid_args: dict, precision: str, a: argparse.Namespace
) -> dict[str, float]:
    """One ``engine.extract.run`` into a fresh store: loop and run tiles/s, CPU s/tile of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(
            slides=[str(slide)],
            out=str(Path(tmp) / "features.zarr"),
            encoder=spec,
            tile_px=grid_args["tile_px"],
            mpp=grid_args["target_mpp"],
            stride_px=grid_args["stride_px"],
            batch_size=a.batch_size,
            workers=a.workers,
            device=a.device,
            precision=precision,
            quiet=True,
        )
        c = _cpu_s()
        s = run(cfg)
        return {"loop": s.encode_tiles_per_s, "run": s.tiles_per_s, "cpu": (_cpu_s() - c) / s.tiles}


def measure(
    slide: Path, spec: str, grid_args: dict, batches: list[torch.Tensor], precision: str, a
) -> dict[str, float | str]:
    """Ceilings and end-to-end runs alternating; ratios against the ceilings either side."""
    enc = TileEncoder(load_encoder(spec), torch.device(a.device), precision)
    ceils = [ceiling(enc, batches)]
    runs = []
    for _ in range(a.rounds):
        runs.append(end_to_end(slide, spec, grid_args, precision, a))
        ceils.append(ceiling(enc, batches))
    around = [
        ((ceils[k][0] + ceils[k + 1][0]) / 2, (ceils[k][1] + ceils[k + 1][1]) / 2)
        for k in range(len(runs))
    ]
    pairs = list(zip(runs, around, strict=True))
    return {
        "ceil": float(np.mean([c[0] for c in ceils])),
        "loop": float(np.mean([r["loop"] for r in runs])),
        "run": float(np.mean([r["run"] for r in runs])),
        "loop/ceil": float(np.median([r["loop"] / w for r, (w, _) in pairs])),
        "run/ceil": float(np.median([r["run"] / w for r, (w, _) in pairs])),
        "cpu ceil/run": float(np.median([c / r["cpu"] for r, (_, c) in pairs])),
        "detail": "ceilings "
        + ", ".join(f"{c[0]:.2f}" for c in ceils)
        + "; loops "
        + ", ".join(f"{r['loop']:.2f}" for r in runs),
    }


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
    grid_args = {"target_mpp": a.mpp, "tile_px": a.tile_px, "stride_px": a.stride_px or a.tile_px}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_supports_bf16()}, "
        f"load average {os.getloadavg()[0]:.1f}; device {a.device}, batch {a.batch_size}, "
        f"workers {a.workers}, {a.rounds} rounds; {a.tile_px}-px tiles at {a.mpp} um/px, "
        f"stride {grid_args['stride_px']} px, resized to 224 px"
    )
    table = []
    with tempfile.TemporaryDirectory(prefix="histocluster-vit-bench-") as tmp:
        for name in models:
            spec = f"{name}:{released_random_file(name, Path(tmp))}"
            batches, read_cpu = tiles_in_memory(slide, spec, grid_args, a.batch_size)
            print(
                f"{name} ({REGISTRY[name].arch}): {sum(len(b) for b in batches)} tiles; reading + "
                f"decoding costs {read_cpu * 1000:.1f} ms CPU per tile",
                flush=True,
            )
            for precision in [s.strip() for s in a.precisions.split(",") if s.strip()]:
                shown = resolve_precision(precision, torch.device(a.device))
                row = {"setting": f"{name} {shown}" + (" (auto)" if precision == "auto" else "")}
                row.update(measure(slide, spec, grid_args, batches, precision, a))
                table.append(row)
                print(row, flush=True)

    print()
    cols = ["ceil", "loop", "run", "loop/ceil", "run/ceil", "cpu ceil/run"]
    print(f"{'setting':<28}" + "".join(f"{c:>14}" for c in cols))
    for row in table:
        print(
            f"{row['setting']:<28}"
            + "".join(f"{row[c]:>14.3f}" for c in cols)
            + f"   ({row['detail']})"
        )
    print(
        "ceil/loop/run in tiles/s (means); ratios are medians over rounds, each run against the "
        "ceilings either side; cpu ceil/run = encoder-only CPU s per tile / whole-run CPU s per tile "
        "(main + reader workers, incl. tissue mask and start-up). Goal loop/ceil >= 0.9."
    )


if __name__ == "__main__":
    main()
