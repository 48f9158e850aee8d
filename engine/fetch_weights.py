"""``python -m engine.fetch_weights [NAME]``: download a registry encoder's weights into the cache.

Without NAME it fetches the paper's released ResNet-18 (``ciga-resnet18``:
``pytorchnative_tenpercent_resnet18.ckpt`` from the GitHub release ``nativetenpercent`` of
ozanciga/self-supervised-histopathology, Ciga, Xu and Martel). ``--list`` prints the registry
(name, dim, input px, um/px, licence, cached or not). The cache directory is ``--cache-dir``, else
:func:`engine.files.cache_dir` (``$HISTOCLUSTER_CACHE``, ``$XDG_CACHE_HOME/histocluster``,
``~/.cache/histocluster``). Once fetched, ``--encoder NAME`` loads it; offline, pass a copy made
elsewhere as ``--encoder NAME:/path/to/file``.
"""

from __future__ import annotations

import sys
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine import cli, hub
from engine.encoders import CIGA, CIGA_URL, REGISTRY, EncoderEntry, registry_names, weights_path
from engine.errors import CheckpointError, HistoclusterError
from engine.files import atomic_write_json, cache_dir, sha256_file
from engine.models import load_encoder
from engine.progress import Progress, no_progress

__all__ = [
    "FILENAME",
    "RELEASE_URL",
    "FetchConfig",
    "FetchResult",
    "cached_weights_path",
    "default_cache_dir",
    "fetch_weights",
    "list_registry",
    "main",
    "run",
]

RELEASE_URL = CIGA_URL
FILENAME = CIGA.filename or "pytorchnative_tenpercent_resnet18.ckpt"


def default_cache_dir() -> Path:
    """:func:`engine.files.cache_dir` (kept as the historical name)."""
    return cache_dir()


def cached_weights_path(cache: str | Path | None = None) -> Path:
    """Where the paper's released checkpoint lives (or will live) in ``cache``."""
    path = weights_path(CIGA, cache)
    assert path is not None
    return path


@dataclass(frozen=True)
class FetchConfig:
    """One ``engine.fetch_weights`` run."""

    name: str | None = cli.option(
        None,
        positional=True,
        help=f"registry encoder to fetch (default: {CIGA.name}); --list shows them all",
    )
    cache_dir: str | None = cli.option(
        None,
        help="directory to download into (default: $HISTOCLUSTER_CACHE, else "
        "$XDG_CACHE_HOME/histocluster, else ~/.cache/histocluster)",
        metavar="CACHE_DIR",
    )
    url: str | None = cli.option(
        None,
        help="URL to download instead of the entry's release (default: the paper's GitHub release)",
    )
    timeout_s: float = cli.option(
        30.0,
        flag="--timeout",
        metavar="SECONDS",
        help="seconds to wait for the server before giving up",
    )
    force: bool = cli.option(False, help="download again even when the file is already cached")
    no_verify: bool = cli.option(
        False,
        help="skip checking that the file loads as an encoder (weights-only) after downloading",
    )
    list_only: bool = cli.option(
        False,
        flag="--list",
        help="print the registry (name, dim, input, um/px, licence, cached) and exit",
    )
    quiet: bool = cli.option(False, help="no progress bar and no summary")

    def cache(self) -> Path:
        """The resolved cache directory."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_dir()

    def entry(self) -> EncoderEntry:
        """The registry entry to fetch; CheckpointError naming the choices when unknown."""
        name = (self.name or CIGA.name).strip().lower()
        e = REGISTRY.get(name)
        if e is None:
            raise CheckpointError(
                f"{self.name}: not a registry encoder — choose one of: {', '.join(registry_names())}"
            )
        if not e.downloadable:
            raise CheckpointError(f"{e.name}: nothing to download ({e.source})")
        return e


@dataclass(frozen=True)
class FetchResult:
    """What a run fetched (``path`` None for ``--list``)."""

    path: Path | None
    sha256: str | None
    was_cached: bool
    note: str
    listing: str = ""


def fetch_weights(
    url: str = RELEASE_URL,
    cache: str | Path | None = None,
    *,
    timeout_s: float = 30.0,
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Download ``url`` into ``cache`` (atomically, via a ``.part`` file) and return its path."""
    root = Path(cache).expanduser() if cache else cache_dir()
    dest = root / (Path(urllib.parse.urlparse(url).path).name or FILENAME)
    return hub.download_url(url, dest, timeout_s=timeout_s, force=force, progress=progress)


def list_registry(cache: str | Path | None = None) -> str:
    """The registry as an aligned table: name, dim, input px, um/px, licence, cached?"""
    rows = [("name", "dim", "input", "um/px", "licence", "weights")]
    for e in REGISTRY.values():
        path = weights_path(e, cache)
        if path is None:
            state = e.source
        else:
            state = "cached" if path.is_file() else ("gated, " if e.gated else "") + "not cached"
        mpp = f"{e.mpp:g}" if e.mpp else "-"
        rows.append((e.name, str(e.dim), f"{e.input_px}px", mpp, e.licence, state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _verify(path: Path, e: EncoderEntry) -> str:
    """One line saying how the file loads; raises CheckpointError when it is not that encoder."""
    spec = f"{e.name}:{path}"
    try:
        encoder = load_encoder(spec)
    except CheckpointError as err:
        if "--trust-checkpoint" in str(err) and "needs pickle" in str(err):
            return "it needs pickle: load it with --trust-checkpoint (only if you trust its source)"
        raise
    return f"loads as a {encoder.arch} encoder ({encoder.dim}-d features, {encoder.input_px} px)"


def run(cfg: FetchConfig, *, progress: Progress = no_progress) -> FetchResult:
    """Fetch ``cfg.entry()`` (or list the registry) and record it beside the file as JSON."""
    if cfg.list_only:
        return FetchResult(None, None, False, "", list_registry(cfg.cache_dir))
    e = cfg.entry()
    cache = cfg.cache()
    if cfg.url:
        dest = cache / (Path(urllib.parse.urlparse(cfg.url).path).name or e.filename or FILENAME)
    else:
        found = weights_path(e, cache)
        assert found is not None
        dest = found
    was_cached = dest.is_file() and not cfg.force
    if cfg.url:
        path = hub.download_url(
            cfg.url, dest, timeout_s=cfg.timeout_s, force=cfg.force, progress=progress
        )
    else:
        path = hub.download(e, cache, timeout_s=cfg.timeout_s, force=cfg.force, progress=progress)
    sha = sha256_file(path)
    record_path = path.with_name(path.name + ".json")
    try:
        atomic_write_json(
            record_path,
            {
                "name": e.name,
                "source": cfg.url or e.source,
                "url": cfg.url or e.url,
                "hub_id": e.hub_id,
                "cache_dir": str(cache),
                "path": str(path),
                "sha256": sha,
                "bytes": path.stat().st_size,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    except OSError as err:
        raise HistoclusterError(
            f"{record_path}: cannot write ({err.strerror or err}) — pass --cache-dir DIR"
        ) from err
    if e.sha256 and sha != e.sha256:
        raise CheckpointError(
            f"{path}: sha256 {sha[:12]}… differs from the published {e.sha256[:12]}… — delete it "
            "and run again (--force)"
        )
    note = "not verified (--no-verify)" if cfg.no_verify else _verify(path, e)
    return FetchResult(path, sha, was_cached, note)


def _report(cfg: FetchConfig, result: FetchResult) -> str:
    if result.path is None:
        return result.listing
    status = "already cached (use --force to download again)" if result.was_cached else "downloaded"
    return f"{result.path}: {status}\n  sha256 {result.sha256}\n  {result.note}"


_DESCRIPTION = (
    "Download a registry encoder's weights (default: the released SimCLR ResNet-18 of Ciga, Xu "
    f"and Martel, {FILENAME}) into a cache directory; then use --encoder NAME."
)
_EPILOG = (
    "Offline or for a gated model without a token: download the file elsewhere and pass "
    "--encoder NAME:/path/to/file."
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit status of :func:`engine.cli.main` (2 with a one-line error)."""
    return cli.main(FetchConfig, run, argv, description=_DESCRIPTION, epilog=_EPILOG,
                    report=_report, report_stream="stdout")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
