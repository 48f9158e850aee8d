"""``python -m engine.fetch_weights``: download the paper's released ResNet-18 into a cache directory.

The file is ``pytorchnative_tenpercent_resnet18.ckpt`` from the GitHub release ``nativetenpercent``
of ozanciga/self-supervised-histopathology (Ciga, Xu and Martel). The cache directory is
``--cache-dir``, else ``$HISTOCLUSTER_CACHE``, else ``~/.cache/histocluster``. Once downloaded, the
encoder spec ``ciga-resnet18`` (or the printed path) loads it with ``engine.models.load_encoder``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from engine.errors import CheckpointError, HistoclusterError

RELEASE_URL = (
    "https://github.com/ozanciga/self-supervised-histopathology/releases/download/"
    "nativetenpercent/pytorchnative_tenpercent_resnet18.ckpt"
)
FILENAME = "pytorchnative_tenpercent_resnet18.ckpt"
CACHE_ENV = "HISTOCLUSTER_CACHE"


@dataclass
class FetchConfig:
    """Resolved configuration of one ``engine.fetch_weights`` run (written beside the file as JSON)."""

    cache_dir: Path
    url: str = RELEASE_URL
    timeout_s: float = 30.0
    force: bool = False
    verify: bool = True
    quiet: bool = False


def default_cache_dir() -> Path:
    """``$HISTOCLUSTER_CACHE`` when set, else ``~/.cache/histocluster``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "histocluster"


def cached_weights_path(cache_dir: str | Path | None = None) -> Path:
    """Where the released checkpoint lives (or will live) in ``cache_dir`` (default: :func:`default_cache_dir`)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / FILENAME


def fetch_weights(
    url: str = RELEASE_URL,
    cache_dir: str | Path | None = None,
    *,
    timeout_s: float = 30.0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Download ``url`` into ``cache_dir`` (atomically, via a ``.part`` file) and return its path.

    An existing file is kept unless ``force``. Raises :class:`HistoclusterError` with a one-line
    message when the network is unreachable or the cache directory is not writable.
    """
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    dest = cache / (Path(urllib.parse.urlparse(url).path).name or FILENAME)
    if dest.is_file() and not force:
        return dest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoclusterError(
            f"{cache}: cannot create the cache directory ({e.strerror or e}) — pass --cache-dir DIR "
            f"or set {CACHE_ENV} to a writable directory"
        ) from e
    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "histocluster"})
    try:
        # A fresh opener per call: proxies are read from the environment now, not at first use.
        with urllib.request.build_opener().open(request, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            try:
                out = open(part, "wb")
            except OSError as e:
                raise HistoclusterError(
                    f"{part}: cannot write ({e.strerror or e}) — pass --cache-dir DIR or set "
                    f"{CACHE_ENV} to a writable directory"
                ) from e
            with (
                out,
                tqdm(
                    total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
                ) as bar,
            ):
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        if total is not None and part.stat().st_size != total:
            raise HistoclusterError(
                f"{url}: download ended after {part.stat().st_size} of {total} bytes — run again"
            )
        os.replace(part, dest)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise HistoclusterError(
            f"{url}: cannot download ({' '.join(str(reason).split())}) — check the internet "
            f"connection, or download it on a machine with internet and copy it to {dest}"
        ) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv: list[str] | None = None) -> FetchConfig:
    """Build a :class:`FetchConfig` from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.fetch_weights",
        description=(
            "Download the released SimCLR ResNet-18 of Ciga, Xu and Martel "
            f"({FILENAME}) into a cache directory; then use --encoder ciga-resnet18."
        ),
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"directory to download into (default: ${CACHE_ENV}, else ~/.cache/histocluster)",
    )
    parser.add_argument(
        "--url", default=RELEASE_URL, help="URL to download (default: the paper's GitHub release)"
    )
    parser.add_argument(
        "--timeout",
        dest="timeout_s",
        metavar="SECONDS",
        type=float,
        default=30.0,
        help="seconds to wait for the server before giving up (default: 30)",
    )
    parser.add_argument(
        "--force", action="store_true", help="download again even when the file is already cached"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking that the file loads as an encoder (weights-only) after downloading",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    ns = parser.parse_args(argv)
    cache_dir = (ns.cache_dir or default_cache_dir()).expanduser()
    return FetchConfig(cache_dir, ns.url, ns.timeout_s, ns.force, ns.verify, ns.quiet)


def _verify(path: Path) -> str:
    """One line saying how the file loads; raises CheckpointError when it is not an encoder at all."""
    from engine.models import load_encoder

    try:
        encoder = load_encoder(path)
    except CheckpointError as e:
        if "--trust-checkpoint" in str(e) and "needs pickle" in str(e):
            return "it needs pickle: load it with --trust-checkpoint (only if you trust its source)"
        raise
    return f"loads as a {encoder.arch} encoder ({encoder.dim}-d features, {encoder.input_px} px)"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success, 1 with a one-line error on stderr)."""
    cfg = parse_args(argv)
    cached = cfg.cache_dir / (Path(urllib.parse.urlparse(cfg.url).path).name or FILENAME)
    was_cached = cached.is_file() and not cfg.force
    try:
        path = fetch_weights(
            cfg.url,
            cfg.cache_dir,
            timeout_s=cfg.timeout_s,
            force=cfg.force,
            progress=not cfg.quiet and sys.stderr.isatty(),
        )
        sha = sha256_of(path)
        record = {
            **asdict(cfg),
            "cache_dir": str(cfg.cache_dir),
            "path": str(path),
            "sha256": sha,
            "bytes": path.stat().st_size,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        record_path = path.with_name(path.name + ".json")
        try:
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        except OSError as e:
            raise HistoclusterError(
                f"{record_path}: cannot write ({e.strerror or e}) — pass --cache-dir DIR"
            ) from e
        note = _verify(path) if cfg.verify else "not verified (--no-verify)"
    except HistoclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not cfg.quiet:
        status = "already cached (use --force to download again)" if was_cached else "downloaded"
        print(f"{path}: {status}\n  sha256 {sha}\n  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
