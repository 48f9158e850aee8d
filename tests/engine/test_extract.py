"""python -m engine.extract on the real CMU slide: layout, correctness, resume after SIGKILL,
2-process gloo run, failures, --slide-mpp, store refusal, bf16 numerics.

Tiles are 16 px at 2 um/px (47 x 35 tiles, 2 x 2 chunks, 565 selected) through a ResNet-18 with
16 px input, so each run takes seconds on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from engine import cli
from engine.encode import TileEncoder
from engine.errors import HistoclusterError, StoreError
from engine.extract import ExtractConfig, build_parser, chunk_batches, main, parse_slide_mpp, run
from engine.models import load_encoder
from engine.progress import Cancelled
from engine.slide import open_slide
from engine.store import CHUNK, FeatureStore
from engine.store_lock import StoreLock
from engine.tiling import TileGrid
from tests.helpers import decode_svs_level0, write_seeded_resnet18

REPO = Path(__file__).resolve().parents[2]
TILE_PX, MPP, BATCH = 16, 2.0, 64


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 checkpoint (engine.pretrain format) with 16 px input: fast plumbing."""
    return write_seeded_resnet18(
        tmp_path_factory.mktemp("encoder") / "tiny.pt", TILE_PX, {"test": True}
    )


def _args(slides: list[Path], out: Path, encoder: Path, *extra: str) -> list[str]:
    return [
        *map(str, slides),
        "--out", str(out),
        "--encoder", str(encoder),
        "--tile-px", str(TILE_PX),
        "--mpp", str(MPP),
        "--batch-size", str(BATCH),
        "--workers", "1",
        "--precision", "fp32",  # explicit: auto picks bf16 on CPUs with native bf16
        "--reader", "openslide",  # these figures are of the OpenSlide path; the jpeg reader has its own tests
        "--quiet",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(cmu_svs: Path, tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process extraction of the CMU slide."""
    out = tmp_path_factory.mktemp("reference") / "features.zarr"
    assert main(_args([cmu_svs], out, tiny_encoder)) == 0
    return out


@pytest.fixture(scope="module")
def jpeg_reference(
    cmu_svs: Path, tiny_encoder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The same extraction read by --reader jpeg (reduced-size decoding of the slide's tiles)."""
    out = tmp_path_factory.mktemp("jpeg_reference") / "features.zarr"
    assert main(_args([cmu_svs], out, tiny_encoder, "--reader", "jpeg")) == 0
    return out


@pytest.fixture(params=["openslide", "jpeg"])
def reader_reference(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """Each reader with its own uninterrupted single-process run (the figure to equal)."""
    name = "reference" if request.param == "openslide" else "jpeg_reference"
    return request.param, request.getfixturevalue(name)


def _arrays(path: Path, sid: str = "CMU-1-Small-Region") -> dict[str, np.ndarray]:
    sf = FeatureStore.open(path).slide(sid)
    return {
        "features": sf.read_features(),
        "done": sf.done,
        "tissue": sf.tissue,
        "origins": sf.origins,
    }


def _assert_same_store(a: Path, b: Path) -> None:
    x, y = _arrays(a), _arrays(b)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_reference_run_writes_every_selected_tile(reference: Path, cmu_svs: Path) -> None:
    store = FeatureStore.open(reference)
    assert store.slide_ids() == ["CMU-1-Small-Region"]
    sf = store.slide("CMU-1-Small-Region")
    assert sf.shape == (47, 35) and sf.dim == 512
    done = np.asarray(sf.done[...])
    assert np.array_equal(done, sf.selected) and done.sum() == 565
    feats = sf.read_features().astype(np.float32)
    assert np.all(np.linalg.norm(feats[done], axis=1) > 0) and not feats[~done].any()
    assert store.encoder.input_px == TILE_PX and store.tiling.target_mpp == MPP

    summary = json.loads(reference.with_name("features.zarr.summary.json").read_text())
    assert summary["tiles"] == 565 and summary["failures"] == [] and summary["precision"] == "fp32"
    assert summary["tiles_per_s"] > 0 and summary["seconds"] > 0
    config = json.loads(reference.with_name("features.zarr.config.json").read_text())
    assert config["tile_px"] == TILE_PX and config["resolved"]["encoder"]["arch"] == "resnet18"


def test_features_are_the_encoding_of_the_tile_at_that_position(
    reference: Path, cmu_svs: Path, tiny_encoder: Path
) -> None:
    store = FeatureStore.open(reference)
    sf = store.slide("CMU-1-Small-Region")
    grid = TileGrid(open_slide(cmu_svs), target_mpp=MPP, tile_px=TILE_PX)
    rows, cols = np.nonzero(sf.selected)
    pick = np.random.default_rng(0).choice(len(rows), 24, replace=False)
    tiles = np.stack([grid.read_tile(int(rows[k]), int(cols[k])) for k in pick])
    encode = TileEncoder(load_encoder(tiny_encoder), torch.device("cpu"), "fp32")
    direct = encode(torch.from_numpy(tiles)).numpy()
    stored = sf.read_tiles(rows[pick], cols[pick])
    np.testing.assert_allclose(stored, direct, rtol=2e-2, atol=2e-2)
    # and not just any tile's features: neighbours differ
    assert not np.allclose(stored[0], stored[1], atol=2e-2)


def test_second_run_encodes_nothing(
    reference: Path, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "features.zarr"
    shutil.copytree(reference, out)
    assert main(_args([cmu_svs], out, tiny_encoder)) == 0
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert summary["tiles"] == 0 and summary["tiles_already_done"] == 565
    _assert_same_store(reference, out)


def test_device_reader_matches_the_cpu_readers(
    reference: Path, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """``--reader device``: workers read the slide's JPEG bytes, the encoder's device (the CPU
    here, CUDA on a GPU node) decodes, crops and resizes them; every selected tile is encoded,
    features within cosine 0.99 of the OpenSlide path, and a second run encodes nothing."""
    out = tmp_path / "device.zarr"
    args = [("device" if a == "openslide" else a) for a in _args([cmu_svs], out, tiny_encoder)]
    assert "device" in args and main(args) == 0
    ref, got = _arrays(reference), _arrays(out)
    np.testing.assert_array_equal(got["done"], ref["done"])
    a = ref["features"][ref["done"]].astype(np.float32)
    b = got["features"][got["done"]].astype(np.float32)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert len(a) == 565 and cosine.min() >= 0.99, cosine.min()
    summary = json.loads(out.with_name("device.zarr.summary.json").read_text())
    assert summary["tiles"] == 565 and summary["failures"] == [] and summary["warnings"] == []
    assert main(args) == 0
    assert json.loads(out.with_name("device.zarr.summary.json").read_text())["tiles"] == 0


def test_resume_after_sigkill_equals_uninterrupted_run(
    reader_reference: tuple[str, Path], cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    reader, reference = reader_reference
    out = tmp_path / "features.zarr"
    # Flush after every batch, and 50 ms per batch (in the progress callback: the features are
    # untouched), so the kill lands in the middle of a chunk however fast the reader or busy the CPU.
    script = (
        "import time\n"
        "from engine.extract import ExtractConfig, run\n"
        f"run(ExtractConfig(slides=[{str(cmu_svs)!r}], out={str(out)!r}, encoder={str(tiny_encoder)!r}, "
        f"tile_px={TILE_PX}, mpp={MPP}, batch_size=8, workers=1, quiet=True, flush_every_s=0.0, precision='fp32', reader={reader!r}),\n"
        "    progress=lambda stage, done, total: time.sleep(0.05 if stage == 'encode' else 0))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), cwd=REPO)
    done_path = out / "slides" / "CMU-1-Small-Region" / "done" / "c"
    deadline = time.monotonic() + 120
    try:
        # the first chunk of ``done`` written (a file, not just its folder), then 20 ms: the
        # kill lands in the next batch's 50 ms, after the first flush and long before the end
        while proc.poll() is None and time.monotonic() < deadline:
            if done_path.is_dir() and any(p.is_file() for p in done_path.rglob("*")):
                break
            time.sleep(0.005)
        time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    sf = FeatureStore.open(out).slide("CMU-1-Small-Region")
    done = np.asarray(sf.done[...])
    assert 0 < done.sum() < 565
    first = done[:CHUNK, :CHUNK]
    assert 0 < (first & sf.selected[:CHUNK, :CHUNK]).sum() < sf.selected[:CHUNK, :CHUNK].sum()

    assert main(_args([cmu_svs], out, tiny_encoder, "--reader", reader)) == 0
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert summary["tiles_already_done"] == done.sum() and summary["tiles"] == 565 - done.sum()
    _assert_same_store(reference, out)


def test_two_gloo_processes_split_tiles_and_equal_single_process(
    reader_reference: tuple[str, Path], cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    reader, reference = reader_reference
    out = tmp_path / "features.zarr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "engine.extract",
           *_args([cmu_svs], out, tiny_encoder, "--device", "cpu", "--reader", reader)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tiles"] == 565
    _assert_same_store(reference, out)


def _crop_png(cmu_svs: Path, path: Path, dpi: bool) -> Path:
    rgb = decode_svs_level0(cmu_svs)[1200:1712, 600:1112]
    Image.fromarray(rgb).save(path, **({"dpi": (25400 / 0.499, 25400 / 0.499)} if dpi else {}))
    return path


def test_bad_slides_are_reported_skipped_and_the_rest_finish(
    reference: Path,
    cmu_svs: Path,
    tiny_encoder: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    data = cmu_svs.read_bytes()
    (slides / "truncated.svs").write_bytes(data[: len(data) // 2])
    (slides / "garbage.svs").write_bytes(b"not a slide at all" * 100)
    nompp = _crop_png(cmu_svs, slides / "nompp.png", dpi=False)
    _crop_png(cmu_svs, slides / "ok.png", dpi=True)
    out = tmp_path / "features.zarr"
    capfd.readouterr()
    code = main(
        _args([slides], out, tiny_encoder)[:-1]
    )  # not --quiet: the summary line names failures
    err = capfd.readouterr().err
    assert code == 1
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    failed = {Path(f["slide"]).name: f["error"] for f in summary["failures"]}
    assert set(failed) == {"truncated.svs", "garbage.svs", "nompp.png"}
    assert "--slide-mpp" in failed["nompp.png"]
    assert "truncated" in failed["truncated.svs"]
    for name, message in failed.items():
        assert f"error: {message}" in err and name in err.splitlines()[-1]
    assert "Traceback" not in err

    store = FeatureStore.open(out)
    assert store.slide_ids() == ["ok"]
    ok = store.slide("ok")
    assert np.array_equal(np.asarray(ok.done[...]), ok.selected) and ok.selected.sum() > 0

    # --slide-mpp as a CSV gives the missing resolution
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text(f"slide,mpp\n{nompp},0.499\n")
    assert main(_args([nompp], out, tiny_encoder, "--slide-mpp", str(csv_path))) == 0
    assert FeatureStore.open(out).slide("nompp").attrs["mpp"] == [0.499, 0.499]


def test_unreadable_tiles_mid_slide_are_recorded_and_the_rest_encoded(
    pyramidal_tiff: Path, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """Corrupt JPEG tiles at the bottom of level 0 (the thumbnail comes from level 1): the
    batches touching them are read tile by tile; every readable tile is encoded, the unreadable
    ones recorded as failed and named; the next slide is done; exit status 1."""
    raw = bytearray(pyramidal_tiff.read_bytes())
    with tifffile.TiffFile(pyramidal_tiff) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        offsets, counts = page.dataoffsets[-per_row:], page.databytecounts[-per_row:]
        damaged_y0 = (len(page.dataoffsets) // per_row - 1) * page.tilelength
    for o, c in zip(offsets, counts, strict=True):
        raw[o + 2 : o + c] = (
            np.random.default_rng(0).integers(0, 256, c - 2, dtype=np.uint8).tobytes()
        )
    corrupt = tmp_path / "a_corrupt.tiff"
    corrupt.write_bytes(bytes(raw))
    ok = _crop_png(cmu_svs, tmp_path / "b_ok.png", dpi=True)

    out = tmp_path / "features.zarr"
    args = _args([corrupt, ok], out, tiny_encoder, "--tile-px", "64", "--mpp", "0.5")
    assert main(args) == 1
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    store = FeatureStore.open(out)
    bad = store.slide("a_corrupt")
    assert bad.attrs["level"] == 0 and bad.shape == (47, 35)
    done, failed = bad.done, bad.failed
    reaches = bad.origins[..., 1] + bad.attrs["tile_l0"][1] > damaged_y0 - 1  # touches the damage
    assert failed.sum() > 0 and not (failed & ~reaches).any() and not (done & failed).any()
    assert np.array_equal(done | failed, bad.selected)  # every readable tile is encoded
    assert np.abs(bad.read_features()[done]).astype(np.float32).sum(axis=1).min() > 0
    [entry] = summary["failures"]
    assert Path(entry["slide"]).name == "a_corrupt.tiff" and summary["slides"] == 2
    assert entry["tiles_unreadable"] == failed.sum() == summary["tiles_unreadable"]
    assert entry["tiles_encoded"] == done.sum()
    assert f"{failed.sum()} of {bad.selected.sum()} tissue tiles unreadable" in entry["error"]
    assert "--retry-failed" in entry["error"]
    good = store.slide("b_ok")
    assert np.array_equal(good.done, good.selected) and good.selected.sum() > 0
    assert store.coverage(out, corrupt, store.encoder, store.tiling).complete  # nothing pending

    # a rerun reads nothing again and still says so; --retry-failed reads the failed tiles again
    assert main(args) == 1
    again = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert again["tiles"] == 0 and again["tiles_unreadable"] == failed.sum()
    assert "earlier run" in again["failures"][0]["error"]
    calls: list[tuple[str, int, int]] = []
    cfg = cli.parse_config(ExtractConfig, [*args, "--retry-failed"])
    summary = run(cfg, progress=lambda *call: calls.append(call))
    assert calls[-1] == ("encode", failed.sum(), failed.sum()) and summary.tiles == 0
    assert np.array_equal(store.slide("a_corrupt").failed, failed)


def test_store_of_other_tiling_is_refused_unless_overwrite(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / "features.zarr"
    assert main(_args([png], out, tiny_encoder)) == 0
    capfd.readouterr()
    assert main(_args([png], out, tiny_encoder, "--min-tissue", "0.25")) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"error: {out}:") and "--overwrite" in err and len(err.splitlines()) == 1
    assert main(_args([png], out, tiny_encoder, "--min-tissue", "0.25", "--overwrite")) == 0
    assert FeatureStore.open(out).tiling.min_tissue == 0.25


def test_progress_callback_and_cancel_keep_what_was_encoded(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / "features.zarr"
    cfg = ExtractConfig(slides=[str(png)], out=str(out), encoder=str(tiny_encoder), tile_px=TILE_PX,
                        mpp=MPP, batch_size=8, workers=0, quiet=True)  # fmt: skip

    def cancel_after_two(stage: str, done: int, total: int) -> None:
        if stage == "encode" and done >= 16:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(cfg, progress=cancel_after_two)
    sf = FeatureStore.open(out).slide("crop")
    assert np.asarray(sf.done[...]).sum() == 16 < sf.selected.sum()

    calls: list[tuple[str, int, int]] = []
    summary = run(cfg, progress=lambda *call: calls.append(call))
    left = int(sf.selected.sum()) - 16
    assert calls[0] == ("tissue", 0, 1) and calls[1] == ("tissue", 1, 1)
    encode = [c for c in calls if c[0] == "encode"]
    assert summary.tiles == left and encode[0] == ("encode", 0, left)
    assert encode[-1] == ("encode", left, left) and len(encode) == 2 + (left - 1) // 8
    assert np.array_equal(np.asarray(sf.done[...]), sf.selected)


def test_cancel_through_the_command_line_runner_exits_130(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C (KeyboardInterrupt) during encoding: status 130, one line, encoded tiles kept."""
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / "features.zarr"
    script = (
        "import sys\n"
        "from engine import cli, extract\n"
        "def run(cfg, *, progress):\n"
        "    def interrupt(stage, done, total):\n"
        "        if stage == 'encode' and done >= 16:\n"
        "            raise KeyboardInterrupt\n"
        "    return extract.run(cfg, progress=interrupt)\n"
        "sys.exit(cli.main(extract.ExtractConfig, run, sys.argv[1:], prog='python -m engine.extract', description=''))\n"
    )
    args = _args([png], out, tiny_encoder, "--batch-size", "8", "--workers", "0")
    proc = subprocess.run([sys.executable, "-c", script, *args], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "interrupted" in proc.stderr
    assert FeatureStore.open(out).slide("crop").n_encoded() == 16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_asked_is_the_precision_run(
    precision: str, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """Each precision explicitly, whatever the CPU (``auto`` picks bf16 on CPUs with native bf16):
    the summary and config say it, and the features are those of an fp32 reference."""
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / f"{precision}.zarr"
    assert main(_args([png], out, tiny_encoder, "--precision", precision, "--workers", "0")) == 0
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    config = json.loads(out.with_name(out.name + ".config.json").read_text())
    assert summary["precision"] == precision and config["resolved"]["precision"] == precision
    assert config["precision"] == precision

    sf = FeatureStore.open(out).slide("crop")
    rows, cols = np.nonzero(sf.done)
    grid = TileGrid(open_slide(png), target_mpp=MPP, tile_px=TILE_PX)
    tiles = np.stack([grid.read_tile(int(r), int(c)) for r, c in zip(rows, cols, strict=True)])
    fp32 = TileEncoder(load_encoder(tiny_encoder), torch.device("cpu"), "fp32")(
        torch.from_numpy(tiles)
    )
    stored = torch.from_numpy(sf.read_tiles(rows, cols))
    cosine = torch.nn.functional.cosine_similarity(stored, fp32, dim=1)
    assert len(rows) > 16 and cosine.min() >= (0.9999 if precision == "fp32" else 0.99), cosine


def test_command_line_errors_are_one_line(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    help_text = build_parser().format_help()
    for flag in ("--out", "--encoder", "--tile-px", "--mpp", "--stride-px", "--min-tissue", "--tissue",
                 "--batch-size", "--workers", "--device", "--precision", "--slide-mpp", "--overwrite",
                 "--quiet"):  # fmt: skip
        assert flag in help_text
    # the real command line, once: an empty directory
    proc = subprocess.run(
        [sys.executable, "-m", "engine.extract", str(tmp_path), "--out", str(tmp_path / "f.zarr")],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path}: no slide files")
    assert len(proc.stderr.strip().splitlines()) == 1
    capfd.readouterr()
    out = tmp_path / "g.zarr"
    assert main([str(cmu_svs), "--out", str(out), "--encoder", str(tmp_path / "nope.pt")]) == 2
    err = capfd.readouterr().err
    assert (
        err.startswith(f"error: {tmp_path / 'nope.pt'}: no such checkpoint")
        and len(err.splitlines()) == 1
    )
    assert main(_args([cmu_svs], out, tiny_encoder, "--slide-mpp", "x.csv")) == 2
    assert "x.csv: --slide-mpp is neither a number nor an existing CSV" in capfd.readouterr().err
    assert not out.exists()


def test_parse_slide_mpp(tmp_path: Path) -> None:
    assert parse_slide_mpp(None) is None and parse_slide_mpp("0.25") == 0.25
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("/data/a b.svs,0.25\nc.tiff,0.5\n")
    assert parse_slide_mpp(str(csv_path)) == {"a_b": 0.25, "c": 0.5}
    csv_path.write_text("slide,mpp\na.svs,zero\n")
    with pytest.raises(HistoclusterError, match="line 2.*not a number"):
        parse_slide_mpp(str(csv_path))
    with pytest.raises(HistoclusterError, match="positive"):
        parse_slide_mpp("-1")


def test_chunk_batches_do_not_depend_on_what_is_done() -> None:
    selected = np.zeros((4, 4), bool)
    selected[[0, 0, 1, 2, 3, 3], [1, 3, 0, 2, 1, 3]] = True
    full = chunk_batches(selected, np.zeros_like(selected), 4)
    assert [b.tolist() for b in full] == [[1, 3, 4, 10], [13, 15]]
    done = np.zeros_like(selected)
    done.ravel()[[1, 3, 13]] = True
    assert [b.tolist() for b in chunk_batches(selected, done, 4)] == [[4, 10], [15]]


def test_file_size_limit_is_one_line_and_the_store_resumes(
    reference: Path, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """``ulimit -f`` (EFBIG on the first features chunk): status 2, one line naming the store and
    the fix, no traceback; the same command without the limit then finishes the same store."""
    out = tmp_path / "features.zarr"
    args = " ".join(f"'{a}'" for a in _args([cmu_svs], out, tiny_encoder, "--workers", "0"))
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 100; exec '{sys.executable}' -m engine.extract {args}"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err == (
        f"error: {out}: File too large — raise the file-size limit (ulimit -f) or choose another "
        "location, then rerun to resume"
    )
    assert FeatureStore.open(out).slide("CMU-1-Small-Region").n_encoded() < 565
    assert main(_args([cmu_svs], out, tiny_encoder)) == 0
    _assert_same_store(reference, out)


def test_one_corrupt_jpeg_tile_costs_only_its_tiles_and_retry_recovers_them(
    tiny_encoder: Path, tmp_path: Path
) -> None:
    """The sample slide with one 256-px JPEG tile of level 0 overwritten (the issue's case): the
    2 x 2 grid tiles of 128 px on it are recorded unreadable, every other tile is encoded with
    exactly the features of a clean run; restored, ``--retry-failed`` encodes the four."""
    sample = REPO / "sample_data" / "sample_slide.tiff"
    data = sample.read_bytes()
    clean = tmp_path / "clean" / "sample_slide.tiff"
    clean.parent.mkdir()
    clean.write_bytes(data)
    grid = TileGrid(open_slide(clean), target_mpp=0.5, tile_px=128)
    with tifffile.TiffFile(clean) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        # a tile inside tissue whose bytes lie outside the file fingerprint's first and last MiB
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    inside = [
        t
        for t, (o, _) in enumerate(spans)
        if (1 << 20) < o < len(data) - (1 << 20)
        and grid.selected[2 * (t // per_row) : 2 * (t // per_row) + 2, 2 * (t % per_row) :][
            :, :2
        ].all()
    ]
    assert inside, "no tissue tile in the middle of the file"
    t = inside[len(inside) // 2]
    (o, c), r, k = spans[t], 2 * (t // per_row), 2 * (t % per_row)
    raw = bytearray(data)
    raw[o + 2 : o + c] = np.random.default_rng(0).integers(0, 256, c - 2, np.uint8).tobytes()
    damaged = tmp_path / "sample_slide.tiff"
    damaged.write_bytes(bytes(raw))

    ref, out = tmp_path / "ref.zarr", tmp_path / "features.zarr"
    flags = ("--tile-px", "128", "--mpp", "0.5", "--workers", "0")
    assert main(_args([clean], ref, tiny_encoder, *flags)) == 0
    assert main(_args([damaged], out, tiny_encoder, *flags)) == 1
    sf, want = (
        FeatureStore.open(out).slide("sample_slide"),
        FeatureStore.open(ref).slide("sample_slide"),
    )
    expected = np.zeros(sf.shape, bool)
    expected[r : r + 2, k : k + 2] = True
    assert np.array_equal(sf.failed, expected)
    assert np.array_equal(sf.done, want.selected & ~expected)
    np.testing.assert_array_equal(sf.read_features()[sf.done], want.read_features()[sf.done])

    damaged.write_bytes(data)  # re-copied: same content fingerprint, the store is reused
    assert main(_args([damaged], out, tiny_encoder, *flags, "--retry-failed")) == 0
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert summary["tiles"] == 4 and summary["failures"] == [] and summary["tiles_unreadable"] == 0
    assert not sf.failed.any() and np.array_equal(sf.done, want.selected)
    np.testing.assert_array_equal(sf.read_features(), want.read_features())


def _cli(args: list[str], limit: str = "", **kw: object) -> subprocess.Popen[str]:
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.Popen(
        ["bash", "-c", f"{limit}exec '{sys.executable}' -m engine.extract {quoted}"],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def test_reader_that_cannot_hand_over_a_batch_ends_the_run_in_one_line(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """The issue's hang: under ``ulimit -f`` a worker cannot put a 2.4 MB batch in shared
    memory. One line and status 2 instead of waiting for ever; the store then resumes."""
    out = tmp_path / "features.zarr"
    args = _args([cmu_svs], out, tiny_encoder, "--tile-px", "64", "--mpp", "1.0",
                 "--batch-size", "256", "--workers", "1")  # fmt: skip
    proc = _cli(args, limit="ulimit -f 1200; ")
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-2000:]
    assert err.startswith("error: a tile-reading worker could not hand over a batch")
    assert "ulimit -f" in err and len(err.strip().splitlines()) == 1, err
    assert main(_args([cmu_svs], out, tiny_encoder, "--tile-px", "64", "--mpp", "1.0")) == 0
    sf = FeatureStore.open(out).slide("CMU-1-Small-Region")
    assert np.array_equal(sf.done, sf.selected) and sf.selected.sum() > 0


def test_second_extraction_on_a_store_is_refused_naming_the_first(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """While this process holds the store's lock, a real extract process is refused in one line
    naming this pid; once released, it runs."""
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / "features.zarr"
    with StoreLock(out):
        proc = _cli(_args([png], out, tiny_encoder, "--workers", "0"))
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    assert err.startswith(f"error: {out}: an extraction (pid {os.getpid()} on ")
    assert "choose another --out" in err and len(err.strip().splitlines()) == 1
    assert main(_args([png], out, tiny_encoder, "--workers", "0")) == 0


def test_two_extractions_started_together_never_collide(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """Two real processes started at once on one new store: one writes, the other is refused
    in one line naming it (or, if the first finished already, finds nothing left to do)."""
    png = _crop_png(cmu_svs, tmp_path / "crop.png", dpi=True)
    out = tmp_path / "features.zarr"
    procs = [_cli(_args([png], out, tiny_encoder, "--workers", "0")) for _ in range(2)]
    results = [(p.wait(timeout=240), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert (
                f"error: {out}: an extraction (pid " in err and len(err.strip().splitlines()) == 1
            )
    sf = FeatureStore.open(out).slide("crop")
    assert np.array_equal(sf.done, sf.selected)


def test_store_lock_in_one_process_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "features.zarr"
    with StoreLock(out):
        with pytest.raises(
            HistoclusterError, match=f"another extraction in this process \\(pid {os.getpid()}\\)"
        ):
            StoreLock(out).acquire()
        # the first lock still holds against other processes
        probe = (
            "from engine.store_lock import StoreLock; import sys; StoreLock(sys.argv[1]).acquire()"
        )
        proc = subprocess.run([sys.executable, "-c", probe, str(out)], env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 1 and f"pid {os.getpid()} on" in proc.stderr
    StoreLock(out).acquire().release()


def _features(store: Path, sid: str = "CMU-1-Small-Region") -> tuple[np.ndarray, np.ndarray]:
    sf = FeatureStore.open(store).slide(sid)
    return sf.read_features().astype(np.float32), sf.done


def test_jpeg_reader_matches_openslide_and_is_deterministic(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """At 1.0 um/px the CMU slide's tiles are 1/2 of level 0: --reader jpeg decodes them reduced."""
    runs = {}
    for name, reader in (("openslide", "openslide"), ("jpeg", "jpeg"), ("jpeg2", "jpeg")):
        out = tmp_path / f"{name}.zarr"
        args = [str(cmu_svs), "--out", str(out), "--encoder", str(tiny_encoder), "--tile-px", "32"]
        assert (
            main(
                [
                    *args,
                    "--mpp",
                    "1.0",
                    "--workers",
                    "1",
                    "--precision",
                    "fp32",
                    "--quiet",
                    "--reader",
                    reader,
                ]
            )
            == 0
        )
        runs[name] = _features(out)
    (a, done_a), (b, done_b), (c, _) = runs["openslide"], runs["jpeg"], runs["jpeg2"]
    assert (done_a == done_b).all() and done_a.sum() > 50
    np.testing.assert_array_equal(b, c)  # one reader: bit-identical runs
    x, y = a[done_a], b[done_b]
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cos.min() >= 0.99, cos.min()
    assert not np.array_equal(a, b)  # the other reader really ran


def test_reader_jpeg_refuses_a_scale_it_cannot_serve(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At 0.5 um/px the CMU tiles are level 0 itself: --reader jpeg fails the slide, auto reads it."""
    out = tmp_path / "f.zarr"
    at_level_0 = ("--mpp", "0.5", "--tile-px", "64")
    assert main(_args([cmu_svs], out, tiny_encoder, *at_level_0, "--reader", "jpeg")) == 1
    assert "--reader jpeg needs" in capsys.readouterr().err
    assert (
        main(_args([cmu_svs], tmp_path / "g.zarr", tiny_encoder, *at_level_0, "--reader", "auto"))
        == 0
    )


def test_jpeg_reader_resumes_bit_identically(
    cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """A run cancelled midway and resumed equals one uninterrupted run, with --reader jpeg."""
    from engine.progress import Cancelled

    def cfg(out: Path) -> ExtractConfig:
        return ExtractConfig(
            slides=(str(cmu_svs),), out=str(out), encoder=str(tiny_encoder), tile_px=TILE_PX,
            mpp=MPP, batch_size=8, workers=0, precision="fp32", reader="jpeg", quiet=True,
            flush_every_s=0.0,
        )  # fmt: skip

    whole = tmp_path / "whole.zarr"
    run(cfg(whole))

    def cancel_midway(stage: str, done: int, total: int) -> None:
        if stage == "encode" and done >= total // 2 > 0:
            raise Cancelled

    part = tmp_path / "part.zarr"
    with pytest.raises(Cancelled):
        run(cfg(part), progress=cancel_midway)
    first = FeatureStore.open(part).slide("CMU-1-Small-Region").done.sum()
    assert 0 < first < FeatureStore.open(whole).slide("CMU-1-Small-Region").done.sum()
    run(cfg(part))
    _assert_same_store(whole, part)


def test_damaged_features_chunk_is_noticed_and_re_encoded(
    reference: Path, cmu_svs: Path, tiny_encoder: Path, tmp_path: Path
) -> None:
    """A truncated features chunk: its done flags are not trusted; the rerun re-encodes it (exit 0)."""
    out = tmp_path / "features.zarr"
    shutil.copytree(reference, out)
    chunk = out / "slides" / "CMU-1-Small-Region" / "features" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    with pytest.raises(StoreError):
        FeatureStore.open(out).slide("CMU-1-Small-Region").read_block(
            FeatureStore.open(out).slide("CMU-1-Small-Region").blocks()[0]
        )
    assert main(_args([cmu_svs], out, tiny_encoder)) == 0
    summary = json.loads(out.with_name("features.zarr.summary.json").read_text())
    assert 0 < summary["tiles"] < 565
    _assert_same_store(reference, out)


@pytest.mark.parametrize("chosen", [None, "ACTIVE"])
def test_import_is_torch_free_and_the_torch_half_asks_passive_openmp(chosen: str | None) -> None:
    """``import engine.extract`` (and ``--help``) does not import torch; its torch half, imported
    before torch, makes OpenMP threads sleep at barriers unless the user chose a policy."""
    env = {k: v for k, v in _env().items() if k != "OMP_WAIT_POLICY"}
    if chosen is not None:
        env["OMP_WAIT_POLICY"] = chosen
    script = (
        "import os, sys\n"
        "import engine.extract as e\n"
        "print('torch' in sys.modules)\n"
        "e._torch_half()\n"
        "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False", f"True {chosen or 'PASSIVE'}"]
