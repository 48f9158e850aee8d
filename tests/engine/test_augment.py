"""engine.augment: the paper's presets, the v2 pipeline, and batched ops == v2.functional per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from engine.augment import (
    JITTER_PRESETS,
    AugmentConfig,
    BatchAugment,
    RandomRot90,
    TwoViews,
    batched_brightness,
    batched_contrast,
    batched_gaussian_blur,
    batched_hue,
    batched_resized_crop,
    batched_rot90,
    batched_saturation,
    blur_kernel_size,
    build_transform,
    sample_crop_boxes,
)

torch.set_num_threads(1)

OFF = dict(crop_min=1.0, jitter="none", flip_p=0.0, rotate90=False, blur_p=0.0)


def _images(b=4, size=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


def _normalise(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


def test_paper_presets_and_defaults():
    assert JITTER_PRESETS["light"] == (0.4, 0.4, 0.4, 0.2)
    assert JITTER_PRESETS["medium"] == (0.8, 0.8, 0.8, 0.2)
    assert JITTER_PRESETS["heavy"] == (0.8, 0.8, 0.8, 0.4)
    cfg = AugmentConfig()
    assert (cfg.crop_min, cfg.jitter, cfg.blur_p, cfg.blur_sigma) == (
        0.01,
        "heavy",
        0.5,
        (0.1, 2.0),
    )


@pytest.mark.parametrize("side,k", [(224, 23), (128, 13), (96, 9), (32, 3), (8, 3)])
def test_blur_kernel_is_odd_and_a_tenth_of_the_side(side, k):
    assert blur_kernel_size(side) == k


@pytest.mark.parametrize(
    "kwargs",
    [dict(crop_min=0.0), dict(crop_min=1.5), dict(jitter="loud"), dict(blur_p=2.0), dict(hue=0.7)],
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_transform_accepts_tensor_pil_and_numpy():
    cfg = AugmentConfig(size=16)
    t = build_transform(cfg)
    arr = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    for inp in (torch.from_numpy(arr).permute(2, 0, 1), Image.fromarray(arr), arr):
        out = t(inp)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_transform_is_identity_plus_normalisation_when_everything_is_off():
    cfg = AugmentConfig(size=20, **OFF)
    img = (torch.rand(3, 20, 20) * 255).to(torch.uint8)
    out = build_transform(cfg)(img)
    assert torch.allclose(out, _normalise(img.float() / 255, cfg), atol=1e-6)


def test_rot90_is_exact_and_uniform():
    img = torch.arange(3 * 5 * 5).view(3, 5, 5)
    rot = RandomRot90()
    torch.manual_seed(0)
    seen = {}
    for _ in range(400):
        out = rot(img)
        k = next(q for q in range(4) if torch.equal(out, torch.rot90(img, q, dims=(1, 2))))
        seen[k] = seen.get(k, 0) + 1
    assert set(seen) == {0, 1, 2, 3}
    assert all(60 <= n <= 140 for n in seen.values()), seen  # 100 expected each
    pil = Image.fromarray(img.permute(1, 2, 0).numpy().astype(np.uint8))
    out = rot.transform(pil, {"k": 1})
    assert np.array_equal(np.asarray(out), np.rot90(np.asarray(pil), 1))


def test_two_views_differ():
    torch.manual_seed(0)
    a, b = TwoViews(build_transform(AugmentConfig(size=16)))(torch.rand(3, 32, 32))
    assert a.shape == b.shape == (3, 16, 16)
    assert not torch.allclose(a, b)


# --- batched ops against torchvision.transforms.v2.functional, image by image ---------------


@pytest.mark.parametrize(
    "batched,single,lo,hi",
    [
        (batched_brightness, TF.adjust_brightness, 0.2, 1.8),
        (batched_contrast, TF.adjust_contrast, 0.2, 1.8),
        (batched_saturation, TF.adjust_saturation, 0.2, 1.8),
        (batched_hue, TF.adjust_hue, -0.4, 0.4),
    ],
)
def test_batched_colour_ops_match_v2(batched, single, lo, hi):
    x = _images()
    f = torch.linspace(lo, hi, x.shape[0])
    got = batched(x.clone(), f)
    for i in range(x.shape[0]):
        assert torch.allclose(got[i], single(x[i], f[i].item()), atol=1e-5), i


def test_batched_blur_matches_v2():
    x = _images(size=20)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = batched_gaussian_blur(x, 5, sigma)
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2)
        assert torch.allclose(got[i], ref, atol=1e-5), i


def test_batched_crop_matches_v2_when_enlarging():
    x = _images(size=24)
    boxes = torch.tensor([[0, 0, 12, 12], [5, 3, 15, 13], [10, 2, 22, 20], [0, 0, 24, 24]]).float()
    got = batched_resized_crop(x, boxes, 24)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(x[i], y0, x0, y1 - y0, x1 - x0, [24, 24], antialias=False)
        # inside; on the outermost ring roi_align blends in the pixels just outside the crop
        # where torchvision repeats the crop's edge
        assert torch.allclose(got[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5), i


def test_batched_crop_shrinking_averages():
    x = torch.zeros(1, 3, 32, 32)
    x[..., ::2] = 1.0  # stripes: a good shrink averages them, a point sample would not
    got = batched_resized_crop(x, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 8)
    assert torch.allclose(got, torch.full_like(got, 0.5), atol=1e-5)


def test_crop_boxes_follow_the_scale_range():
    torch.manual_seed(0)
    b = sample_crop_boxes(2000, 100, 100, (0.01, 1.0))
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 100).all() and (b[:, 3] <= 100).all()
    area = w * h / 1e4
    assert area.min() >= 0.008 and area.max() <= 1.0
    assert area.min() < 0.05 and area.max() > 0.9  # spans the range
    ratio = w / h
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4
    full = sample_crop_boxes(5, 50, 50, (1.0, 1.0))
    assert full.tolist() == [[0.0, 0.0, 50.0, 50.0]] * 5


def test_batched_rot90_per_image():
    x = _images()
    k = torch.tensor([0, 1, 2, 3])
    got = batched_rot90(x, k)
    for i in range(4):
        assert torch.equal(got[i], torch.rot90(x[i], i, dims=(1, 2)))


# --- BatchAugment ------------------------------------------------------------------------------


def test_batch_augment_identity_when_everything_is_off():
    cfg = AugmentConfig(size=24, **OFF)
    x = (_images() * 255).to(torch.uint8)
    got = BatchAugment(cfg)(x)
    assert torch.allclose(got, _normalise(x.float() / 255, cfg), atol=1e-5)


def test_hue_override_replaces_only_the_presets_hue():
    assert AugmentConfig(jitter="heavy", hue=0.05).jitter_strength == (0.8, 0.8, 0.8, 0.05)
    assert AugmentConfig(jitter="light").jitter_strength == JITTER_PRESETS["light"]
    # hue alone: pixels change, and the bound of the shift is the override's
    x = (_images(b=64) * 255).to(torch.uint8)
    for hue, lo, hi in ((0.02, 1e-4, 0.021), (0.4, 0.1, 0.401)):
        cfg = AugmentConfig(size=24, **{**OFF, "hue": hue}, jitter_p=1.0)
        torch.manual_seed(0)
        got = BatchAugment(cfg)(x) * torch.tensor(cfg.std).view(1, 3, 1, 1)
        got = got + torch.tensor(cfg.mean).view(1, 3, 1, 1)
        shift = _hue(got) - _hue(x.float() / 255)
        shift = ((shift + 0.5) % 1.0 - 0.5).abs().flatten(1).median(dim=1).values
        assert lo < shift.max() < hi, (hue, float(shift.max()))


def _hue(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, H, W) hue in [0, 1)."""
    hsv = np.stack(
        [
            np.asarray(
                Image.fromarray(
                    (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                ).convert("HSV")
            )[..., 0]
            for img in rgb
        ]
    )
    return torch.from_numpy(hsv).float() / 256


def test_batch_augment_rotations_and_flips_are_per_image():
    cfg = AugmentConfig(size=8, crop_min=1.0, jitter="none", blur_p=0.0)
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8) / (3 * 64)
    torch.manual_seed(0)
    out = BatchAugment(cfg)(img.repeat(64, 1, 1, 1))
    out = out * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    d4 = [torch.rot90(v, q, dims=(1, 2)) for v in (img[0], img[0].flip(2)) for q in range(4)]
    hits = [next(j for j, ref in enumerate(d4) if torch.allclose(o, ref, atol=1e-5)) for o in out]
    assert len(set(hits)) == 8  # all 8 symmetries of the square appear


def test_batch_augment_shapes_reproducibility_and_per_image_draws():
    cfg = AugmentConfig(size=16)
    x = (_images(b=1, size=40) * 255).to(torch.uint8).repeat(6, 1, 1, 1)
    aug = BatchAugment(cfg)
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # same input image, different parameters


def test_batch_augment_and_v2_pipeline_share_the_distribution():
    # statistics of many views of one image agree between the two paths (same size in and out,
    # as in training; shrinking filters differ slightly: antialias vs area sampling)
    cfg = AugmentConfig(size=32, jitter="heavy")
    g = torch.Generator().manual_seed(1)
    base = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2 + 0.1 * torch.rand(3, 32, 32, generator=g)
    img = (base.clamp(0, 1) * 255).to(torch.uint8)
    n = 400
    torch.manual_seed(0)
    batched = BatchAugment(cfg)(img[None].repeat(n, 1, 1, 1))
    t = build_transform(cfg)
    single = torch.stack([t(img) for _ in range(n)])
    mb, ms = batched.mean(dim=(2, 3)), single.mean(dim=(2, 3))
    z = (mb.mean(0) - ms.mean(0)) / ((mb.var(0) + ms.var(0)) / n).sqrt()
    assert (z.abs() < 4).all(), z
    assert mb.std(0).sub(ms.std(0)).abs().div(ms.std(0)).max() < 0.2  # spread of jitter
    sb, ss = batched.std(dim=(2, 3)).mean(0), single.std(dim=(2, 3)).mean(0)
    assert torch.allclose(sb, ss, rtol=0.15), (sb, ss)
    # and the augmentation is strong: views differ a lot from each other
    assert mb.std(0).min() > 0.2
