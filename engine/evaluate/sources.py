"""Where a dataset's pixels come from: image files on disk or rows of HDF5 arrays.

Both sources read one sample as ``(H, W, 3)`` uint8 RGB, can be subset by index, and give a
fingerprint (paths, sizes, modification times) that keys the feature cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.evaluate.images import read_rgb

__all__ = ["FileImages", "H5Images", "ImageSource"]


def _stat_token(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


@dataclass
class FileImages:
    """Image files, one sample each."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` -> ``(H, W, 3)`` uint8."""
        return read_rgb(self.paths[i])

    def name(self, i: int) -> str:
        """A human-readable name for sample ``i`` (its path)."""
        return str(self.paths[i])

    def select(self, idx: Sequence[int] | np.ndarray) -> FileImages:
        """The samples at ``idx``, in that order."""
        return FileImages([self.paths[int(i)] for i in idx])

    def fingerprint(self) -> str:
        """sha256 over (path, size, mtime) of every file, in order."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(_stat_token(p).encode())
            h.update(b"\n")
        return h.hexdigest()


@dataclass
class H5Images:
    """Rows of ``(N, H, W, 3)`` uint8 HDF5 datasets, possibly spread over several files.

    Sample ``i`` is row ``rows[i]`` of dataset ``key`` in ``files[file_index[i]]``. Files are
    opened lazily once per process, so the object can be handed to DataLoader workers.
    """

    files: list[Path]
    key: str
    file_index: np.ndarray  # (N,) int
    rows: np.ndarray  # (N,) int
    _handles: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _dataset(self, f: int):
        import h5py

        token = (os.getpid(), f)
        if token not in self._handles:
            self._handles[token] = h5py.File(self.files[f], "r")
        return self._handles[token][self.key]

    def read(self, i: int) -> np.ndarray:
        """Sample ``i`` -> ``(H, W, 3)`` uint8."""
        arr = np.asarray(self._dataset(int(self.file_index[i]))[int(self.rows[i])])
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return arr.astype(np.uint8, copy=False)

    def name(self, i: int) -> str:
        """``file[key][row]`` for sample ``i``."""
        return f"{self.files[int(self.file_index[i])]}[{self.key}][{int(self.rows[i])}]"

    def select(self, idx: Sequence[int] | np.ndarray) -> H5Images:
        """The samples at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return H5Images(self.files, self.key, self.file_index[idx], self.rows[idx])

    def fingerprint(self) -> str:
        """sha256 over the files' (path, size, mtime) and the selected rows."""
        h = hashlib.sha256()
        for p in self.files:
            h.update(_stat_token(p).encode())
        h.update(self.key.encode())
        h.update(np.ascontiguousarray(self.file_index, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.rows, dtype=np.int64).tobytes())
        return h.hexdigest()


ImageSource = FileImages | H5Images
