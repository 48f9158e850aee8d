"""A store made with a foundation-model entry (a ViT, given as name:path) opens, clusters and
exports in the widget (issue 14)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from engine import extract
from histocluster_napari._widget import HistoClusterWidget
from tests.engine.test_vit_end_to_end import NAME, extract_args, released_file
from tests.napari.test_widget import wait_idle

pytestmark = [pytest.mark.gui, pytest.mark.slow]


def test_a_vit_store_clusters_and_exports_in_the_widget(
    make_napari_viewer, qtbot, isolated_cache, tmp_path: Path
) -> None:
    weights = released_file(tmp_path / "lunit", seed=0)
    store = tmp_path / "features.zarr"
    assert extract.main(extract_args(store, f"{NAME}:{weights}")) == 0
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    widget.open_store(store)
    wait_idle(qtbot, widget)
    assert widget.encoder.value == f"{NAME}:{weights}"
    widget.k.value = 3
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.view is not None and widget.view.k == 3, widget.status.value
    widget.table.set_name(0, "group")
    widget.table.set_selected([0])
    out = tmp_path / "patches"
    widget.export_dir.value = str(out)
    widget.export_selected()
    wait_idle(qtbot, widget)
    assert "Exported" in widget.status.value, widget.status.value
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["class"] for r in rows} == {"group"}
    assert all((out / r["path"]).is_file() for r in rows)
