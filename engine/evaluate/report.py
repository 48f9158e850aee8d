"""Reports from ``results.csv``: ``results.md`` (mean ± std over seeds, laid out like the
paper's Tables 9-12) and ``metric_vs_fraction.png`` (one line per encoder, like its Figures 6-8).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from engine.evaluate.metrics import METRICS
from engine.files import atomic_write, atomic_write_text

__all__ = ["Summary", "encoder_labels", "plot_metric_vs_fraction", "summarize", "write_markdown"]

_TITLES = {
    "acc": "Acc.",
    "f1_macro": "F1 (macro)",
    "f1_micro": "F1 (micro)",
    "mse": "MSE",
    "l1": "L1",
}
_PERCENT = {"acc", "f1_macro", "f1_micro"}

# (protocol, encoder, fraction) -> metric -> values over seeds
Summary = dict[tuple[str, str, float], dict[str, list[float]]]


def _tail(spec: str, depth: int) -> str:
    return "/".join(Path(spec).parts[-depth:])


def encoder_labels(specs: Iterable[str]) -> dict[str, str]:
    """Short, distinct names for encoder specs: a file's name (a built-in spec stays itself),
    lengthened by parent folders only where two specs would share it (``a/encoder.pt``)."""
    specs = list(dict.fromkeys(specs))
    labels = {}
    for spec in specs:
        depth, parts = 1, len(Path(spec).parts)
        while depth < parts and any(
            _tail(o, depth) == _tail(spec, depth) for o in specs if o != spec
        ):
            depth += 1
        labels[spec] = _tail(spec, depth)
    return labels


def summarize(rows: Sequence[dict[str, str]], task: str) -> Summary:
    """Group ``results.csv`` rows by (protocol, encoder, fraction); collect each test metric and
    ``n_train`` over seeds."""
    out: Summary = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["protocol"], r["encoder"], float(r["fraction"]))
        for m in METRICS[task]:
            value = r.get(f"test_{m}", "")
            if value not in ("", None):
                out[key][m].append(float(value))
        if r.get("n_train"):
            out[key]["n_train"].append(float(r["n_train"]))
    return out


def _cell(values: list[float], metric: str) -> str:
    if not values:
        return "–"
    scale, digits = (100.0, 1) if metric in _PERCENT else (1.0, 4)
    v = np.asarray(values) * scale
    mean = f"{v.mean():.{digits}f}"
    if len(v) < 2:
        return mean
    return f"{mean} ± {v.std(ddof=1):.{digits}f}"


def write_markdown(
    rows: Sequence[dict[str, str]], task: str, path: str | Path, title: str = ""
) -> Path:
    """One table per protocol: rows (training fraction, encoder), columns the test metrics as
    mean ± std over seeds (percent for accuracy/F1), plus the mean training-set size and the
    number of seeds."""
    summary = summarize(rows, task)
    metrics = METRICS[task]
    lines = [f"# {title}" if title else "# Evaluation results", ""]
    lines.append(
        "Test metrics at the epoch of best validation metric; mean ± standard deviation over "
        "seeds" + (" (accuracy and F1 in %)." if task != "regression" else ".")
    )
    labels = encoder_labels(k[1] for k in summary)
    for protocol in sorted({k[0] for k in summary}):
        lines += ["", f"## {protocol}", ""]
        header = ["Training data", "Encoder", *(_TITLES[m] for m in metrics), "Train n", "Seeds"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
        keys = sorted((k for k in summary if k[0] == protocol), key=lambda k: (k[2], k[1]))
        for _, encoder, fraction in keys:
            values = summary[(protocol, encoder, fraction)]
            n_train = values.get("n_train", [])
            seeds = max((len(values.get(m, [])) for m in metrics), default=0)
            cells = [
                f"{fraction:g}%",
                labels[encoder],
                *(_cell(values.get(m, []), m) for m in metrics),
                f"{np.mean(n_train):.0f}" if n_train else "–",
                str(seeds),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def plot_metric_vs_fraction(
    rows: Sequence[dict[str, str]], task: str, path: str | Path, title: str = ""
) -> Path:
    """A grid of panels (protocols x test metrics): metric against training fraction (log x),
    one line per encoder with ±std error bars over seeds. Written (atomically) with the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = summarize(rows, task)
    metrics = METRICS[task]
    protocols = sorted({k[0] for k in summary}) or ["(none)"]
    fig = Figure(figsize=(4.2 * len(metrics), 3.4 * len(protocols)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(protocols), len(metrics), squeeze=False)
    fractions = sorted({k[2] for k in summary})
    labels = encoder_labels(k[1] for k in summary)
    for i, protocol in enumerate(protocols):
        encoders = sorted({k[1] for k in summary if k[0] == protocol})
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            scale = 100.0 if metric in _PERCENT else 1.0
            for encoder in encoders:
                xs, ys, es = [], [], []
                for f in fractions:
                    vals = summary.get((protocol, encoder, f), {}).get(metric, [])
                    if vals:
                        v = np.asarray(vals) * scale
                        xs.append(f)
                        ys.append(v.mean())
                        es.append(v.std(ddof=1) if len(v) > 1 else 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=labels[encoder])
            ax.set_xscale("log")
            if fractions:
                ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
                ax.minorticks_off()
            ax.set_xlabel("training data (%)")
            ax.set_ylabel(_TITLES[metric] + (" (%)" if metric in _PERCENT else ""))
            ax.set_title(f"{protocol}: test {_TITLES[metric]}")
            ax.grid(alpha=0.3)
            if encoders:
                ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
