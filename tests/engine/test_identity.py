"""EncoderId and Tiling: the store's identity, round trips and what counts as a difference."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from engine.encoder_id import EncoderId
from engine.files import atomic_write_json, cache_dir, sha256_file
from engine.models import load_encoder
from engine.store import FeatureStore
from engine.tiling import Tiling

ENC = EncoderId(
    "resnet18-random", "resnet18", 512, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
)


def test_encoder_id_round_trips_and_reads_stores_without_an_embedding_rule() -> None:
    assert EncoderId.from_attrs(ENC.to_attrs()) == ENC
    old = {k: v for k, v in ENC.to_attrs().items() if k != "embedding"}
    assert EncoderId.from_attrs(old).embedding == "pooled"


@pytest.mark.parametrize(
    "change, named",
    [
        ({"sha256": "ab" * 32}, "weights"),
        ({"arch": "resnet34"}, "arch"),
        ({"embedding": "cls"}, "embedding"),
        ({"std": (0.5, 0.5, 0.5)}, "normalisation"),
        ({"input_px": 256}, "input_px"),
    ],
)
def test_encoder_differences_name_what_differs(change: dict, named: str) -> None:
    other = replace(ENC, **change)
    assert named in ENC.differences(other) and not ENC.same_features(other)
    assert ENC.same_features(replace(ENC, mean=(0.4850000001, 0.456, 0.406)))


def test_file_encoders_are_identified_by_content_not_path(tmp_path: Path) -> None:
    from engine.models import save_encoder

    encoder = load_encoder("resnet18-random")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_encoder(a, encoder.backbone, "resnet18", encoder.mean, encoder.std, 224, {})
    b.write_bytes(a.read_bytes())
    ida, idb = load_encoder(a).identity(), load_encoder(b).identity()
    assert ida.sha256 == sha256_file(a) and ida.same_features(idb)
    assert not ida.same_features(load_encoder("resnet18-random").identity())


def test_tiling_resolves_stride_and_names_differences() -> None:
    t = Tiling(tile_px=224, target_mpp=0.5)
    assert t.stride_px == 224 and Tiling.from_attrs(t.to_attrs()) == t
    assert t.differences(replace(t, tissue_method="hsv")) == ["tissue_method='otsu' vs 'hsv'"]
    assert t.differences(replace(t, min_tissue=0.25)) == ["min_tissue=0.5 vs 0.25"]
    assert t.differences(Tiling(tile_px=224, target_mpp=0.5 + 1e-12)) == []


def test_coverage_is_the_one_reuse_rule(tmp_path: Path, cmu_svs: Path) -> None:
    from engine.slide import open_slide
    from engine.tiling import TileGrid

    enc = replace(ENC, dim=4)
    tiling = Tiling(tile_px=64, target_mpp=2.0)
    path = tmp_path / "f.zarr"
    assert FeatureStore.coverage(path, cmu_svs, enc, tiling).usable
    assert not FeatureStore.coverage(path, cmu_svs, enc, tiling).store_exists
    store = FeatureStore.create_or_open(path, enc, tiling)
    with open_slide(cmu_svs) as slide:
        sf = store.add_slide("CMU-1-Small-Region", TileGrid.from_tiling(slide, tiling))
    cov = FeatureStore.coverage(path, cmu_svs, enc, tiling)
    assert cov.usable and cov.slide_present and cov.pending == cov.selected > 0 and not cov.complete
    import numpy as np

    rows, cols = np.nonzero(sf.selected)
    sf.write_tiles(rows, cols, np.zeros((len(rows), 4), np.float32))
    assert FeatureStore.coverage(path, cmu_svs, enc, tiling).complete
    slide_mpp = sf.attrs["mpp"][0]
    assert FeatureStore.coverage(path, cmu_svs, enc, tiling, slide_mpp=slide_mpp).complete
    cov = FeatureStore.coverage(path, cmu_svs, enc, tiling, slide_mpp=2 * slide_mpp)
    assert not cov.usable and "um/px" in cov.problem and str(cmu_svs) in cov.problem
    for other in (replace(tiling, tissue_method="hsv"), replace(tiling, min_tissue=0.25)):
        cov = FeatureStore.coverage(path, cmu_svs, enc, other)
        assert not cov.usable and "tiled with other settings" in cov.problem
    assert (
        "encoder"
        in FeatureStore.coverage(path, cmu_svs, replace(enc, sha256="00" * 32), tiling).problem
    )


def test_atomic_json_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = atomic_write_json(tmp_path / "x.json", {"a": Path("/p")})
    assert target.read_text().strip() == '{\n  "a": "/p"\n}' and list(tmp_path.iterdir()) == [
        target
    ]
    monkeypatch.delenv("HISTOCLUSTER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "histocluster"
    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
