"""python -m engine.extract: encode the tissue tiles of slides into a zarr feature store.

    python -m engine.extract SLIDE_OR_DIR... --out features.zarr --encoder SPEC [options]
    torchrun --nproc-per-node N -m engine.extract ...      # several processes / GPUs

How it works:

- Each slide gets a :class:`~engine.tiling.TileGrid` (tissue fractions at thumbnail scale) and a
  group in the :class:`~engine.store.FeatureStore`. Work is planned per 32 x 32-tile zarr chunk:
  the selected tiles of a chunk, in row-major order, are cut into batches of ``--batch-size``
  (a batch never spans chunks, and a given tile always lands in the same batch, so a resumed or
  multi-process run computes bit-identical features).
- Start-up: ``import engine.extract`` does not import torch. torch is imported, and the encoder
  loaded, in a thread (:mod:`engine.extract_encode`, the torch half) while the first slides'
  tissue masks are computed; nothing on the way imports torchvision. The plan
  (:mod:`engine.extract_plan`) and the chunk writer (:mod:`engine.chunk_writer`) are torch-free.
- DataLoader worker processes open each slide once and read + decode tiles; the main process
  normalises them and runs the encoder (:class:`~engine.encode.TileEncoder`: channels_last;
  bf16 autocast on CPUs with native bf16 and fp16/bf16 on CUDA when ``--precision auto``;
  pinned memory and non-blocking copies on CUDA).
- A chunk's features are written as one whole zarr chunk, then its ``done`` flags, when the chunk
  is finished (and every few seconds while a slow chunk is in progress), so a run killed at any
  moment resumes where it stopped, and only whole chunks are ever written.
- Under torchrun, ranks split the pending chunks (not whole slides): rank 0 creates the store,
  ranks prepare slides round-robin, then each rank encodes and writes its own chunks.
- An unreadable slide is reported and skipped; the others finish; the exit status is then 1.
  A batch that fails to read is read again tile by tile (:mod:`engine.tile_reader`): readable
  tiles are encoded, unreadable ones recorded in the store's ``failed`` array, named in the
  summary (exit status 1) and read again only with ``--retry-failed``. A reader worker that
  dies or cannot hand over its batch ends the run with one line; what was encoded is kept.
- One extraction at a time per store: ``<out>.lock`` names the process writing it.
  A JSON summary (tiles, seconds, tiles/s, failures) and the resolved configuration are written
  next to the store as ``<out>.summary.json`` and ``<out>.config.json``.

Progress stages: ``"tissue"`` (slides prepared of this rank's slides) and ``"encode"`` (tiles
encoded of this rank's tiles); a ``Cancelled`` raised by the callback stops the run after what was
encoded is written.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from engine import cli
from engine.chunk_writer import ChunkWriter
from engine.cli import option
from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, one_line
from engine.extract_plan import Plan, chunk_batches, make_plan
from engine.files import atomic_write_json
from engine.launcher_env import env_int, launched_world_size
from engine.precisions import PRECISIONS
from engine.progress import Progress, no_progress
from engine.sample_data import default_encoder_spec
from engine.slide import SLIDE_SUFFIXES, find_slides, open_slide, slide_id
from engine.slide_job import READERS
from engine.store import FeatureStore
from engine.store_lock import StoreLock
from engine.tiling import TileGrid, Tiling
from engine.tissue import TISSUE_METHODS

if TYPE_CHECKING:
    from engine.distributed import DistInfo

__all__ = [
    "DEVICES",
    "ChunkWriter",
    "ExtractConfig",
    "ExtractSummary",
    "auto_workers",
    "chunk_batches",
    "expand_inputs",
    "main",
    "make_plan",
    "parse_slide_mpp",
    "Plan",
    "run",
]

DEVICES = ("auto", "cpu", "cuda")


def auto_workers(local_world_size: int = 1) -> int:
    """Reader processes per rank: this rank's share of the CPUs minus one for the main process, 1..8."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, local_world_size) - 1))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``python -m engine.extract`` needs; written as JSON next to the store."""

    slides: tuple[str, ...] = option(
        positional=True,
        metavar="SLIDE_OR_DIR",
        help="slide files, or directories whose slide files to encode",
    )
    out: str = option(help="the feature store to write (features.zarr); an existing one is resumed")
    encoder: str = option(
        default_factory=default_encoder_spec,
        help="checkpoint path or named encoder, e.g. resnet18-random, ciga-resnet18",
    )
    tile_px: int = option(224, help="tile side in pixels at --mpp")
    mpp: float = option(0.5, help="micrometres per pixel of the tiles")
    stride_px: int | None = option(
        None, help="step between tiles in pixels at --mpp (default: --tile-px)"
    )
    min_tissue: float = option(0.5, help="encode tiles with at least this tissue fraction")
    tissue: str = option("otsu", choices=TISSUE_METHODS, help="tissue detection method")
    batch_size: int = option(64, help="tiles per encoder batch")
    workers: int | None = option(
        None,
        help="tile-reading worker processes per rank; 0 reads in the main process "
        f"(default: the rank's share of the CPUs minus one, 1 to 8; here {auto_workers()})",
    )
    device: str = option(
        "auto", help="auto, cpu or cuda (default: %(default)s; auto = cuda when available)"
    )
    precision: str = option(
        "auto",
        choices=PRECISIONS,
        help="encoder precision; auto = bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    reader: str = option(
        "auto",
        choices=READERS,
        help="how tiles are read: jpeg decodes a JPEG-tiled TIFF's (SVS, pyramidal TIFF) own tiles at "
        "1/2, 1/4 or 1/8 scale when the tiles are that much smaller than a stored level; openslide "
        "always reads through OpenSlide and resizes; device: workers read the JPEG tiles' bytes and "
        "the encoder's device (CUDA) decodes, crops and resizes them (other slides as auto); "
        "auto = jpeg where it fits, else openslide. "
        "Features are bit-identical across resume and torchrun for a given reader",
    )
    slide_mpp: str | None = option(
        None,
        metavar="VALUE_OR_CSV",
        help="micrometres per pixel of slides whose files lack it (overrides the metadata): "
        "one number for all, or a CSV of slide,mpp rows",
    )
    overwrite: bool = option(
        False, help="replace an existing store made with another encoder or tiling"
    )
    retry_failed: bool = option(
        False, help="read again the tiles an earlier run recorded as unreadable"
    )
    quiet: bool = option(False, help="no progress bar or summary line")
    trust_checkpoint: bool = option(
        False,
        help="allow loading a checkpoint that needs pickle (only from a source you trust)",
    )
    flush_every_s: float = option(
        10.0, cli=False, help="seconds between writes of a chunk still in progress"
    )
    channels_last: bool = option(True, cli=False, help="run the encoder in channels_last layout")
    reader_timeout_s: float = option(
        300.0, cli=False, help="seconds without a batch from the reader workers before giving up"
    )

    def __post_init__(self) -> None:
        if isinstance(self.slides, str | Path):
            object.__setattr__(self, "slides", (str(self.slides),))
        else:
            object.__setattr__(self, "slides", tuple(str(s) for s in self.slides))

    @property
    def tiling(self) -> Tiling:
        """The tiling these flags ask for."""
        return Tiling(self.tile_px, self.mpp, self.stride_px, self.tissue, self.min_tissue)  # type: ignore[arg-type]

    def summary_path(self) -> Path:
        """``<out>.summary.json``: what the last run did."""
        out = Path(self.out)
        return out.with_name(out.name + ".summary.json")

    def resolved_config_path(self) -> Path:
        """``<out>.config.json``: this configuration with its resolved values (written by ``run``)."""
        out = Path(self.out)
        return out.with_name(out.name + ".config.json")


@dataclass
class ExtractSummary:
    """What a run did; ``tiles`` counts tiles encoded by this run (all ranks)."""

    tiles: int = 0
    seconds: float = 0.0
    tiles_per_s: float = 0.0
    encode_seconds: float = 0.0
    encode_tiles_per_s: float = 0.0
    slides: int = 0
    tiles_already_done: int = 0
    tiles_unreadable: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Slides that failed (``slide``, ``error``), and slides with unreadable tiles (with
    ``tiles_unreadable`` and ``tiles_encoded`` too); any of them makes the exit status 1."""
    precision: str = "fp32"
    device: str = "cpu"
    world_size: int = 1
    warnings: list[str] = field(default_factory=list)
    """Said once, not failures (e.g. a slide level whose device decode fell back to the CPU)."""


# ----------------------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the slide files directly inside each directory (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = find_slides(p)
            if not found:
                raise HistoclusterError(
                    f"{p}: no slide files in this directory ({', '.join(sorted(SLIDE_SUFFIXES))}) — "
                    "give slide files or a directory that holds them"
                )
            out.extend(found)
        else:
            out.append(p)
    seen: dict[str, Path] = {}
    for p in out:
        sid = slide_id(p)
        if sid in seen and seen[sid].resolve() != p.resolve():
            raise HistoclusterError(
                f"{p}: has the same slide id {sid!r} as {seen[sid]} — rename one of them or "
                "extract them into different stores"
            )
        seen[sid] = p
    return list({slide_id(p): p for p in out}.values())


def parse_slide_mpp(value: str | None) -> dict[str, float] | float | None:
    """``--slide-mpp``: one number for every slide, or a CSV of ``slide,mpp`` rows.

    A CSV row's slide may be a path, a file name or a slide id; a header row is allowed.
    """
    if value is None:
        return None
    try:
        mpp = float(value)
    except ValueError:
        pass
    else:
        if not (math.isfinite(mpp) and mpp > 0):
            raise HistoclusterError(
                f"--slide-mpp {value}: must be a positive number of micrometres per pixel"
            )
        return mpp
    path = Path(value)
    if not path.is_file():
        raise HistoclusterError(
            f"{value}: --slide-mpp is neither a number nor an existing CSV file — give e.g. "
            "--slide-mpp 0.25 or a CSV of slide,mpp rows"
        )
    try:
        return _read_slide_mpp_csv(path)
    except UnicodeDecodeError:
        raise HistoclusterError(
            f"{path}: --slide-mpp is not a text CSV (binary content) — give a CSV of slide,mpp rows"
        ) from None


def _read_slide_mpp_csv(path: Path) -> dict[str, float]:
    table: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise HistoclusterError(
                    f"{path}: line {n} has {len(row)} field(s) — each row must be slide,mpp"
                )
            try:
                mpp = float(row[1])
            except ValueError:
                if not table and n == 1:
                    continue  # header
                raise HistoclusterError(
                    f"{path}: line {n}: {row[1]!r} is not a number — each row must be slide,mpp"
                ) from None
            if not (math.isfinite(mpp) and mpp > 0):
                raise HistoclusterError(f"{path}: line {n}: mpp {mpp} must be positive")
            table[slide_id(row[0].strip())] = mpp
    if not table:
        raise HistoclusterError(f"{path}: no slide,mpp rows — give one row per slide")
    return table


def _mpp_for(path: Path, slide_mpp: dict[str, float] | float | None) -> float | None:
    if isinstance(slide_mpp, dict):
        return slide_mpp.get(slide_id(path))
    return slide_mpp


# ----------------------------------------------------------------------------- the run


def _tile_slide(path: Path, tiling: Tiling, slide_mpp: Any) -> TileGrid | str:
    """``path``'s tile grid with its tissue fractions computed, or the one-line error when the
    slide cannot be read (the slide fails, the run goes on)."""
    try:
        with open_slide(path, mpp=_mpp_for(path, slide_mpp)) as slide:
            grid = TileGrid.from_tiling(slide, tiling)
            grid.tissue  # noqa: B018 - read the slide here, so a read error is the slide's
    except HistoclusterError as e:
        return str(e)
    except OSError as e:
        return cli.describe_os_error(e)
    except Exception as e:  # a codec error deep in a reader
        return f"{path}: failed to read ({type(e).__name__}: {one_line(e)}) — the file may be corrupt; re-copy it"
    return grid


def _prepare_slide(store: FeatureStore, path: Path, grid: TileGrid | str) -> str | None:
    """Create (or reuse) the store group of ``path`` tiled as ``grid`` (from :func:`_tile_slide`).

    Returns ``grid`` when it is an error; an ``OSError`` writing the store is raised (the whole
    run stops).
    """
    if isinstance(grid, str):
        return grid
    store.add_slide(slide_id(path), grid).discard_damaged_blocks()  # re-encoded below
    return None


def _open_store(
    out: Path, encoder: EncoderId, tiling: Tiling, overwrite: bool, info: DistInfo
) -> StoreLock | None:
    """Rank 0 locks the store and creates (or checks) it; the others learn whether it said yes.

    Returns the lock rank 0 holds (None on the other ranks); release it when the run ends.
    """

    def lock_and_open() -> StoreLock:
        lock = StoreLock(out).acquire()
        try:
            FeatureStore.create_or_open(out, encoder, tiling, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise
        return lock

    if not info.distributed:
        return lock_and_open()
    error, lock = None, None
    if info.is_main:
        try:
            lock = lock_and_open()
        except HistoclusterError as e:
            error = str(e)
        except OSError as e:
            error = cli.describe_os_error(e)
    error = _torch_half().broadcast(error, info)
    if error:
        raise HistoclusterError(error)
    return lock


def run(
    cfg: ExtractConfig, *, progress: Progress = no_progress, info: DistInfo | None = None
) -> ExtractSummary:
    """Extract features as ``cfg`` says.

    Per-slide problems end up in ``summary.failures``; problems with the whole run raise
    ``HistoclusterError`` (bad flags, encoder, store) or ``OSError`` (a full disk, a file-size
    limit, a read-only store: what was written stays resumable). ``progress("tissue", slides,
    total)`` after each slide prepared, then ``progress("encode", tiles, total)`` after every batch
    (this rank's counts); a ``Cancelled`` it raises stops the run after what was encoded is written.
    """
    t0 = time.perf_counter()
    _validate(cfg)
    if info is None and launched_world_size() > 1:  # torchrun: the ranks split the slides
        info = _torch_half().join_distributed(cfg.device)
    rank, world_size = (info.rank, info.world_size) if info is not None else (0, 1)
    paths = expand_inputs(cfg.slides)
    slide_mpp = parse_slide_mpp(cfg.slide_mpp)
    out = Path(cfg.out)
    tiling = cfg.tiling
    mine = [p for i, p in enumerate(paths) if i % world_size == rank]
    progress("tissue", 0, len(mine))
    # torch imports and the encoder loads in a thread while this one computes the first tissue
    # masks (OpenSlide, Pillow and numpy release the GIL for most of their work).
    given = info
    loading = _Background(lambda: _torch_half().start(cfg, given))
    early: dict[Path, TileGrid | str] = {}
    for path in mine[:_EARLY_SLIDES]:
        if loading.done():
            break
        early[path] = _tile_slide(path, tiling, slide_mpp)
    encoding = loading.result()
    half = _torch_half()  # imported by the loading thread: here only looked up
    info, tile_encoder = encoding.info, encoding.tile_encoder
    device = info.device
    local_world = env_int("LOCAL_WORLD_SIZE", info.world_size)
    workers = auto_workers(local_world) if cfg.workers is None else cfg.workers
    encoder = tile_encoder.encoder
    with _naming_os_errors(out), ExitStack() as held:
        lock = _open_store(out, encoder.identity(), tiling, cfg.overwrite, info)
        if lock is not None:
            held.callback(lock.release)
        store = FeatureStore.open(out, mode="r+")
        if info.is_main:
            cli.write_config(
                cfg.resolved_config_path(),
                cfg,
                encoder=encoder.info(),
                tiling=tiling.to_attrs(),
                precision=tile_encoder.precision,
                device=str(device),
                world_size=info.world_size,
                workers=workers,
            )

        failures = _prepare_slides(store, mine, early, tiling, slide_mpp, info, progress)
        ready = [slide_id(p) for p in paths if str(p) not in failures]
        plan = make_plan(
            store, ready, cfg.batch_size, info.rank, info.world_size, cfg.retry_failed, cfg.reader
        )
        path_of = {slide_id(p): str(p) for p in paths}

        t_enc = time.perf_counter()
        encoded = half.encode_plan(plan, store, tile_encoder, workers, cfg, progress)
        encode_s = time.perf_counter() - t_enc

        # gather and summarise
        for sid, msg in encoded.slide_errors.items():
            failures[path_of[sid]] = msg
        parts = half.gather(
            (encoded.tiles, encode_s, failures, encoded.tile_errors, encoded.notes), info
        )
        half.barrier()
        all_failures: dict[str, str] = {}
        tile_errors: dict[str, str] = {}
        for _, _, f, t, _ in parts:
            all_failures.update(f)
            for sid, msg in t.items():
                tile_errors.setdefault(sid, msg)
        unreadable = _unreadable_tiles(store, ready, path_of, all_failures, tile_errors)
        tiles = sum(p[0] for p in parts)
        encode_s = max(p[1] for p in parts)
        seconds = time.perf_counter() - t0
        summary = ExtractSummary(
            tiles=tiles,
            seconds=round(seconds, 3),
            tiles_per_s=round(tiles / seconds, 3) if seconds > 0 else 0.0,
            encode_seconds=round(encode_s, 3),
            encode_tiles_per_s=round(tiles / encode_s, 3) if encode_s > 0 else 0.0,
            slides=len(paths) - len(all_failures),
            tiles_already_done=plan.already_done,  # counted over all slides on every rank
            tiles_unreadable=sum(int(u["tiles_unreadable"]) for u in unreadable),
            failures=[{"slide": s, "error": m} for s, m in sorted(all_failures.items())]
            + unreadable,
            precision=tile_encoder.precision,
            device=str(device),
            world_size=info.world_size,
            warnings=sorted({note for p in parts for note in p[4]}),
        )
        if info.is_main:
            atomic_write_json(cfg.summary_path(), asdict(summary))
    return summary


def _torch_half() -> ModuleType:
    """:mod:`engine.extract_encode`, imported on first use. It imports torch (about 2 s on a 2-core
    CPU), so it is imported where that overlaps other work: in the encoder-loading thread. The
    one function-local import of an engine module, on purpose: ``import engine.extract`` (and
    ``--help``) stays torch-free.

    Imported before torch, it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose one: the
    reader workers share the cores with the encoder's OpenMP threads, and a thread that spins at
    a barrier while its partner is preempted by a reader keeps the partner off the free core
    (on 2 cores, loop 200-249 -> 221-315 tiles/s in interleaved runs; the encoder alone is the same).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return importlib.import_module("engine.extract_encode")


_EARLY_SLIDES = 2
"""Slides tiled while the encoder loads (their grids wait in memory until the store is open)."""


class _Background:
    """``fn()`` run in a daemon thread (a Ctrl-C never waits for it): ``done()``, ``result()``."""

    def __init__(self, fn: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        """``fn``'s return value, once it is ready; its exception is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _unreadable_tiles(
    store: FeatureStore,
    slide_ids: Sequence[str],
    path_of: dict[str, str],
    slide_failures: dict[str, str],
    tile_errors: dict[str, str],
) -> list[dict[str, Any]]:
    """One failure entry per slide with tiles recorded as unreadable (this run or an earlier one)."""
    out = []
    for sid in slide_ids:
        path = path_of[sid]
        if path in slide_failures:
            continue
        sf = store.slide(sid)
        n = sf.n_failed()
        if n == 0:
            continue
        first = tile_errors.get(sid, "recorded by an earlier run")
        out.append(
            {
                "slide": path,
                "error": f"{path}: {n} of {int(sf.selected.sum())} tissue tiles unreadable, "
                f"{sf.n_encoded()} encoded (first: {first}) — they are recorded as failed in the "
                "store; re-copy the file, then rerun with --retry-failed",
                "tiles_unreadable": n,
                "tiles_encoded": sf.n_encoded(),
            }
        )
    return out


@contextmanager
def _naming_os_errors(path: Path) -> Iterator[None]:
    """An ``OSError`` without a file name (zarr's chunk writes) gets ``path`` (the store) as its file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or one_line(e), str(path)) from e
        raise


def _prepare_slides(
    store: FeatureStore,
    mine: list[Path],
    early: dict[Path, TileGrid | str],
    tiling: Tiling,
    slide_mpp: dict[str, float] | float | None,
    info: DistInfo,
    progress: Progress,
) -> dict[str, str]:
    """Tile this rank's slides (``early``: those tiled already) and add them to the store (the
    ranks take the slides round-robin: tissue masks are the slow part); returns {path: error}
    of the slides that could not be opened, from every rank."""
    failures: dict[str, str] = {}
    for n, path in enumerate(mine, start=1):
        grid = early.pop(path) if path in early else _tile_slide(path, tiling, slide_mpp)
        error = _prepare_slide(store, path, grid)
        if error is not None:
            failures[str(path)] = error
        progress("tissue", n, len(mine))
    for part in _torch_half().gather(failures, info):
        failures.update(part)
    _torch_half().barrier()
    return failures


def _validate(cfg: ExtractConfig) -> None:
    checks = [
        (cfg.tile_px > 0, f"--tile-px {cfg.tile_px}: must be a positive number of pixels"),
        (
            cfg.mpp > 0 and math.isfinite(cfg.mpp),
            f"--mpp {cfg.mpp}: must be positive micrometres per pixel",
        ),
        (
            cfg.stride_px is None or cfg.stride_px > 0,
            f"--stride-px {cfg.stride_px}: must be positive",
        ),
        (0.0 <= cfg.min_tissue <= 1.0, f"--min-tissue {cfg.min_tissue}: must lie in [0, 1]"),
        (
            cfg.tissue in TISSUE_METHODS,
            f"--tissue {cfg.tissue}: choose one of {', '.join(TISSUE_METHODS)}",
        ),
        (cfg.batch_size > 0, f"--batch-size {cfg.batch_size}: must be positive"),
        (cfg.workers is None or cfg.workers >= 0, f"--workers {cfg.workers}: must be 0 or more"),
        (
            cfg.device in DEVICES or cfg.device.startswith("cuda:"),
            f"--device {cfg.device}: choose one of {', '.join(DEVICES)}",
        ),
        (
            cfg.precision in PRECISIONS,
            f"--precision {cfg.precision}: choose one of {', '.join(PRECISIONS)}",
        ),
        (bool(cfg.slides), "no slides given — pass slide files or directories"),
    ]
    for ok, message in checks:
        if not ok:
            raise HistoclusterError(message)


# ----------------------------------------------------------------------------- command line

_PROG = "python -m engine.extract"
_DESCRIPTION = (
    "Encode the tissue tiles of whole-slide images into a zarr feature store "
    "(resumable; run under torchrun to split the tiles over processes / GPUs)."
)


def report(cfg: ExtractConfig, summary: ExtractSummary) -> str:
    """The one summary line printed after a run."""
    whole = [f for f in summary.failures if "tiles_unreadable" not in f]
    partial = [f for f in summary.failures if "tiles_unreadable" in f]
    failed = (
        f"; {len(whole)} failed: " + ", ".join(Path(f["slide"]).name for f in whole)
        if whole
        else ""
    )
    if partial:
        failed += f"; {summary.tiles_unreadable} tiles unreadable in " + ", ".join(
            f"{Path(f['slide']).name} ({f['tiles_unreadable']})" for f in partial
        )
    return (
        f"extracted {summary.tiles} tiles ({summary.tiles_already_done} already done) from "
        f"{summary.slides} slide(s) in {summary.seconds:.1f} s ({summary.tiles_per_s:.1f} tiles/s, "
        f"{summary.precision} on {summary.device}){failed} -> {cfg.out}"
    )


def build_parser() -> Any:
    """The command's ``argparse`` parser (generated from :class:`ExtractConfig`)."""
    return cli.build_parser(ExtractConfig, prog=_PROG, description=_DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some slides failed, 2 bad input, 130 interrupted)."""
    return cli.main(ExtractConfig, run, argv, prog=_PROG, description=_DESCRIPTION, report=report)


if __name__ == "__main__":
    sys.exit(main())
