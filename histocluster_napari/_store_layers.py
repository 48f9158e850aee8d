"""Layers of a feature store: its slides (when their files are found) and the latest cluster run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_info, show_warning

from engine.errors import HistoclusterError
from engine.store import FeatureStore
from histocluster_napari._overlay import GridGeometry, cluster_colors, label_image, labels_colormap
from histocluster_napari._slide_layers import LayerData, open_for_viewing, slide_layer_data

CLUSTERS_SUFFIX = " clusters"
"""A slide layer named ``s`` gets its cluster overlay in a labels layer named ``s + CLUSTERS_SUFFIX``."""


def clusters_layer_data(
    labels: np.ndarray,
    geometry: GridGeometry,
    name: str,
    offset_yx: tuple[float, float] = (0.0, 0.0),
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """A labels LayerDataTuple of cluster ids (rows, cols), -1 outside tissue, on the tile grid."""
    k = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    ty, tx = geometry.translate
    kwargs = {
        "name": name,
        "scale": geometry.scale,
        "translate": (ty + offset_yx[0], tx + offset_yx[1]),
        "opacity": 0.6,
        "colormap": labels_colormap(cluster_colors(k)),
        "metadata": {"histocluster": metadata or {}},
    }
    return label_image(labels, k), kwargs, "labels"


def store_reader(path: Path) -> Callable[[], list[LayerData]] | None:
    """A reader for a ``features.zarr`` store, or None when ``path`` is not one.

    It shows one slide (the first) with its labels in the latest cluster run: a cohort is
    browsed one slide at a time in the HistoCluster widget (Open store), never stacked.
    """
    try:
        store = FeatureStore.open(path)
        slide_ids = store.slide_ids()
    except (HistoclusterError, OSError, KeyError, ValueError):
        return None
    if not slide_ids:
        return None

    def read() -> list[LayerData]:
        run = store.latest_cluster_run()
        sid = slide_ids[0]
        if run is not None:
            run_slides = store.read_cluster_run(run, []).attrs.get("slides", [])
            sid = next((s for s in slide_ids if s in run_slides), sid)
        if len(slide_ids) > 1:
            show_info(
                f"{path}: showing slide {sid!r} of {len(slide_ids)} — open the store with the "
                "HistoCluster widget's 'Open store…' to go through the others"
            )
        attrs = store.slide(sid).attrs
        source = Path(attrs["source_path"])
        slide, _ = open_for_viewing(source, mpp=tuple(attrs["mpp"]))  # type: ignore[arg-type]
        layers: list[LayerData] = []
        if slide is None:
            show_warning(
                f"{source}: slide {sid!r} of {path} not found or unreadable — showing its "
                "clusters only; put the slide back at that path to see it"
            )
        else:
            layers.append(slide_layer_data(slide, name=sid))
        if run is not None and sid in store.read_cluster_run(run, []).attrs.get("slides", []):
            labels = store.read_cluster_labels(run, sid)
            meta = {"store": str(path), "run": run, "slide_id": sid}
            layers.append(
                clusters_layer_data(
                    labels,
                    GridGeometry.from_store_attrs(attrs),
                    sid + CLUSTERS_SUFFIX,
                    metadata=meta,
                )
            )
        return layers

    return read
