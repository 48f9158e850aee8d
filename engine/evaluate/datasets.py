"""Labelled datasets for evaluation, found on disk: :func:`load_samples` -> :class:`Samples`.

Classification
    - an ImageFolder directory ``ROOT/<class>/<image>`` (files directly in ROOT, such as the
      ``manifest.csv`` that ``engine.export`` writes beside its class folders, are ignored);
    - the same with the dataset's own split: ``ROOT/train/<class>/...``, ``ROOT/val/...``
      (or ``valid/``), ``ROOT/test/...``;
    - a CSV of ``path,label`` (header optional; relative paths resolved against the CSV's
      folder; an optional third column ``split`` with train/val/test);
    - PatchCamelyon-style HDF5: one file with datasets ``x`` (N, H, W, 3) uint8 and ``y``
      (N, ...) labels, a ``*_x.h5`` file beside its ``*_y.h5``, or a folder of such pairs whose
      names say ``train``, ``valid`` and ``test`` (then that is the split).
Regression
    a CSV of ``path,target`` (float targets, e.g. cellularity 0-1), optional ``split`` column.
Segmentation
    ``ROOT/images/*`` and ``ROOT/masks/*`` matched by file stem (a mask may also be named
    ``<stem>_mask``); or ``ROOT/{train,val,test}/{images,masks}``. Masks hold an integer class
    per pixel, the size of their image; masks whose values are only {0, 255} are read as binary
    0/1. ``ROOT/classes.txt`` (optional) names the classes, one a line (value i = line i+1);
    without it the classes are 0..max, and a value beyond a gap (0, 1, 200) is refused.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

from engine.errors import HistoclusterError
from engine.evaluate.images import find_undecodable, is_image_file
from engine.evaluate.sources import FileImages, H5Images, ImageSource
from engine.progress import Progress, no_progress

__all__ = [
    "CLASSES_FILE",
    "SPLIT_NAMES",
    "TASKS",
    "DatasetError",
    "Samples",
    "Task",
    "drop_undecodable",
    "load_samples",
]

Task = Literal["classification", "regression", "segmentation"]
TASKS: tuple[str, ...] = get_args(Task)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
#: optional segmentation class names, one a line, beside images/ and masks/
CLASSES_FILE = "classes.txt"


class DatasetError(HistoclusterError):
    """A dataset that cannot be used as given; the message names the file and the fix."""


@dataclass
class Samples:
    """Every usable sample of one dataset, before splitting.

    ``targets``: (N,) int64 class index (classification) or float32 target (regression);
    None for segmentation. ``masks``: (N,) mask paths for segmentation. ``split``: (N,)
    strings from :data:`SPLIT_NAMES` when the dataset brings its own split, else None.
    """

    task: Task
    root: Path
    images: ImageSource
    targets: np.ndarray | None
    classes: list[str]
    masks: list[Path] | None = None
    split: np.ndarray | None = None
    masks_255_as_1: bool = False

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes)

    def select(self, idx: Sequence[int] | np.ndarray) -> Samples:
        """The samples at ``idx`` (int indices), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            images=self.images.select(idx),
            targets=None if self.targets is None else self.targets[idx],
            masks=None if self.masks is None else [self.masks[i] for i in idx],
            split=None if self.split is None else self.split[idx],
        )


# --------------------------------------------------------------------------- entry point


def load_samples(path: str | Path, task: Task) -> Samples:
    """Find the dataset at ``path`` for ``task``; raises :class:`DatasetError` when unusable."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder — check --dataset")
    if task == "segmentation":
        samples = _segmentation(root)
    elif task == "regression":
        if root.is_dir():
            csvs = sorted(root.glob("*.csv"))
            if len(csvs) != 1:
                raise DatasetError(
                    f"{root}: a regression dataset is a CSV of path,target — pass the CSV file"
                )
            root = csvs[0]
        samples = _csv(root, task)
    elif task == "classification":
        if root.is_file() and root.suffix.lower() == ".csv":
            samples = _csv(root, task)
        elif (root.is_file() and root.suffix.lower() in _H5_SUFFIXES) or (
            root.is_dir() and _h5_files(root)
        ):
            samples = _hdf5(root)
        elif root.is_dir():
            samples = _image_folder_with_splits(root)
        else:
            raise DatasetError(
                f"{root}: not an ImageFolder directory, a .csv or an .h5 file — "
                "see `python -m engine.evaluate --help` for the accepted layouts"
            )
    else:
        raise DatasetError(f"{root}: unknown task {task!r} — use one of {', '.join(TASKS)}")
    _check_classes(samples)
    return samples


def drop_undecodable(
    samples: Samples, workers: int = 2, progress: Progress = no_progress
) -> tuple[Samples, dict[str, str]]:
    """Decode every image (and mask) file once; drop the samples that fail.

    Reports ``progress("check", files decoded, files)``.
    Returns the remaining samples and ``{file: reason}`` for each skipped file. HDF5 sources
    are not scanned (their rows are arrays, not encoded files). Raises :class:`DatasetError`
    if dropping leaves a class empty or nothing at all.
    """
    if not isinstance(samples.images, FileImages):
        return samples, {}
    files = list(samples.images.paths)
    if samples.masks is not None:
        files += samples.masks
    bad = find_undecodable(files, workers=workers, progress=progress)
    if not bad:
        return samples, {}
    n = len(samples)
    keep = [
        i
        for i in range(n)
        if samples.images.paths[i] not in bad
        and (samples.masks is None or samples.masks[i] not in bad)
    ]
    if not keep:
        raise DatasetError(
            f"{samples.root}: none of the {n} images could be decoded — check the files' format"
        )
    out = samples.select(keep)
    _check_classes(out, after_skipping=len(bad))
    return out, {str(p): reason for p, reason in bad.items()}


# --------------------------------------------------------------------------- checks


def _check_classes(samples: Samples, after_skipping: int = 0) -> None:
    if len(samples) == 0:
        raise DatasetError(f"{samples.root}: no samples found — check the path and layout")
    if samples.task != "classification":
        return
    note = f" after skipping {after_skipping} undecodable files" if after_skipping else ""
    counts = np.bincount(samples.targets, minlength=len(samples.classes))
    empty = [samples.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(
            f"{samples.root}: class {empty[0]!r} has no images{note} — "
            "add images to it or remove that class"
        )
    if len(samples.classes) < 2:
        only = samples.classes[0] if samples.classes else "?"
        raise DatasetError(
            f"{samples.root}: only one class ({only!r}) — a classifier needs at least two classes"
        )


# --------------------------------------------------------------------------- ImageFolder


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _own_split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _subdirs(root):
        name = _SPLIT_ALIASES.get(d.name.lower())
        if name is not None and name not in found:
            found[name] = d
    if "train" in found and len(found) >= 2:
        return found
    return {}


def _image_folder(root: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for ``root/<class>/**/<image>``."""
    classes: dict[str, list[Path]] = {}
    for d in _subdirs(root):
        images = sorted(p for p in d.rglob("*") if is_image_file(p))
        if not images:
            raise DatasetError(
                f"{d}: class folder has no images — add images to it or remove the folder"
            )
        classes[d.name] = images
    if not classes:
        raise DatasetError(
            f"{root}: no class folders — expected ROOT/<class>/<image> (ImageFolder), "
            "ROOT/train|val|test/<class>/<image>, a CSV of path,label, or HDF5 x/y"
        )
    return classes


def _image_folder_with_splits(root: Path) -> Samples:
    split_dirs = _own_split_dirs(root)
    parts = {name: _image_folder(d) for name, d in split_dirs.items()} or {"": _image_folder(root)}
    classes = sorted({c for per_class in parts.values() for c in per_class})
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    targets: list[int] = []
    split: list[str] = []
    for name, per_class in parts.items():
        for c, images in per_class.items():
            paths += images
            targets += [index[c]] * len(images)
            split += [name] * len(images)
    return Samples(
        task="classification",
        root=root,
        images=FileImages(paths),
        targets=np.asarray(targets, dtype=np.int64),
        classes=classes,
        split=np.asarray(split) if split_dirs else None,
    )


# --------------------------------------------------------------------------- CSV


def _csv(path: Path, task: Task) -> Samples:
    value_name = "label" if task == "classification" else "target"
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    if not rows:
        raise DatasetError(f"{path}: empty CSV — expected rows of path,{value_name}")
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        col_path = header.index("path")
        names = [value_name, "label", "target", "class", "y"]
        col_value = next((header.index(n) for n in names if n in header), None)
        if col_value is None:
            raise DatasetError(
                f"{path}: header has no '{value_name}' column — name the columns path,{value_name}"
            )
        col_split = header.index("split") if "split" in header else None
        rows = rows[1:]
    else:
        col_path, col_value = 0, 1
        col_split = 2 if len(rows[0]) >= 3 else None
    paths: list[Path] = []
    values: list[str] = []
    split: list[str] = []
    for lineno, r in enumerate(rows, start=2 if "path" in header else 1):
        if len(r) <= max(col_path, col_value):
            raise DatasetError(f"{path}:{lineno}: expected path,{value_name} — fix that line")
        p = Path(r[col_path].strip())
        paths.append(p if p.is_absolute() else path.parent / p)
        values.append(r[col_value].strip())
        if col_split is not None:
            s = _SPLIT_ALIASES.get(r[col_split].strip().lower()) if len(r) > col_split else None
            if s is None:
                raise DatasetError(
                    f"{path}:{lineno}: split must be train, val or test — fix that line"
                )
            split.append(s)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: listed in {path.name} but not found ({len(missing)} missing) — "
            "fix the paths (relative paths are resolved against the CSV's folder)"
        )
    if task == "classification":
        classes, targets = _encode_labels(values)
    else:
        try:
            targets = np.asarray([float(v) for v in values], dtype=np.float32)
        except ValueError as exc:
            raise DatasetError(
                f"{path}: non-numeric target ({exc}) — targets must be numbers"
            ) from None
        classes = []
    return Samples(
        task=task,
        root=path,
        images=FileImages(paths),
        targets=targets,
        classes=classes,
        split=np.asarray(split) if split else None,
    )


def _encode_labels(values: Sequence) -> tuple[list[str], np.ndarray]:
    """Labels -> (sorted class names, (N,) int64 index); numeric labels sort numerically."""
    uniq = sorted({str(v) for v in values})
    try:
        uniq = sorted(uniq, key=float)
    except ValueError:
        pass
    index = {c: i for i, c in enumerate(uniq)}
    return uniq, np.asarray([index[str(v)] for v in values], dtype=np.int64)


# --------------------------------------------------------------------------- HDF5


def _h5_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix.lower() in _H5_SUFFIXES and p.is_file())


def _y_partner(x_file: Path) -> Path | None:
    m = re.match(r"^(.*)([_-])x$", x_file.stem)
    if not m:
        return None
    partner = x_file.with_name(f"{m.group(1)}{m.group(2)}y{x_file.suffix}")
    return partner if partner.is_file() else None


def _split_from_name(name: str) -> str | None:
    tokens = re.split(r"[^a-z]+", name.lower())
    for t in tokens:
        if t in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[t]
    return None


def _read_labels(y_file: Path, key: str, n: int) -> np.ndarray:
    import h5py

    with h5py.File(y_file, "r") as f:
        if key not in f:
            raise DatasetError(f"{y_file}: no dataset '{key}' — PCam-style files hold 'x' and 'y'")
        y = np.asarray(f[key]).reshape(len(f[key]), -1)
    if y.shape[1] != 1 or len(y) != n:
        raise DatasetError(
            f"{y_file}: labels of shape {y.shape} do not match {n} images — expected one label per image"
        )
    return y[:, 0]


def _h5_len(x_file: Path) -> int:
    import h5py

    try:
        with h5py.File(x_file, "r") as f:
            if "x" not in f:
                raise DatasetError(f"{x_file}: no dataset 'x' — PCam-style files hold 'x' and 'y'")
            shape = f["x"].shape
    except OSError as exc:
        raise DatasetError(f"{x_file}: not a readable HDF5 file ({exc}) — check the file") from None
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise DatasetError(f"{x_file}: 'x' has shape {shape} — expected (N, H, W, 3) uint8")
    return shape[0]


def _hdf5(root: Path) -> Samples:
    pairs: list[tuple[Path, Path]] = []  # (x file, y file); identical for a single combined file
    candidates = [root] if root.is_file() else _h5_files(root)
    for f in candidates:
        if re.search(r"[_-]y$", f.stem):
            continue
        partner = _y_partner(f)
        pairs.append((f, partner if partner is not None else f))
    if not pairs:
        raise DatasetError(f"{root}: no HDF5 image files (x) found — expected *_x.h5 with *_y.h5")
    split_names = [_split_from_name(x.name) for x, _ in pairs]
    own_split = len(pairs) > 1 and all(split_names) and "train" in split_names
    file_index: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    split: list[np.ndarray] = []
    for i, (x_file, y_file) in enumerate(pairs):
        n = _h5_len(x_file)
        labels.append(_read_labels(y_file, "y", n))
        file_index.append(np.full(n, i, dtype=np.int64))
        rows.append(np.arange(n, dtype=np.int64))
        if own_split:
            split.append(np.full(n, split_names[i]))
    classes, targets = _encode_labels(np.concatenate(labels).tolist())
    return Samples(
        task="classification",
        root=root,
        images=H5Images(
            [x for x, _ in pairs], "x", np.concatenate(file_index), np.concatenate(rows)
        ),
        targets=targets,
        classes=classes,
        split=np.concatenate(split) if own_split else None,
    )


# --------------------------------------------------------------------------- segmentation


def _image_mask_pairs(folder: Path) -> tuple[list[Path], list[Path]]:
    img_dir, mask_dir = folder / "images", folder / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetError(
            f"{folder}: expected sub-folders images/ and masks/ (matched by file stem) — "
            "arrange the segmentation data that way"
        )
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if is_image_file(p)}
    images = sorted(p for p in img_dir.iterdir() if is_image_file(p))
    pairs_i: list[Path] = []
    pairs_m: list[Path] = []
    for img in images:
        m = masks.get(img.stem) or masks.get(f"{img.stem}_mask")
        if m is None:
            raise DatasetError(
                f"{img}: no mask named {img.stem}.* in {mask_dir} — add its mask or remove the image"
            )
        pairs_i.append(img)
        pairs_m.append(m)
    if not pairs_i:
        raise DatasetError(f"{img_dir}: no images — add images and masks")
    return pairs_i, pairs_m


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, or None when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - reported by drop_undecodable
        return None


def _mask_values(images: Sequence[Path], masks: Sequence[Path]) -> dict[int, Path]:
    """``{mask value: first mask file holding it}`` over every mask.

    Raises :class:`DatasetError` naming the mask for a mask that is not single-channel or not
    the size of its image (a mask is never stretched to fit: it would mislabel the pixels).
    """
    values: dict[int, Path] = {}
    for img, p in zip(images, masks, strict=True):
        try:
            with Image.open(p) as im:
                arr = np.asarray(im)
        except Exception:  # noqa: BLE001 - reported by drop_undecodable
            continue
        if arr.ndim != 2:
            raise DatasetError(
                f"{p}: mask has shape {arr.shape} — masks must be single-channel, one class per pixel"
            )
        size = _image_size(img)
        if size is not None and size != (arr.shape[1], arr.shape[0]):
            raise DatasetError(
                f"{p}: mask is {arr.shape[1]}x{arr.shape[0]} px but its image {img.name} is "
                f"{size[0]}x{size[1]} — give every image a mask of its own size"
            )
        for v in np.unique(arr).tolist():
            values.setdefault(int(v), p)
    return values


def _declared_classes(root: Path) -> list[str] | None:
    """The class names of ``root/classes.txt`` (one a line; mask value i is line i), if any."""
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n]
    if len(names) < 2:
        raise DatasetError(
            f"{path}: {len(names)} class name(s) — list at least two, one a line "
            "(mask value i is the class on line i+1)"
        )
    return names


def _segmentation_classes(root: Path, values: dict[int, Path]) -> tuple[list[str], bool]:
    """(class names, masks_255_as_1) from the mask values seen and ``classes.txt`` if present.

    Masks holding only 0 and 255 are binary. Otherwise a mask value is a class index, and one
    outside the declared classes (or, undeclared, beyond a gap in the values seen: 0, 1, 200)
    is refused with the file named, rather than silently adding empty classes.
    """
    declared = _declared_classes(root)
    seen = sorted(values)
    negative = [v for v in seen if v < 0]
    if negative:
        v = negative[0]
        raise DatasetError(f"{values[v]}: mask value {v} — class indices start at 0")
    if (
        seen
        and set(seen) <= {0, 255}
        and 255 in values
        and (declared is None or len(declared) == 2)
    ):
        return (declared or ["0", "1"]), True
    if declared is not None:
        outside = [v for v in seen if v >= len(declared)]
        if outside:
            v = outside[0]
            raise DatasetError(
                f"{values[v]}: mask value {v} is not a class of {root / CLASSES_FILE} "
                f"(values 0-{len(declared) - 1}) — fix the mask or add the class there"
            )
        return declared, False
    n_classes = max(max(seen, default=0) + 1, 2)
    gaps = [c for c in range(n_classes) if c not in values]
    if gaps and n_classes > 2:
        beyond = [v for v in seen if v > gaps[0]]
        v = beyond[0]
        raise DatasetError(
            f"{values[v]}: mask value {v}, but no mask holds class {gaps[0]} — mask values are "
            "class indices 0..C-1 (0/255 masks are read as binary); fix the mask, or name the "
            f"classes in {root / CLASSES_FILE} (one a line, value i = line i+1)"
        )
    return [str(c) for c in range(n_classes)], False


def _segmentation(root: Path) -> Samples:
    if root.is_file():
        raise DatasetError(f"{root}: segmentation needs a folder with images/ and masks/")
    split_dirs = _own_split_dirs(root)
    parts = split_dirs or {"": root}
    images: list[Path] = []
    masks: list[Path] = []
    split: list[str] = []
    for name, folder in parts.items():
        i, m = _image_mask_pairs(folder)
        images += i
        masks += m
        split += [name] * len(i)
    classes, as_binary = _segmentation_classes(root, _mask_values(images, masks))
    return Samples(
        task="segmentation",
        root=root,
        images=FileImages(images),
        targets=None,
        classes=classes,
        masks=masks,
        split=np.asarray(split) if split_dirs else None,
        masks_255_as_1=as_binary,
    )
