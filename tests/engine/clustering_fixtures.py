"""Feature stores for the clustering, query and export tests (built once per test session).

``real_store`` encodes a real slide with ``engine.extract`` (resnet18-random, 64 px tiles at
2 um/px: a few dozen tissue tiles on the CMU slide). ``synthetic_store`` writes known features
into a real store layout over a real slide's grid, for exact checks that need many chunks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

_BUILT: dict[tuple, Path] = {}


def real_store(
    slide: Path,
    factory: pytest.TempPathFactory,
    tile_px: int = 64,
    mpp: float = 2.0,
    encoder: str = "resnet18-random",
) -> Path:
    """A features.zarr of ``slide`` made by ``engine.extract`` (cached for the session; do not modify)."""
    key = ("real", str(slide), tile_px, mpp, encoder)
    if key not in _BUILT:
        import torch

        from engine.extract import ExtractConfig, run

        torch.set_num_threads(1)
        out = factory.mktemp("store") / "features.zarr"
        summary = run(
            ExtractConfig(
                slides=[str(slide)],
                out=str(out),
                encoder=encoder,
                tile_px=tile_px,
                mpp=mpp,
                workers=0,
                batch_size=32,
                device="cpu",
                quiet=True,
            )
        )
        assert not summary.failures, summary.failures
        _BUILT[key] = out
    return _BUILT[key]


def copy_store(src: Path, dest_dir: Path) -> Path:
    """A private, writable copy of a cached store."""
    dest = dest_dir / src.name
    shutil.copytree(src, dest)
    return dest


def synthetic_store(
    slide: Path,
    out: Path,
    dim: int = 8,
    tile_px: int = 32,
    mpp: float = 0.5,
    seed: int = 0,
    ids: tuple[str, ...] = ("a",),
) -> Path:
    """A store over ``slide``'s real grid whose tissue tiles hold random (dim,) features.

    At 32 px / 0.5 um the CMU slide is 93 x 70 tiles, i.e. 3 x 3 chunks of 32 x 32, so chunked
    readers cross chunk boundaries. Each id in ``ids`` is the same grid with other features.
    """
    from engine.encoder_id import EncoderId
    from engine.slide import open_slide
    from engine.store import FeatureStore
    from engine.tiling import TileGrid

    encoder = EncoderId(
        name="synthetic", arch="resnet18", dim=dim, input_px=224, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    rng = np.random.default_rng(seed)
    with open_slide(slide) as s:
        grid = TileGrid(s, target_mpp=mpp, tile_px=tile_px)
        store = FeatureStore.create_or_open(out, encoder, grid.tiling)
        for sid in ids:
            sf = store.add_slide(sid, grid)
            rows, cols = np.nonzero(sf.selected)
            sf.write_tiles(rows, cols, rng.standard_normal((len(rows), dim)).astype(np.float32))
    return out
