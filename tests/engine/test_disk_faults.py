"""A full disk and a read-only store meet one line naming the path and the fix, never a traceback,
and the store stays resumable (issue 15.3).

Real file systems: a 600 KiB tmpfs and a read-only bind mount, each in a private mount namespace
(``unshare -m``); the tests skip where the machine does not allow that.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "sample_slide.tiff"
EXTRACT = [sys.executable, "-m", "engine.extract", str(SAMPLE), "--encoder", "resnet18-random"]
FLAGS = ["--workers", "0", "--precision", "fp32", "--quiet", "--device", "cpu"]


def _in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    r = _in_namespace(f"mount -t tmpfs -o size=64k tmpfs {probe}")
    if r.returncode != 0:
        pytest.skip(f"no private mount namespace here ({r.stderr.strip()[:80]})")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_full_disk_is_one_line_and_the_copied_store_resumes(
    namespaces: None, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    out = small / "f.zarr"
    args = " ".join([*EXTRACT, "--out", str(out), "--tile-px", "32", "--mpp", "2", *FLAGS])
    saved = tmp_path / "saved"
    r = _in_namespace(
        f"mount -t tmpfs -o size=600k tmpfs {small} && {args}; rc=$?; cp -r {small} {saved}; exit $rc"
    )
    line = _one_error_line(r.stderr)
    assert r.returncode == 2, r.stderr
    assert str(out) in line and "No space left" in line and "resume" in line
    # the store written until the disk filled resumes on a disk with room
    resumed = subprocess.run(
        [*EXTRACT, "--out", str(saved / "f.zarr"), "--tile-px", "32", "--mpp", "2", *FLAGS],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


def test_read_only_store_is_one_line_in_extract_and_cluster(
    namespaces: None, tmp_path: Path
) -> None:
    data, view = tmp_path / "data", tmp_path / "view"
    data.mkdir()
    view.mkdir()
    made = subprocess.run(
        [*EXTRACT, "--out", str(data / "f.zarr"), "--tile-px", "64", "--mpp", "4", *FLAGS],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    mount = f"mount --bind {data} {view} && mount -o remount,bind,ro {view}"
    cluster = f"{sys.executable} -m engine.cluster {view / 'f.zarr'} --k 3 --quiet"
    r = _in_namespace(f"{mount} && {cluster}")
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr)
    assert str(view / "f.zarr") in line and "read-only" in line
    extract = " ".join(
        [*EXTRACT, "--out", str(view / "f.zarr"), "--tile-px", "64", "--mpp", "4", *FLAGS]
    )
    r = _in_namespace(f"{mount} && {extract} --overwrite")
    assert r.returncode == 2, r.stderr
    assert "read-only" in _one_error_line(r.stderr)
