"""Fixtures shared by the whole suite: the real data beside the checkout, small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HISTOCLUSTER_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_DATA = REPO / "sample_data"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)  # two spinning OpenMP threads thrash a shared 2-core machine


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $HISTOCLUSTER_SHARED_DATA); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set HISTOCLUSTER_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    """The real Aperio SVS CMU-1-Small-Region (one level, 2220x2967, 0.499 um/px)."""
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def pyramidal_tiff(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level tiled pyramidal TIFF (0.499, 0.998, 1.996 um/px) written from the CMU SVS."""
    from tests.helpers import write_pyramidal_tiff

    out = tmp_path_factory.mktemp("pyramid") / "cmu_pyramid.tiff"
    write_pyramidal_tiff(cmu_svs, out, levels=3)
    return out
