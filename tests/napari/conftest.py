"""Fixtures of the napari tests: the committed sample slide and a fast widget setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_DATA

ARTIFACTS = REPO / "test-artifacts"
"""Screenshots the GUI tests leave for people to look at (gitignored)."""

# Few, coarse tiles: 64 px at 8 um/px is 1024 level-0 px of the sample slide, a 6 x 4 grid.
FAST = {"encoder": "resnet18-random", "tile_px": 64, "target_mpp": 8.0, "k": 3}


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """sample_data/sample_slide.tiff (5376 x 4032 px, 0.5 um/px, 4 levels)."""
    path = SAMPLE_DATA / "sample_slide.tiff"
    if not path.is_file():
        pytest.skip(f"{path} not found — run python sample_data/make_sample_slide.py")
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The widget's default store cache, inside the test's tmp_path."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(cache))
    return cache


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
