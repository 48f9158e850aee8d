"""Seeded random damage of the sample slide: extraction never hangs or prints a traceback, names the
file in one line, and encodes every tile it can read (issue 15's fuzz test).

Each case copies ``sample_data/sample_slide.tiff`` (pyramidal JPEG TIFF), truncates it or overwrites
byte ranges of 1 B to 4 KiB at seeded offsets, and extracts it at 128 px / 1 um per px (level 1) with a
16-px encoder: the grid is 16 x 21 tiles, so a case takes about a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.extract import main as extract_main
from engine.store import FeatureStore
from tests.helpers import write_seeded_resnet18

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_data" / "sample_slide.tiff"
CASES = 56

pytestmark = pytest.mark.skipif(not SAMPLE.exists(), reason="sample_data/sample_slide.tiff absent")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_seeded_resnet18(tmp_path_factory.mktemp("enc") / "tiny.pt", 16)


def damage(src: Path, dest: Path, rng: np.random.Generator) -> str:
    """Write a damaged copy of ``src`` to ``dest``; say what was done."""
    data = bytearray(src.read_bytes())
    if rng.random() < 0.25:
        cut = int(rng.integers(8, len(data)))
        dest.write_bytes(bytes(data[:cut]))
        return f"truncated to {cut} of {len(data)} bytes"
    done = []
    for _ in range(int(rng.integers(1, 4))):
        size = int(rng.choice([1, 16, 256, 4096]))
        start = int(rng.integers(0, len(data) - size))
        data[start : start + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        done.append(f"{size} B at {start}")
    dest.write_bytes(bytes(data))
    return "overwrote " + ", ".join(done)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(CASES))
def test_damaged_slide_fails_cleanly_or_is_salvaged(
    seed: int, encoder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    slide = tmp_path / "sample_slide.tiff"
    what = damage(SAMPLE, slide, np.random.default_rng(seed))
    out = tmp_path / "f.zarr"
    args = [
        str(slide),
        "--out",
        str(out),
        "--encoder",
        str(encoder),
        "--tile-px",
        "128",
        "--mpp",
        "1",
    ]
    rc = extract_main([*args, "--workers", "0", "--precision", "fp32", "--quiet"])
    err = capfd.readouterr().err
    assert "Traceback" not in err, (what, err)
    assert rc in (0, 1), (what, rc, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (rc == 1) == bool(errors), (what, err)
    for line in errors:
        assert str(slide) in line or slide.name in line, (what, line)
    store = FeatureStore.open(out)
    for sid in store.slide_ids():
        sf = store.slide(sid)
        assert not (sf.selected & ~sf.done & ~sf.failed).any(), (what, "tiles left unread")
        if sf.failed.any():
            assert rc == 1 and "unreadable" in err, (what, err)
    shutil.rmtree(out)
