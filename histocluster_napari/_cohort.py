"""A cohort as the widget lists it: its slides, with tissue tiles, encoded tiles and status (no Qt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import HistoclusterError
from engine.slide import find_slides, slide_id
from engine.store import FeatureStore


@dataclass(frozen=True)
class SlideRow:
    """One slide of the cohort: ``tissue`` tiles selected for encoding and ``encoded`` ones (None: not tiled yet)."""

    path: Path
    slide_id: str
    tissue: int | None
    encoded: int | None
    unreadable: int = 0

    @property
    def status(self) -> str:
        if self.tissue is None:
            return "not extracted" if self.path.exists() else "file missing"
        bad = f", {self.unreadable} unreadable" if self.unreadable else ""
        if self.encoded == self.tissue - self.unreadable:
            return f"encoded{bad}"
        return f"{self.encoded} / {self.tissue} encoded{bad}"


def folder_slides(folder: Path) -> list[Path]:
    """The slide files directly inside ``folder`` (``engine.slide.find_slides``); an error when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HistoclusterError(f"{folder}: not a folder — choose a folder of slides")
    slides = find_slides(folder)
    if not slides:
        raise HistoclusterError(
            f"{folder}: no slide files in it — choose a folder holding .svs/.tiff/... slides"
        )
    return slides


def store_slides(store_path: Path) -> list[Path]:
    """The slide files a feature store was made from (where they were when extracted)."""
    store = FeatureStore.open(store_path)
    return [Path(store.slide(s).source_path) for s in store.slide_ids()]


def cohort_rows(store_path: Path | None, slides: Sequence[Path]) -> list[SlideRow]:
    """Each slide's tissue and encoded tile counts in the store at ``store_path`` (if it exists)."""
    store = None
    if store_path is not None and (Path(store_path) / "zarr.json").is_file():
        try:
            store = FeatureStore.open(store_path)
        except HistoclusterError:
            store = None
    rows = []
    for path in slides:
        sid = slide_id(path)
        if store is not None and sid in store:
            sf = store.slide(sid)
            selected = sf.selected
            rows.append(
                SlideRow(
                    Path(path),
                    sid,
                    int(selected.sum()),
                    int((selected & sf.done).sum()),
                    sf.n_failed(),
                )
            )
        else:
            rows.append(SlideRow(Path(path), sid, None, None))
    return rows
