"""``results.csv``: one row per finished (encoder, protocol, fraction, seed) cell, added as soon
as the cell finishes, so an interrupted run resumes where it stopped.

Each addition rewrites the file atomically (:func:`engine.files.atomic_write_text`): a kill at
any moment leaves the file as it was before the cell or with the cell's whole row.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.evaluate.metrics import METRICS
from engine.files import atomic_write_text

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
    """``results.csv`` for one task: rows are only ever added, each whole."""

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
        """Add one row (missing columns left empty): the file is rewritten atomically."""
        self.extend([row])

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add several rows in one atomic rewrite."""
        old = ""
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                old = f.read()  # line ends kept as written (the csv module's \r\n)
        if old and not old.endswith("\n"):
            old = old[: old.rfind("\n") + 1]  # a row cut short by an older, non-atomic writer
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        if not old:
            writer.writeheader()
        for r in rows:
            writer.writerow({c: _fmt(r.get(c, "")) for c in self.columns})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, old + buf.getvalue())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
