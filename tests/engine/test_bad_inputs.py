"""Bad input meets one line naming the file and the fix, a non-zero exit, and nothing lost (issue 15)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cluster import main as cluster_main
from engine.errors import SlideError, StoreError
from engine.extract import main as extract_main
from engine.models import IMAGENET_MEAN, IMAGENET_STD, build_backbone, save_encoder
from engine.slide import open_slide
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import synthetic_store

REPO = Path(__file__).resolve().parents[2]
SAMPLE_MASK = REPO / "sample_data" / "sample_slide_mask.png"  # a small plain PNG


def _extract(
    tmp_path: Path, *extra: str, slide: Path = SAMPLE_MASK, encoder: str = "resnet18-random"
) -> int:
    args = [str(slide), "--out", str(tmp_path / "f.zarr"), "--encoder", encoder, "--tile-px", "32"]
    return extract_main(
        [*args, "--mpp", "8", "--workers", "0", "--precision", "fp32", "--quiet", *extra]
    )


def test_binary_slide_mpp_csv_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_bytes(bytes(range(256)) * 4)
    assert _extract(tmp_path, "--slide-mpp", str(csv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(csv) in err and "not a text CSV" in err


def test_absurd_mpp_is_called_a_typo_not_a_corrupt_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _extract(tmp_path, "--slide-mpp", "1e-300") == 1
    err = capsys.readouterr().err
    assert "not a microscope's resolution" in err and "corrupt" not in err
    with pytest.raises(SlideError, match="between 0.01 and 1000"):
        open_slide(SAMPLE_MASK, mpp=5000.0)


def test_symlink_loop_and_dangling_link_say_what_they_are(tmp_path: Path) -> None:
    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(SlideError, match="symbolic link loop"):
        open_slide(a)
    dangling = tmp_path / "c.svs"
    os.symlink(tmp_path / "gone.svs", dangling)
    with pytest.raises(SlideError, match="link to a missing file"):
        open_slide(dangling)


def test_nan_encoder_never_fills_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backbone = build_backbone("resnet18")
    with torch.no_grad():
        backbone.layer4[1].conv2.weight.fill_(float("nan"))
    checkpoint = tmp_path / "nan.pt"
    save_encoder(checkpoint, backbone, "resnet18", IMAGENET_MEAN, IMAGENET_STD, 32, {})
    assert (
        _extract(tmp_path, "--slide-mpp", "0.5", "--min-tissue", "0", encoder=str(checkpoint)) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite features" in err and str(checkpoint) in err
    store = FeatureStore.open(tmp_path / "f.zarr")
    assert all(store.slide(s).n_encoded() == 0 for s in store.slide_ids())


def test_clustering_a_store_with_nan_features_is_one_store_error(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synthetic_store(cmu_svs, tmp_path / "f.zarr")
    sf = FeatureStore.open(path, mode="r+").slide("a")
    rows, cols = np.nonzero(sf.selected)
    sf.write_tiles(rows[:3], cols[:3], np.full((3, sf.dim), np.nan, np.float32))
    with pytest.raises(StoreError, match="non-finite"):
        list(FeatureStore.open(path).iter_tissue_features())
    assert (
        cluster_main([str(path), "--k", "2", "--quiet", "--exemplars", "0", "--no-overlays"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "non-finite" in err and "slides/a" in err
