"""Display levels: indexing never reads the slide on the calling (GUI) thread; the chunks asked
for are read in the background and then give the slide's exact pixels."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from engine.slide import open_slide
from histocluster_napari._display_pyramid import (
    DisplayLevel,
    TileReader,
    display_pyramid,
    pyramid_id,
)
from histocluster_napari._slide_layers import slide_pyramid


def wait_idle(reader: TileReader, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not reader.idle():
        assert time.monotonic() < deadline, "tiles not read in time"
        time.sleep(0.01)


def test_display_levels_read_in_the_background_then_show_the_slide(qapp, cmu_svs: Path) -> None:
    reader = TileReader()
    with open_slide(cmu_svs) as slide:
        read, threads = slide.read_region, []

        def recording(l0_xy, level, size):
            threads.append(threading.get_ident())
            return read(l0_xy, level, size)

        pyramid = display_pyramid(slide, reader)
        fine, overview = pyramid[0], pyramid[-1]
        assert isinstance(fine, DisplayLevel) and isinstance(overview, np.ndarray)
        assert fine.shape == (2967, 2220, 3) and max(overview.shape[:2]) <= 1024
        assert pyramid_id(pyramid) == fine.pyramid_id
        slide.read_region = recording  # type: ignore[method-assign]
        first = fine[1000:1500, 300:900]  # nothing read yet: the overview, scaled up
        assert first.shape == (500, 600, 3) and first.dtype == np.uint8
        assert threading.get_ident() not in threads
        wait_idle(reader)
        assert threads and threading.get_ident() not in threads  # read, in the reader's thread
        n_reads = len(threads)
        again = fine[1000:1500, 300:900]
        assert len(threads) == n_reads  # from memory now
        slide.read_region = read  # type: ignore[method-assign]
        exact = np.asarray(slide_pyramid(slide)[0][1000:1500, 300:900])
        np.testing.assert_array_equal(again, exact)
        assert np.abs(first.astype(int) - exact).mean() < 20  # the blurry preview was close
        np.testing.assert_array_equal(fine[1200, 400], exact[200, 100])  # napari's cursor value
    reader.close()


def test_levels_of_a_pyramidal_tiff_fall_back_through_the_coarser_ones(
    qapp, pyramidal_tiff: Path
) -> None:
    reader = TileReader()
    with open_slide(pyramidal_tiff) as slide:
        pyramid = display_pyramid(slide, reader)
        levels = [p for p in pyramid if isinstance(p, DisplayLevel)]
        assert len(levels) >= 2 and all(
            lv.coarser is nxt for lv, nxt in zip(levels, pyramid[1:], strict=True)
        )
        fine = levels[0]
        h, w = fine.shape[:2]
        fine[: h // 2, : w // 2]
        wait_idle(reader)
        exact = np.asarray(slide_pyramid(slide)[0][: h // 2, : w // 2])
        np.testing.assert_array_equal(fine[: h // 2, : w // 2], exact)
    reader.close()
