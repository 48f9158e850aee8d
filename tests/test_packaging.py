"""Packaging: a built wheel carries every package, the sample slide and the sample encoder, and an
install of it (not editable) finds them through importlib.resources."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.sample_data import sample_encoder_path, sample_slide_path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_FILES = ("sample_slide.tiff", "sample_encoder.pt", "sample_slide_mask.png")

FIND_SAMPLES = """
import sys, warnings
sys.path = [p for p in sys.path if p not in ('', {repo!r})]
warnings.simplefilter('error')
import engine, engine.sample_data as s, engine.models as m
assert engine.__file__.startswith({site!r}), engine.__file__
print(s.sample_slide_path()); print(s.sample_encoder_path()); print(m.default_encoder_spec())
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + [str(REPO), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("histocluster-*.whl")
    return found


def test_checkout_finds_the_samples() -> None:
    assert sample_slide_path() is not None and sample_encoder_path() is not None


@pytest.mark.slow
def test_wheel_holds_every_package_and_the_samples(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for sample in SAMPLE_FILES:
        assert f"histocluster_sample_data/{sample}" in names
    sources = [
        p.relative_to(REPO).as_posix()
        for top in ("engine", "histocluster_napari")
        for p in (REPO / top).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    missing = [s for s in sources if s not in names]
    assert not missing, f"packages missing from pyproject's list: {missing}"
    assert "histocluster_napari/napari.yaml" in names
    size = (REPO / "sample_data" / "sample_encoder.pt").stat().st_size
    assert (
        zipfile.ZipFile(wheel).getinfo("histocluster_sample_data/sample_encoder.pt").file_size
        == size
    )


@pytest.mark.slow
def test_installed_wheel_finds_samples_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Unpack the wheel as site-packages (what pip install does, minus deps) and import from it."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = FIND_SAMPLES.format(repo=str(REPO), site=str(site))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    slide, encoder, default = proc.stdout.split()
    assert slide == str(site / "histocluster_sample_data" / "sample_slide.tiff")
    assert encoder == default == str(site / "histocluster_sample_data" / "sample_encoder.pt")
