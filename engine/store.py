"""FeatureStore: the zarr v3 store of tile features, its only reader and writer.

Layout (``shared/design/ARCHITECTURE.md``)::

    features.zarr/
      attrs: format, format_version, encoder {arch, sha256, dim, input_px, mean, std, spec},
             tiling {tile_px, stride_px, target_mpp, tissue_method, min_tissue}
      slides/<slide_id>/
        features  (rows, cols, dim) float16, chunks (32, 32, dim)
        tissue    (rows, cols) float16, tissue fraction of each tile
        done      (rows, cols) bool, chunks (32, 32): tiles already encoded (the resume point)
        failed    (rows, cols) bool, chunks (32, 32): tiles whose pixels could not be read (skipped
                  by every reader; retried by extraction only when asked; never counted as pending)
        origins   (rows, cols, 2) int64: level-0 (l0_x, l0_y) of each tile's top-left corner
        attrs:    source path, size, mtime, content fingerprint, mpp used, level, grid origin,
                  tile/stride in level-0 px, rows, cols, level-0 dimensions, complete
      clusters/<run>/
        attrs: k, algorithm, seed, slides, fitted on how many tiles, created (+ anything given)
        centroids  (k, dim) float32
        slides/<slide_id>/labels  (rows, cols) int16, -1 outside tissue
        files/     pictures beside the run (exemplars, overlays): :meth:`FeatureStore.run_file`

Identity: the store's ``encoder`` attrs are an :class:`~engine.encoder_id.EncoderId`, its
``tiling`` attrs a :class:`~engine.tiling.Tiling`. Whether the store can serve a request
(slide, encoder, tiling) is decided here alone, by :meth:`FeatureStore.coverage`, for the
command line and the GUI alike.

A tile is *selected* when its stored (float16) tissue fraction is at least the store's
``min_tissue``; every reader and the extractor use that same rule. A tile's feature is valid
only where ``done`` is true; ``done`` is always written after the features it vouches for, and
zarr's local store replaces chunk files atomically, so a killed writer never leaves a done tile
without its feature.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import zarr

from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, StoreError, one_line
from engine.files import atomic_write_bytes, atomic_write_json
from engine.slide import slide_id as slide_id_of
from engine.tiling import TileGrid, Tiling

__all__ = [
    "CHUNK",
    "FORMAT",
    "FORMAT_VERSION",
    "ClusterRun",
    "Coverage",
    "FeatureStore",
    "PredictionMaps",
    "SlideFeatures",
    "TileFeatures",
    "file_fingerprint",
]

FORMAT = "histocluster-features"
FORMAT_VERSION = 1
CHUNK = 32  # tiles per chunk side of features and done
_BIG_CHUNK = 256  # tiles per chunk side of arrays written once (tissue, origins, labels)
_FINGERPRINT_BYTES = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_RUN_FILES = "files"


def file_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's size, first MiB and last MiB: cheap identity of a big slide."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read(_FINGERPRINT_BYTES))
    return f"sha256-head-tail:{digest.hexdigest()}"


_DAMAGE = (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError)
"""What zarr and its codecs raise for damaged metadata or chunks (JSON, missing keys, zstd)."""


@contextmanager
def _damage_guard(where: Path, fix: str) -> Iterator[None]:
    """Turn the errors of a damaged store under ``where`` into one ``StoreError`` naming it and ``fix``."""
    try:
        yield
    except HistoclusterError:
        raise
    except _DAMAGE as e:
        raise StoreError(f"{where}: damaged ({type(e).__name__}: {one_line(e)}) — {fix}") from e


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{kind} {name!r}: use only letters, digits, '.', '_' and '-'")
    return name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON-like values, floats compared to 1e-9 relative."""
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, Paths -> str, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


class TileFeatures(NamedTuple):
    """Features of some tiles of one slide: ``rows``, ``cols`` (N,) int64, ``features`` (N, dim) float32."""

    slide_id: str
    rows: np.ndarray
    cols: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class Coverage:
    """What a store holds of one request (slide, encoder, tiling), and what is missing.

    ``problem`` is None when the store can serve the request (possibly after encoding the
    ``pending`` tiles); otherwise one line saying why it cannot (another encoder or tiling,
    another file under the same slide id).
    """

    store_exists: bool
    problem: str | None
    slide_present: bool
    pending: int
    selected: int
    failed: int = 0
    """Selected tiles recorded as unreadable (not pending: retried only when asked)."""

    @property
    def usable(self) -> bool:
        """The store can take this request (creating it or adding the slide when needed)."""
        return self.problem is None

    @property
    def complete(self) -> bool:
        """Every selected tile of the slide is already encoded with this encoder and tiling."""
        return self.problem is None and self.slide_present and self.pending == 0


class ClusterRun(NamedTuple):
    """A stored clustering: ``attrs``, ``centroids`` (k, dim) float32, ``labels`` {slide_id: (rows, cols) int16}."""

    attrs: dict[str, Any]
    centroids: np.ndarray
    labels: dict[str, np.ndarray]


@dataclass(frozen=True)
class Block:
    """One chunk of a slide's tile grid: rows ``r0:r1``, cols ``c0:c1`` (at most CHUNK x CHUNK)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def index(self) -> tuple[int, int]:
        """(chunk row, chunk col)."""
        return self.r0 // CHUNK, self.c0 // CHUNK

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


class SlideFeatures:
    """One slide's group in the store; every accessor returns numpy arrays.

    Arrays (read with the properties below; features only by block or by tile):
        features: (rows, cols, dim) float16, chunks (32, 32, dim); valid where ``done``.
        tissue: (rows, cols) float16 tissue fraction.
        done: (rows, cols) bool, chunks (32, 32).
        failed: (rows, cols) bool, chunks (32, 32): unreadable tiles (absent in older stores).
        origins: (rows, cols, 2) int64 level-0 (l0_x, l0_y).
    """

    def __init__(
        self, group: zarr.Group, slide_id: str, min_tissue: float, where: Path | None = None
    ) -> None:
        self._group = group
        self.slide_id = slide_id
        self.min_tissue = float(min_tissue)
        self.where = where or Path(slide_id)
        self.fix = f"delete {self.where} and rerun python -m engine.extract on the store to re-encode the slide"
        with _damage_guard(self.where, self.fix):
            self._features: zarr.Array = group["features"]  # type: ignore[assignment]
            self._tissue: zarr.Array = group["tissue"]  # type: ignore[assignment]
            self._done: zarr.Array = group["done"]  # type: ignore[assignment]
            self._origins: zarr.Array = group["origins"]  # type: ignore[assignment]

    def _read(self, name: str, array: zarr.Array, sl: Any = Ellipsis) -> np.ndarray:
        with _damage_guard(self.where / name, self.fix):
            return np.asarray(array[sl])

    @cached_property
    def tissue(self) -> np.ndarray:
        """(rows, cols) float16 tissue fraction of each tile (written once)."""
        return self._read("tissue", self._tissue)

    @cached_property
    def origins(self) -> np.ndarray:
        """(rows, cols, 2) int64 level-0 (l0_x, l0_y) of each tile (written once)."""
        return self._read("origins", self._origins)

    @property
    def done(self) -> np.ndarray:
        """(rows, cols) bool: tiles whose features are stored (read afresh on every access)."""
        return self._read("done", self._done)

    @property
    def attrs(self) -> dict[str, Any]:
        """The slide's provenance (see the module docstring)."""
        return self._group.attrs.asdict()

    @property
    def source_path(self) -> Path:
        """The slide file the features came from."""
        return Path(self.attrs["source_path"])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        return int(self._features.shape[0]), int(self._features.shape[1])

    @property
    def dim(self) -> int:
        return int(self._features.shape[2])

    @cached_property
    def selected(self) -> np.ndarray:
        """(rows, cols) bool: tiles to encode, ``tissue >= min_tissue`` on the stored float16 tissue."""
        return self.tissue.astype(np.float32) >= self.min_tissue

    def pending(self) -> np.ndarray:
        """(rows, cols) bool: selected tiles not yet encoded (unreadable ones excluded)."""
        done = self.done
        return self.selected & ~done & ~self._failed_raw(done)

    @property
    def failed(self) -> np.ndarray:
        """(rows, cols) bool: selected tiles whose pixels could not be read (never also done)."""
        return self.selected & self._failed_raw(self.done)

    def n_failed(self) -> int:
        """How many selected tiles are recorded as unreadable."""
        return int(self.failed.sum())

    def _failed_raw(self, done: np.ndarray) -> np.ndarray:
        array = self._group.get("failed")
        if array is None:  # a store written before unreadable tiles were recorded
            return np.zeros(self.shape, dtype=bool)
        return self._read("failed", array) & ~done  # type: ignore[arg-type]

    def read_failed_block(self, block: Block) -> np.ndarray:
        """(h, w) bool: the recorded unreadable tiles of one chunk (done ones included as stored)."""
        array = self._group.get("failed")
        if array is None:
            return np.zeros(block.shape, dtype=bool)
        sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
        return self._read("failed", array, sl)  # type: ignore[arg-type]

    def write_failed_block(self, block: Block, failed: np.ndarray) -> None:
        """Replace the unreadable-tile flags (h, w) bool of one chunk (write it after its features
        and done flags: a tile both done and failed counts as done)."""
        if failed.shape != block.shape:
            raise ValueError(f"block {block} needs failed {block.shape}; got {failed.shape}")
        array = self._group.get("failed")
        if array is None:
            array = _create_failed(self._group, self.shape)
        sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
        array[sl] = failed.astype(bool, copy=False)  # type: ignore[index]

    def read_features(self) -> np.ndarray:
        """(rows, cols, dim) float16: the whole feature map (for small slides and tests; zeros where not done)."""
        return self._read("features", self._features)

    def n_encoded(self) -> int:
        """How many selected tiles are encoded."""
        return int((self.selected & self.done).sum())

    def blocks(self) -> list[Block]:
        """The chunks of the grid in row-major chunk order."""
        rows, cols = self.shape
        return [
            Block(r0, min(r0 + CHUNK, rows), c0, min(c0 + CHUNK, cols))
            for r0 in range(0, rows, CHUNK)
            for c0 in range(0, cols, CHUNK)
        ]

    def block_at(self, chunk_row: int, chunk_col: int) -> Block:
        rows, cols = self.shape
        r0, c0 = chunk_row * CHUNK, chunk_col * CHUNK
        return Block(r0, min(r0 + CHUNK, rows), c0, min(c0 + CHUNK, cols))

    def read_block(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """(features (h, w, dim) float16, done (h, w) bool) of one chunk."""
        sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
        return self._read("features", self._features, sl), self._read("done", self._done, sl)

    def discard_damaged_blocks(self) -> list[Block]:
        """Find chunks whose features or done flags cannot be decoded and reset them to not done
        (zeros, done False), so an extraction encodes them again; returns the chunks reset.

        Reads every chunk that holds encoded tiles: a resume costs one pass over the slide's
        features, the price of never trusting done flags that vouch for unreadable features.
        """
        reset = []
        for block in self.blocks():
            try:
                self.read_block(block)
                continue
            except StoreError:
                pass
            h, w = block.shape
            self.write_block(block, np.zeros((h, w, self.dim), np.float16), np.zeros((h, w), bool))
            reset.append(block)
        return reset

    def write_block(self, block: Block, features: np.ndarray, done: np.ndarray) -> None:
        """Replace one whole chunk: ``features`` (h, w, dim) (cast to float16), then ``done`` (h, w) bool.

        Writing a whole chunk never reads it back, and features land before the done flags.
        """
        h, w = block.shape
        if features.shape != (h, w, self.dim) or done.shape != (h, w):
            raise ValueError(
                f"block {block} needs features {(h, w, self.dim)} and done {(h, w)}; "
                f"got {features.shape} and {done.shape}"
            )
        sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
        self._features[sl] = features.astype(np.float16, copy=False)
        self._done[sl] = done.astype(bool, copy=False)

    def write_tiles(self, rows: np.ndarray, cols: np.ndarray, features: np.ndarray) -> None:
        """Store ``features`` (N, dim) of tiles ``rows``, ``cols`` (N,) and mark them done, chunk by chunk."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        features = np.asarray(features)
        if features.shape != (len(rows), self.dim) or rows.shape != cols.shape:
            raise ValueError(
                f"need rows, cols (N,) and features (N, {self.dim}); "
                f"got {rows.shape}, {cols.shape}, {features.shape}"
            )
        for block, idx in self._by_block(rows, cols):
            feats, done = self.read_block(block)
            feats = feats.copy()
            done = done.copy()
            feats[rows[idx] - block.r0, cols[idx] - block.c0] = features[idx]
            done[rows[idx] - block.r0, cols[idx] - block.c0] = True
            self.write_block(block, feats, done)

    def read_tiles(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(N, dim) float32 features of tiles ``rows``, ``cols`` (N,) (zeros where not done)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        out = np.zeros((len(rows), self.dim), np.float32)
        for block, idx in self._by_block(rows, cols):
            feats, _ = self.read_block(block)
            out[idx] = feats[rows[idx] - block.r0, cols[idx] - block.c0]
        return out

    def _by_block(self, rows: np.ndarray, cols: np.ndarray) -> Iterator[tuple[Block, np.ndarray]]:
        """(chunk, indices into rows/cols of the tiles inside it) for every chunk the tiles touch."""
        key = (rows // CHUNK) * (1 + (self.shape[1] - 1) // CHUNK) + cols // CHUNK
        for k in np.unique(key):
            idx = np.flatnonzero(key == k)
            yield self.block_at(int(rows[idx[0]] // CHUNK), int(cols[idx[0]] // CHUNK)), idx

    def __repr__(self) -> str:
        return f"SlideFeatures({self.slide_id!r}, shape={self.shape}, dim={self.dim})"


class FeatureStore:
    """A ``features.zarr`` store. Make one with :meth:`create_or_open` (writers) or :meth:`open`."""

    def __init__(self, root: zarr.Group, path: Path) -> None:
        self.root = root
        self.path = path
        attrs = root.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise HistoclusterError(
                f"{path}: not a histocluster feature store — give the features.zarr written by "
                "python -m engine.extract"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise HistoclusterError(
                f"{path}: feature store format version {attrs.get('format_version')!r}, this "
                f"histocluster reads version {FORMAT_VERSION} — re-extract with --overwrite"
            )

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "r+"] = "r") -> FeatureStore:
        """Open an existing store read-only (``"r"``) or for writing (``"r+"``)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise HistoclusterError(
                f"{path}: no feature store there — run python -m engine.extract ... --out {path} first"
            )
        try:
            root = zarr.open_group(store=str(path), mode=mode)
        except Exception as e:  # zarr raises several types for bad metadata
            raise StoreError(
                f"{path}: unreadable zarr store ({one_line(e)}) — re-extract with --overwrite"
            ) from e
        store = cls(root, path)
        for name in ("slides", "clusters"):
            with _damage_guard(
                path / name, f"the store lost its {name}/ group — re-extract with --overwrite"
            ):
                group = root.get(name)
            if not isinstance(group, zarr.Group):
                if name == "clusters" and group is None:
                    if mode == "r+":  # nothing was clustered yet: an empty group is right
                        root.create_group("clusters")
                    continue
                raise StoreError(
                    f"{path / name}: missing or not a group — re-extract with --overwrite"
                )
        return store

    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        encoder: EncoderId,
        tiling: Tiling,
        overwrite: bool = False,
    ) -> FeatureStore:
        """Open ``path`` for writing features of ``encoder`` with ``tiling``, creating it if absent.

        Args:
            encoder: the identity of the encoder (``Encoder.identity``).
            tiling: how the slides are tiled.
            overwrite: replace an existing store (only a histocluster feature store is ever deleted).
        Raises:
            HistoclusterError: the store exists with another encoder or tiling (and not ``overwrite``),
                or ``path`` holds something that is not a feature store.
        """
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            if not _is_feature_store(path):
                raise HistoclusterError(
                    f"{path}: exists and is not a histocluster feature store (--overwrite only "
                    "replaces feature stores) — choose another --out"
                )
            if not overwrite:
                store = cls.open(path, mode="r+")
                problem = store.mismatch(encoder, tiling)
                if problem:
                    raise HistoclusterError(problem)
                return store
            shutil.rmtree(path)
        try:
            root = zarr.create_group(
                store=str(path),
                attributes={
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "encoder": encoder.to_attrs(),
                    "tiling": tiling.to_attrs(),
                    "created": _now(),
                },
            )
            root.create_group("slides")
            root.create_group("clusters")
        except OSError as e:
            raise HistoclusterError(
                f"{path}: cannot create the feature store ({e}) — choose a writable --out"
            ) from e
        return cls(root, path)

    def mismatch(self, encoder: EncoderId, tiling: Tiling) -> str | None:
        """None when this store's features are of ``encoder`` and ``tiling``; else one line saying why not."""
        if not self.encoder.same_features(encoder):
            return (
                f"{self.path}: holds features of encoder {self.encoder.describe()}, this run uses "
                f"{encoder.describe()} — pass --overwrite to replace the store, or choose another --out"
            )
        diff = self.tiling.differences(tiling)
        if diff:
            return (
                f"{self.path}: was tiled with other settings (store vs this run: {', '.join(diff)}) — "
                "pass --overwrite to replace the store, or choose another --out"
            )
        return None

    @classmethod
    def coverage(
        cls,
        path: str | Path,
        slide_path: str | Path,
        encoder: EncoderId,
        tiling: Tiling,
        *,
        slide_mpp: float | None = None,
    ) -> Coverage:
        """What the store at ``path`` holds of ``slide_path`` encoded by ``encoder`` with ``tiling``.

        The one rule for reusing a store, used by ``engine.extract`` and the GUI: the store
        must hold features of the same encoder (weights, architecture, normalisation, embedding)
        and tiling (tile size, stride, um/px, tissue method, minimum tissue fraction); the slide
        is present when a complete group of that slide id was made from the same file content
        and, when the user gives the slide's um/px (``slide_mpp``), at that um/px.
        """
        path, slide_path = Path(path), Path(slide_path)
        if not (path / "zarr.json").is_file():
            return Coverage(False, None, False, 0, 0)
        store = cls.open(path)
        problem = store.mismatch(encoder, tiling)
        if problem:
            return Coverage(True, problem, False, 0, 0)
        sid = slide_id_of(slide_path)
        if sid not in store:
            return Coverage(True, None, False, 0, 0)
        sf = store.slide(sid)
        if slide_path.is_file() and sf.attrs.get("fingerprint") != file_fingerprint(slide_path):
            return Coverage(
                True,
                f"{slide_path}: the store {path} holds slide {sid!r} from another file "
                f"({sf.attrs.get('source_path')}) — rename the slide or choose another store",
                True,
                0,
                0,
            )
        stored_mpp = sf.attrs.get("mpp")
        if slide_mpp is not None and not _same(stored_mpp, [float(slide_mpp)] * 2):
            return Coverage(
                True,
                f"{slide_path}: the store {path} holds slide {sid!r} read as {stored_mpp[0]:g} "
                f"um/px at level 0, not the {slide_mpp:g} given — clear the slide um/px or "
                "choose another store",
                True,
                0,
                0,
            )
        selected = sf.selected
        return Coverage(
            True, None, True, int(sf.pending().sum()), int(selected.sum()), sf.n_failed()
        )

    # ------------------------------------------------------------------ store-level

    @property
    def attrs(self) -> dict[str, Any]:
        return self.root.attrs.asdict()

    @cached_property
    def encoder(self) -> EncoderId:
        """The identity of the encoder that made the features."""
        return EncoderId.from_attrs(self.attrs["encoder"])

    @cached_property
    def tiling(self) -> Tiling:
        """How the slides were tiled."""
        return Tiling.from_attrs(self.attrs["tiling"])

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def _slide_group(self, slide_id: str) -> zarr.Group | None:
        """The group of a slide (None when absent); ``StoreError`` when its metadata is damaged."""
        where = self.path / "slides" / slide_id
        with _damage_guard(
            where, f"delete {where} and rerun python -m engine.extract to re-encode the slide"
        ):
            group = self.root["slides"].get(slide_id)  # type: ignore[union-attr]
            if group is not None and not isinstance(group, zarr.Group):
                raise ValueError("not a group")
            return group

    def _slide_names(self) -> list[str]:
        """Names of the entries under ``slides/`` (complete, incomplete or damaged), from the file system."""
        root = self.path / "slides"
        return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def damaged_slides(self) -> dict[str, str]:
        """{slide_id: one-line error} of the slide groups whose metadata cannot be read."""
        out = {}
        for name in self._slide_names():
            try:
                self._slide_group(name)
            except StoreError as e:
                out[name] = str(e)
        return out

    def slide_ids(self) -> list[str]:
        """Ids of the slides whose groups are complete, sorted (damaged groups are left out:
        see :meth:`damaged_slides`)."""
        ids = []
        for name in self._slide_names():
            try:
                group = self._slide_group(name)
            except StoreError:
                continue
            if group is not None and group.attrs.get("complete") is True:
                ids.append(name)
        return ids

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and slide_id in self.slide_ids()

    def slide(self, slide_id: str) -> SlideFeatures:
        """The features of one slide; ``HistoclusterError`` naming the known slides when absent."""
        group = self._slide_group(slide_id) if _NAME.match(slide_id) else None
        if group is None or group.attrs.get("complete") is not True:
            known = ", ".join(self.slide_ids()) or "none"
            raise HistoclusterError(
                f"{self.path}: no slide {slide_id!r} (slides: {known}) — extract it first"
            )
        return SlideFeatures(
            group, slide_id, self.tiling.min_tissue, self.path / "slides" / slide_id
        )

    def add_slide(self, slide_id: str, grid: TileGrid) -> SlideFeatures:
        """Create ``slides/<slide_id>`` for ``grid`` (tissue, origins, provenance), or reuse it.

        An existing complete group made from the same file content and grid is reused (its done
        tiles kept; the source path and mtime are updated if the file moved). One made from other
        content or another grid raises ``HistoclusterError``. A group left incomplete by a killed
        writer is rebuilt. The ``complete`` flag is written last.
        """
        _check_name("slide id", slide_id)
        source = Path(grid.slide.path)
        on_disk = source.is_file()  # an in-memory ArraySlide has no file
        stat = source.stat() if on_disk else None
        attrs = {
            "source_path": str(source.resolve()) if on_disk else str(source),
            "size": int(stat.st_size) if stat else None,
            "mtime": float(stat.st_mtime) if stat else None,
            "fingerprint": file_fingerprint(source) if on_disk else None,
            "mpp": [float(v) for v in grid.slide.mpp],
            "level": int(grid.level),
            "level_read_size": [int(v) for v in grid.read_size],
            "grid_origin_l0": [0, 0],
            "tile_l0": [float(v) for v in grid.tile_l0_xy],
            "stride_l0": [float(v) for v in grid.stride_l0_xy],
            "rows": int(grid.rows),
            "cols": int(grid.cols),
            "dimensions": [int(v) for v in grid.slide.dimensions],
        }
        slides: zarr.Group = self.root["slides"]  # type: ignore[assignment]
        try:
            existing = self._slide_group(slide_id)
        except StoreError:  # damaged metadata: rebuild the slide's group from the slide
            shutil.rmtree(self.path / "slides" / slide_id)
            existing = None
        if existing is not None:
            old = existing.attrs.asdict()
            if old.get("complete") is True:
                keys = (
                    "fingerprint",
                    "mpp",
                    "level",
                    "tile_l0",
                    "stride_l0",
                    "rows",
                    "cols",
                    "dimensions",
                )
                diff = [k for k in keys if not _same(old.get(k), attrs[k])]
                if diff:
                    raise HistoclusterError(
                        f"{source}: the store {self.path} holds slide {slide_id!r} from "
                        f"{old.get('source_path')} with other {', '.join(diff)} — pass --overwrite, "
                        "rename the slide, or choose another --out"
                    )
                if (
                    old.get("source_path") != attrs["source_path"]
                    or old.get("mtime") != attrs["mtime"]
                ):
                    existing.update_attributes(
                        {"source_path": attrs["source_path"], "mtime": attrs["mtime"]}
                    )
                if existing.get("failed") is None:  # older store: add it before ranks write
                    _create_failed(existing, (int(old["rows"]), int(old["cols"])))
                return self.slide(slide_id)
            del slides[slide_id]
        rows, cols, dim = grid.rows, grid.cols, self.dim
        group = slides.create_group(slide_id)
        _tile_map(group, "features", (rows, cols, dim), CHUNK, "float16", 0.0)
        _tile_map(group, "done", (rows, cols), CHUNK, "bool", False)
        _create_failed(group, (rows, cols))
        tissue = _tile_map(group, "tissue", (rows, cols), _BIG_CHUNK, "float16", 0.0)
        origins = _tile_map(group, "origins", (rows, cols, 2), _BIG_CHUNK, "int64", 0)
        tissue[...] = grid.tissue.astype(np.float16)
        origins[...] = grid.origins
        group.update_attributes({**attrs, "complete": True})
        return self.slide(slide_id)

    def iter_tissue_features(
        self, slide_ids: Sequence[str] | None = None, max_tiles: int = 16384
    ) -> Iterator[TileFeatures]:
        """Features of every selected, encoded tile, slide by slide, chunk by chunk.

        Yields ``TileFeatures`` of at most ``max_tiles`` tiles each (and at least one chunk's worth
        when a chunk holds more), so memory stays bounded whatever the store's size.
        """
        for sid in self.slide_ids() if slide_ids is None else slide_ids:
            sf = self.slide(sid)
            selected = sf.selected
            parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            count = 0
            for block in sf.blocks():
                sel = selected[block.r0 : block.r1, block.c0 : block.c1]
                if not sel.any():
                    continue
                feats, done = sf.read_block(block)
                r, c = np.nonzero(sel & done)
                if len(r) == 0:
                    continue
                values = feats[r, c].astype(np.float32)
                if not np.isfinite(values).all():
                    raise StoreError(
                        f"{sf.where}: non-finite features (NaN or inf) in chunk {block.index} — "
                        f"{sf.fix} with an encoder that gives finite features"
                    )
                parts.append((r + block.r0, c + block.c0, values))
                count += len(r)
                if count >= max_tiles:
                    yield _concat(sid, parts)
                    parts, count = [], 0
            if parts:
                yield _concat(sid, parts)

    def n_tissue_tiles(self, slide_ids: Sequence[str] | None = None) -> int:
        """How many selected, encoded tiles the given slides (default all) hold."""
        total = 0
        for sid in self.slide_ids() if slide_ids is None else slide_ids:
            sf = self.slide(sid)
            total += sf.n_encoded()
        return total

    # ------------------------------------------------------------------ clusters

    def write_cluster_run(
        self,
        run: str,
        centroids: np.ndarray,
        labels_by_slide: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any],
        overwrite: bool = False,
        files: Iterable[tuple[str, bytes]] = (),
    ) -> None:
        """Store a clustering under ``clusters/<run>``; the run is listed only once all is written.

        Args:
            centroids: (k, dim) cluster centres (stored float32).
            labels_by_slide: {slide_id: (rows, cols) labels, -1 outside tissue} (stored int16).
            attrs: k, algorithm, seed, slides, n_fit_tiles, ... (JSON values); ``created`` is added.
            overwrite: replace an existing run of that name (else ``HistoclusterError``).
            files: (name, bytes) of the files beside the run (as :meth:`write_run_file`), written
                atomically after the arrays and before the ``complete`` flag. May be a generator:
                it is consumed one file at a time, and an exception it raises (a ``Cancelled``)
                leaves the run incomplete, i.e. unlisted and replaced by the next write.
        """
        _check_name("cluster run", run)
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != self.dim:
            raise ValueError(f"centroids must be (k, {self.dim}); got {centroids.shape}")
        checked = {}
        for sid, labels in labels_by_slide.items():
            shape = self.slide(sid).shape
            labels = np.asarray(labels)
            if labels.shape != shape:
                raise ValueError(f"labels of {sid!r} must be {shape}; got {labels.shape}")
            if labels.size and (labels.min() < -1 or labels.max() >= len(centroids)):
                raise ValueError(f"labels of {sid!r} must lie in [-1, {len(centroids) - 1}]")
            checked[sid] = labels.astype(np.int16)
        clusters: zarr.Group = self._clusters()
        if run in clusters:
            if not overwrite:
                raise HistoclusterError(
                    f"{self.path}: cluster run {run!r} exists — choose another run name or overwrite it"
                )
            del clusters[run]
        group = clusters.create_group(run)
        group.create_array("centroids", data=centroids, chunks=centroids.shape)
        slides = group.create_group("slides")
        for sid, labels in checked.items():
            chunks = (min(_BIG_CHUNK, labels.shape[0]), min(_BIG_CHUNK, labels.shape[1]))
            slides.create_group(sid).create_array(
                "labels", data=labels, chunks=chunks, fill_value=-1
            )
        for name, data in files:
            for part in name.split("/"):
                _check_name("run file", part)
            path = self.path / "clusters" / run / _RUN_FILES / name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        meta = {
            "k": int(len(centroids)),
            "slides": sorted(checked),
            **_jsonable(dict(attrs)),
            "created": _now(),
            "complete": True,
        }
        group.update_attributes(meta)

    def cluster_run_problem(self, run: str) -> str | None:
        """None when run ``run``'s centroids were fitted on this store's features; else one line why not.

        A run records the :class:`EncoderId` of the features it clustered (``attrs["encoder"]``);
        another encoder is refused even when the dimensions agree. A run without that record
        (written before it existed) is accepted when its centroids have the store's dimension.
        """
        group = self._cluster_group(run)
        recorded = group.attrs.get("encoder")
        if recorded is None:
            dim = int(group["centroids"].shape[1])  # type: ignore[union-attr]
            if dim == self.dim:
                return None
            return (
                f"{self.path}: cluster run {run!r} has {dim}-d centroids, the store's features are "
                f"{self.dim}-d — recluster with python -m engine.cluster --name {run} --overwrite"
            )
        theirs = EncoderId.from_attrs(recorded)  # type: ignore[arg-type]
        if theirs.same_features(self.encoder):
            return None
        return (
            f"{self.path}: cluster run {run!r} was fitted on features of encoder "
            f"{theirs.describe()}, the store holds {self.encoder.describe()} (differ in "
            f"{', '.join(theirs.differences(self.encoder))}) — recluster with "
            f"python -m engine.cluster --name {run} --overwrite"
        )

    def check_cluster_run(self, run: str) -> None:
        """Raise ``StoreError`` with :meth:`cluster_run_problem`'s line when the run does not fit."""
        problem = self.cluster_run_problem(run)
        if problem:
            raise StoreError(problem)

    def cluster_runs(self) -> list[str]:
        """Names of the complete cluster runs, oldest first."""
        runs = []
        root = self.path / "clusters"
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            if not (entry.is_dir() and _NAME.match(entry.name)):
                continue
            try:
                with _damage_guard(entry, ""):
                    g = self._clusters().get(entry.name)
                    if isinstance(g, zarr.Group) and g.attrs.get("complete") is True:
                        runs.append((g.attrs.get("created", ""), entry.name))
            except StoreError:
                continue  # a damaged run is not listed; reading it by name says what is wrong
        return [name for _, name in sorted(runs)]

    def latest_cluster_run(self) -> str | None:
        """The most recently written cluster run, or None."""
        runs = self.cluster_runs()
        return runs[-1] if runs else None

    def read_cluster_run(self, run: str, slide_ids: Sequence[str] | None = None) -> ClusterRun:
        """(attrs, centroids (k, dim) float32, {slide_id: labels (rows, cols) int16}) of a run."""
        group = self._cluster_group(run)
        with _damage_guard(self.path / "clusters" / run, self._run_fix(run)):
            slides: zarr.Group = group["slides"]  # type: ignore[assignment]
            ids = sorted(slides.group_keys()) if slide_ids is None else list(slide_ids)
            centroids = np.asarray(group["centroids"][...])
        labels = {sid: self.read_cluster_labels(run, sid) for sid in ids}
        return ClusterRun(group.attrs.asdict(), centroids, labels)

    def read_cluster_labels(self, run: str, slide_id: str) -> np.ndarray:
        """(rows, cols) int16 labels of one slide in a run, -1 outside tissue."""
        group = self._cluster_group(run)
        with _damage_guard(self.path / "clusters" / run / "slides" / slide_id, self._run_fix(run)):
            slides: zarr.Group = group["slides"]  # type: ignore[assignment]
            if slide_id not in slides:
                raise HistoclusterError(
                    f"{self.path}: cluster run {run!r} has no labels for slide {slide_id!r}"
                )
            return np.asarray(slides[slide_id]["labels"][...])  # type: ignore[index]

    def _run_fix(self, run: str) -> str:
        return f"delete {self.path / 'clusters' / run} and rerun python -m engine.cluster"

    def write_run_file(self, run: str, name: str, data: bytes) -> Path:
        """Write a file beside cluster run ``run`` (``files/<name>``, e.g. ``exemplars.png``) atomically."""
        self._cluster_group(run)
        for part in name.split("/"):
            _check_name("run file", part)
        path = self.path / "clusters" / run / _RUN_FILES / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, data)

    def run_file(self, run: str, name: str) -> Path | None:
        """The path of a file written beside ``run`` with :meth:`write_run_file`, or None if absent."""
        path = self.path / "clusters" / run / _RUN_FILES / name
        return path if path.is_file() else None

    def write_run_json(self, run: str, name: str, obj: Any) -> Path:
        """Write a JSON document beside cluster run ``run`` (``<name>.json``, e.g. the curation) atomically."""
        self._cluster_group(run)
        _check_name("run document", name)
        path = self.path / "clusters" / run / f"{name}.json"
        return atomic_write_json(path, _jsonable(obj))

    def read_run_json(self, run: str, name: str) -> Any | None:
        """The JSON document ``name`` beside ``run``, or None when there is none.

        Raises ``StoreError`` naming the file when it exists but is not JSON.
        """
        self._cluster_group(run)
        path = self.path / "clusters" / run / f"{name}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{path}: damaged ({one_line(e)}) — delete the file to start it afresh"
            ) from e

    # ------------------------------------------------------------------ map embedding (engine.embed)

    def embedding_attrs(self, run: str) -> dict[str, Any] | None:
        """The attrs of ``clusters/<run>/embedding`` (the map's tile coordinates), or None when absent."""
        group = self._cluster_group(run).get("embedding")
        return group.attrs.asdict() if isinstance(group, zarr.Group) else None

    def start_embedding(self, run: str, attrs: Mapping[str, Any]) -> None:
        """Replace ``clusters/<run>/embedding`` by an empty one with ``attrs`` (JSON values)."""
        group = self._cluster_group(run)
        if "embedding" in group:
            del group["embedding"]
        group.create_group("embedding", attributes=_jsonable(dict(attrs))).create_group("slides")

    def update_embedding_attrs(self, run: str, attrs: Mapping[str, Any]) -> None:
        """Merge ``attrs`` into the embedding's attrs (e.g. ``slides_done``, ``complete``)."""
        self._cluster_group(run)["embedding"].update_attributes(_jsonable(dict(attrs)))

    def write_embedding(self, run: str, slide_id: str, xy: np.ndarray) -> None:
        """Store one slide's map coordinates ``xy`` (rows, cols, 2) float32, NaN where no tile."""
        slides = self._cluster_group(run)["embedding"]["slides"]  # type: ignore[index]
        if slide_id in slides:  # type: ignore[operator]
            del slides[slide_id]  # type: ignore[union-attr]
        xy = np.asarray(xy, dtype=np.float32)
        chunks = (min(_BIG_CHUNK, xy.shape[0]), min(_BIG_CHUNK, xy.shape[1]), 2)
        slides.create_group(slide_id).create_array("xy", data=xy, chunks=chunks)  # type: ignore[union-attr]

    def read_embedding(self, run: str) -> dict[str, np.ndarray]:
        """{slide_id: xy (rows, cols, 2) float32, NaN where no tile} of the slides written so far."""
        where = self.path / "clusters" / run / "embedding"
        with _damage_guard(where, f"delete {where} and rerun python -m engine.embed"):
            slides = self._cluster_group(run)["embedding"]["slides"]  # type: ignore[index]
            return {sid: np.asarray(slides[sid]["xy"][...]) for sid in sorted(slides.group_keys())}  # type: ignore[union-attr,index]

    def _clusters(self) -> zarr.Group:
        group = self.root.get("clusters")
        if not isinstance(group, zarr.Group):
            raise HistoclusterError(
                f"{self.path}: no cluster runs (runs: none) — run python -m engine.cluster first"
            )
        return group

    def _cluster_group(self, run: str) -> zarr.Group:
        clusters = self._clusters()
        with _damage_guard(self.path / "clusters" / run, self._run_fix(run)):
            group = clusters.get(run) if _NAME.match(run) else None
        if group is None or group.attrs.get("complete") is not True:
            known = ", ".join(self.cluster_runs()) or "none"
            raise HistoclusterError(
                f"{self.path}: no cluster run {run!r} (runs: {known}) — run python -m engine.cluster first"
            )
        return group  # type: ignore[return-value]

    # ------------------------------------------------------------------ predictions

    def create_prediction(
        self, name: str, attrs: Mapping[str, Any], overwrite: bool = False
    ) -> PredictionMaps:
        """Open ``predictions/<name>`` for writing, creating it with ``attrs`` if absent.

        ``attrs`` must hold ``classes`` (names) and ``model_sha256``; an existing prediction of the
        same model is resumed, one of another model raises ``HistoclusterError`` unless ``overwrite``.
        """
        _check_name("prediction", name)
        root = self.root.get("predictions")
        if root is None:
            root = self.root.create_group("predictions")
        group = root.get(name)  # type: ignore[union-attr]
        if group is not None:
            same = group.attrs.get("model_sha256") == attrs.get("model_sha256")
            if same and not overwrite:
                return PredictionMaps(self, group, name)  # type: ignore[arg-type]
            if not overwrite:
                raise HistoclusterError(
                    f"{self.path}: prediction {name!r} was made by another model — choose another "
                    "--name, or pass --overwrite to replace it"
                )
            del root[name]  # type: ignore[index]
        group = root.create_group(name)  # type: ignore[union-attr]
        group.create_group("slides")
        group.update_attributes({**_jsonable(dict(attrs)), "created": _now()})
        return PredictionMaps(self, group, name)

    def prediction_names(self) -> list[str]:
        """Names of the stored predictions, sorted."""
        root = self.root.get("predictions")
        return sorted(root.group_keys()) if isinstance(root, zarr.Group) else []

    def prediction(self, name: str) -> PredictionMaps:
        """A stored prediction; ``HistoclusterError`` naming the known ones when absent."""
        root = self.root.get("predictions")
        group = root.get(name) if isinstance(root, zarr.Group) and _NAME.match(name) else None
        if group is None:
            known = ", ".join(self.prediction_names()) or "none"
            raise HistoclusterError(
                f"{self.path}: no prediction {name!r} (predictions: {known}) — run python -m "
                "engine.classify apply first"
            )
        return PredictionMaps(self, group, name)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, encoder={self.encoder.name!r}, slides={len(self.slide_ids())})"


class PredictionMaps:
    """``predictions/<name>``: a classifier's class and probabilities for every tissue tile.

    Per slide: ``class`` (rows, cols) int16 (-1 where not predicted), ``prob`` (rows, cols, classes)
    float16, both chunked like the features, and ``done`` (chunk rows, chunk cols) bool, set after
    a chunk's maps are written (the resume point).
    """

    def __init__(self, store: FeatureStore, group: zarr.Group, name: str) -> None:
        self.store = store
        self._group = group
        self.name = name
        self._arrays: dict[str, tuple[zarr.Array, zarr.Array, zarr.Array]] = {}

    def _maps(self, slide_id: str) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
        """(class, prob, done) arrays of one slide, created on first use, opened once."""
        if slide_id not in self._arrays:
            group = self._slide(slide_id, create=True)
            self._arrays[slide_id] = (group["class"], group["prob"], group["done"])  # type: ignore[index,assignment]
        return self._arrays[slide_id]

    @property
    def attrs(self) -> dict[str, Any]:
        """classes, colours, model_sha256, encoder, tiling, created."""
        return self._group.attrs.asdict()

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    def slide_ids(self) -> list[str]:
        """Slides with maps (complete or not), sorted."""
        return sorted(self._group["slides"].group_keys())  # type: ignore[union-attr]

    def _slide(self, slide_id: str, create: bool) -> zarr.Group | None:
        slides: zarr.Group = self._group["slides"]  # type: ignore[assignment]
        group = slides.get(slide_id)
        if group is None and create:
            rows, cols = self.store.slide(slide_id).shape
            n = len(self.classes)
            group = slides.create_group(slide_id)
            _tile_map(group, "class", (rows, cols), CHUNK, "int16", -1)
            _tile_map(group, "prob", (rows, cols, n), CHUNK, "float16", 0.0)
            group.create_array(
                "done",
                shape=(-(-rows // CHUNK), -(-cols // CHUNK)),
                chunks=(1, 1),  # one flag a file: setting it never rewrites the others
                dtype="bool",
                fill_value=False,
            )
        return group  # type: ignore[return-value]

    def chunks_done(self, slide_id: str) -> np.ndarray:
        """(chunk rows, chunk cols) bool: chunks whose maps are written (all False before the first)."""
        group = self._slide(slide_id, create=False)
        if group is None:
            rows, cols = self.store.slide(slide_id).shape
            return np.zeros((-(-rows // CHUNK), -(-cols // CHUNK)), bool)
        return np.asarray(group["done"][...])

    def write_block(
        self, slide_id: str, block: Block, classes: np.ndarray, prob: np.ndarray
    ) -> None:
        """Write one chunk: ``classes`` (h, w) int16, ``prob`` (h, w, n_classes), then its done flag."""
        cls_map, prob_map, done = self._maps(slide_id)
        sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
        cls_map[sl] = classes.astype(np.int16, copy=False)
        prob_map[sl] = prob.astype(np.float16, copy=False)
        done[  # every chunk the (chunk-aligned) block covers
            block.r0 // CHUNK : (block.r1 - 1) // CHUNK + 1,
            block.c0 // CHUNK : (block.c1 - 1) // CHUNK + 1,
        ] = True

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(class (rows, cols) int16, prob (rows, cols, n_classes) float32) of one slide."""
        group = self._slide(slide_id, create=False)
        if group is None:
            raise HistoclusterError(
                f"{self.store.path}: prediction {self.name!r} has no maps for slide {slide_id!r} — "
                "run python -m engine.classify apply again to predict the slides added since"
            )
        with _damage_guard(
            self.store.path / "predictions" / self.name / "slides" / slide_id,
            "rerun engine.classify apply with --overwrite",
        ):
            return np.asarray(group["class"][...]), np.asarray(group["prob"][...]).astype(
                np.float32
            )


def _tile_map(
    group: zarr.Group, name: str, shape: tuple[int, ...], chunk: int, dtype: str, fill: Any
) -> zarr.Array:
    """A (rows, cols, ...) array over a tile grid, chunked ``chunk`` x ``chunk`` tiles (whole trailing axes)."""
    return group.create_array(
        name, shape=shape, chunks=(chunk, chunk, *shape[2:]), dtype=dtype, fill_value=fill
    )


def _create_failed(group: zarr.Group, shape: tuple[int, int]) -> zarr.Array:
    """The ``failed`` (rows, cols) bool array of a slide group, chunked like ``done``."""
    return _tile_map(group, "failed", shape, CHUNK, "bool", False)


def _is_feature_store(path: Path) -> bool:
    """True when ``path`` is a zarr group whose attrs say histocluster feature store."""
    if not (path / "zarr.json").is_file():
        return False
    try:
        return zarr.open_group(store=str(path), mode="r").attrs.get("format") == FORMAT
    except Exception:
        return False


def _concat(slide_id: str, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> TileFeatures:
    rows, cols, feats = zip(*parts, strict=True)
    return TileFeatures(
        slide_id,
        np.concatenate(rows).astype(np.int64),
        np.concatenate(cols).astype(np.int64),
        np.concatenate(feats, axis=0),
    )
