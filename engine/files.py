"""Files: atomic writes, content hashes (computed once per file content), the cache directory.

Atomic writes go to a temporary file in the same directory and are renamed over the target, so
a reader (or a rerun after a kill) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "CACHE_ENV",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "sha256_file",
]

CACHE_ENV = "HISTOCLUSTER_CACHE"
_HASH_BLOCK = 1 << 20
_sha_cache: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """``$HISTOCLUSTER_CACHE``, else ``$XDG_CACHE_HOME/histocluster``, else ``~/.cache/histocluster``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "histocluster"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (Paths and other objects as ``str``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, computed once per (resolved path, size, mtime) in this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    cached = _sha_cache.get(key)
    if cached is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                digest.update(block)
        cached = _sha_cache[key] = digest.hexdigest()
    return cached
