"""results.md and metric_vs_fraction.png from results.csv rows."""

from __future__ import annotations

from engine.evaluate.report import (
    encoder_labels,
    plot_metric_vs_fraction,
    summarize,
    write_markdown,
)
from engine.evaluate.results import ResultsFile, cell_key


def _rows():
    rows = []
    for enc, base in (("resnet18-random", 0.5), ("/x/sample_encoder.pt", 0.8)):
        for fraction in (10, 100):
            for seed, delta in enumerate((-0.02, 0.0, 0.02)):
                key = cell_key(enc, "linear", fraction, seed)
                v = base + fraction / 1000 + delta
                rows.append(dict(zip(("encoder", "protocol", "fraction", "seed"), key, strict=True))
                            | {"n_train": 30 if fraction == 10 else 300, "test_acc": v,
                               "test_f1_macro": v - 0.1})  # fmt: skip
    return rows


def test_csv_roundtrip_and_summary(tmp_path):
    f = ResultsFile(tmp_path / "results.csv", "classification")
    f.extend(_rows())
    rows = f.rows()
    assert len(rows) == 12 and rows[0]["fraction"] == "10" and rows[0]["val_acc"] == ""
    assert ("resnet18-random", "linear", "100", "2") in f.finished()
    s = summarize(rows, "classification")
    assert s[("linear", "resnet18-random", 10.0)]["acc"] == [0.49, 0.51, 0.53]


def test_markdown_mean_and_std(tmp_path):
    md = write_markdown(_rows(), "classification", tmp_path / "r.md", "lc25000").read_text()
    # mean 0.51 -> 51.0 %, sample std over seeds 0.02 -> 2.0
    assert "| 10% | resnet18-random | 51.0 ± 2.0 | 41.0 ± 2.0 | 30 | 3 |" in md
    assert "| 100% | sample_encoder.pt | 90.0 ± 2.0 | 80.0 ± 2.0 | 300 | 3 |" in md


def test_regression_markdown_uses_raw_values(tmp_path):
    rows = [{"encoder": "e", "protocol": "linear", "fraction": "100", "seed": "0",
             "test_mse": "0.0123", "test_l1": "0.1"}]  # fmt: skip
    md = write_markdown(rows, "regression", tmp_path / "r.md").read_text()
    assert "| 100% | e | 0.0123 | 0.1000 | – | 1 |" in md


def test_plot_is_written(tmp_path):
    path = plot_metric_vs_fraction(_rows(), "classification", tmp_path / "p.png", "t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_encoders_sharing_a_file_name_get_distinct_labels():
    labels = encoder_labels(
        ["runs/a/encoder.pt", "runs/b/encoder.pt", "x/sample.pt", "resnet18-random"]
    )
    assert labels == {
        "runs/a/encoder.pt": "a/encoder.pt",
        "runs/b/encoder.pt": "b/encoder.pt",
        "x/sample.pt": "sample.pt",
        "resnet18-random": "resnet18-random",
    }


def test_markdown_keeps_encoders_sharing_a_file_name_apart(tmp_path):
    rows = [r | {"encoder": r["encoder"].replace("resnet18-random", "/y/sample_encoder.pt")}
            for r in _rows()]  # fmt: skip
    md = write_markdown(rows, "classification", tmp_path / "r.md").read_text()
    assert "| 10% | y/sample_encoder.pt | 51.0 ± 2.0 |" in md
    assert "| 10% | x/sample_encoder.pt |" in md
