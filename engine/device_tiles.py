"""Tiles decoded on the encoder's device: CPU workers read compressed JPEG bytes, nothing more.

On a GPU node the encoder is ~100x faster than a CPU and decoding is the whole limit of
extraction. This module splits a tile read in two:

- :class:`JpegSources` (CPU, a DataLoader worker): for a batch of output tiles (level-0
  origins of one slide at ``target_mpp``, ``tile_px``) it lists the unique source JPEG tiles
  of the level ``Slide.read_tile_at_mpp`` reads (its best level at or finer than the target,
  decoded at full size: nvJPEG has no DCT scaling) and reads their compressed bytes with
  ``os.pread``, the level's colour marker and shared JPEGTables spliced after SOI exactly as
  :mod:`engine.jpeg_tiles` does. The result, a :class:`SourceBatch`, is a few tensors.
- :class:`DeviceTileDecoder` (the encoder's process): one batched
  ``torchvision.io.decode_jpeg(streams, device=device)`` call (nvJPEG on CUDA, libjpeg-turbo on
  CPU), the source tiles gathered into a small mosaic per output tile (white where a tile is
  absent or outside the level), then cropped and resized to ``tile_px`` by two matrix products
  whose weights are Pillow's antialiased bilinear (triangle) filter with the same box, support
  and edge clipping as the OpenSlide path's ``Image.resize`` (the crop, the sub-pixel phase and
  the shrink in one step). Output: (B, tile_px, tile_px, 3) uint8 on the device, what
  :class:`~engine.encode.TileEncoder` takes (a view of a contiguous (B, 3, H, W) tensor, so its
  ``preprocess`` permute gives back a contiguous NCHW tensor).

A source tile that cannot be decoded (a batched call that fails is retried stream by stream)
makes the output tiles that need it white and ``failed``; the rest of the batch is usable, and
one line names the file and the tile. :class:`SourceBatches` is the DataLoader dataset of a
``tile_reader.BatchPlan``: a byte batch for slides this path serves, the CPU reader's tiles for
the others.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from engine.errors import one_line
from engine.jpeg_tiles import TIFF_VENDORS, _Level, _read_levels
from engine.slide import MppLike, OpenSlideSlide, Slide, best_level, open_slide, read_size
from engine.tile_reader import BatchPlan, SlideJob, TileBatches

__all__ = [
    "DecodedBatch",
    "DeviceTileDecoder",
    "JpegSources",
    "SourceBatch",
    "SourceBatches",
    "decode_on_device",
    "resample_weights",
]

_WHITE = 255
_CHUNK_PX = {"cpu": 8 * 2**20, "other": 64 * 2**20}
"""Mosaic pixels (x3 channels, float32) resampled at once: bounds the decoder's memory."""
_COLOUR_PSNR = 30.0
"""A device decode this far from the CPU decode of the same stream is a colour mix-up."""


@dataclass(frozen=True)
class SourceBatch:
    """The compressed source tiles of B output tiles and how each output tile is cut from them.

    ``data`` (N,) uint8 holds K JPEG streams, stream k at ``bounds[k]:bounds[k + 1]`` (empty when
    unreadable: ``errors[k]`` says why). ``ids`` (K,) int64: each stream's tile index in the
    level. ``valid`` (K, 2) int64: (w, h) of each tile inside the level (edge tiles are padded).
    ``cells`` (B, ny, nx) int64: the source tiles under each output tile's region, row-major, -1
    for white (absent or outside the level). ``region`` (B, 4) int64: (x, y, w, h) of the level
    pixels read, in mosaic pixels of ``cells``. ``box`` (B, 4) float64: (x0, y0, x1, y1) of the
    resize box inside that region (Pillow's ``box``; (0, 0, w, h) on level 0's grid).
    """

    path: str
    level: int
    tile_w: int
    tile_h: int
    tile_px: int
    data: torch.Tensor
    bounds: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor
    cells: torch.Tensor
    region: torch.Tensor
    box: torch.Tensor
    errors: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def streams(self) -> list[torch.Tensor]:
        """The K streams as 1-D uint8 CPU tensors (views of ``data``)."""
        b = self.bounds.tolist()
        return [self.data[b[k] : b[k + 1]] for k in range(len(b) - 1)]


@dataclass(frozen=True)
class DecodedBatch:
    """``tiles`` (B, tile_px, tile_px, 3) uint8 on the device; ``failed`` (B,) bool (CPU) marks
    the white tiles that could not be read; ``tile_error`` names the first unreadable source."""

    tiles: torch.Tensor
    failed: torch.Tensor
    tile_error: str


class JpegSources(AbstractContextManager):
    """The CPU half: which compressed JPEG tiles a batch of output tiles needs, and their bytes.

    Open with :meth:`from_slide` (None when the slide is not a JPEG-tiled TIFF). Holds an open
    file, nothing decoded; a context manager; picklable (the receiving process reopens the file).
    """

    def __init__(
        self, path: str | Path, mpp: tuple[float, float], downsamples: tuple[float, ...],
        levels: dict[int, _Level],
    ) -> None:  # fmt: skip
        """``levels``: the JPEG levels (``jpeg_tiles._read_levels``) by OpenSlide level index;
        ``downsamples``: every level's, as ``Slide.level_downsamples``."""
        self.path = Path(path)
        self.mpp = (float(mpp[0]), float(mpp[1]))
        self.level_downsamples = tuple(float(d) for d in downsamples)
        self._levels = levels
        self._file: BinaryIO | None = None

    @classmethod
    def from_slide(cls, slide: Slide) -> JpegSources | None:
        """Sources of ``slide`` (which stays open), or None when it is not an OpenSlide slide of
        a plain TIFF tile format with JPEG levels."""
        if not isinstance(slide, OpenSlideSlide) or slide.vendor not in TIFF_VENDORS:
            return None
        levels = _read_levels(slide.path, slide.level_dimensions)
        if levels is None:
            return None
        return cls(slide.path, slide.mpp, slide.level_downsamples, levels)

    @classmethod
    def open(cls, path: str | Path, mpp: MppLike = None) -> JpegSources | None:
        """Sources of the slide at ``path`` (``mpp`` as for ``open_slide``), or None."""
        with open_slide(path, mpp=mpp) as slide:
            return cls.from_slide(slide)

    # --- planning: Slide.read_tile_at_mpp's level and read size, decoded at full size ------

    def level_for(self, target_mpp: float) -> int:
        """``Slide.best_level_for_mpp``: the coarsest level at or finer than ``target_mpp``."""
        return best_level(self.mpp, self.level_downsamples, target_mpp)

    def read_size(self, level: int, target_mpp: float, tile_px: int) -> tuple[int, int]:
        """``Slide.read_size_at_mpp``: (w, h) level pixels under one output tile."""
        ds = self.level_downsamples[level]
        return read_size((self.mpp[0] * ds, self.mpp[1] * ds), target_mpp, tile_px)

    def fits(self, target_mpp: float) -> bool:
        """Whether tiles at ``target_mpp`` come from a JPEG level (any scale: full-size decode)."""
        return self.level_for(target_mpp) in self._levels

    def plan(self, origins: np.ndarray, target_mpp: float, tile_px: int) -> SourceBatch:
        """The :class:`SourceBatch` of output tiles at level-0 ``origins`` (B, 2) (x, y).

        Raises ValueError when ``target_mpp`` is not read from a JPEG level (see :meth:`fits`);
        a tile whose bytes cannot be read is an entry of ``errors``, not an exception.
        """
        level = self.level_for(target_mpp)
        if level not in self._levels:
            raise ValueError(
                f"{self.path}: level {level} (read at {target_mpp} um/px) is not JPEG tiles — "
                "read it through the slide"
            )
        lv = self._levels[level]
        ds = self.level_downsamples[level]
        uw, vh = self.read_size(level, target_mpp, tile_px)
        xy = np.asarray(origins, dtype=np.float64).reshape(-1, 2)
        u0, v0 = xy[:, 0] / ds, xy[:, 1] / ds
        ix0, iy0 = np.floor(u0).astype(np.int64), np.floor(v0).astype(np.int64)
        ix1, iy1 = np.ceil(u0 + uw).astype(np.int64), np.ceil(v0 + vh).astype(np.int64)
        cx0, cy0 = ix0 // lv.tile_w, iy0 // lv.tile_h
        nx = int(((ix1 - 1) // lv.tile_w - cx0).max(initial=0)) + 1
        ny = int(((iy1 - 1) // lv.tile_h - cy0).max(initial=0)) + 1
        down = math.ceil(lv.height / lv.tile_h)
        cx = cx0[:, None, None] + np.arange(nx)[None, None, :]
        cy = cy0[:, None, None] + np.arange(ny)[None, :, None]
        span_x = ((ix1 - 1) // lv.tile_w)[:, None, None]  # each tile's own last column, row
        span_y = ((iy1 - 1) // lv.tile_h)[:, None, None]
        inside = (cx >= 0) & (cx < lv.across) & (cy >= 0) & (cy < down)
        inside &= (cx <= span_x) & (cy <= span_y)
        index = np.where(inside, cy * lv.across + cx, -1)
        present = inside & (lv.counts[np.clip(index, 0, len(lv.counts) - 1)] > 0)
        index = np.where(present, index, -1)
        ids, cells = np.unique(index, return_inverse=True)
        cells = cells.reshape(index.shape) - (1 if len(ids) and ids[0] < 0 else 0)
        ids = ids[ids >= 0]
        data, bounds, errors = self._read(level, lv, ids)
        col, row = ids % lv.across, ids // lv.across
        valid = np.stack(
            [
                np.minimum(lv.tile_w, lv.width - col * lv.tile_w),
                np.minimum(lv.tile_h, lv.height - row * lv.tile_h),
            ],
            axis=1,
        ).reshape(-1, 2)
        region = np.stack(
            [ix0 - cx0 * lv.tile_w, iy0 - cy0 * lv.tile_h, ix1 - ix0, iy1 - iy0], axis=1
        )
        box = np.stack([u0 - ix0, v0 - iy0, u0 - ix0 + uw, v0 - iy0 + vh], axis=1)
        return SourceBatch(
            path=str(self.path),
            level=level,
            tile_w=lv.tile_w,
            tile_h=lv.tile_h,
            tile_px=int(tile_px),
            data=torch.from_numpy(data),
            bounds=torch.from_numpy(bounds),
            ids=torch.from_numpy(ids.astype(np.int64)),
            valid=torch.from_numpy(valid.astype(np.int64)),
            cells=torch.from_numpy(cells.astype(np.int64)),
            region=torch.from_numpy(region.astype(np.int64)),
            box=torch.from_numpy(box),
            errors=errors,
        )

    def _read(
        self, level: int, lv: _Level, ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """(bytes, (K + 1,) bounds, errors) of tiles ``ids``, prefix spliced after each SOI."""
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        fd = self._file.fileno()
        parts: list[bytes] = []
        errors: list[str] = []
        for i in ids.tolist():
            count = int(lv.counts[i])
            try:
                data = os.pread(fd, count, int(lv.offsets[i]))
                if len(data) != count or data[:2] != b"\xff\xd8":
                    raise ValueError(f"{len(data)} of {count} bytes, not a JPEG stream")
            except (OSError, ValueError) as e:
                parts.append(b"")
                errors.append(_tile_message(self.path, i, level, e))
                continue
            parts.append(data[:2] + lv.prefix + data[2:] if lv.prefix else data)
            errors.append("")
        bounds = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=bounds[1:])
        return np.frombuffer(b"".join(parts), np.uint8).copy(), bounds, tuple(errors)

    # --- lifetime: a file object (closed when collected), reopened on demand --------------

    def close(self) -> None:
        """Release the file (idempotent; a later :meth:`plan` reopens it)."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"JpegSources({str(self.path)!r}, jpeg levels={sorted(self._levels)})"


def _decode_jpeg(streams: Any, device: torch.device | str) -> Any:
    """``torchvision.io.decode_jpeg`` to RGB: (3, h, w) uint8 on ``device`` per stream (a list
    for a list). torchvision 0.29 warns that its decoders move to TorchCodec: silenced here."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)


def _tile_message(path: str | Path, index: int, level: int, e: BaseException) -> str:
    return (
        f"{path}: JPEG tile {index} of level {level} cannot be decoded ({one_line(e)}) — "
        "the file may be truncated or corrupt; re-copy it"
    )


def resample_weights(
    out_px: int, box0: torch.Tensor, box1: torch.Tensor, start: torch.Tensor, size: torch.Tensor,
    length: int,
) -> torch.Tensor:  # fmt: skip
    """(B, out_px, length) float32: Pillow's antialiased bilinear resize along one axis.

    Output pixel i of tile b samples input ``box0[b] + (i + 0.5) * scale`` (scale =
    (box1 - box0) / out_px) of a region of ``size[b]`` pixels that starts at ``start[b]`` of an
    axis of ``length``; the triangle filter is widened by max(scale, 1), clipped to the region
    and renormalised (Pillow's ``precompute_coeffs``). All (B,) tensors, on the result's device.
    """
    box0, box1 = box0.double(), box1.double()
    scale = (box1 - box0) / out_px
    support = scale.clamp(min=1.0)
    i = torch.arange(out_px, dtype=torch.float64, device=box0.device)
    centre = box0[:, None] + (i[None, :] + 0.5) * scale[:, None]  # (B, out) region pixels
    centre = (centre + start.double()[:, None] - 0.5).float()  # in mosaic pixels, less 1/2
    j = torch.arange(length, dtype=torch.float32, device=box0.device)[None, None, :]
    w = (1.0 - ((j - centre[:, :, None]) / support.float()[:, None, None]).abs()).clamp_(min=0.0)
    first = start[:, None, None]
    w *= (j >= first) & (j < first + size[:, None, None])  # clipped to the region
    total = w.sum(dim=2, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


class DeviceTileDecoder:
    """The device half: :class:`SourceBatch` -> :class:`DecodedBatch` on ``device``.

    On a non-CPU device, the first stream of each (slide, level) is also decoded on the CPU; if
    the two disagree (a decoder that ignores the colour marker Aperio's RGB-in-JPEG needs) that
    level is decoded on the CPU from then on, and ``notes`` says so once.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.gather = self.device.type != "cpu"
        """Regions cut by one gather (GPU) or by slices (CPU: fewer, larger copies)."""
        self.notes: list[str] = []
        self._cpu_levels: set[tuple[str, int]] = set()
        self._checked: set[tuple[str, int]] = set()

    @torch.inference_mode()
    def __call__(self, batch: SourceBatch) -> DecodedBatch:
        streams = batch.streams()
        bad = [bool(e) for e in batch.errors]
        decoded, errors = self._decode(batch, streams, bad)
        first = next((e for e in errors if e), "")
        bad_t = torch.tensor([bool(e) for e in errors] + [False], dtype=torch.bool)
        cells = batch.cells.clone()
        cells[cells < 0] = len(streams)  # the white tile
        failed = bad_t[cells].flatten(1).any(dim=1) if len(cells) else torch.zeros(0, dtype=bool)
        tiles = self._assemble(batch, decoded, cells, failed)
        return DecodedBatch(tiles=tiles.permute(0, 2, 3, 1), failed=failed, tile_error=first)

    # --- decoding --------------------------------------------------------------------------

    def _decode(
        self, batch: SourceBatch, streams: list[torch.Tensor], bad: list[bool]
    ) -> tuple[list[torch.Tensor | None], list[str]]:
        """Each stream decoded to (3, h, w) uint8 on the device (None where it failed), and the
        one-line error of each ("" where it was decoded)."""
        key = (batch.path, batch.level)
        device = torch.device("cpu") if key in self._cpu_levels else self.device
        errors = list(batch.errors)
        todo = [k for k in range(len(streams)) if not bad[k]]
        out: list[torch.Tensor | None] = [None] * len(streams)
        if not todo:
            return out, errors
        try:
            got = _decode_jpeg([streams[k] for k in todo], device)
        except Exception:  # one bad stream fails the batched call: retry stream by stream
            got = []
            for k in todo:
                try:
                    got.append(_decode_jpeg(streams[k], device))
                except Exception as e:
                    got.append(e)
        ids = batch.ids.tolist()
        for k, img in zip(todo, got, strict=True):
            if isinstance(img, Exception):
                errors[k] = _tile_message(batch.path, ids[k], batch.level, img)
            elif tuple(img.shape) != (3, batch.tile_h, batch.tile_w):
                shape = "x".join(str(v) for v in img.shape)
                e = ValueError(f"decoded {shape}, expected 3x{batch.tile_h}x{batch.tile_w}")
                errors[k] = _tile_message(batch.path, ids[k], batch.level, e)
            else:
                out[k] = img
        if device.type != "cpu" and key not in self._checked:
            self._check_colour(batch, streams, out)
        return out, errors

    def _check_colour(
        self, batch: SourceBatch, streams: list[torch.Tensor], out: list[torch.Tensor | None]
    ) -> None:
        """Compare the device decode of the first good stream of a level with the CPU's."""
        k = next((k for k, img in enumerate(out) if img is not None), None)
        if k is None:
            return
        key = (batch.path, batch.level)
        self._checked.add(key)
        ref = _decode_jpeg(streams[k], "cpu").float()
        mse = float(((out[k].float().cpu() - ref) ** 2).mean())  # type: ignore[union-attr]
        if mse > 255.0**2 / 10 ** (_COLOUR_PSNR / 10):
            self._cpu_levels.add(key)
            self.notes.append(
                f"{batch.path}: level {batch.level}'s JPEG colour decodes differently on "
                f"{self.device} than on the CPU (mean squared difference {mse:.0f}) — its tiles "
                "are decoded on the CPU"
            )
            for j, img in enumerate(out):
                if img is not None:
                    out[j] = _decode_jpeg(streams[j], "cpu").to(self.device)

    # --- assembly: gather, crop and resize on the device -----------------------------------

    def _assemble(
        self,
        batch: SourceBatch,
        decoded: list[torch.Tensor | None],
        cells: torch.Tensor,
        failed: torch.Tensor,
    ) -> torch.Tensor:
        """(B, 3, tile_px, tile_px) uint8 on the device: each output tile's region gathered
        from the decoded sources, then resized (:func:`resize_regions`)."""
        dev, th, tw, px = self.device, batch.tile_h, batch.tile_w, batch.tile_px
        b, ny, nx = cells.shape
        out = torch.full((b, 3, px, px), _WHITE, dtype=torch.uint8, device=dev)
        if b == 0:
            return out
        white = torch.full((th, tw, 3), _WHITE, dtype=torch.uint8, device=dev)
        hwc = [white if t is None else t.to(dev).permute(1, 2, 0) for t in decoded]
        sources = torch.stack(hwc + [white])  # (K + 1, th, tw, 3): pixels as rows of 3 bytes
        for k, (vw, vh) in enumerate(batch.valid.tolist()):  # edge padding: outside the level
            if vw < tw:
                sources[k, :, max(vw, 0) :] = _WHITE
            if vh < th:
                sources[k, max(vh, 0) :] = _WHITE
        region, box = batch.region.to(dev), batch.box.to(dev)
        hr, wr = int(batch.region[:, 3].max()), int(batch.region[:, 2].max())
        limit = _CHUNK_PX["cpu" if dev.type == "cpu" else "other"]
        chunk = max(1, limit // (hr * wr))
        crops = self._gathered if self.gather else self._sliced
        for s in range(0, b, chunk):
            e = min(b, s + chunk)
            crop = crops(sources, cells[s:e], batch.region[s:e], hr, wr)
            out[s:e] = resize_regions(crop, region[s:e, 2:], box[s:e], px)
        if bool(failed.any()):
            out[failed.to(dev)] = _WHITE
        return out

    @staticmethod
    def _gathered(
        sources: torch.Tensor, cells: torch.Tensor, region: torch.Tensor, hr: int, wr: int
    ) -> torch.Tensor:
        """(c, 3, hr, wr) uint8 regions of (K + 1, th, tw, 3) ``sources`` in one gather (a few
        kernels whatever the batch: the way on a GPU)."""
        c, ny, nx = cells.shape
        th, tw, dev = sources.shape[1], sources.shape[2], sources.device
        cells, region = cells.to(dev), region.to(dev)
        ys = (region[:, 1:2] + torch.arange(hr, device=dev)).clamp_(max=ny * th - 1)[:, :, None]
        xs = (region[:, 0:1] + torch.arange(wr, device=dev)).clamp_(max=nx * tw - 1)[:, None, :]
        at = ((ys // th) * nx + xs // tw).flatten(1)  # (c, hr * wr) cell of each pixel
        cell = cells.flatten(1).gather(1, at).view(c, hr, wr)
        at = (cell * th + ys % th) * tw + xs % tw  # (c, hr, wr) pixel of the sources
        crop = sources.view(-1, 3)[at.flatten()].view(c, hr, wr, 3)
        return crop.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def _sliced(
        sources: torch.Tensor, cells: torch.Tensor, region: torch.Tensor, hr: int, wr: int
    ) -> torch.Tensor:
        """The same regions, copied cell by cell (a few copies per tile: faster on a CPU)."""
        c, ny, nx = cells.shape
        th, tw = sources.shape[1], sources.shape[2]
        crop = torch.full((c, hr, wr, 3), _WHITE, dtype=torch.uint8, device=sources.device)
        index = cells.tolist()
        for b, (x0, y0, _, _) in enumerate(region.tolist()):
            for cy in range(y0 // th, min(ny, (y0 + hr - 1) // th + 1)):
                for cx in range(x0 // tw, min(nx, (x0 + wr - 1) // tw + 1)):
                    ax0, ay0 = max(x0, cx * tw), max(y0, cy * th)
                    ax1, ay1 = min(x0 + wr, (cx + 1) * tw), min(y0 + hr, (cy + 1) * th)
                    crop[b, ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = sources[
                        index[b][cy][cx],
                        ay0 - cy * th : ay1 - cy * th,
                        ax0 - cx * tw : ax1 - cx * tw,
                    ]
        return crop.permute(0, 3, 1, 2).contiguous()


def resize_regions(
    crop: torch.Tensor, size: torch.Tensor, box: torch.Tensor, px: int
) -> torch.Tensor:
    """(c, 3, hr, wr) uint8 regions -> (c, 3, px, px) uint8, as Pillow's antialiased bilinear
    ``resize((px, px), box=box)`` of each region's top-left ``size`` (c, 2) = (w, h) pixels.

    Regions read whole (box (0, 0, w, h), one size for all): ``F.interpolate(antialias=True)``
    (Pillow's weights, separable) or the crop itself at px; otherwise (a sub-pixel phase, mixed
    sizes) two matrix products with :func:`resample_weights`.
    """
    c, _, hr, wr = crop.shape
    w, h = int(size[0, 0]), int(size[0, 1])
    whole = bool((size == size[0]).all()) and bool((box == box.new_tensor([0, 0, w, h])).all())
    if whole and (w, h) == (px, px):
        return crop[:, :, :h, :w]
    if whole:
        x = torch.nn.functional.interpolate(
            crop[:, :, :h, :w].float(), size=(px, px), mode="bilinear", align_corners=False,
            antialias=True,
        )  # fmt: skip
    else:
        zero = torch.zeros_like(size[:, 0])
        wx = resample_weights(px, box[:, 0], box[:, 2], zero, size[:, 0], wr)
        wy = resample_weights(px, box[:, 1], box[:, 3], zero, size[:, 1], hr)
        x = wy[:, None] @ (crop.float() @ wx[:, None].transpose(-1, -2))
    return x.round_().clamp_(0, 255).to(torch.uint8)


def decode_on_device(batch: SourceBatch, device: torch.device | str) -> DecodedBatch:
    """One :class:`SourceBatch` decoded on ``device`` (a fresh :class:`DeviceTileDecoder`;
    keep one decoder for a run so its colour check is done once per level)."""
    return DeviceTileDecoder(device)(batch)


class SourceBatches(Dataset):
    """Batch i of a ``tile_reader.BatchPlan`` -> the ``TileBatches`` item with, where this path
    serves the slide, ``"sources"`` (a :class:`SourceBatch`, bytes only) instead of ``"tiles"``.

    Items: {"index", "sources" (SourceBatch or None), "tiles" (B,H,W,3) uint8 (empty when
    ``sources``), "failed" (B,) bool, "tile_error", "error", "fatal"}. Slides that are not JPEG
    tiles at the job's scale, and jobs with ``reader="openslide"``, are the ``TileBatches``
    items (read on the CPU). A worker keeps the byte reader of the slide it reads last (plans
    run slide after slide). Picklable: each worker opens its own files.
    """

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.cpu = TileBatches(plan)
        self.slides = self.cpu.slides  # what read_batches closes at the end
        self._current: tuple[str, JpegSources | None] = ("", None)

    def __len__(self) -> int:
        return len(self.plan)

    def sources(self, job: SlideJob) -> JpegSources | None:
        """The byte reader of ``job``'s slide, or None when its tiles are read on the CPU."""
        if job.reader == "openslide":
            return None
        if self._current[0] != job.path:
            self.close_sources()
            src = JpegSources.from_slide(self.slides.slide(job))
            self._current = (job.path, src if src is None or src.fits(job.target_mpp) else None)
        return self._current[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.plan
        job = p.jobs[int(p.slide[i])]
        try:
            src = self.sources(job)
        except Exception:  # the slide cannot be opened: TileBatches says so in its words
            self.slides.forget(job.path)
            src = None
        if src is None:
            return {**self.cpu[i], "sources": None}
        rows = p.rows[p.start[i] : p.stop[i]]
        cols = p.cols[p.start[i] : p.stop[i]]
        batch = src.plan(
            np.stack([job.xs[cols], job.ys[rows]], axis=1), job.target_mpp, job.tile_px
        )
        empty = torch.empty(0, dtype=torch.uint8)
        return {
            "index": i,
            "sources": batch,
            "tiles": empty,
            "failed": empty.bool(),
            "tile_error": "",
            "error": "",
            "fatal": "",
        }

    def close_sources(self) -> None:
        """Close the byte reader of the current slide."""
        if self._current[1] is not None:
            self._current[1].close()
        self._current = ("", None)

    def close(self) -> None:
        """Close every file this dataset opened (in this process)."""
        self.close_sources()
        self.slides.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"plan": self.plan}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["plan"])  # type: ignore[misc]


def item_tiles(item: dict[str, Any], decoder: DeviceTileDecoder) -> dict[str, Any]:
    """A :class:`SourceBatches` item with its tiles on ``decoder.device``: ``"tiles"``,
    ``"failed"`` and ``"tile_error"`` as a ``TileBatches`` item has them."""
    batch = item["sources"]
    if batch is None:
        return item
    got = decoder(batch)
    return {
        **item,
        "tiles": got.tiles,
        "failed": got.failed,
        "tile_error": item["tile_error"] or got.tile_error,
    }


def without_level_tiles(src: JpegSources, level: int, tiles: list[int]) -> JpegSources:
    """A copy of ``src`` whose ``tiles`` of ``level`` read as absent (white), as a scanner
    leaves blank areas (for tests and for reading around a known-bad tile)."""
    lv = src._levels[level]
    counts = lv.counts.copy()
    counts[tiles] = 0
    levels = {**src._levels, level: replace(lv, counts=counts)}
    return JpegSources(src.path, src.mpp, src.level_downsamples, levels)
