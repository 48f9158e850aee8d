"""The export folder DIR of ``engine.export``: class folders, ``manifest.csv``, ``export.json``, GeoJSON.

::

    DIR/<class>/<slide_id>_<l0_x>_<l0_y>.png   one file per exported tile (ImageFolder layout)
    DIR/manifest.csv                           one row per file in DIR (MANIFEST_COLUMNS)
    DIR/export.json                            every export into DIR: config, classes, status, counts
    DIR/<slide_id>.geojson                     a MultiPolygon per class (QuPath annotations)

Consistency rule: every file listed in the manifest exists and is complete (tiles are written
atomically, then their row is appended); a file without a row (written just before a kill) is
adopted by a rerun of the same export. A row cut short by a kill is dropped when read.

A manifest written before a column existed (``prob`` came with export by prediction) reads with
that column empty, and is rewritten with the current header before rows are appended to it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from engine.errors import HistoclusterError, one_line
from engine.files import atomic_write_json, atomic_write_text
from engine.geojson import feature_collection, write_geojson

__all__ = [
    "read_json",
    "EXPORT_JSON",
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "MAX_NAME_BYTES",
    "ClassNameError",
    "ManifestAppender",
    "check_class_names",
    "existing_classes",
    "load_record",
    "manifest_is_clean",
    "manifest_is_current",
    "read_manifest",
    "remove_stale_temps",
    "rewrite_manifest",
    "write_record",
    "write_slide_geojson",
]

MANIFEST = "manifest.csv"
EXPORT_JSON = "export.json"
PARTIAL = ".partial"  # temporary suffix of exports written before engine.files
MAX_NAME_BYTES = 255  # a file name component, in bytes (ext4, APFS, NTFS in UTF-16 units)
MANIFEST_COLUMNS = (
    "path", "class", "cluster", "run", "slide_path", "slide_id", "row", "col",
    "l0_x", "l0_y", "l0_w", "l0_h", "level", "mpp", "tile_px", "distance", "prob", "export",
)  # fmt: skip
_RESERVED = {MANIFEST.lower(), EXPORT_JSON.lower()}
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\x7f]')


class ClassNameError(HistoclusterError):
    """A class name that cannot be a folder of DIR (one line: the name, why, the fix)."""


def check_class_names(names: Sequence[str], existing: Iterable[str] = ()) -> list[str]:
    """Validate class names (folder names under DIR); returns them unchanged.

    Refused, with a message saying why: empty names, path separators, ``..``, a leading dot,
    characters Windows forbids, leading/trailing spaces, names of DIR's own files, names longer
    than :data:`MAX_NAME_BYTES` bytes in UTF-8 (what the file system counts), and names that
    differ only in case from one another or from a class already in DIR (``existing``), since a
    case-insensitive file system would merge their folders.

    Raises:
        ClassNameError: the first bad name, with the fix.
    """
    seen: dict[str, str] = {n.lower(): n for n in existing}
    for name in names:
        shown = repr(name)
        if not name or not name.strip():
            raise ClassNameError(
                f"class name {shown} is empty — give every class a name with --names"
            )
        if "/" in name or "\\" in name:
            raise ClassNameError(
                f"class name {shown} contains a path separator — use a plain folder name"
            )
        if ".." in name:
            raise ClassNameError(f"class name {shown} contains '..' — use a plain folder name")
        if name.startswith("."):
            raise ClassNameError(
                f"class name {shown} starts with '.' (a hidden folder) — drop the dot"
            )
        if _BAD_CHARS.search(name):
            raise ClassNameError(
                f'class name {shown} contains a character not allowed in folder names (<>:"|?* or control) — remove it'
            )
        if name != name.strip() or name.endswith("."):
            raise ClassNameError(
                f"class name {shown} has leading/trailing spaces or a trailing dot — remove them"
            )
        if name.lower() in _RESERVED or name.lower().endswith((".geojson", PARTIAL)):
            raise ClassNameError(
                f"class name {shown} would collide with the export's own files — choose another name"
            )
        size = len(name.encode("utf-8"))
        if size > MAX_NAME_BYTES:
            raise ClassNameError(
                f"class name {shown[:40]}... is {size} bytes in UTF-8, more than the {MAX_NAME_BYTES} "
                "a folder name may have — shorten it"
            )
        other = seen.get(name.lower())
        if other is not None and other != name:
            raise ClassNameError(
                f"class names {other!r} and {shown} differ only in case — use one spelling"
            )
        seen[name.lower()] = name
    return list(names)


# ------------------------------------------------------------------------------ manifest


def read_manifest(out: str | Path) -> list[dict[str, str]]:
    """Rows of ``DIR/manifest.csv`` (empty when absent); a last row cut short by a kill is dropped.

    Every row has every column of :data:`MANIFEST_COLUMNS` (those an older manifest lacks are "").
    """
    path = Path(out) / MANIFEST
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None and not text:
        return []
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise HistoclusterError(f"{path}: not an engine.export manifest — choose another --out")
    missing = [c for c in MANIFEST_COLUMNS if c not in reader.fieldnames]
    rows = [row for row in reader if None not in row and all(v is not None for v in row.values())]
    for row in rows:
        for c in missing:
            row[c] = ""
    return rows


def manifest_is_current(out: str | Path) -> bool:
    """True when ``manifest.csv`` is absent or empty, or its header is :data:`MANIFEST_COLUMNS`."""
    path = Path(out) / MANIFEST
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader([f.readline()]), [])
    return tuple(header) == MANIFEST_COLUMNS


def manifest_is_clean(out: str | Path) -> bool:
    """True when ``manifest.csv`` is absent or ends with a whole row (appending is safe)."""
    path = Path(out) / MANIFEST
    if not path.exists() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def rewrite_manifest(out: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``DIR/manifest.csv`` by ``rows`` (header included), atomically."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(
        buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(out) / MANIFEST, buf.getvalue())


class ManifestAppender:
    """Appends rows to ``DIR/manifest.csv`` (writing the header first when the file is new).

    Each row is flushed as soon as it is written, so the manifest lists every finished file.
    """

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out) / MANIFEST
        self._file: TextIO | None = None
        self._writer: csv.DictWriter | None = None

    def __enter__(self) -> ManifestAppender:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        if new:
            self._writer.writeheader()
            self._file.flush()
        return self

    def write(self, row: Mapping[str, Any]) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.writerow(row)
        self._file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._writer = None, None


# ------------------------------------------------------------------------------ export.json


def new_record() -> dict[str, Any]:
    """The ``export.json`` of an empty DIR."""
    return {"format": "histocluster-export", "version": 1, "classes": {}, "exports": []}


def read_json(path: Path, problem: str, fix: str) -> Any:
    """The JSON document in ``path`` (UTF-8). Not JSON -> one line ``path: problem (why) — fix``;
    an ``OSError`` (missing, no permission) is left to the caller (``cli.main`` words it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HistoclusterError(f"{path}: {problem} ({one_line(e)}) — {fix}") from e


def load_record(out: str | Path) -> dict[str, Any]:
    """``DIR/export.json`` (a fresh record when absent)."""
    path = Path(out) / EXPORT_JSON
    if not path.exists():
        return new_record()
    data = read_json(path, "unreadable", "fix or remove it, or choose another --out")
    if not isinstance(data, dict) or data.get("format") != "histocluster-export":
        raise HistoclusterError(f"{path}: not an engine.export record — choose another --out")
    data.setdefault("classes", {})
    data.setdefault("exports", [])
    return data


def write_record(out: str | Path, record: Mapping[str, Any]) -> None:
    """Write ``DIR/export.json`` atomically."""
    atomic_write_json(Path(out) / EXPORT_JSON, record)


def existing_classes(out: str | Path, record: Mapping[str, Any]) -> list[str]:
    """Class names already in DIR: those in ``export.json`` and the non-hidden folders."""
    out = Path(out)
    names = set(record.get("classes", {}))
    if out.is_dir():
        names |= {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(names)


def remove_stale_temps(folders: Iterable[Path]) -> int:
    """Delete temporary files left by a killed writer in ``folders``; returns how many."""
    n = 0
    for d in folders:
        if d.is_dir():
            for stale in [*d.glob(f"*{PARTIAL}"), *d.glob(".*.tmp")]:
                stale.unlink(missing_ok=True)
                n += 1
    return n


# ------------------------------------------------------------------------------ GeoJSON


def write_slide_geojson(
    out: str | Path,
    colors: Mapping[str, Sequence[int]],
    rows: Sequence[Mapping[str, str]] | None = None,
) -> list[Path]:
    """``DIR/<slide_id>.geojson`` for every slide in the manifest: one MultiPolygon per class.

    Built from all of DIR's manifest rows (or ``rows``), so classes exported earlier into DIR
    are included and the shapes cover exactly the files listed.

    Args:
        colors: {class name: (r, g, b)}; classes without one are red.
    """
    out = Path(out)
    by_slide: dict[str, dict[str, list[list[int]]]] = {}
    for row in read_manifest(out) if rows is None else rows:
        x, y, w, h = (int(row[c]) for c in ("l0_x", "l0_y", "l0_w", "l0_h"))
        by_slide.setdefault(row["slide_id"], {}).setdefault(row["class"], []).append(
            [x, y, x + w, y + h]
        )
    written = []
    for sid, classes in sorted(by_slide.items()):
        fc = feature_collection(
            {
                name: (colors.get(name, (255, 0, 0)), np.array(boxes))
                for name, boxes in sorted(classes.items())
            }
        )
        path = out / f"{sid}.geojson"
        write_geojson(path, fc)
        written.append(path)
    return written
