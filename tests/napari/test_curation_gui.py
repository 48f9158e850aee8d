"""Curation in the widget (real viewer, Xvfb): cancel at every stage, names that follow their
clusters, corrections per tile, the curation saved in the store, export equal to the CLI's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from engine import export as engine_export
from engine.curation import Curation
from engine.store import FeatureStore
from histocluster_napari._widget import HistoClusterWidget
from tests.napari.conftest import FAST
from tests.napari.test_widget import TIMEOUT_MS, open_with_widget, wait_idle

pytestmark = pytest.mark.gui


def cancel_at(widget: HistoClusterWidget, stage: str, after: int = 0) -> tuple[list[tuple], object]:
    """Press Cancel (the event it sets) the moment the worker reports ``stage`` with done >= after.

    Runs in the worker thread as the report is sent, so the cancel lands in that very stage.
    """
    seen: list[tuple] = []

    def on_event(event: tuple) -> None:
        if event[0] == "progress":
            seen.append(event[1:])
            if event[1] == stage and event[2] >= after:
                widget._cancel.set()

    widget._bridge.event.connect(on_event, Qt.ConnectionType.DirectConnection)
    return seen, on_event


def clustered(make_napari_viewer, qtbot, slide: Path, store: Path | None = None, **settings):
    viewer, layer, widget = open_with_widget(make_napari_viewer, slide, store, **settings)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.view is not None, widget.status.value
    return viewer, layer, widget


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_cancel_stops_kmeans_and_keeps_the_run_shown(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    before = widget.view
    runs = FeatureStore.open(before.store_path).cluster_runs()
    seen, _ = cancel_at(widget, "kmeans")
    widget.k.value = 4  # re-clusters after a short delay; cancelled inside K-means
    qtbot.waitUntil(
        lambda: any(s[0] == "kmeans" for s in seen) and not widget.busy, timeout=TIMEOUT_MS
    )
    assert "Cancelled" in widget.status.value
    assert not any(s[0] == "assign" for s in seen)  # stopped in K-means, before assigning
    assert FeatureStore.open(before.store_path).cluster_runs() == runs  # no new run written
    assert widget.view is before and widget.table.rowCount() == FAST["k"]
    assert widget.cluster_button.enabled and not widget.cancel_button.enabled


def test_cancel_stops_an_export_leaving_only_whole_listed_files(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    for c, name in enumerate(["a", "b", "c"]):
        widget.table.set_name(c, name)
    widget.table.set_selected([0, 1, 2])
    out = tmp_path / "patches"
    widget.export_dir.value = str(out)
    seen, handler = cancel_at(widget, "export", after=2)
    assert widget.export_selected() is not None
    wait_idle(qtbot, widget)
    assert "Cancelled" in widget.status.value, widget.status.value
    total = int(widget.view.totals.sum())
    rows = manifest(out)
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*.png")}
    assert {r["path"] for r in rows} == on_disk and 2 <= len(rows) < total
    assert [p.name for p in out.rglob("*") if p.name.startswith(".")] == []  # no temp files
    record = json.loads((out / "export.json").read_text())
    assert record["exports"][-1]["status"] == "cancelled"
    assert any(s[0] == "export" for s in seen)
    widget._bridge.event.disconnect(handler)
    widget.export_selected()  # the same export again resumes and completes
    wait_idle(qtbot, widget)
    rows = manifest(out)
    assert len(rows) == total and {r["path"] for r in rows} == {
        p.relative_to(out).as_posix() for p in out.glob("*/*.png")
    }


def named_tiles(widget: HistoClusterWidget, name: str) -> set[tuple[int, int]]:
    view = widget.view
    labels = view.labels["sample_slide"]
    clusters = view.curation.clusters_of(name)
    return {(int(r), int(c)) for r, c in np.argwhere(np.isin(labels, clusters))}


def test_names_follow_their_clusters_not_row_numbers(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    view = widget.view
    big = int(np.argmax(view.totals))
    widget.table.set_name(big, "ink")
    widget.table.set_selected([big])
    before = named_tiles(widget, "ink")
    small = int(np.argmin(view.totals))
    widget.table.set_name(small, "small")  # (a cluster of few tiles: cleared as k falls)
    cleared: list[str] = []
    # Cluster again (same k, same seed): a new run with the same clusters, the name on them.
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.view.run != view.run
    assert named_tiles(widget, "ink") == before
    assert widget.table.names()[widget.view.curation.clusters_of("ink")[0]] == "ink"
    assert "ink" in widget.status.value
    # Another k: wherever "ink" lands, >= 90 % of that cluster's tiles were "ink" before; and
    # the table shows the name on exactly those rows (never on row `big` by position).
    for k in (4, 2):
        widget.k.value = k
        qtbot.waitUntil(lambda k=k: widget.view.k == k and not widget.busy, timeout=TIMEOUT_MS)
        cur = widget.view.curation
        labels = widget.view.labels["sample_slide"]
        for c in cur.clusters_of("ink"):
            tiles = {(int(r), int(col)) for r, col in np.argwhere(labels == c)}
            assert len(tiles & before) >= 0.9 * len(tiles)
        assert [i for i, n in enumerate(widget.table.names()) if n == "ink"] == cur.clusters_of(
            "ink"
        )
        assert "ink" in widget.status.value  # said where it went, or that it was cleared
        # a name that found no cluster is cleared with a warning toast (the carry-over's line)
        lost = widget.view.carried_lost
        for name in ("ink", "small"):
            line = [line for line in lost if line.startswith(f"'{name}'")]
            assert bool(line) == (not cur.clusters_of(name)), (name, lost)
            if line:
                cleared.append(name)
                qtbot.waitUntil(
                    lambda line=line: any(
                        str(n.message) == line[0] for n in notification_manager.records
                    ),
                    timeout=TIMEOUT_MS,
                )
    assert "small" in cleared, cleared  # (two tiles of its own cannot make 90 % of one of 2)


def test_per_tile_corrections_by_key_are_drawn_and_saved(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    view = widget.view
    labels = view.labels["sample_slide"]
    widget.table.set_name(0, "tumour")
    widget.table.set_selected([0])
    widget.correction_class.value = "tumour"
    inside = [tuple(t) for t in np.argwhere(labels == 0)]
    outside = [tuple(t) for t in np.argwhere(labels == 1)]
    layer = widget.clusters_layer
    world = lambda t: tuple(layer.data_to_world(t))  # noqa: E731
    viewer.cursor.position = world(inside[0])
    widget._viewer_hooks._correction("exclude")(viewer)  # what Shift-X calls
    viewer.cursor.position = world(outside[0])
    widget._viewer_hooks._correction("move")(viewer)  # Shift-M
    cur = widget.curation
    assert cur.overrides("sample_slide") == {
        ("sample_slide", *map(int, inside[0])): None,
        ("sample_slide", *map(int, outside[0])): "tumour",
    }
    data = np.asarray(layer.data)
    assert data[inside[0]] == view.k + 1  # excluded: drawn dark
    assert data[outside[0]] == 1  # moved: drawn in the class's cluster colour
    assert layer.colormap.map(np.array([view.k + 1]))[0, 3] > 0.5
    qtbot.waitUntil(
        lambda: Curation.load(FeatureStore.open(view.store_path), view.run) == cur, timeout=5000
    )
    viewer.cursor.position = world(inside[0])
    widget._viewer_hooks._correction("restore")(viewer)  # Shift-U
    assert not cur.has_override("sample_slide", *map(int, inside[0]))


def test_reopening_the_store_restores_the_curation_and_export_equals_the_cli(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    store = tmp_path / "features.zarr"
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide, store=store)
    labels = widget.view.labels["sample_slide"]
    widget.table.set_name(0, "ink")
    widget.table.set_name(2, "crease")
    widget.table.set_selected([0, 2])
    excluded = tuple(int(v) for v in np.argwhere(labels == 0)[0])
    widget.curation.override_tile("sample_slide", *excluded, None)
    moved = tuple(int(v) for v in np.argwhere(labels == 1)[0])
    widget.curation.override_tile("sample_slide", *moved, "crease")
    saved = widget.curation.copy()
    run = widget.view.run
    out_gui = tmp_path / "gui"
    widget.export_dir.value = str(out_gui)
    widget.export_selected()
    wait_idle(qtbot, widget)
    assert "Exported" in widget.status.value, widget.status.value
    viewer.close()

    # A new viewer on the same store: the run and its curation come back.
    viewer2 = make_napari_viewer()
    widget2 = HistoClusterWidget(viewer2)
    viewer2.window.add_dock_widget(widget2, name="HistoCluster")
    assert widget2.open_store(store) is not None
    wait_idle(qtbot, widget2)
    assert widget2.view.run == run and widget2.curation == saved
    assert widget2.table.names()[0] == "ink" and widget2.table.selected() == [0, 2]
    # the widget's layers are drawn once, transparent, at plugin start: wait for those passes
    qtbot.waitUntil(lambda: widget2.layers_ready, timeout=TIMEOUT_MS)
    shown = [layer.__class__.__name__ for layer in viewer2.layers if layer.visible]
    assert shown == ["Image", "Labels"]

    # The command line with the saved curation writes the same files.
    out_cli = tmp_path / "cli"
    args = [str(store), "--out", str(out_cli), "--run", run, "--geojson", "--quiet"]
    assert engine_export.main(args) == 0
    gui_rows, cli_rows = manifest(out_gui), manifest(out_cli)
    key = lambda r: (r["class"], r["slide_id"], r["path"])  # noqa: E731
    assert sorted(map(key, gui_rows)) == sorted(map(key, cli_rows))
    for r in gui_rows:
        assert (out_gui / r["path"]).read_bytes() == (out_cli / r["path"]).read_bytes()
    x, y = (int(v) for v in FeatureStore.open(store).slide("sample_slide").origins[excluded])
    assert not any(r["path"].endswith(f"_{x}_{y}.png") for r in gui_rows)
    n_ink = int((labels == 0).sum()) - 1
    n_crease = int((labels == 2).sum()) + 1
    assert sum(r["class"] == "ink" for r in gui_rows) == n_ink
    assert sum(r["class"] == "crease" for r in gui_rows) == n_crease


def test_closing_the_viewer_right_after_an_edit_saves_it(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    """An edit is saved a moment after it is made; closing napari within that moment writes it
    at once, and no timer of the closed widget fires afterwards."""
    store = tmp_path / "features.zarr"
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide, store=store)
    run = widget.view.run
    widget.table.set_name(1, "stroma")
    assert widget._save_timer.isActive()  # the save is still waiting
    assert Curation.load(FeatureStore.open(store), run).name_of(1) is None
    viewer.close()
    qtbot.wait(10)  # the window's deferred deletion, well before the save's delay
    assert not widget._save_timer.isActive()
    assert Curation.load(FeatureStore.open(store), run).name_of(1) == "stroma"
