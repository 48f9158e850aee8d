"""Tiles -> GeoJSON regions that QuPath opens as classified annotations.

Tiles are axis-aligned boxes in level-0 pixels, ``(x0, y0, x1, y1)`` with integer corners (the
exporter snaps each tile's extent to whole pixels so that neighbours share their edges exactly).
The boxes of one class are merged (``shapely.union_all``) into one MultiPolygon, so adjacent
tiles become one region with holes where tiles are missing. One FeatureCollection per slide;
each Feature has QuPath's annotation properties::

    {"objectType": "annotation", "classification": {"name": "ink", "color": [r, g, b]}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.files import atomic_write_text


def merge_row_runs(boxes: np.ndarray) -> np.ndarray:
    """Join boxes that share a row band (same y0, y1) and touch or overlap along x.

    Args:
        boxes: (n, 4) numbers (x0, y0, x1, y1).
    Returns:
        (m, 4) float64 boxes covering exactly the same area, m <= n (fewer shapes to union).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    order = np.lexsort((boxes[:, 0], boxes[:, 3], boxes[:, 1]))
    b = boxes[order]
    out: list[list[float]] = []
    for x0, y0, x1, y1 in b:
        if out and out[-1][1] == y0 and out[-1][3] == y1 and x0 <= out[-1][2]:
            out[-1][2] = max(out[-1][2], x1)
        else:
            out.append([x0, y0, x1, y1])
    return np.asarray(out, dtype=np.float64)


def boxes_to_multipolygon(boxes: np.ndarray) -> Any:
    """(n, 4) level-0 boxes (x0, y0, x1, y1) -> their union as a ``shapely.MultiPolygon``.

    An empty input gives an empty MultiPolygon. Corners that are integers stay exact.
    """
    import shapely

    merged = merge_row_runs(boxes)
    if len(merged) == 0:
        return shapely.MultiPolygon()
    union = shapely.union_all(shapely.box(merged[:, 0], merged[:, 1], merged[:, 2], merged[:, 3]))
    union = shapely.normalize(shapely.simplify(union, 0.0))  # drop collinear vertices only
    if isinstance(union, shapely.Polygon):
        return shapely.MultiPolygon([union])
    if isinstance(union, shapely.MultiPolygon):
        return union
    polys = [g for g in shapely.get_parts(union) if isinstance(g, shapely.Polygon)]
    return shapely.MultiPolygon(polys)


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _coords(multipolygon: Any) -> list:
    """GeoJSON MultiPolygon coordinates: [[exterior, hole, ...], ...] of [x, y] pairs."""
    out = []
    for poly in multipolygon.geoms:
        rings = [poly.exterior, *poly.interiors]
        out.append([[[_number(x), _number(y)] for x, y in ring.coords] for ring in rings])
    return out


def class_feature(
    name: str, color: Sequence[int], boxes: np.ndarray, extra: Mapping[str, Any] | None = None
) -> dict:
    """One GeoJSON Feature: the union of ``boxes`` as a MultiPolygon, classified ``name`` for QuPath.

    Args:
        name: class name (QuPath classification name).
        color: (r, g, b) 0-255.
        boxes: (n, 4) level-0 (x0, y0, x1, y1).
        extra: more properties (e.g. the number of tiles).
    """
    geometry = {"type": "MultiPolygon", "coordinates": _coords(boxes_to_multipolygon(boxes))}
    props = {
        "objectType": "annotation",
        "name": name,
        "classification": {"name": name, "color": [int(c) for c in color]},
        "isLocked": False,
        **(dict(extra) if extra else {}),
    }
    return {"type": "Feature", "geometry": geometry, "properties": props}


def feature_collection(classes: Mapping[str, tuple[Sequence[int], np.ndarray]]) -> dict:
    """A FeatureCollection with one MultiPolygon Feature per class.

    Args:
        classes: {class name: ((r, g, b), boxes (n, 4) level-0 x0, y0, x1, y1)}, in output order.
    """
    features = [
        class_feature(name, color, boxes, {"tiles": int(len(boxes))})
        for name, (color, boxes) in classes.items()
        if len(boxes)
    ]
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, collection: Mapping[str, Any]) -> None:
    """Write ``collection`` as JSON atomically (a temporary file renamed over ``path``)."""
    atomic_write_text(path, json.dumps(collection, separators=(",", ":")) + "\n")


def read_multipolygons(path: str | Path) -> dict[str, Any]:
    """{class name: shapely MultiPolygon} of a GeoJSON file written by ``write_geojson``."""
    import shapely.geometry

    data = json.loads(Path(path).read_text())
    return {
        f["properties"]["classification"]["name"]: shapely.geometry.shape(f["geometry"])
        for f in data["features"]
    }
