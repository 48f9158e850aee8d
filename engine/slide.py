"""Whole-slide images behind one small API: ``open_slide(path, mpp=None) -> Slide``.

Every format OpenSlide reads (.svs, .ndpi, .mrxs, pyramidal .tiff, ...) opens as an
``OpenSlideSlide``; plain images (PNG, JPEG, non-pyramidal TIFF) open as an ``ArraySlide``
that behaves the same. Coordinates are named by frame: ``l0_xy`` is in level-0 pixels,
``size`` is in pixels of the level read.
"""

from __future__ import annotations

import errno
import math
import os
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import MissingMppError, SlideError, one_line

MppLike = float | tuple[float, float] | None

SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip
"""Suffixes of the files treated as slides: OpenSlide's formats and plain images (one list, used everywhere)."""

MIN_MPP, MAX_MPP = 0.01, 1000.0
"""Plausible micrometres per pixel of a slide given by the user (beyond: a typo, not a scanner)."""

MAX_IMAGE_PIXELS_ENV = "HISTOCLUSTER_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 400_000_000
"""Plain (non-pyramidal) images are decoded whole: above this many pixels they are refused."""

_MPP_FIX = (
    "pass mpp= to open_slide() or --slide-mpp VALUE (or a CSV of slide,mpp) on the command line"
)


def slide_id(path: str | Path) -> str:
    """A stable, filesystem- and zarr-safe identifier of a slide: its file stem, sanitised."""
    stem = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(path).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) or "slide"


def is_slide_file(path: str | Path) -> bool:
    """True for a file (or an .mrxs) whose suffix is one of :data:`SLIDE_SUFFIXES`."""
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def find_slides(path: str | Path, recursive: bool = False) -> list[Path]:
    """The slide files directly inside directory ``path`` (or below it when ``recursive``), sorted."""
    root = Path(path)
    entries = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        f for f in entries if (f.is_file() or f.suffix.lower() == ".mrxs") and is_slide_file(f)
    )


def max_image_pixels() -> int:
    """The plain-image size limit: ``$HISTOCLUSTER_MAX_IMAGE_PIXELS`` or :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    try:
        return int(os.environ.get(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS))
    except ValueError:
        return DEFAULT_MAX_IMAGE_PIXELS


@contextmanager
def _pil_limit(pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``pixels`` for the block (slides are big on purpose)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA -> (H, W, 3) uint8 RGB with transparent pixels on white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _as_mpp_pair(mpp: MppLike, path: Path) -> tuple[float, float] | None:
    if mpp is None:
        return None
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)  # type: ignore[arg-type]
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        raise SlideError(
            f"{path}: invalid mpp {mpp!r} — give a positive number of micrometres per pixel"
        )
    if not all(MIN_MPP <= v <= MAX_MPP for v in pair):
        raise SlideError(
            f"{path}: mpp {mpp!r} is not a microscope's resolution — give micrometres per pixel "
            f"between {MIN_MPP} and {MAX_MPP} (40x is about 0.25, 20x about 0.5)"
        )
    return pair  # type: ignore[return-value]


def best_level(mpp: tuple[float, float], downsamples: Sequence[float], target_mpp: float) -> int:
    """The coarsest level whose resolution is at or finer than ``target_mpp`` (level 0 if
    none), for a slide of level-0 ``mpp`` and level ``downsamples``: the one rule every tile
    reader follows (OpenSlide, the reduced JPEG decode, the device decode)."""
    best = 0
    for level, ds in enumerate(downsamples):
        if max(mpp[0] * ds, mpp[1] * ds) <= target_mpp * 1.001:
            best = level
    return best


def read_size(level_mpp: tuple[float, float], target_mpp: float, tile_px: int) -> tuple[int, int]:
    """(w, h) pixels of a level at ``level_mpp`` that cover ``tile_px`` pixels at ``target_mpp``."""
    mx, my = level_mpp
    return max(1, round(tile_px * target_mpp / mx)), max(1, round(tile_px * target_mpp / my))


class Slide(ABC):
    """A multi-resolution RGB image with physical pixel size. Use as a context manager."""

    path: Path
    mpp: tuple[float, float]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> tuple[float, float]:
        """(x, y) micrometres per pixel of ``level``."""
        ds = self.level_downsamples[level]
        return self.mpp[0] * ds, self.mpp[1] * ds

    @abstractmethod
    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` = (w, h) pixels of ``level`` whose top-left is ``l0_xy`` in level-0 pixels.

        Returns (h, w, 3) uint8 RGB; pixels outside the slide or transparent come out white.
        """

    @abstractmethod
    def thumbnail(self, max_px: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the whole slide, longest side at most ``max_px``."""

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro, thumbnail... as (h, w, 3) uint8 RGB arrays (empty for plain images)."""
        return {}

    def thumbnail_strips(self, max_px: int, rows: int = 256) -> Iterator[np.ndarray]:
        """``thumbnail(max_px)``'s rows top to bottom, about ``rows`` at a time (the same pixels).

        Subclasses that can make the thumbnail strip by strip keep less of it in memory.
        """
        thumb = self.thumbnail(max_px)
        for y in range(0, len(thumb), max(1, rows)):
            yield thumb[y : y + rows]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the file handle."""

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at or finer than ``target_mpp`` (level 0 if none)."""
        return best_level(self.mpp, self.level_downsamples, target_mpp)

    def read_size_at_mpp(self, level: int, target_mpp: float, tile_px: int) -> tuple[int, int]:
        """(w, h) pixels to read at ``level`` to cover ``tile_px`` pixels at ``target_mpp``."""
        return read_size(self.level_mpp(level), target_mpp, tile_px)

    def read_tile_at_mpp(
        self, l0_xy: tuple[int, int], target_mpp: float, tile_px: int
    ) -> np.ndarray:
        """A (tile_px, tile_px, 3) uint8 tile of ``tile_px * target_mpp`` micrometres a side.

        Reads the best level at or finer than the target and resizes (antialiased) to ``tile_px``.
        """
        level = self.best_level_for_mpp(target_mpp)
        size = self.read_size_at_mpp(level, target_mpp, tile_px)
        region = self.read_region(l0_xy, level, size)
        if size == (tile_px, tile_px):
            return region
        return np.asarray(
            Image.fromarray(region).resize((tile_px, tile_px), Image.Resampling.BILINEAR)
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, levels={self.level_count}, "
            f"dimensions={self.dimensions}, mpp=({self.mpp[0]:.4g}, {self.mpp[1]:.4g}))"
        )


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide; picklable (re-opens the file in the receiving process)."""

    def __init__(self, path: str | Path, mpp: MppLike = None) -> None:
        import openslide

        self.path = Path(path)
        self._mpp_arg = mpp
        _check_tiff_complete(self.path)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideError(
                f"{self.path}: cannot be read as a slide ({one_line(e)}) — check the file is complete and in a format OpenSlide reads"
            ) from e
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)  # type: ignore[misc]
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        given = _as_mpp_pair(mpp, self.path)
        self.mpp = given if given is not None else self._metadata_mpp()
        self.vendor = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def _metadata_mpp(self) -> tuple[float, float]:
        import openslide

        props = self._osr.properties
        try:
            mx = float(props[openslide.PROPERTY_NAME_MPP_X])
            my = float(props[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            mx = my = float("nan")
        if not (math.isfinite(mx) and mx > 0 and math.isfinite(my) and my > 0):
            tiff_mpp = _tiff_resolution_mpp(self.path)
            if tiff_mpp is None:
                raise MissingMppError(
                    f"{self.path}: no resolution (microns per pixel) in the metadata — {_MPP_FIX}"
                )
            mx, my = tiff_mpp
        return mx, my

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            rgba = np.asarray(
                self._osr.read_region(
                    (int(l0_xy[0]), int(l0_xy[1])), int(level), (int(size[0]), int(size[1]))
                )
            )
        except openslide.OpenSlideError as e:
            raise SlideError(
                f"{self.path}: failed to read a region at level {level} ({one_line(e)}) — the file may be truncated or corrupt; re-copy it"
            ) from e
        return composite_on_white(rgba)

    def thumbnail(self, max_px: int) -> np.ndarray:
        w, h = self.dimensions
        scale = max(w, h) / max_px
        level = self._osr.get_best_level_for_downsample(max(scale, 1.0))
        lw, lh = self.level_dimensions[level]
        region = self.read_region((0, 0), level, (lw, lh))
        if max(lw, lh) <= max_px:
            return region
        s = max_px / max(lw, lh)
        size = (max(1, round(lw * s)), max(1, round(lh * s)))
        return np.asarray(Image.fromarray(region).resize(size, Image.Resampling.BILINEAR))

    def thumbnail_strips(self, max_px: int, rows: int = 256) -> Iterator[np.ndarray]:
        """``thumbnail(max_px)``'s rows in strips, bit-identical, with the level read held once
        (4 bytes a pixel, shared with the resize) instead of three copies and a fourth for Pillow.

        OpenSlide reads a level exactly only whole (a strip read from another origin lands at a
        sub-pixel offset and is resampled), so the level is read into one ARGB buffer, converted
        in place as openslide-python converts it and composited on white strip by strip, and
        resized by Pillow over that same buffer (as RGBX: each channel alone, as for RGB).
        """
        import ctypes

        import openslide
        from openslide import _convert, lowlevel

        w, h = self.dimensions
        level = self._osr.get_best_level_for_downsample(max(max(w, h) / max_px, 1.0))
        lw, lh = self.level_dimensions[level]
        handle = getattr(self._osr, "_osr", None)
        if handle is None or not hasattr(lowlevel, "_read_region"):  # another binding
            yield from super().thumbnail_strips(max_px, rows)
            return
        argb = np.empty((lh, lw), np.uint32)
        try:
            lowlevel._read_region(
                handle, argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), 0, 0, level, lw, lh
            )
        except openslide.OpenSlideError as e:
            raise SlideError(
                f"{self.path}: failed to read a region at level {level} ({one_line(e)}) — the file may be truncated or corrupt; re-copy it"
            ) from e
        step = max(1, rows)
        rgba = argb.view(np.uint8).reshape(lh, lw, 4)
        for y in range(0, lh, step):
            _convert.argb2rgba(argb[y : y + step])  # in place, as lowlevel.read_region does
            band = rgba[y : y + step]
            if band[..., 3].min() != 255:
                band[..., :3] = composite_on_white(band)
                band[..., 3] = 255
        if max(lw, lh) <= max_px:
            for y in range(0, lh, step):
                yield np.ascontiguousarray(rgba[y : y + step, :, :3])
            return
        s = max_px / max(lw, lh)
        size = (max(1, round(lw * s)), max(1, round(lh * s)))
        image = Image.frombuffer("RGBX", (lw, lh), argb, "raw", "RGBX", 0, 1)
        del rgba
        out = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
        del image, argb
        for y in range(0, len(out), step):
            yield np.ascontiguousarray(out[y : y + step, :, :3])

    @property
    def associated_images(self) -> dict[str, np.ndarray]:
        return {
            name: composite_on_white(np.asarray(img.convert("RGBA")))
            for name, img in self._osr.associated_images.items()
        }

    def close(self) -> None:
        self._osr.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mpp": self.mpp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["mpp"])  # type: ignore[misc]


class ArraySlide(Slide):
    """A single-level slide over an in-memory (H, W, 3|4) uint8 array, e.g. a PNG or JPEG."""

    def __init__(self, array: np.ndarray, mpp: MppLike, path: str | Path = "<array>") -> None:
        self.path = Path(path)
        pair = _as_mpp_pair(mpp, self.path)
        if pair is None:
            raise MissingMppError(
                f"{self.path}: no resolution (microns per pixel) in the metadata — {_MPP_FIX}"
            )
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise SlideError(
                f"{self.path}: expected an RGB or RGBA image, got shape {array.shape} — convert it to RGB"
            )
        self._rgb = (
            composite_on_white(array)
            if array.shape[2] == 4
            else np.ascontiguousarray(array[..., :3])
        )
        if self._rgb.dtype != np.uint8:
            raise SlideError(
                f"{self.path}: expected 8-bit pixels, got {self._rgb.dtype} — convert it to 8-bit RGB"
            )
        self.mpp = pair
        h, w = self._rgb.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)

    def read_region(self, l0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level != 0:
            raise ValueError(f"{self.path}: has one level, asked for level {level}")
        x, y = int(l0_xy[0]), int(l0_xy[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_px: int) -> np.ndarray:
        img = Image.fromarray(self._rgb)
        img.thumbnail((max_px, max_px), Image.Resampling.BILINEAR)
        return np.asarray(img)


def open_slide(path: str | Path, mpp: MppLike = None) -> Slide:
    """Open any slide OpenSlide reads, or a plain image, as a ``Slide``.

    ``mpp`` (micrometres per level-0 pixel, one value or (x, y)) overrides the file's metadata;
    without it a file lacking resolution metadata raises ``MissingMppError``. A file that is
    missing, truncated or not an image raises ``SlideError`` naming it.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SlideError(
                    f"{path}: a symbolic link loop — point at the slide file itself"
                ) from None
        if path.is_symlink():
            raise SlideError(
                f"{path}: a symbolic link to a missing file ({os.readlink(path)}) — check the link"
            )
        raise SlideError(f"{path}: no such file — check the path")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideError(f"{path}: is a directory, not a slide — give the slide file itself")
    _check_tiff_complete(path)  # before choosing a reader: a truncated SVS is not a plain image
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError):
        fmt = None
    if fmt is not None:
        return OpenSlideSlide(path, mpp)
    return _open_plain_image(path, mpp)


def _open_plain_image(path: Path, mpp: MppLike) -> ArraySlide:
    limit = max_image_pixels()
    try:
        with _pil_limit(None), Image.open(path) as img:
            w, h = img.size
            if w * h > limit:
                raise SlideError(
                    f"{path}: a plain image of {w} x {h} px is decoded whole and exceeds the limit of "
                    f"{limit:,} pixels — convert it to a pyramidal TIFF, or raise ${MAX_IMAGE_PIXELS_ENV}"
                )
            img.load()
            file_mpp = _pil_mpp(img)
            array = np.asarray(
                img.convert("RGBA") if img.mode in ("RGBA", "LA", "P", "PA") else img.convert("RGB")
            )
    except SlideError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise SlideError(
            f"{path}: not a readable slide or image ({one_line(e)}) — check the file is complete and is a whole-slide image, PNG, JPEG or TIFF"
        ) from e
    if mpp is None and file_mpp is None:
        raise MissingMppError(
            f"{path}: no resolution (microns per pixel) in the metadata — {_MPP_FIX}"
        )
    return ArraySlide(array, mpp if mpp is not None else file_mpp, path)


def _pil_mpp(img: Image.Image) -> tuple[float, float] | None:
    """Microns per pixel from a plain image's metadata, when it is plausibly a microscope's."""
    if img.format == "TIFF":
        tags = getattr(img, "tag_v2", {})
        xres, yres, unit = tags.get(282), tags.get(283), tags.get(296, 2)
        if xres and yres and unit in (2, 3):
            per_um = 25400.0 if unit == 2 else 10000.0
            mx, my = per_um / float(xres), per_um / float(yres)
            return (mx, my) if max(mx, my) < 50 else None
    dpi = img.info.get("dpi")
    if dpi and all(float(d) > 0 for d in dpi):
        mx, my = 25400.0 / float(dpi[0]), 25400.0 / float(dpi[1])
        return (mx, my) if max(mx, my) < 50 else None  # 72 dpi is a screen, not a microscope
    return None


def _tiff_resolution_mpp(path: Path) -> tuple[float, float] | None:
    """Microns per pixel from TIFF resolution tags (cm or inch), for pyramidal TIFFs OpenSlide reads as generic."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            xr, yr, unit = (
                tags.get("XResolution"),
                tags.get("YResolution"),
                tags.get("ResolutionUnit"),
            )
            if xr is None or yr is None or unit is None:
                return None
            per_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if per_um is None:
                return None
            xv = xr.value[0] / xr.value[1]
            yv = yr.value[0] / yr.value[1]
            if xv <= 0 or yv <= 0:
                return None
            mx, my = per_um / xv, per_um / yv
            return (mx, my) if max(mx, my) < 50 else None
    except Exception:
        return None


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff_structured(path: Path) -> bool:
    """True for a file that starts like a TIFF or BigTIFF (SVS, NDPI, SCN, BIF, pyramidal TIFF, ...)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _ifd_chain_end(path: Path, size: int) -> int | None:
    """Walk the chain of image file directories; the first offset past ``size`` (a truncation), else None."""
    import struct

    with open(path, "rb") as f:
        head = f.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")
        offset = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
        count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        seen: set[int] = set()
        while offset and offset not in seen and len(seen) < 100_000:
            seen.add(offset)
            count_size = struct.calcsize(count_fmt)
            if offset + count_size > size:
                return offset
            f.seek(offset)
            (count,) = struct.unpack(order + count_fmt, f.read(count_size))
            end = offset + count_size + count * entry_size + struct.calcsize(next_fmt)
            if end > size:
                return end
            f.seek(end - struct.calcsize(next_fmt))
            (offset,) = struct.unpack(order + next_fmt, f.read(struct.calcsize(next_fmt)))
    return None


def _check_tiff_complete(path: Path) -> None:
    """Refuse TIFF-structured files whose directories or image data point past the end of the file
    (truncated copies), whatever their suffix, before a reader is chosen."""
    if not path.is_file() or not _is_tiff_structured(path):
        return
    import tifffile

    size = path.stat().st_size
    past = _ifd_chain_end(path, size)
    if past is not None:
        raise SlideError(
            f"{path}: truncated ({size} bytes, its TIFF directories run to {past}) — re-copy or re-download the file"
        )
    try:
        with tifffile.TiffFile(path) as tif:
            end = 0
            for page in tif.pages:
                offsets, counts = page.dataoffsets, page.databytecounts
                if offsets:
                    end = max(end, max(o + c for o, c in zip(offsets, counts, strict=False)))
    except Exception as e:
        raise SlideError(
            f"{path}: the TIFF structure cannot be read ({one_line(e)}) — the file is truncated or corrupt; re-copy it"
        ) from e
    if end > size:
        raise SlideError(
            f"{path}: truncated ({size} bytes, image data runs to {end}) — re-copy or re-download the file"
        )


class SlideCache:
    """At most ``capacity`` open slides, by path; the least recently used one is closed first.

    Picklable (a worker process gets an empty cache), so datasets holding one can cross into
    DataLoader workers.
    """

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = max(1, int(capacity))
        self._open: OrderedDict[tuple[str, Any], Slide] = OrderedDict()

    def get(self, path: str | Path, mpp: MppLike = None) -> Slide:
        """The open slide at ``path`` (opened with ``mpp`` on first use)."""
        key = (str(path), mpp if mpp is None or np.isscalar(mpp) else tuple(mpp))  # type: ignore[arg-type]
        slide = self._open.get(key)
        if slide is not None:
            self._open.move_to_end(key)
            return slide
        slide = self._open[key] = open_slide(path, mpp=mpp)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return slide

    def forget(self, path: str | Path) -> None:
        """Close and drop ``path`` (e.g. after a read error, which OpenSlide latches on the handle)."""
        for key in [k for k in self._open if k[0] == str(path)]:
            self._open.pop(key).close()

    def close(self) -> None:
        """Close every open slide."""
        while self._open:
            self._open.popitem()[1].close()

    def __len__(self) -> int:
        return len(self._open)

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])  # type: ignore[misc]

    def __enter__(self) -> SlideCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
