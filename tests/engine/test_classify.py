"""engine.classify: train from named clusters, apply over a store, review the least certain tiles.

On the generated sample slide with its ground-truth mask (the sample encoder's features, k = 8).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.classify import (
    ApplyConfig,
    TrainConfig,
    apply,
    main,
    parse_class_spec,
    train,
    uncertain_tiles,
)
from engine.cluster import main as cluster_main
from engine.errors import HistoclusterError
from engine.progress import Cancelled
from engine.store import FeatureStore
from engine.tile_classifier import TileClassifier
from tests.engine.clustering_fixtures import copy_store, real_store, synthetic_store
from tests.engine.test_cluster import SAMPLE, SAMPLE_ENCODER, SAMPLE_MASK, tile_truth

TRUTH = {4: "green ink", 5: "blue ink", 6: "fold"}

pytestmark = pytest.mark.skipif(
    not SAMPLE.exists() or not SAMPLE_ENCODER.exists(), reason="sample_data/ not generated"
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def clustered(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, str, np.ndarray, dict[str, tuple[int, ...]]]:
    """(store, slide id, tile truth (rows, cols), {artefact: its clusters}) of the sample slide at k = 8."""
    path = copy_store(
        real_store(SAMPLE, tmp_path_factory, encoder=str(SAMPLE_ENCODER)),
        tmp_path_factory.mktemp("classify"),
    )
    args = [str(path), "--k", "8", "--name", "k8", "--quiet", "--exemplars", "0", "--no-overlays"]
    assert cluster_main(args) == 0
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    meta = json.loads(SAMPLE_MASK.with_suffix(".json").read_text())
    truth = tile_truth(store, sid, np.asarray(Image.open(SAMPLE_MASK)), int(meta["mask_factor"]))
    labels = store.read_cluster_labels("k8", sid)
    # the user's naming: each artefact is the cluster most of whose tiles are that artefact;
    # the clusters mostly of tissue (labels 1, 2, 3, 7) are named "tissue"
    named: dict[str, tuple[int, ...]] = {}
    for c in range(8):
        counts = np.bincount(truth[labels == c] + 1, minlength=9)[1:]
        top = int(counts.argmax())
        if counts[top] > 0.5 * counts.sum():
            name = TRUTH.get(top, "tissue" if top in (1, 2, 3, 7) else None)
            if name:
                named[name] = (*named.get(name, ()), c)
    assert {"green ink", "blue ink", "tissue"} <= set(named), named
    return path, sid, truth, named


def _specs(named: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    return tuple(f"{n}={','.join(map(str, cs))}" for n, cs in named.items())


def test_classifier_paints_the_inks_at_least_as_well_as_their_clusters(
    clustered: tuple, tmp_path: Path
) -> None:
    path, sid, truth, named = clustered
    result = train(
        TrainConfig(store=str(path), out=str(tmp_path / "m"), run="k8", classes=_specs(named))
    )
    assert result.metrics["grouped_by"].endswith("tile blocks") and result.confusion_png.is_file()
    assert len(result.metrics["f1"]) == len(result.classes)
    apply(ApplyConfig(model=str(result.model_path), store=str(path), name="p"))
    store = FeatureStore.open(path)
    cls, prob = store.prediction("p").read(sid)
    assert np.allclose(prob[cls >= 0].sum(1), 1, atol=1e-2)
    assert ((cls >= 0) == (store.slide(sid).selected & store.slide(sid).done)).all()
    labels = store.read_cluster_labels("k8", sid)
    ious = {}
    for lab in (4, 5):
        name = TRUTH[lab]
        by_cluster = _iou(np.isin(labels, named[name]), truth == lab)
        by_model = _iou(cls == result.classes.index(name), truth == lab)
        print(f"{name}: tile IoU classifier {by_model:.3f}, clusters {by_cluster:.3f}")
        ious[name] = (by_model, by_cluster)
    # The classifier learns from the clusters' tiles, so on one ink it may land a little under
    # them: the features (hence the clusters) differ from one CPU to another, e.g. blue ink
    # 0.848 against 0.886 on one AMD EPYC, where green ink was 1.000 against 0.943. Over both
    # inks it paints at least as well, and on each within 0.05 of its clusters.
    assert all(model >= cluster - 0.05 for model, cluster in ious.values()), ious
    assert sum(m for m, _ in ious.values()) >= sum(c for _, c in ious.values()), ious


def test_review_of_the_least_certain_tiles_raises_the_folds_iou(
    clustered: tuple, tmp_path: Path
) -> None:
    """The ground truth answers the 20 least certain tiles, the model retrains; three rounds."""
    path, sid, truth, named = clustered
    named = {**named, "fold": named.get("fold", ())}
    classes = tuple(s for s in _specs(named) if not s.endswith("="))
    answers: dict[tuple[str, int, int], str | None] = {}
    ious = []
    for _ in range(4):
        cfg = TrainConfig(
            store=str(path),
            out=str(tmp_path / "m"),
            run="k8",
            classes=classes,
            tile_labels=dict(answers),
        )
        result = train(cfg)
        apply(
            ApplyConfig(
                model=str(result.model_path), store=str(path), name="review", overwrite=True
            )
        )
        store = FeatureStore.open(path)
        cls, _ = store.prediction("review").read(sid)
        fold = result.classes.index("fold") if "fold" in result.classes else -2
        ious.append(round(_iou(cls == fold, truth == 6), 3))
        asked = 0
        for s, r, c, margin in uncertain_tiles(store, "review", 20 + len(answers)):
            assert 0 <= margin <= 1
            if (s, r, c) in answers:
                continue
            t = int(truth[r, c])
            answers[(s, r, c)] = None if t <= 0 else TRUTH.get(t, "tissue")
            asked += 1
            if asked == 20:
                break
    print("fold tile IoU over review rounds:", ious)
    assert ious[-1] > ious[0]


def test_model_file_is_weights_only_and_refuses_another_encoder(
    clustered: tuple, tmp_path: Path
) -> None:
    path, _, _, named = clustered
    result = train(
        TrainConfig(
            store=str(path), out=str(tmp_path / "m"), run="k8", classes=_specs(named), folds=1
        )
    )
    npz = result.model_path.with_suffix(".npz")
    with zipfile.ZipFile(npz) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    model = TileClassifier.load(result.model_path)
    with np.load(npz, allow_pickle=False) as arrays:
        assert set(arrays.files) == {"mean", "scale", "W", "b"}
    other = replace(model.encoder, sha256="00" * 32)
    with pytest.raises(HistoclusterError, match="classifier was trained on"):
        model.check_features(other, model.tiling, "elsewhere.zarr")
    with pytest.raises(HistoclusterError, match="tiled otherwise"):
        model.check_features(model.encoder, replace(model.tiling, tile_px=32, stride_px=32), "x")
    npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(HistoclusterError, match="sha256"):
        TileClassifier.load(result.model_path)


def test_apply_resumes_after_a_cancel_and_covers_slides_added_later(
    cmu_svs: Path, tmp_path: Path
) -> None:
    """Random features over the CMU grid (3 x 3 chunks per slide), two slides, k = 3."""
    store_path = synthetic_store(cmu_svs, tmp_path / "f.zarr", ids=("a", "b"))
    assert (
        cluster_main(
            [
                str(store_path),
                "--k",
                "3",
                "--name",
                "k3",
                "--quiet",
                "--exemplars",
                "0",
                "--no-overlays",
            ]
        )
        == 0
    )
    result = train(
        TrainConfig(
            store=str(store_path), out=str(tmp_path / "m"), run="k3", classes=("x=0", "y=1,2")
        )
    )
    assert result.metrics["grouped_by"] == "slide" and result.metrics["folds"] == 2
    cfg = ApplyConfig(model=str(result.model_path), store=str(store_path), name="resume")
    full = apply(replace(cfg, name="full"))

    def cancel_after_two(stage: str, done: int, total: int) -> None:
        if done >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        apply(cfg, progress=cancel_after_two)
    maps = FeatureStore.open(store_path).prediction("resume")
    assert 2 <= maps.chunks_done("a").sum() < 9 and maps.chunks_done("b").sum() == 0
    again = apply(cfg)
    assert 0 < again.tiles < full.tiles
    for sid in ("a", "b"):
        a = FeatureStore.open(store_path).prediction("resume").read(sid)
        b = FeatureStore.open(store_path).prediction("full").read(sid)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert apply(cfg).tiles == 0  # nothing left to predict


def test_command_line(clustered: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _, named = clustered
    store_path = copy_store(path, tmp_path)
    model = tmp_path / "model"
    assert (
        main(
            [
                "train",
                str(store_path),
                "--run",
                "k8",
                "--out",
                str(model),
                "--classes",
                *_specs(named),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "macro F1" in err and "green ink" in err
    assert main(["apply", f"{model}.json", str(store_path), "--name", "cli"]) == 0
    assert "predictions/cli" in capsys.readouterr().err
    assert main(["train", str(store_path), "--out", str(model), "--classes", "ink"]) == 2
    assert "NAME=CLUSTER" in capsys.readouterr().err
    assert main(["train", str(store_path), "--out", str(model)]) == 2
    assert "no saved curation" in capsys.readouterr().err
    assert main(["nope"]) == 2
    assert main(["--help"]) == 0


def test_class_spec_parsing() -> None:
    assert parse_class_spec(["ink=2,5", "tissue=0,1,3"]) == {"ink": [2, 5], "tissue": [0, 1, 3]}
    for bad in (["ink"], ["=2"], ["ink=x"], ["a=1", "b=1"]):
        with pytest.raises(HistoclusterError):
            parse_class_spec(bad)


def test_training_from_a_saved_curation_uses_its_names_and_overrides(
    clustered: tuple, tmp_path: Path
) -> None:
    from engine.curation import Curation

    path, sid, _, named = clustered
    store_path = copy_store(path, tmp_path)
    store = FeatureStore.open(store_path, mode="r+")
    curation = Curation.from_classes(store, "k8", {n: list(cs) for n, cs in named.items()})
    ink = np.isin(store.read_cluster_labels("k8", sid), named["green ink"])  # (1 or 2 clusters,
    r, c = np.argwhere(ink)[0]  # by the CPU the features were computed on)
    curation.override_tile(sid, int(r), int(c), "pen mark")  # a class made by one correction
    curation.save(store)
    result = train(TrainConfig(store=str(store_path), out=str(tmp_path / "m"), run="k8", folds=1))
    assert result.classes[: len(named)] == list(named) and result.counts["pen mark"] == 1
    assert result.counts["green ink"] == int(ink.sum()) - 1
