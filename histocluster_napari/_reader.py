"""npe2 reader: whole-slide images (``_slide_layers``) and feature stores (``_store_layers``).

Files that cannot be read give ``None``, so napari can try another reader. The file patterns of
``napari.yaml`` are ``engine.slide.SLIDE_SUFFIXES`` and ``*.zarr`` (a test keeps them equal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from engine.slide import is_slide_file
from histocluster_napari._slide_layers import LayerData, open_for_viewing, slide_layer_data
from histocluster_napari._store_layers import store_reader

ReaderFunction = Callable[[str | Sequence[str]], list[LayerData]]


def napari_get_reader(path: str | Sequence[str]) -> ReaderFunction | None:
    """npe2 reader hook: a reader for whole-slide files and feature stores, or None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        return None
    try:
        readers = [_reader_for(Path(p)) for p in paths]
    except Exception:  # a reader hook must never raise
        return None
    if any(r is None for r in readers):
        return None

    def read(_path: str | Sequence[str]) -> list[LayerData]:
        layers: list[LayerData] = []
        for r in readers:
            layers.extend(r())  # type: ignore[misc]
        return layers

    return read


def _reader_for(path: Path) -> Callable[[], list[LayerData]] | None:
    if path.suffix.lower() == ".zarr":
        return store_reader(path)
    if not is_slide_file(path) or not path.exists():
        return None
    slide, mpp_known = open_for_viewing(path)
    if slide is None:
        return None
    return lambda: [slide_layer_data(slide, mpp_known=mpp_known)]
