"""A registry ViT end to end through the commands: extract -> cluster -> evaluate.

The Lunit DINO ViT-S/16 entry with random weights, written as its release is (a plain state dict
saved by torch.save as dino_vit_small_patch16_ep200.torch, all 12 blocks: the commands load the
real architecture), passed as ``lunit-dino-vits16:PATH``. The commands run in-process through
their ``main(argv)`` (the command-line contract: parse, run, exit status). 96-px tiles at 4 um/px
on the sample slide (about 25 tissue tiles), each resized to the model's 224 px.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import cluster, extract
from engine.encode import TileEncoder
from engine.encoders import REGISTRY
from engine.evaluate import cli as evaluate
from engine.files import sha256_file
from engine.models import load_encoder
from engine.slide import open_slide
from engine.store import FeatureStore
from engine.tiling import TileGrid
from engine.vit import build_model
from tests.conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow  # a full ViT-S on ~25 tiles and 18 images: ~30 s on 2 busy cores

NAME = "lunit-dino-vits16"
SLIDE = SAMPLE_DATA / "sample_slide.tiff"
TILE_PX, MPP = 96, 4.0


def released_file(folder: Path, seed: int) -> Path:
    """The entry's full architecture, random weights, saved in the released file format."""
    e = REGISTRY[NAME]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(e)
    path = folder / str(e.filename)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.model.state_dict(), path)
    return path


def extract_args(out: Path, encoder: str, *extra: str) -> list[str]:
    return [
        str(SLIDE), "--out", str(out), "--encoder", encoder,
        "--tile-px", str(TILE_PX), "--mpp", str(MPP), "--batch-size", "16",
        "--workers", "0", "--device", "cpu", "--precision", "fp32", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return released_file(tmp_path_factory.mktemp("lunit"), seed=0)


@pytest.fixture(scope="module")
def store(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit") / "features.zarr"
    assert extract.main(extract_args(out, f"{NAME}:{weights}")) == 0
    return out


def test_the_store_records_the_vit_and_its_embedding_rule(store: Path, weights: Path) -> None:
    e = REGISTRY[NAME]
    ident = FeatureStore.open(store).encoder
    assert ident.name == f"{NAME}:{weights.resolve()}"
    assert (ident.arch, ident.dim, ident.input_px) == (e.arch, 384, 224)
    assert ident.embedding == "cls" and ident.source == e.source
    assert ident.sha256 == sha256_file(weights)
    assert ident.mean == e.mean and ident.std == e.std


def test_stored_features_are_the_class_token_of_the_resized_tile(
    store: Path, weights: Path
) -> None:
    sf = FeatureStore.open(store).slide("sample_slide")
    rows, cols = np.nonzero(sf.selected)
    assert len(rows) >= 10
    pick = np.random.default_rng(0).choice(len(rows), 4, replace=False)
    grid = TileGrid(open_slide(SLIDE), target_mpp=MPP, tile_px=TILE_PX)
    tiles = np.stack([grid.read_tile(int(rows[k]), int(cols[k])) for k in pick])
    encoder = load_encoder(f"{NAME}:{weights}")
    direct = TileEncoder(encoder, torch.device("cpu"), "fp32")(torch.from_numpy(tiles)).numpy()
    with torch.no_grad():  # the rule by hand: class token of the final normed tokens
        x = encoder.preprocess(tiles)
        by_hand = encoder.backbone.model.forward_features(x)[:, 0].numpy()
    stored = sf.read_tiles(rows[pick], cols[pick])
    assert stored.shape == (4, 384)
    np.testing.assert_allclose(stored, direct, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stored, by_hand, rtol=1e-3, atol=1e-3)
    assert not np.allclose(stored[0], stored[1], atol=1e-3)


def test_features_of_another_model_never_enter_the_store(
    store: Path, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = FeatureStore.open(store).encoder
    features = FeatureStore.open(store).slide("sample_slide").read_features()
    other = released_file(tmp_path / "other", seed=1)  # same entry and file name, other weights
    for spec in ("resnet18-random", f"{NAME}:{other}"):
        capsys.readouterr()
        assert extract.main(extract_args(store, spec)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pass --overwrite" in err, err
        assert f"{NAME}:{weights.resolve()}" in err  # names what the store holds
    after = FeatureStore.open(store)
    assert after.encoder == before
    np.testing.assert_array_equal(after.slide("sample_slide").read_features(), features)
    # the same encoder again: nothing left to encode, exit 0
    assert extract.main(extract_args(store, f"{NAME}:{weights}")) == 0


def test_the_vit_store_clusters(store: Path) -> None:
    args = [str(store), "--k", "3", "--name", "vit-k3", "--exemplars", "1"]
    assert cluster.main([*args, "--thumbnail-px", "128", "--quiet"]) == 0
    fs = FeatureStore.open(store)
    assert fs.cluster_run_problem("vit-k3") is None
    run = fs.read_cluster_run("vit-k3")
    assert run.centroids.shape == (3, 384)
    labels = run.labels["sample_slide"]
    assert set(np.unique(labels[labels >= 0]).tolist()) == {0, 1, 2}
    assert fs.run_file("vit-k3", "exemplars.png") is not None


@pytest.fixture
def tiny_lc25000(shared_data: Path, tmp_path: Path) -> Path:
    """6 real LC25000 lung patches per class, as an ImageFolder of symlinks."""
    source = shared_data / "patches" / "lc25000-lung-subset"
    root = tmp_path / "lc25000-tiny"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:6]:
            (root / folder.name / image.name).symlink_to(image)
    return root


def test_evaluate_compares_the_vit_with_a_resnet(
    weights: Path, tiny_lc25000: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    specs = f"{NAME}:{weights},resnet18-random"
    args = ["--encoders", specs, "--dataset", str(tiny_lc25000), "--protocol", "knn,linear"]
    args += ["--epochs", "2", "--k", "3", "--fractions", "100", "--seeds", "0", "--workers", "0"]
    assert evaluate.main([*args, "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["encoder"], r["protocol"]) for r in rows}
    assert cells == {
        (enc, proto)
        for enc in (f"{NAME}:{weights}", "resnet18-random")
        for proto in ("knn", "linear")
    }
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
