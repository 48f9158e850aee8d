"""python -m engine.evaluate end to end on generated data: outputs, resume, clear errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from engine.evaluate import EvalConfig
from engine.evaluate.cli import build_parser, main, parse_config
from tests.engine.evaluate.conftest import write_colour_folder

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def small_colours(tmp_path_factory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("cli") / "data", per_class=12, px=32)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--encoders", "resnet18-random", "--dataset", str(data), "--input-px", "32",
        "--epochs", "5", "--workers", "0", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


#: every flag of python -m engine.evaluate before the command contract (issue 11), with its
#: default; --precision was added with it
TODAYS_FLAGS = {
    "--encoders": None, "--dataset": None, "--task": "classification", "--protocol": ("linear",),
    "--fractions": (100.0,), "--seeds": (0, 1, 2), "--epochs": 100, "--out": Path("evaluate-out"),
    "--device": "auto", "--workers": 2, "--batch-size": 32, "--lr": None, "--weight-decay": None,
    "--k": 20, "--input-px": None, "--fit": "resize", "--split-seed": None, "--seg-scale": 1.0,
    "--seg-crops": 4, "--feature-cache": None, "--trust-checkpoint": False, "--quiet": False,
}  # fmt: skip


def test_flags_and_defaults_are_todays():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    assert flags == {*TODAYS_FLAGS, "--help", "--precision"}
    text = parser.format_help()
    for flag in flags:
        assert flag in text
    cfg = parse_config(["--encoders", "x", "--dataset", "d"])
    by_flag = {a.option_strings[-1]: a.dest for a in parser._actions if a.option_strings}
    for flag, default in TODAYS_FLAGS.items():
        if default is not None or flag not in ("--encoders", "--dataset"):
            assert getattr(cfg, by_flag[flag]) == default, flag
    assert cfg.precision == "fp32"  # features as before: full precision
    assert "1,2,5,10,20,50,75,100" in text and "(default: 0,1,2)" in text


def test_comma_lists_parse_as_before():
    cfg = parse_config(["--encoders", "a, b", "--dataset", "d", "--fractions", "1,10%,100",
                        "--protocol", "linear,knn", "--seeds", "3"])  # fmt: skip
    assert cfg.encoders == ("a", "b") and cfg.fractions == (1.0, 10.0, 100.0)
    assert cfg.protocols == ("linear", "knn") and cfg.seeds == (3,) and cfg.epochs == 100
    assert isinstance(cfg.dataset, Path) and isinstance(cfg.out, Path)
    # library callers may pass lists and strings
    lib = EvalConfig(encoders=["a", "b"], dataset="d", fractions=[1, 10.0, 100], seeds=[3],
                     protocols=["linear", "knn"])  # fmt: skip
    assert lib == cfg


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--encoders", "a", "--dataset", "d", "--seeds", "one"])
    assert e.value.code == 2
    assert "--seeds" in capsys.readouterr().err


def test_grid_outputs_and_resume(small_colours, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(small_colours, out, "--protocol", "linear,knn", "--fractions", "50,100",
                 "--seeds", "0,1")  # fmt: skip
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 8
    keys = {(r["protocol"], r["fraction"], r["seed"]) for r in rows}
    assert keys == {(p, f, s) for p in ("linear", "knn") for f in ("50", "100") for s in ("0", "1")}
    for r in rows:
        assert (r["n_train"], r["n_val"], r["n_test"]) in {("9", "9", "9"), ("18", "9", "9")}
        assert 0.0 <= float(r["test_f1_macro"]) <= 1.0 and r["test_acc"] != ""
    md = (out / "results.md").read_text()
    assert "## linear" in md and "## knn" in md and " ± " in md
    assert "| 50% | resnet18-random |" in md
    assert (out / "metric_vs_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file() and len(list((out / "cells").glob("*.json"))) == 8
    assert len(list((out / "features").glob("*.npy"))) == 1
    capsys.readouterr()

    # a re-run skips every finished cell and leaves the file as it was
    before = (out / "results.csv").read_text()
    assert main(args) == 0
    assert "8 of 8 cells already finished" in capsys.readouterr().err
    assert (out / "results.csv").read_text() == before

    # drop one finished cell: only that one runs again
    lines = before.splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "7 of 8 cells already finished" in err and "features of resnet18-random: cached" in err
    after = _rows(out)
    assert len(after) == 8 and after[:7] == rows[:7]

    # widening the grid adds cells; settings that change results are refused
    assert main([*args[:-1], "0,1,2"]) == 0
    assert len(_rows(out)) == 12
    assert main([*args, "--k", "5"]) == 2
    assert "results here were made with k=20, now k=5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fractions", "1"], "1% of the training split leaves class 'blue' with no sample"),
        (["--protocol", "svm"], "--protocol: unknown 'svm'"),
        (
            ["--task", "segmentation", "--protocol", "linear"],
            "segmentation is evaluated by fine-tuning only",
        ),
        (["--encoders", "resnet18-nope"], "resnet18-nope: no such checkpoint file"),
    ],
)
def test_bad_input_is_one_line(small_colours, tmp_path, capsys, extra, message):
    args = _args(small_colours, tmp_path / "out", *extra)
    if extra[0] == "--encoders":
        args = args[2:] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_empty_class_folder_as_a_command(tmp_path):
    data = write_colour_folder(tmp_path / "data", per_class=2, px=8)
    (data / "MUC").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "engine.evaluate", *_args(data, tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {data / 'MUC'}: class folder has no images — add images to it or remove the folder"
    ]


def test_undecodable_images_are_counted_and_listed(small_colours, tmp_path, capsys):
    data = tmp_path / "data"
    write_colour_folder(data, per_class=8, px=32)
    (data / "red" / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(_args(data, out, "--protocol", "knn", "--seeds", "0")) == 0
    err = capsys.readouterr().err
    assert "warning: 1 file(s) could not be decoded and were skipped" in err
    assert (out / "skipped_files.txt").read_text().startswith(str(data / "red" / "bad.png"))
    assert _rows(out)[0]["n_train"] == "12"


def test_regression_csv_beats_predicting_the_mean(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    targets = rng.random(48)
    lines = ["path,target"]
    for i, t in enumerate(targets):
        img = np.clip(40 + 170 * t + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{t:.4f}")
    (tmp_path / "cellularity.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = _args(tmp_path / "cellularity.csv", out, "--task", "regression",
                 "--protocol", "linear,knn", "--seeds", "0", "--epochs", "40", "--k", "5")  # fmt: skip
    assert main(args) == 0
    rows = {r["protocol"]: r for r in _rows(out)}
    variance = float(np.var(targets))
    for protocol in ("linear", "knn"):
        assert float(rows[protocol]["test_mse"]) < 0.5 * variance, rows[protocol]
        assert float(rows[protocol]["test_l1"]) > 0
    assert "| MSE | L1 |" in (out / "results.md").read_text()


def test_cell_files_of_encoders_sharing_a_file_name_differ(tmp_path):
    from engine.evaluate.runner import _cell_file

    a = _cell_file(tmp_path, ("runs/a/encoder.pt", "linear", "10", "0"))
    b = _cell_file(tmp_path, ("runs/b/encoder.pt", "linear", "10", "0"))
    assert a != b and a.name.startswith("encoder.pt-") and a.parent == b.parent
