"""``python -m histocluster_napari.demo``: what ``make demo`` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from histocluster_napari.demo import DemoConfig, open_demo
from tests.conftest import REPO


def test_demo_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "histocluster_napari.demo", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0
    for flag in ("--slide", "--encoder", "--k", "--tile-px", "--mpp", "--cluster"):
        assert flag in out.stdout


@pytest.mark.gui
def test_demo_docks_the_widget_on_the_sample_slide(make_napari_viewer, sample_slide: Path) -> None:
    viewer = make_napari_viewer()
    viewer, widget = open_demo(DemoConfig(slide=sample_slide, k=5), viewer)
    assert [layer.name for layer in viewer.layers if layer.visible] == ["sample_slide"]
    assert widget.slide.value is viewer.layers["sample_slide"]
    assert widget.k.value == 5 and widget.cluster_button.enabled
    assert "HistoCluster (histocluster)" in viewer.window.dock_widgets


def test_demo_refuses_an_unreadable_slide(tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    with pytest.raises(SystemExit, match="cannot be opened"):
        open_demo(DemoConfig(slide=bad))
