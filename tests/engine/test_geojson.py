"""engine.geojson: tile boxes merged into MultiPolygons, QuPath FeatureCollections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely

from engine.export_plan import tile_boxes
from engine.geojson import (
    boxes_to_multipolygon,
    class_feature,
    feature_collection,
    merge_row_runs,
    read_multipolygons,
    write_geojson,
)


def _grid_boxes(cells: list[tuple[int, int]], size: int = 10) -> np.ndarray:
    return np.array([[c * size, r * size, (c + 1) * size, (r + 1) * size] for r, c in cells])


def test_merge_row_runs_joins_touching_boxes_only() -> None:
    boxes = _grid_boxes([(0, 0), (0, 1), (0, 3), (1, 0)])
    merged = merge_row_runs(boxes)
    assert sorted(map(tuple, merged.tolist())) == [(0, 0, 20, 10), (0, 10, 10, 20), (30, 0, 40, 10)]


def test_adjacent_tiles_become_one_polygon() -> None:
    mp = boxes_to_multipolygon(_grid_boxes([(0, 0), (0, 1), (1, 0), (1, 1)]))
    assert isinstance(mp, shapely.MultiPolygon) and len(mp.geoms) == 1
    assert mp.area == 400 and mp.bounds == (0, 0, 20, 20)


def test_separate_groups_and_holes() -> None:
    ring = [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)]
    mp = boxes_to_multipolygon(_grid_boxes([*ring, (5, 5)]))
    assert len(mp.geoms) == 2
    big = max(mp.geoms, key=lambda g: g.area)
    assert (
        big.area == 800
        and len(big.interiors) == 1
        and shapely.Polygon(big.interiors[0]).area == 100
    )


def test_diagonal_neighbours_touch_at_a_corner_only() -> None:
    mp = boxes_to_multipolygon(_grid_boxes([(0, 0), (1, 1)]))
    assert mp.area == 200 and mp.is_valid


def test_empty_input_gives_an_empty_multipolygon() -> None:
    mp = boxes_to_multipolygon(np.zeros((0, 4)))
    assert isinstance(mp, shapely.MultiPolygon) and mp.is_empty
    assert feature_collection({"x": ((1, 2, 3), np.zeros((0, 4)))})["features"] == []


def test_fractional_grid_tiles_share_edges_exactly() -> None:
    """Tiles of 256.56 level-0 px (64 px at 2 um on a 0.499 um slide) merge without slivers."""
    rows, cols = np.mgrid[:7, :9]
    step = 64 * 2.0 / 0.499
    boxes = tile_boxes(rows.ravel(), cols.ravel(), (step, step), (step, step), (step, step))
    mp = boxes_to_multipolygon(boxes)
    assert len(mp.geoms) == 1 and len(mp.geoms[0].interiors) == 0
    x1, y1 = round(9 * step), round(7 * step)
    assert mp.area == x1 * y1 and len(mp.geoms[0].exterior.coords) == 5  # a plain rectangle
    assert shapely.equals(mp, shapely.box(0, 0, x1, y1))


def test_feature_has_qupath_properties_and_round_trips(tmp_path: Path) -> None:
    boxes = _grid_boxes([(0, 0), (0, 1), (4, 4)], size=256)
    feature = class_feature("ink", (0, 128, 255), boxes)
    assert feature["type"] == "Feature" and feature["geometry"]["type"] == "MultiPolygon"
    props = feature["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "ink", "color": [0, 128, 255]}
    ring = feature["geometry"]["coordinates"][0][0]
    assert ring[0] == ring[-1] and all(isinstance(v, int) for xy in ring for v in xy)

    fc = feature_collection(
        {"ink": ((0, 128, 255), boxes), "fold": ((255, 0, 0), boxes[:1] + 2048)}
    )
    path = tmp_path / "slide.geojson"
    write_geojson(path, fc)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    assert data["features"][0]["properties"]["tiles"] == 3
    shapes = read_multipolygons(path)
    assert shapes["ink"].area == 3 * 256**2 and shapes["fold"].area == 256**2
    assert not list(tmp_path.glob("*.partial"))
