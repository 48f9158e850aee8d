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


@pytest.fixture(autouse=True)
def tmp_path_outlives_the_viewer(tmp_path: Path) -> Path:
    """Sets tmp_path up before any viewer, so it is torn down after the viewer has closed.

    The suite removes a passed test's tmp_path at its teardown (``tmp_path_retention_policy``);
    a viewer closed after that would save its curation into a store already deleted.
    """
    return tmp_path


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


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory, sample_slide: Path, cmu_svs: Path) -> Path:
    """A folder of three slides: the real CMU-1-Small-Region.svs, the sample slide and a second
    generated slide (seed 1, half size), linked into one folder."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("cohort")
    subprocess.run(
        [
            sys.executable,
            str(SAMPLE_DATA / "make_sample_slide.py"),
            "--out-dir",
            str(folder / "gen"),
            "--seed",
            "1",
            "--width",
            "2688",
            "--height",
            "2016",
            "--name",
            "second_slide",
            "--quiet",
        ],
        check=True,
        timeout=300,
    )
    (folder / "slides").mkdir()
    for src in (cmu_svs, sample_slide, folder / "gen" / "second_slide.tiff"):
        (folder / "slides" / src.name).symlink_to(src)
    return folder / "slides"
