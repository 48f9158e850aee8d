"""engine.pretrain: flags, bad input, outputs, exact resume, and a 2-process gloo run via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.models import load_encoder
from engine.pretrain import PretrainConfig, build_parser, main, parse_config, train

REPO = Path(__file__).resolve().parents[2]
TINY = dict(arch="resnet18", patch_px=32, batch_size=8, quiet=True, save_every=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 small H&E-coloured noise images in nested folders."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(16):
        base = np.array([200, 120, 180]) * rng.uniform(0.6, 1.0, 3)
        arr = np.clip(base + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
        d = root / f"set{i % 2}" / "deep"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    return root


def _cfg(images: Path, out: Path, **kw) -> PretrainConfig:
    return PretrainConfig(data=[str(images)], out=str(out), **{**TINY, **kw})


def test_flags_and_paper_defaults():
    cfg = parse_config(["--data", "d", "--out", "o"])
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.temperature) == ("resnet18", "lars", None, 0.1)
    assert (cfg.augment, cfg.crop_min, cfg.patch_px, cfg.mpp) == ("heavy", 0.01, 224, 0.5)
    assert (cfg.max_per_slide, cfg.fraction, cfg.precision, cfg.device) == (
        100,
        None,
        "auto",
        "auto",
    )
    cfg = parse_config(
        "--data a b --out o --lr 0.5 --workers 3 --optimizer lamb --augment light --fraction 0.1 "
        "--precision fp32 --resume --seed 7 --save-every 3 --quiet --slide-mpp 0.25 --hue 0.05".split()
    )
    assert cfg.hue == 0.05 and parse_config("--data a --out o".split()).hue is None
    assert cfg.data == ["a", "b"] and cfg.lr == 0.5 and cfg.workers == 3 and cfg.resume
    assert (cfg.optimizer, cfg.augment, cfg.fraction, cfg.slide_mpp) == ("lamb", "light", 0.1, 0.25)
    text = build_parser().format_help()
    for flag in (
        "--data", "--out", "--arch", "--epochs", "--batch-size", "--optimizer", "--lr",
        "--temperature", "--augment", "--crop-min", "--patch-px", "--mpp", "--max-per-slide",
        "--fraction", "--precision", "--workers", "--device", "--resume", "--seed",
        "--save-every", "--quiet", "--slide-mpp", "--hue",
    ):  # fmt: skip
        assert flag in text


def _error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line(capsys, images, tmp_path):
    (tmp_path / "empty").mkdir()
    base = ["--out", str(tmp_path / "o"), "--patch-px", "32", "--quiet"]
    line = _error_line(capsys, ["--data", str(tmp_path / "empty"), *base])
    assert "no slides or PNG/JPEG/TIFF" in line and str(tmp_path / "empty") in line
    line = _error_line(capsys, ["--data", str(images), "--batch-size", "64", *base])
    assert "larger than the dataset (16 patches)" in line
    for t in ("0", "-0.5"):
        line = _error_line(capsys, ["--data", str(images), "--temperature", t, *base])
        assert "--temperature must be > 0" in line
    line = _error_line(capsys, ["--data", str(images), "--hue", "0.7", *base])
    assert "--hue must be in [0, 0.5]" in line
    line = _error_line(capsys, ["--data", str(tmp_path / "missing"), *base])
    assert "no such file" in line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_resume_two_plus_two_equals_four(images, tmp_path):
    full = train(_cfg(images, tmp_path / "full", epochs=4))
    train(_cfg(images, tmp_path / "split", epochs=4), stop_after_epoch=2)
    part = json.loads((tmp_path / "split" / "config.json").read_text())
    assert part["n_patches"] == 16 and part["steps_per_epoch"] == 2
    resumed = train(_cfg(images, tmp_path / "split", epochs=4, resume=True))
    losses = [h["loss"] for h in full["history"]]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(losses, rel=1e-6, abs=1e-7)
    assert [h["lr"] for h in resumed["history"]] == pytest.approx(
        [h["lr"] for h in full["history"]]
    )
    assert len(set(losses)) == 4  # it trains: the losses move
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"] == 8
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k

    out = tmp_path / "split"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"epoch", "step", "loss", "lr", "images_per_s"}
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "patches.csv").read_text().count("\n") == 17
    enc = load_encoder(out / "encoder.pt")
    assert (enc.arch, enc.input_px, enc.dim) == ("resnet18", 32, 512)
    with torch.no_grad():
        assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_resolved"] == pytest.approx(0.3 * 8 / 256) and cfg["world_size"] == 1


def test_existing_run_needs_resume_and_same_settings(images, tmp_path, capsys):
    train(_cfg(images, tmp_path / "r", epochs=1))
    argv = ["--data", str(images), "--out", str(tmp_path / "r"), "--patch-px", "32",
            "--batch-size", "8", "--epochs", "2", "--quiet"]  # fmt: skip
    assert "pass --resume" in _error_line(capsys, argv)
    assert "--temperature 0.1, not 0.2" in _error_line(
        capsys, [*argv, "--resume", "--temperature", "0.2"]
    )


def test_loader_augmentation_path(images, tmp_path):
    res = train(
        _cfg(images, tmp_path / "l", epochs=1, augment_on="loader", workers=0, optimizer="adam")
    )
    assert res["config"]["augment_on"] == "loader" and res["config"]["lr_resolved"] == 1e-4
    assert np.isfinite(res["history"][0]["loss"])


def test_torchrun_two_gloo_processes(images, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "engine.pretrain", "--data", str(images), "--out", str(out), "--patch-px", "32",
        "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["world_size"], cfg["local_batch"], cfg["steps_per_epoch"]) == (2, 4, 2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and all(np.isfinite(r["loss"]) for r in rows)
    assert load_encoder(out / "encoder.pt").arch == "resnet18"
