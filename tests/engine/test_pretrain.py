"""engine.pretrain: flags, bad input, outputs, exact resume (after a cancel at an epoch boundary and
mid-epoch), the checkpoint checksum, a dying loader worker, and a 2-process gloo run via torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import cli
from engine.errors import HistoclusterError
from engine.models import load_encoder
from engine.pretrain import (
    PretrainConfig,
    _next_batch,
    load_checkpoint,
    main,
    run,
    save_checkpoint,
    state_sha256,
)
from engine.progress import Cancelled

REPO = Path(__file__).resolve().parents[2]
TINY = dict(arch="resnet18", patch_px=32, batch_size=8, quiet=True, save_every=2, precision="fp32")
ALL_FLAGS = (
    "--data", "--out", "--arch", "--epochs", "--batch-size", "--optimizer", "--lr",
    "--temperature", "--augment", "--crop-min", "--patch-px", "--mpp", "--max-per-slide",
    "--fraction", "--precision", "--workers", "--device", "--resume", "--seed",
    "--save-every", "--quiet", "--slide-mpp", "--hue",
)  # fmt: skip


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
    return PretrainConfig(data=(str(images),), out=str(out), **{**TINY, **kw})


def _parse(argv: list[str]) -> PretrainConfig:
    return cli.parse_config(PretrainConfig, argv)


class CancelAt:
    """A progress callback that records every report and cancels at train step ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.calls = at, []

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))
        if stage == "train" and done == self.at:
            raise Cancelled


def test_flags_and_paper_defaults():
    cfg = _parse(["--data", "d", "--out", "o"])
    assert (cfg.arch, cfg.optimizer, cfg.lr, cfg.temperature) == ("resnet18", "lars", None, 0.1)
    assert (cfg.augment, cfg.crop_min, cfg.patch_px, cfg.mpp) == ("heavy", 0.01, 224, 0.5)
    assert (cfg.max_per_slide, cfg.fraction, cfg.precision, cfg.device) == (
        100,
        None,
        "auto",
        "auto",
    )
    assert (cfg.epochs, cfg.batch_size, cfg.save_every, cfg.seed, cfg.workers) == (
        100,
        256,
        10,
        0,
        None,
    )
    cfg = _parse(
        "--data a b --out o --lr 0.5 --workers 3 --optimizer lamb --augment light --fraction 0.1 "
        "--precision fp32 --resume --seed 7 --save-every 3 --quiet --slide-mpp 0.25 --hue 0.05".split()
    )
    assert cfg.hue == 0.05 and _parse("--data a --out o".split()).hue is None
    assert cfg.data == ("a", "b") and cfg.lr == 0.5 and cfg.workers == 3 and cfg.resume
    assert (cfg.optimizer, cfg.augment, cfg.fraction, cfg.slide_mpp) == ("lamb", "light", 0.1, 0.25)
    assert _parse("--data a --out o --lr auto --workers auto".split()).lr is None
    text = cli.build_parser(PretrainConfig, prog="p", description="").format_help()
    for flag in ALL_FLAGS:
        assert flag in text
    assert "(default: auto)" in text and "(default: 0.01, the paper's best)" in text


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ALL_FLAGS:
        assert flag in text


def _error_line(capsys, argv) -> str:
    assert main(argv) == cli.BAD_INPUT
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
    for t in ("0", "-0.5", "inf", "nan"):
        line = _error_line(capsys, ["--data", str(images), "--temperature", t, *base])
        assert "--temperature must be > 0 and finite" in line
    line = _error_line(capsys, ["--data", str(images), "--hue", "0.7", *base])
    assert "--hue must be in [0, 0.5]" in line
    line = _error_line(capsys, ["--data", str(images), "--lr", "inf", *base])
    assert "--lr must be > 0 and finite" in line
    line = _error_line(capsys, ["--data", str(tmp_path / "missing"), *base])
    assert "no such file" in line
    line = _error_line(capsys, ["--data", str(images), "--device", "gpu7", *base])
    assert "--device gpu7" in line
    if not torch.cuda.is_available():
        line = _error_line(capsys, ["--data", str(images), "--device", "cuda", *base])
        assert "no such CUDA device" in line
        line = _error_line(capsys, ["--data", str(images), "--precision", "fp16", *base])
        assert "fp16 needs CUDA" in line
    assert not (tmp_path / "o").exists()


def test_only_rank_0_prints_errors(capsys, images, tmp_path, monkeypatch):
    """Under torchrun every rank meets the same bad input; rank 0 alone says so."""
    argv = ["--data", str(images), "--out", str(tmp_path / "o"), "--temperature", "inf"]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == cli.BAD_INPUT
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert "--temperature must be > 0" in _error_line(capsys, argv)


def test_huge_patch_refused_before_any_read(capsys, images, tmp_path):
    """--patch-px 100000 would make loader workers allocate 30 GB per patch: refused up front."""
    argv = ["--data", str(images), "--out", str(tmp_path / "o"), "--patch-px", "100000", "--quiet"]
    line = _error_line(capsys, argv)
    assert "--patch-px 100000" in line and "smaller --patch-px" in line
    assert not (tmp_path / "o").exists()


class _KillsItsWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does to a worker
        return torch.zeros(1)


def test_a_killed_loader_worker_is_one_line():
    loader = torch.utils.data.DataLoader(_KillsItsWorker(), batch_size=2, num_workers=1)
    cfg = PretrainConfig(data=("d",), out="o", patch_px=4096, batch_size=64)
    with pytest.raises(HistoclusterError, match="worker died.*smaller --patch-px \\(now 4096\\)"):
        _next_batch(iter(loader), cfg)


def test_resume_after_cancel_equals_one_run(images, tmp_path):
    """Cancel at an epoch boundary (step 4) and mid-epoch (step 3): resumed, the 4-epoch losses."""
    seen = CancelAt()
    full = run(_cfg(images, tmp_path / "full", epochs=4), progress=seen)
    stages = [c[0] for c in seen.calls]
    assert "preload" in stages and stages[-1] == "train"
    assert [c[1] for c in seen.calls if c[0] == "train"] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert seen.calls[-1] == ("train", 8, 8)
    losses = [h["loss"] for h in full.history]
    assert len(set(losses)) == 4  # it trains: the losses move

    for name, at in (("boundary", 4), ("mid", 3)):
        out = tmp_path / name
        with pytest.raises(Cancelled):
            run(_cfg(images, out, epochs=4), progress=CancelAt(at))
        part = json.loads((out / "config.json").read_text())
        assert part["resolved"]["n_patches"] == 16 and part["resolved"]["steps_per_epoch"] == 2
        ckpt = load_checkpoint(out / "checkpoint.pt")
        assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (at // 2, at % 2, at)
        resumed = run(_cfg(images, out, epochs=4, resume=True))
        got = [h["loss"] for h in resumed.history]
        assert got == pytest.approx(losses, rel=1e-6, abs=1e-7), name
        assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in full.history])
        a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
        b = torch.load(out / "checkpoint.pt", weights_only=True)
        assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"] == 8
        for k, v in a["model"].items():
            assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), (name, k)

    out = tmp_path / "mid"
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
    assert cfg["temperature"] == 0.1 and cfg["data"] == [str(images)]
    assert cfg["resolved"]["lr_resolved"] == pytest.approx(0.3 * 8 / 256)
    assert cfg["resolved"]["world_size"] == 1 and cfg["resolved"]["precision"] == "fp32"


def test_cancel_before_training_writes_nothing(images, tmp_path):
    def cancel_preload(stage, done, total):
        if stage == "preload" and done > 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(_cfg(images, tmp_path / "o"), progress=cancel_preload)
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
    assert not (tmp_path / "o" / "patches.csv").exists()


def test_checksum_refuses_altered_checkpoints(images, tmp_path, capsys):
    out = tmp_path / "r"
    run(_cfg(images, out, epochs=1))
    ckpt_path = out / "checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=True)
    assert state["sha256"] == state_sha256(state) == state_sha256(load_checkpoint(ckpt_path))

    # 50 flipped bytes inside the tensor data: torch.load reads it, the checksum does not match
    good = ckpt_path.read_bytes()
    data = bytearray(good)
    rng = np.random.default_rng(0)
    for pos in rng.integers(len(data) // 4, 3 * len(data) // 4, 50):
        data[pos] ^= 0xFF
    ckpt_path.write_bytes(bytes(data))
    argv = ["--data", str(images), "--out", str(out), "--patch-px", "32", "--batch-size", "8",
            "--epochs", "2", "--precision", "fp32", "--quiet", "--resume"]  # fmt: skip
    line = _error_line(capsys, argv)
    assert "checkpoint.pt" in line and "checksum" in line
    assert ckpt_path.read_bytes() == bytes(data)  # left as it was, not trained on
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # a tensor changed and saved without a new checksum: refused as well
    state["model"]["conv1.weight"][0, 0, 0, 0] += 1.0
    torch.save(state, ckpt_path)
    with pytest.raises(HistoclusterError, match="checksum"):
        load_checkpoint(ckpt_path)
    # a checkpoint written through save_checkpoint gets its new checksum and loads
    save_checkpoint(ckpt_path, {k: v for k, v in state.items() if k != "sha256"})
    assert (
        load_checkpoint(ckpt_path)["model"]["conv1.weight"][0, 0, 0, 0]
        == (state["model"]["conv1.weight"][0, 0, 0, 0])
    )
    ckpt_path.write_bytes(good[: len(good) // 2])  # truncated: unreadable, one line
    assert "unreadable checkpoint" in _error_line(capsys, argv)


def test_existing_run_needs_resume_and_same_settings(images, tmp_path, capsys):
    run(_cfg(images, tmp_path / "r", epochs=1))
    argv = ["--data", str(images), "--out", str(tmp_path / "r"), "--patch-px", "32",
            "--batch-size", "8", "--epochs", "2", "--quiet"]  # fmt: skip
    before = (tmp_path / "r" / "config.json").read_text()
    assert "pass --resume" in _error_line(capsys, argv)
    assert "--temperature 0.1, not 0.2" in _error_line(
        capsys, [*argv, "--resume", "--temperature", "0.2"]
    )
    assert (tmp_path / "r" / "config.json").read_text() == before  # a refused run writes nothing


def test_loader_augmentation_path_and_bf16(images, tmp_path):
    res = run(
        _cfg(images, tmp_path / "l", epochs=1, augment_on="loader", workers=0, optimizer="adam")
    )
    assert res.config["augment_on"] == "loader" and res.config["lr_resolved"] == 1e-4
    assert np.isfinite(res.history[0]["loss"])
    res = run(_cfg(images, tmp_path / "b", epochs=1, precision="bf16"))
    assert (res.config["precision"], res.config["autocast"], res.config["channels_last"]) == (
        "bf16",
        "bfloat16",
        True,
    )
    assert np.isfinite(res.history[0]["loss"])


def test_main_prints_the_summary_and_warnings(images, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "zz_truncated.png").write_bytes((data / "set0" / "deep" / "00.png").read_bytes()[:60])
    out = tmp_path / "m"
    argv = ["--data", str(data), "--out", str(out), "--patch-px", "32", "--batch-size", "8",
            "--epochs", "1", "--precision", "fp32"]  # fmt: skip
    assert main(argv) == cli.OK
    captured = capsys.readouterr()
    assert f"{out}: trained 1 epochs (2 steps), final loss" in captured.out
    assert f"wrote {out / 'encoder.pt'}" in captured.out
    assert "epoch 1/1: loss" in captured.err  # the per-epoch line, not --quiet
    warned = [x for x in captured.err.splitlines() if x.startswith("warning: ")]
    assert len(warned) == 1 and "zz_truncated.png" in warned[0]
    shutil.rmtree(out)
    assert main([*argv, "--quiet"]) == cli.OK  # warnings are shown with --quiet too
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("warning: ") == 1


def test_torchrun_two_gloo_processes(images, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "engine.pretrain", "--data", str(images), "--out", str(out), "--patch-px", "32",
        "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 1 epochs") == 1  # only rank 0 prints
    assert proc.stderr.count("epoch 1/1: loss") == 1
    cfg = json.loads((out / "config.json").read_text())["resolved"]
    assert (cfg["world_size"], cfg["local_batch"], cfg["steps_per_epoch"]) == (2, 4, 2)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and all(np.isfinite(r["loss"]) for r in rows)
    assert load_encoder(out / "encoder.pt").arch == "resnet18"
