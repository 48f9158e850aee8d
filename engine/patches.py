"""Unlabeled patch sets for self-supervised pretraining, from slides and image folders.

Every ``--data`` argument is one *dataset*: a slide, an image, a folder searched at any depth, or
a ``patches.csv`` written by an earlier run. Files OpenSlide recognises are slides: they are
tiled at ``mpp`` um/px into ``patch_px`` tiles, tiles with enough tissue are kept, and at most
``max_per_slide`` of them (100 in the paper) are drawn at random from a fixed seed. Other PNG,
JPEG and TIFF files are images, each one patch (centre-cropped to a square, resized to
``patch_px``). With ``fraction`` set, each dataset keeps that share of its patches, at least 10
and at most 2000 (the paper's section 4.3 rule). The chosen patches are written to a CSV that
``--data`` accepts back, so a run can be reproduced exactly.

Candidate files are those :func:`engine.slide.find_slides` lists (the project's one suffix list);
a slide file OpenSlide does not recognise is skipped with a warning. DICOM (``.dcm``) is not
listed: no test shows OpenSlide opening a DICOM slide here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from engine.errors import HistoclusterError, SlideError
from engine.files import atomic_write_text
from engine.progress import Progress, Throttle, no_progress
from engine.slide import (
    Slide,
    SlideCache,
    composite_on_white,
    find_slides,
    is_slide_file,
    open_slide,
)
from engine.tiling import TileGrid

__all__ = [
    "IMAGE_SUFFIXES",
    "PatchDataset",
    "PatchRecord",
    "build_patch_set",
    "find_sources",
    "load_patch",
    "read_patch_csv",
    "sample_slide_patches",
    "subsample_fraction",
    "write_patch_csv",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""Plain images, each one patch (a subset of :data:`engine.slide.SLIDE_SUFFIXES`)."""
FRACTION_MIN, FRACTION_MAX = 10, 2000
SLIDE_CACHE_SIZE = 128
"""Open slides kept per process (and per loader worker) while patches are read."""


@dataclass(frozen=True)
class PatchRecord:
    """One training patch: a whole image, or a tile of a slide at (l0_x, l0_y).

    ``target_mpp`` and ``tile_px`` describe the slide tile read; ``slide_mpp`` is the
    resolution override the slide was opened with (0 when its metadata was used).
    """

    dataset: str
    kind: Literal["slide", "image"]
    path: str
    l0_x: int = -1
    l0_y: int = -1
    target_mpp: float = 0.0
    tile_px: int = 0
    slide_mpp: float = 0.0


def _openslide_reads(path: Path) -> bool:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except (openslide.OpenSlideError, OSError):
        return False


def _classify(path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(slides, images, unrecognised slide files) under ``path``, sorted."""
    if not path.exists():
        raise HistoclusterError(f"{path}: no such file or folder — check the --data path")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        files = find_slides(path, recursive=True)
    else:
        files = [path] if is_slide_file(path) else []
    slides, images, others = [], [], []
    for f in files:
        if f.name.startswith("."):
            continue
        if _openslide_reads(f):
            slides.append(f)
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            images.append(f)
        else:
            others.append(f)
    return slides, images, others


def find_sources(path: str | Path) -> tuple[list[Path], list[Path]]:
    """(slides, images) under ``path`` (a file or a folder searched at any depth), sorted.

    Candidates are the files :func:`engine.slide.find_slides` lists (hidden files skipped):
    those OpenSlide reads are slides, other PNG, JPEG and TIFF files are images.
    """
    slides, images, _ = _classify(Path(path))
    return slides, images


def sample_slide_patches(
    slide: Slide,
    dataset: str,
    rng: np.random.Generator,
    mpp: float = 0.5,
    patch_px: int = 224,
    max_per_slide: int = 100,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
) -> list[PatchRecord]:
    """At most ``max_per_slide`` random tissue tiles of ``slide`` (grid tiles, no repeats)."""
    grid = TileGrid(slide, target_mpp=mpp, tile_px=patch_px, min_tissue=min_tissue)
    rows, cols = np.nonzero(grid.selected)
    if len(rows) == 0:
        return []
    pick = np.sort(rng.choice(len(rows), size=min(max_per_slide, len(rows)), replace=False))
    out = []
    for i in pick:
        x, y = grid.origin(int(rows[i]), int(cols[i]))
        out.append(
            PatchRecord(
                dataset,
                "slide",
                str(slide.path),
                x,
                y,
                float(mpp),
                int(patch_px),
                float(slide_mpp or 0.0),
            )  # fmt: skip
        )
    return out


def subsample_fraction(
    records: Sequence[PatchRecord],
    fraction: float,
    rng: np.random.Generator,
    min_n: int = FRACTION_MIN,
    max_n: int = FRACTION_MAX,
) -> list[PatchRecord]:
    """Keep ``fraction`` of ``records`` at random, clamped to [min_n, max_n] (and to what exists)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = int(np.clip(round(fraction * len(records)), min_n, max_n))
    n = min(n, len(records))
    keep = np.sort(rng.choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


def build_patch_set(
    data: Sequence[str | Path],
    *,
    mpp: float = 0.5,
    patch_px: int = 224,
    max_per_slide: int = 100,
    fraction: float | None = None,
    seed: int = 0,
    slide_mpp: float | None = None,
    min_tissue: float = 0.5,
    log: Callable[[str], None] | None = None,
    progress: Progress = no_progress,
) -> list[PatchRecord]:
    """All patches of every ``data`` source, each source one dataset (see the module docstring).

    Reports stage ``"patches"`` (slides sampled of all slides). Raises ``HistoclusterError``
    (one line) when a source is missing or nothing usable is found.
    """
    rng = np.random.default_rng(seed)
    sources: list[tuple[Path, list[Path], list[Path]] | list[PatchRecord]] = []
    for src in data:
        src = Path(src)
        if src.suffix.lower() == ".csv" and src.is_file():
            sources.append(read_patch_csv(src))
        else:
            slides, images, others = _classify(src)
            for f in others:
                if log:
                    log(f"warning: {f}: OpenSlide does not recognise this slide file — skipped")
            sources.append((src, slides, images))
    n_slides = sum(len(s[1]) for s in sources if isinstance(s, tuple))
    report = Throttle(progress) if n_slides else no_progress
    report("patches", 0, n_slides)
    done = 0
    records: list[PatchRecord] = []
    for source in sources:
        if not isinstance(source, tuple):
            records += source
            continue
        src, slides, images = source
        name = str(src)
        found: list[PatchRecord] = []
        for sp in slides:
            with open_slide(sp, mpp=slide_mpp) as slide:
                got = sample_slide_patches(
                    slide, name, rng, mpp, patch_px, max_per_slide, min_tissue, slide_mpp
                )
            done += 1
            report("patches", done, n_slides)
            if not got and log:
                log(f"warning: {sp}: no tile with >= {min_tissue:.0%} tissue — skipped")
            found += got
        found += [PatchRecord(name, "image", str(p)) for p in images]
        if not found:
            raise HistoclusterError(
                f"{src}: no slides or PNG/JPEG/TIFF images with tissue found — check the --data path"
            )
        if fraction is not None:
            found = subsample_fraction(found, fraction, rng)
        if log:
            log(f"{src}: {len(found)} patches ({len(slides)} slides, {len(images)} images)")
        records += found
    if not records:
        raise HistoclusterError("no --data given — pass slide or image folders")
    return records


def write_patch_csv(records: Iterable[PatchRecord], path: str | Path) -> None:
    """One row per patch, columns as :class:`PatchRecord`'s fields."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=[f.name for f in fields(PatchRecord)])
    w.writeheader()
    for r in records:
        w.writerow(asdict(r))
    atomic_write_text(path, text.getvalue())


def read_patch_csv(path: str | Path) -> list[PatchRecord]:
    """Records written by :func:`write_patch_csv`."""
    path = Path(path)
    casts: dict[str, Callable[[str], Any]] = {
        "l0_x": int, "l0_y": int, "target_mpp": float, "tile_px": int, "slide_mpp": float,
    }  # fmt: skip
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [PatchRecord(**{k: casts.get(k, str)(v) for k, v in row.items()}) for row in rows]
    except (TypeError, ValueError, KeyError) as e:
        raise HistoclusterError(
            f"{path}: not a patches CSV of engine.patches ({e}) — pass the patches.csv of a run"
        ) from e


def _square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h != w:
        s = min(h, w)
        y, x = (h - s) // 2, (w - s) // 2
        rgb = rgb[y : y + s, x : x + s]
    if rgb.shape[0] != size:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(rgb)


def _read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA", "P"):
                return composite_on_white(np.asarray(img.convert("RGBA")))
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types for bad files
        raise SlideError(
            f"{path}: not a readable image ({type(e).__name__}: {e}) — remove or re-copy the file"
        ) from e


def load_patch(record: PatchRecord, patch_px: int, slides: SlideCache) -> np.ndarray:
    """(patch_px, patch_px, 3) uint8 RGB of ``record``; ``slides`` keeps slides open between reads."""
    if record.kind == "image":
        return _square_resize(_read_image(record.path), patch_px)
    slide = slides.get(record.path, mpp=record.slide_mpp or None)
    try:
        tile = slide.read_tile_at_mpp((record.l0_x, record.l0_y), record.target_mpp, record.tile_px)
    except SlideError:
        slides.forget(record.path)  # OpenSlide latches a read error on the handle
        raise
    return _square_resize(tile, patch_px)


class PatchDataset(Dataset):
    """Patches as uint8 (3, patch_px, patch_px) tensors, passed through ``transform`` if given.

    With ``transform=TwoViews(build_transform(cfg))`` an item is two augmented views
    ((3, S, S), (3, S, S)); with no transform it is the uint8 patch (for batched augmentation
    on the device). :meth:`preload` decodes every patch once into memory (dropping unreadable
    images); otherwise patches are read on access, slides opened once per worker process.
    """

    def __init__(
        self,
        records: Sequence[PatchRecord],
        patch_px: int,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.records = list(records)
        self.patch_px = int(patch_px)
        self.transform = transform
        self._cache: torch.Tensor | None = None
        self._slides = SlideCache(SLIDE_CACHE_SIZE)  # picklable: each worker opens its own

    def __len__(self) -> int:
        return len(self.records)

    def preload(self, progress: Progress = no_progress) -> list[str]:
        """Decode every patch into one (N, 3, P, P) uint8 tensor; returns messages of dropped files.

        Reports stage ``"preload"`` (patches decoded of all). A ``Cancelled`` raised by
        ``progress`` leaves the dataset as it was (not preloaded).
        """
        kept, arrays, dropped = [], [], []
        report = Throttle(progress)
        n = len(self.records)
        try:
            for i, r in enumerate(self.records):
                report("preload", i, n)
                try:
                    arrays.append(load_patch(r, self.patch_px, self._slides))
                    kept.append(r)
                except SlideError as e:
                    if r.kind == "slide":
                        raise
                    dropped.append(str(e))
            report("preload", n, n)
        finally:
            self._slides.close()
        if not arrays:
            raise HistoclusterError(
                f"none of the {len(self.records)} patches could be read — check the --data files"
            )
        self.records = kept
        self._cache = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return dropped

    def with_transform(self, transform: Callable[[torch.Tensor], Any] | None) -> PatchDataset:
        """A copy with another ``transform`` that shares the records and the preloaded patches."""
        other = PatchDataset(self.records, self.patch_px, transform)
        other._cache = self._cache
        return other

    @property
    def preloaded(self) -> torch.Tensor | None:
        """The (N, 3, P, P) uint8 tensor after :meth:`preload`, else None."""
        return self._cache

    def patch(self, i: int) -> torch.Tensor:
        """Un-augmented uint8 (3, P, P) patch ``i``."""
        if self._cache is not None:
            return self._cache[i]
        arr = np.require(load_patch(self.records[i], self.patch_px, self._slides), requirements="W")
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> Any:
        x = self.patch(i)
        return self.transform(x) if self.transform is not None else x


def estimate_bytes(n: int, patch_px: int) -> int:
    """Memory of :meth:`PatchDataset.preload` for ``n`` patches."""
    return n * 3 * patch_px * patch_px
