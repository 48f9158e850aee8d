"""``results.csv``: one row per finished (encoder, protocol, fraction, seed) cell, appended as
soon as the cell finishes, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.evaluate.metrics import METRICS

__all__ = ["ResultsFile", "cell_key", "columns_for"]

_KEY_COLUMNS = ("encoder", "protocol", "fraction", "seed")


def columns_for(task: str) -> list[str]:
    """The CSV columns for ``task``: key, sizes, selected epoch, val_* and test_* metrics, time."""
    metrics = METRICS[task]
    return [
        *_KEY_COLUMNS,
        "n_train",
        "n_val",
        "n_test",
        "best_epoch",
        *(f"val_{m}" for m in metrics),
        *(f"test_{m}" for m in metrics),
        "seconds",
    ]


def cell_key(encoder: str, protocol: str, fraction: float, seed: int) -> tuple[str, str, str, str]:
    """The identity of a cell as the strings written to the CSV."""
    return (str(encoder), str(protocol), f"{float(fraction):g}", str(int(seed)))


class ResultsFile:
    """Append-only ``results.csv`` for one task."""

    def __init__(self, path: str | Path, task: str) -> None:
        self.path = Path(path)
        self.columns = columns_for(task)

    def rows(self) -> list[dict[str, str]]:
        """Every row written so far (strings, as in the file)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def finished(self) -> set[tuple[str, str, str, str]]:
        """Keys (see :func:`cell_key`) of the cells already in the file."""
        return {tuple(r[c] for c in _KEY_COLUMNS) for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        """Write one row (missing columns left empty) and flush it to disk."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({c: _fmt(row.get(c, "")) for c in self.columns})

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append several rows."""
        for r in rows:
            self.append(r)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
