"""engine.evaluate.datasets: every accepted layout, and a clear error for each bad one."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from engine.evaluate.datasets import DatasetError, drop_undecodable, load_samples
from engine.evaluate.sources import H5Images
from tests.engine.evaluate.conftest import write_colour_folder


def _png(path: Path, value: int = 128, px: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((px, px, 3), value, np.uint8)).save(path)
    return path


def test_image_folder_classes_targets_and_export_manifest_ignored(tmp_path):
    root = write_colour_folder(tmp_path / "d", per_class=3, px=8)
    # what engine.export writes beside the class folders, and a tile it had not finished
    (root / "manifest.csv").write_text("path,class,cluster\n")
    (root / "export.json").write_text("{}")
    (root / "red" / "slide_0_0.png.partial").write_bytes(b"half a png")
    s = load_samples(root, "classification")
    assert s.classes == ["blue", "green", "red"]
    assert len(s) == 9 and s.split is None
    assert np.bincount(s.targets).tolist() == [3, 3, 3]
    for i in range(len(s)):
        assert Path(s.images.name(i)).parent.name == s.classes[s.targets[i]]
    assert s.images.read(0).shape == (8, 8, 3)


def test_own_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_colour_folder(tmp_path / split, per_class=n, px=8)
    s = load_samples(tmp_path, "classification")
    assert s.classes == ["blue", "green", "red"]
    assert sorted(set(s.split)) == ["test", "train", "val"]
    assert (s.split == "train").sum() == 12 and (s.split == "val").sum() == 6


def test_empty_class_folder_is_named(tmp_path):
    root = write_colour_folder(tmp_path / "d", per_class=2, px=8)
    (root / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=r"empty_class: class folder has no images — "):
        load_samples(root, "classification")


def test_one_class_only(tmp_path):
    write_colour_folder(tmp_path / "d", per_class=3, px=8, colours={"red": (200, 0, 0)})
    with pytest.raises(DatasetError, match=r"only one class \('red'\)"):
        load_samples(tmp_path / "d", "classification")


def test_undecodable_images_listed_and_skipped(tmp_path):
    root = write_colour_folder(tmp_path / "d", per_class=4, px=8)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = root / "green" / "green_000.png"
    truncated = root / "green" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    s = load_samples(root, "classification")
    assert len(s) == 14
    kept, skipped = drop_undecodable(s, workers=2)
    assert len(kept) == 12
    assert sorted(Path(p).name for p in skipped) == ["broken.png", "truncated.png"]
    assert all(reason for reason in skipped.values())


def test_class_emptied_by_undecodable_images_is_reported(tmp_path):
    root = write_colour_folder(tmp_path / "d", per_class=2, px=8)
    for p in (root / "red").iterdir():
        p.write_bytes(b"garbage")
    s = load_samples(root, "classification")
    with pytest.raises(DatasetError, match=r"'red' has no images after skipping 2 undecodable"):
        drop_undecodable(s)


def test_csv_relative_paths_header_and_split(tmp_path):
    a = _png(tmp_path / "imgs" / "a.png", 10)
    _png(tmp_path / "imgs" / "b.png", 200)
    csv = tmp_path / "meta" / "labels.csv"
    csv.parent.mkdir()
    csv.write_text(
        f"path,label,split\n../imgs/a.png,tumour,train\n{tmp_path / 'imgs' / 'b.png'},normal,test\n"
    )
    s = load_samples(csv, "classification")
    assert s.classes == ["normal", "tumour"]
    assert s.targets.tolist() == [1, 0]
    assert s.split.tolist() == ["train", "test"]
    assert Path(s.images.name(0)).resolve() == a.resolve()


def test_csv_without_header_and_missing_file(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    csv = tmp_path / "l.csv"
    csv.write_text("a.png,1\nb.png,0\n")
    s = load_samples(csv, "classification")
    assert s.classes == ["0", "1"] and s.targets.tolist() == [1, 0] and s.split is None
    csv.write_text("a.png,1\nnope.png,0\n")
    with pytest.raises(DatasetError, match=r"nope.png: listed in l.csv but not found"):
        load_samples(csv, "classification")


def test_regression_csv(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 50 * i)
    csv = tmp_path / "cellularity.csv"
    csv.write_text("path,target\n0.png,0.0\n1.png,0.5\n2.png,1\n")
    s = load_samples(csv, "regression")
    assert s.targets.dtype == np.float32 and s.targets.tolist() == [0.0, 0.5, 1.0]
    assert s.classes == []
    csv.write_text("path,target\n0.png,high\n")
    with pytest.raises(DatasetError, match="non-numeric target"):
        load_samples(csv, "regression")


def _pcam_pair(folder: Path, stem: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(folder / f"{stem}_x.h5", "w") as f:
        f["x"] = rng.integers(0, 255, size=(n, 12, 12, 3), dtype=np.uint8)
    with h5py.File(folder / f"{stem}_y.h5", "w") as f:
        f["y"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)


def test_hdf5_pcam_split_pairs(tmp_path):
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        _pcam_pair(tmp_path, f"camelyonpatch_level_2_split_{split}", n, n)
    s = load_samples(tmp_path, "classification")
    assert isinstance(s.images, H5Images)
    assert len(s) == 16 and s.classes == ["0", "1"]
    assert (s.split == "train").sum() == 8 and (s.split == "val").sum() == 4
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5") as f:
        expected = f["x"][3]
    i = int(np.flatnonzero(s.split == "val")[3])
    np.testing.assert_array_equal(s.images.read(i), expected)
    sub = s.select([i])
    np.testing.assert_array_equal(sub.images.read(0), expected)


def test_hdf5_single_file_and_x_file(tmp_path):
    with h5py.File(tmp_path / "both.h5", "w") as f:
        f["x"] = np.zeros((6, 8, 8, 3), np.uint8)
        f["y"] = np.array([0, 1, 2, 0, 1, 2])
    s = load_samples(tmp_path / "both.h5", "classification")
    assert len(s) == 6 and s.classes == ["0", "1", "2"] and s.split is None
    _pcam_pair(tmp_path, "only", 4, 0)
    s2 = load_samples(tmp_path / "only_x.h5", "classification")
    assert len(s2) == 4 and s2.targets.tolist() == [0, 1, 0, 1]


def _seg_folder(root: Path, n: int, mask_value: int = 1) -> Path:
    for i in range(n):
        _png(root / "images" / f"img{i}.png", 100, px=16)
        m = np.zeros((16, 16), np.uint8)
        m[4:8, 4:8] = mask_value
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"img{i}.png")
    return root


def test_segmentation_pairs_by_stem_and_255_masks(tmp_path):
    s = load_samples(_seg_folder(tmp_path / "a", 3), "segmentation")
    assert len(s) == 3 and s.classes == ["0", "1"] and not s.masks_255_as_1
    assert [p.stem for p in s.masks] == [p.stem for p in s.images.paths]
    s255 = load_samples(_seg_folder(tmp_path / "b", 2, mask_value=255), "segmentation")
    assert s255.classes == ["0", "1"] and s255.masks_255_as_1
    (tmp_path / "a" / "masks" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"img1.png: no mask named img1"):
        load_samples(tmp_path / "a", "segmentation")


def _mask(path: Path, values, px: int = 16) -> Path:
    """A ``px`` square mask whose rows cycle through ``values``."""
    m = np.zeros((px, px), np.uint8)
    for i, v in enumerate(values):
        m[i :: len(values)] = v
    Image.fromarray(m).save(path)
    return path


def test_mask_of_another_size_is_refused_not_stretched(tmp_path):
    root = _seg_folder(tmp_path / "a", 3)
    _mask(root / "masks" / "img2.png", [0, 1], px=8)  # its image is 16 px
    with pytest.raises(DatasetError) as e:
        load_samples(root, "segmentation")
    msg = str(e.value)
    assert msg.startswith(str(root / "masks" / "img2.png") + ": mask is 8x8 px")
    assert "img2.png is 16x16" in msg and "\n" not in msg


def test_mask_value_beyond_the_classes_is_refused(tmp_path):
    root = _seg_folder(tmp_path / "a", 3)
    _mask(root / "masks" / "img1.png", [0, 1, 200])
    with pytest.raises(DatasetError) as e:
        load_samples(root, "segmentation")
    msg = str(e.value)
    assert msg.startswith(str(root / "masks" / "img1.png") + ": mask value 200")
    assert "no mask holds class 2" in msg and "classes.txt" in msg
    # a gap is refused too (0, 2: is class 1 missing or is 2 a mistake?)
    root = _seg_folder(tmp_path / "b", 3, mask_value=2)
    with pytest.raises(DatasetError, match=r"img0.png: mask value 2, but no mask holds class 1"):
        load_samples(root, "segmentation")
    # declared classes allow a class absent from these masks, and nothing beyond them
    (root / "classes.txt").write_text("background\nnucleus\nstroma\n")
    s = load_samples(root, "segmentation")
    assert s.classes == ["background", "nucleus", "stroma"] and not s.masks_255_as_1
    _mask(root / "masks" / "img0.png", [0, 200])
    with pytest.raises(DatasetError) as e:
        load_samples(root, "segmentation")
    assert str(e.value).startswith(
        f"{root / 'masks' / 'img0.png'}: mask value 200 is not a class of {root / 'classes.txt'}"
    )


def test_contiguous_multiclass_masks_and_binary_255(tmp_path):
    root = _seg_folder(tmp_path / "a", 3)
    _mask(root / "masks" / "img1.png", [0, 1, 2, 3])
    assert load_samples(root, "segmentation").classes == ["0", "1", "2", "3"]
    # 0/255 and 0/1/255 differ: 255 is the binary convention only with 0 alone
    root_b = _seg_folder(tmp_path / "b", 2, mask_value=255)
    assert load_samples(root_b, "segmentation").masks_255_as_1
    _mask(root_b / "masks" / "img0.png", [0, 1, 255])
    with pytest.raises(DatasetError, match=r"img0.png: mask value 255, but no mask holds class 2"):
        load_samples(root_b, "segmentation")


def test_missing_path_and_wrong_layout(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_samples(tmp_path / "nope", "classification")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "x.png")
    with pytest.raises(DatasetError, match="no class folders"):
        load_samples(tmp_path / "flat", "classification")


# ------------------------------------------------------------------ real shared data


def test_nct_crc_sample9_loads(shared_data):
    root = shared_data / "patches" / "nct-crc-he-100k-nonorm-sample9"
    s = load_samples(root, "classification")
    assert s.classes == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert np.bincount(s.targets).tolist() == [1] * 9
    kept, skipped = drop_undecodable(s)
    assert len(kept) == 9 and not skipped
    assert s.images.read(0).shape == (224, 224, 3)


def test_lc25000_subset_loads(shared_data):
    root = shared_data / "patches" / "lc25000-lung-subset"
    s = load_samples(root, "classification")
    assert s.classes == ["lung_aca", "lung_n", "lung_scc"]
    assert np.bincount(s.targets).tolist() == [200, 200, 200]
    img = s.images.read(len(s) - 1)
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8


def test_monuseg_subset_loads(shared_data):
    s = load_samples(shared_data / "segmentation" / "monuseg-subset", "segmentation")
    assert len(s) == 8 and s.classes == ["0", "1"]
    assert all(m.stem == p.stem for m, p in zip(s.masks, s.images.paths, strict=True))


def test_copied_nct_with_a_broken_file(shared_data, tmp_path):
    root = tmp_path / "nct"
    shutil.copytree(shared_data / "patches" / "nct-crc-he-100k-nonorm-sample9", root)
    (root / "ADI" / "zzz.tif").write_bytes(b"II*\x00broken")
    kept, skipped = drop_undecodable(load_samples(root, "classification"))
    assert len(kept) == 9 and list(skipped) == [str(root / "ADI" / "zzz.tif")]
