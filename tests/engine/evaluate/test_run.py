"""engine.evaluate.run: the command contract — progress stages, Cancel keeps finished cells
whole and resumable, exit statuses, and runs recorded before the contract still resume."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import cli
from engine.evaluate import EvalConfig, EvalResult, run
from engine.evaluate.results import ResultsFile
from engine.progress import Cancelled
from tests.engine.evaluate.conftest import write_colour_folder


@pytest.fixture(scope="module")
def tiny_colours(tmp_path_factory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("run") / "data", per_class=8, px=16)


def _cfg(data: Path, out: Path, **kw) -> EvalConfig:
    base = dict(
        encoders=("resnet18-random",), dataset=data, input_px=16, epochs=3, workers=0,
        device="cpu", out=out, protocols=("linear", "knn"), seeds=(0, 1), quiet=True,
    )  # fmt: skip
    return EvalConfig(**{**base, **kw})


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


class Recorder:
    """A progress callback that records every report and cancels when ``when`` says so."""

    def __init__(self, when=None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.when = when

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))
        if self.when is not None and self.when(self.calls):
            raise Cancelled

    def stage(self, name: str) -> list[tuple[int, int]]:
        return [(d, t) for s, d, t in self.calls if s == name]


@pytest.fixture(scope="module")
def loader(random_encoder):
    return lambda spec: random_encoder


def test_progress_reports_every_stage(tiny_colours, tmp_path, loader):
    rec = Recorder()
    result = run(_cfg(tiny_colours, tmp_path / "out"), progress=rec, load_encoder=loader)
    assert isinstance(result, EvalResult)
    assert (result.cells, result.ran, result.resumed) == (4, 4, 0)
    assert rec.stage("check")[-1] == (24, 24)
    assert rec.stage("features")[0] == (0, 24) and rec.stage("features")[-1] == (24, 24)
    assert rec.stage("cells") == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    train = rec.stage("train")
    # linear: 3 epochs x 1 step of 12 samples; knn: 6 val + 6 test queries
    assert (3, 3) in train and (12, 12) in train
    for name in ("check", "features", "train"):
        for (d0, _), (d1, _) in zip(rec.stage(name), rec.stage(name)[1:], strict=False):
            assert d1 >= d0 or d1 == 0, (name, d0, d1)  # never backwards within one loop
    assert len(_rows(tmp_path / "out")) == 4


def test_cancel_keeps_finished_cells_whole_and_resumes(tiny_colours, tmp_path, loader):
    out = tmp_path / "out"
    cfg = _cfg(tiny_colours, out)

    def in_third_cell(calls):  # the first report of the third cell's training
        return calls[-1][0] == "train" and ("cells", 2, 4) in calls

    with pytest.raises(Cancelled):
        run(cfg, progress=Recorder(in_third_cell), load_encoder=loader)
    rows = _rows(out)
    assert [(r["protocol"], r["seed"]) for r in rows] == [("linear", "0"), ("linear", "1")]
    assert (out / "results.csv").read_bytes().endswith(b"\r\n")  # whole rows only
    assert "| 100% | resnet18-random |" in (out / "results.md").read_text()  # reports of them
    assert len(list((out / "cells").glob("*.json"))) == 2
    assert not list(out.rglob("*.tmp"))

    rec = Recorder()
    result = run(cfg, progress=rec, load_encoder=loader)
    assert (result.ran, result.resumed) == (2, 2)
    assert rec.stage("cells")[0] == (2, 4)
    after = _rows(out)
    assert after[:2] == rows and len(after) == 4


def test_cancel_while_encoding_features_leaves_no_cache_entry(tiny_colours, tmp_path, loader):
    out = tmp_path / "out"
    cfg = _cfg(tiny_colours, out, protocols=("knn",), seeds=(0,))
    with pytest.raises(Cancelled):
        run(cfg, progress=Recorder(lambda c: c[-1][0] == "features"), load_encoder=loader)
    assert not (out / "results.csv").exists()
    assert not list(out.glob("features/*"))
    assert run(cfg, load_encoder=loader).ran == 1
    assert len(list((out / "features").glob("*.npy"))) == 1


def test_main_exit_status_on_cancel_is_130(tiny_colours, tmp_path, capsys, loader):
    args = ["--encoders", "resnet18-random", "--dataset", str(tiny_colours), "--input-px", "16",
            "--epochs", "2", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "o"),
            "--protocol", "linear", "--seeds", "0"]  # fmt: skip

    def cancelled(cfg, *, progress):
        return run(cfg, progress=Recorder(lambda c: c[-1][0] == "train"), load_encoder=loader)

    from engine.evaluate.cli import DESCRIPTION, PROG

    assert cli.main(EvalConfig, cancelled, args, prog=PROG, description=DESCRIPTION) == 130
    assert "interrupted" in capsys.readouterr().err
    assert cli.main(EvalConfig, run, args, prog=PROG, description=DESCRIPTION) == 0
    capsys.readouterr()
    assert cli.main(EvalConfig, run, [*args, "--device", "nonsense"], prog=PROG,
                    description=DESCRIPTION) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device nonsense:") and "\n" not in err


def test_runs_recorded_before_the_contract_resume(tiny_colours, tmp_path, loader):
    """An OUT written by the earlier command (config.json with a top-level "signature" and no
    precision) resumes, and a changed setting is still refused."""
    out = tmp_path / "out"
    cfg = _cfg(tiny_colours, out, protocols=("knn",), seeds=(0,))
    run(cfg, load_encoder=loader)
    new = json.loads((out / "config.json").read_text())
    assert new["resolved"]["signature"]["precision"] == "fp32"
    legacy_signature = {k: v for k, v in new["resolved"]["signature"].items() if k != "precision"}
    (out / "config.json").write_text(
        json.dumps({"config": cfg.to_json(), "signature": legacy_signature})
    )
    assert run(replace(cfg, seeds=(0, 1)), load_encoder=loader).resumed == 1
    from engine.evaluate.runner import ConfigError

    with pytest.raises(ConfigError, match=r"made with precision='fp32', now precision='bf16'"):
        run(replace(cfg, precision="bf16"), load_encoder=loader)


def test_results_file_rows_are_whole(tmp_path):
    path = tmp_path / "results.csv"
    results = ResultsFile(path, "classification")
    results.append({"encoder": "a", "protocol": "knn", "fraction": "100", "seed": "0"})
    # a row cut short by an earlier writer that was killed mid-write
    with open(path, "ab") as f:
        f.write(b"b,knn,100,1,1")
    results.append({"encoder": "c", "protocol": "knn", "fraction": "100", "seed": "0"})
    assert [r["encoder"] for r in results.rows()] == ["a", "c"]
    assert np.all([r["protocol"] == "knn" for r in results.rows()])
