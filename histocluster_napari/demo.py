"""``python -m histocluster_napari.demo``: napari on a slide with the HistoCluster widget docked.

What ``make demo`` runs. Opens the generated sample slide (or ``--slide``) through the plugin's
reader, docks the widget with the slide picked, and leaves the rest to the user: click Cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.sample_data import SAMPLE_SLIDE as SAMPLE_SLIDE_NAME
from engine.sample_data import sample_slide_path
from histocluster_napari._reader import napari_get_reader
from histocluster_napari._triton_guard import block_triton

SAMPLE_SLIDE = sample_slide_path() or Path("sample_data") / SAMPLE_SLIDE_NAME
"""The installed sample slide (``engine.sample_data``), found by editable and wheel installs."""


@dataclass
class DemoConfig:
    """What the demo opens (see ``--help``)."""

    slide: Path = SAMPLE_SLIDE
    encoder: str | None = None
    k: int = 8
    tile_px: int = 224
    mpp: float = 0.5
    cluster: bool = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m histocluster_napari.demo",
        description="Open napari on a whole-slide image with the HistoCluster widget docked, "
        "ready to click Cluster.",
    )
    p.add_argument(
        "--slide",
        type=Path,
        default=SAMPLE_SLIDE,
        help="slide to open (default: the generated sample slide, sample_data/sample_slide.tiff)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder checkpoint or name (default: sample_data/sample_encoder.pt when present, "
        "else resnet18-random)",
    )
    p.add_argument("--k", type=int, default=8, help="number of clusters (default: 8)")
    p.add_argument("--tile-px", type=int, default=224, help="tile side in pixels (default: 224)")
    p.add_argument(
        "--mpp", type=float, default=0.5, help="micrometres per pixel of the tiles (default: 0.5)"
    )
    p.add_argument(
        "--cluster", action="store_true", help="click Cluster right away instead of waiting for you"
    )
    return p


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    ns = build_parser().parse_args(argv)
    return DemoConfig(
        slide=ns.slide,
        encoder=ns.encoder,
        k=ns.k,
        tile_px=ns.tile_px,
        mpp=ns.mpp,
        cluster=ns.cluster,
    )


def open_demo(cfg: DemoConfig, viewer=None):
    """Open ``cfg.slide`` in ``viewer`` (a new one when None) with the widget docked; returns both."""
    import napari

    if napari_get_reader(str(cfg.slide)) is None:
        raise SystemExit(
            f"error: {cfg.slide}: cannot be opened as a slide — "
            + (
                "generate it with `python sample_data/make_sample_slide.py`"
                if cfg.slide == SAMPLE_SLIDE
                else "check the path and that OpenSlide reads the format"
            )
        )
    viewer = viewer or napari.Viewer(title="histocluster")
    viewer.open(str(cfg.slide), plugin="histocluster")
    _, widget = viewer.window.add_plugin_dock_widget("histocluster", "HistoCluster")
    if cfg.encoder:
        widget.encoder.value = cfg.encoder
    widget.k.value = cfg.k
    widget.tile_px.value = cfg.tile_px
    widget.target_mpp.value = cfg.mpp
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    (overlays.scale_bar if overlays is not None else viewer.scale_bar).visible = True
    viewer.reset_view()
    if cfg.cluster:
        widget.run_cluster()
    return viewer, widget


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    block_triton()  # this is a GUI process: Triton and Mesa's OpenGL cannot share it
    os.environ.setdefault("NAPARI_ASYNC", "1")  # load tiles while panning without blocking
    import napari

    open_demo(cfg)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
