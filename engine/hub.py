"""Downloads of registry weights: release URLs through urllib, Hugging Face repositories through
``huggingface_hub``. Every failure is one line naming the source and how to pass a local file.

Both write atomically (a ``.part`` file renamed into place, or huggingface_hub's own temporary
file) into the place :func:`engine.encoders.weights_path` names, and report bytes through the
progress protocol (stage ``download <file>``).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from engine.encoders import EncoderEntry, weights_path
from engine.errors import CheckpointError, HistoclusterError, one_line
from engine.files import CACHE_ENV
from engine.progress import Progress, Throttle, no_progress

__all__ = ["download", "download_url", "offline_hint"]

_BLOCK = 1 << 20


def offline_hint(e: EncoderEntry) -> str:
    """How to use the entry without this machine downloading it."""
    where = f"https://huggingface.co/{e.hub_id}" if e.hub_id else (e.url or "its source")
    return (
        f"download {e.filename} from {where} on a machine with internet, then pass "
        f"--encoder {e.name}:/path/to/{e.filename}"
    )


def download_url(
    url: str,
    dest: Path,
    *,
    timeout_s: float = 30.0,
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed when complete); keep an existing file
    unless ``force``. Raises :class:`HistoclusterError` (one line) when offline or not writable."""
    if dest.is_file() and not force:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HistoclusterError(
            f"{dest.parent}: cannot create the cache directory ({e.strerror or e}) — pass "
            f"--cache-dir DIR or set {CACHE_ENV} to a writable directory"
        ) from e
    part = dest.with_name(dest.name + ".part")
    stage = f"download {dest.name}"
    request = urllib.request.Request(url, headers={"User-Agent": "histocluster"})
    report = Throttle(progress, 0.5)
    try:
        # A fresh opener per call: proxies are read from the environment now, not at first use.
        with urllib.request.build_opener().open(request, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0)
            try:
                out = open(part, "wb")
            except OSError as e:
                raise HistoclusterError(
                    f"{part}: cannot write ({e.strerror or e}) — pass --cache-dir DIR or set "
                    f"{CACHE_ENV} to a writable directory"
                ) from e
            done = 0
            with out:
                report(stage, 0, total)
                for block in iter(lambda: response.read(_BLOCK), b""):
                    out.write(block)
                    done += len(block)
                    report(stage, done, max(total, done))
        if total and part.stat().st_size != total:
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


def _download_hub(e: EncoderEntry, dest: Path, force: bool, progress: Progress) -> Path:
    """``hf_hub_download`` of the entry's file into ``dest.parent`` (a plain folder, not the HF cache)."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    assert e.hub_id and e.filename
    stage = f"download {e.filename}"
    progress(stage, 0, 1)
    try:
        got = huggingface_hub.hf_hub_download(
            e.hub_id, e.filename, local_dir=dest.parent, force_download=force
        )
    except hf_errors.GatedRepoError as err:
        raise CheckpointError(
            f"{e.name}: hf:{e.hub_id} is gated — accept its licence at "
            f"https://huggingface.co/{e.hub_id} and log in (`hf auth login`, or set HF_TOKEN to "
            f"your token), or {offline_hint(e)}"
        ) from err
    except hf_errors.RepositoryNotFoundError as err:
        raise CheckpointError(
            f"{e.name}: hf:{e.hub_id} not found or not visible with your token (gated models need "
            f"HF_TOKEN / `hf auth login`) — or {offline_hint(e)}"
        ) from err
    except hf_errors.EntryNotFoundError as err:
        raise CheckpointError(
            f"{e.name}: hf:{e.hub_id} has no file {e.filename} — pass a local copy: "
            f"{offline_hint(e)}"
        ) from err
    except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as err:
        raise CheckpointError(
            f"{e.name}: cannot download hf:{e.hub_id}/{e.filename} ({one_line(err)[:160]}) — "
            f"check the internet connection, or {offline_hint(e)}"
        ) from err
    progress(stage, 1, 1)
    return Path(got)


def download(
    e: EncoderEntry,
    cache: str | Path | None = None,
    *,
    timeout_s: float = 30.0,
    force: bool = False,
    progress: Progress = no_progress,
) -> Path:
    """Fetch the entry's weights into :func:`weights_path` (kept when there unless ``force``)."""
    dest = weights_path(e, cache)
    if dest is None:
        raise CheckpointError(f"{e.name}: has no weights to download ({e.source})")
    if dest.is_file() and not force:
        return dest
    if e.hub_id:
        return _download_hub(e, dest, force, progress)
    assert e.url
    return download_url(e.url, dest, timeout_s=timeout_s, force=force, progress=progress)
