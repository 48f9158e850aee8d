"""engine.models: every checkpoint kind written here and loaded back, and every way loading must refuse."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from engine import models, resnet, sample_data
from engine.errors import CheckpointError
from engine.models import (
    CIGA_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    ProjectionHead,
    build_backbone,
    default_encoder_spec,
    feature_dim,
    infer_arch,
    load_encoder,
    named_specs,
    save_encoder,
)
from engine.sample_data import sample_encoder_path

torch.set_num_threads(1)


def assert_one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def resnet18() -> torchvision.models.ResNet:
    """A torchvision resnet18 (with its ImageNet-style fc) of random, non-default weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = torchvision.models.resnet18(weights=None)
        # Non-trivial BN statistics so that loading running stats matters.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """(2,3,64,64) float input."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, 64, 64, generator=g)


def reference_features(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward with fc removed: (B, 512)."""
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(model.state_dict())
    ref.fc = nn.Identity()
    with torch.no_grad():
        return ref.eval()(x)


def ciga_state_dict(model: torchvision.models.ResNet) -> dict[str, torch.Tensor]:
    """The released Ciga et al. layout: model.resnet.<name>, projection head fc.1 / fc.3, no plain fc."""
    state = {
        f"model.resnet.{k}": v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith("fc.")
    }
    state["model.resnet.fc.1.weight"] = torch.randn(512, 512)
    state["model.resnet.fc.1.bias"] = torch.randn(512)
    state["model.resnet.fc.3.weight"] = torch.randn(128, 512)
    state["model.resnet.fc.3.bias"] = torch.randn(128)
    return state


# ----------------------------------------------------------------------------- architectures


def test_feature_dims_and_backbone_shapes() -> None:
    assert {a: feature_dim(a) for a in ("resnet18", "resnet34", "resnet50", "resnet101")} == {
        "resnet18": 512,
        "resnet34": 512,
        "resnet50": 2048,
        "resnet101": 2048,
    }
    backbone = build_backbone("resnet18")
    assert isinstance(backbone, resnet.ResNet)
    assert isinstance(backbone.fc, nn.Identity)
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 64, 64)).shape == (2, 512)
    with torch.device("meta"):
        wide = build_backbone("resnet50")
        assert wide(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)
    with pytest.raises(ValueError, match="resnet152"):
        build_backbone("resnet152")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_is_torchvisions_network(arch: str) -> None:
    """engine.resnet builds torchvision's network: same keys, same seeded weights, same features."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ours = build_backbone(arch)
        torch.manual_seed(5)
        theirs = getattr(torchvision.models, arch)(weights=None)
    theirs.fc = nn.Identity()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_extraction_imports_no_torchvision(tmp_path: Path) -> None:
    """torchvision's import costs ~2 s of start-up (its ops import torch._dynamo): extraction
    builds its ResNets without it, and loading a checkpoint (onto the meta device) does not
    import torch._dynamo either."""
    code = (
        "import sys, engine.extract\n"
        "from engine.models import build_backbone, load_encoder, save_encoder\n"
        f"path = save_encoder({str(tmp_path / 'e.pt')!r}, build_backbone('resnet18'), 'resnet18', "
        "(0.5,) * 3, (0.5,) * 3, 224, {})\n"
        "load_encoder(path)\n"
        "print(sorted({'torchvision', 'torch._dynamo'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_infer_arch_from_torchvision_keys(arch: str) -> None:
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert infer_arch(state) == arch


def test_infer_arch_refuses_other_layouts() -> None:
    with torch.device("meta"):
        state = torchvision.models.resnet152(weights=None).state_dict()
    with pytest.raises(CheckpointError, match="bottleneck"):
        infer_arch(state)


def test_projection_head() -> None:
    head = ProjectionHead(512, 256)
    layers = list(head)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (
        512,
        256,
        128,
    )
    assert head(torch.zeros(3, 512)).shape == (3, 128)
    assert ProjectionHead(2048, 2048, 64)(torch.zeros(1, 2048)).shape == (1, 64)


# ----------------------------------------------------------------------------- named specs


def test_random_spec_is_deterministic_and_leaves_global_rng() -> None:
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    a = load_encoder("resnet18-random")
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG stream is untouched
    b = load_encoder("resnet18-random")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert (a.arch, a.dim, a.input_px, a.mean, a.std) == (
        "resnet18",
        512,
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    assert a.spec == "resnet18-random" and a.sha256 is None
    assert not a.training
    with torch.no_grad():
        assert a(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


def test_unknown_spec_and_missing_file_list_valid_specs(tmp_path: Path) -> None:
    for spec in ("resnet152-random", str(tmp_path / "nope.pt"), "resnet18-imagenet21k"):
        with pytest.raises(CheckpointError) as err:
            load_encoder(spec)
        message = assert_one_line(err)
        assert spec in message
        for valid in ("resnet18-random", "resnet101-imagenet", "ciga-resnet18"):
            assert valid in message
    assert set(named_specs()) >= {"resnet34-random", "resnet50-imagenet"}
    with pytest.raises(CheckpointError, match="directory"):
        load_encoder(tmp_path)


def test_imagenet_offline_fails_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty torch hub cache and a proxy that refuses connections: offline on any machine,
    # so this test can never download anything.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CheckpointError) as err:
        load_encoder("resnet18-imagenet")
    message = assert_one_line(err)
    assert message.startswith("resnet18-imagenet: ")
    assert "internet" in message and "local state_dict path" in message
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_default_encoder_spec_is_the_packaged_sample_encoder() -> None:
    sample = sample_encoder_path()
    assert sample is not None and sample.name == "sample_encoder.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found: no warning
        assert default_encoder_spec() == str(sample)
    assert load_encoder("sample").sha256 == load_encoder(default_encoder_spec()).sha256


def test_default_encoder_spec_warns_naming_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "sample_encoder_path", lambda: None)
    monkeypatch.setattr(sample_data, "sample_encoder_path", lambda: None)
    with pytest.warns(UserWarning, match="sample_encoder.pt of the histocluster_sample_data"):
        assert default_encoder_spec() == "resnet18-random"
    with pytest.raises(CheckpointError) as err:
        load_encoder("sample")
    assert "histocluster_sample_data" in assert_one_line(err)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("input_px", 0, "input_px 0"),
        ("std", [0.5, 0.0, 0.5], "std"),
        ("mean", [float("nan"), 0.5, 0.5], "mean"),
        ("input_px", "big", "not numbers"),
    ],
)
def test_bad_normalisation_in_a_checkpoint_is_one_line(
    tmp_path: Path, resnet18, field: str, value, words: str
) -> None:
    path = save_encoder(
        tmp_path / "enc.pt", resnet18, "resnet18", IMAGENET_MEAN, IMAGENET_STD, 224, {}
    )
    payload = torch.load(path, weights_only=True)
    payload[field] = value
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    message = assert_one_line(err)
    assert str(path) in message and words in message


# ----------------------------------------------------------------------------- engine.pretrain format


@pytest.mark.parametrize("half", [False, True])
def test_save_encoder_roundtrip(tmp_path: Path, resnet18, images, half: bool) -> None:
    backbone = build_backbone("resnet18")
    backbone.load_state_dict(
        {k: v for k, v in resnet18.state_dict().items() if not k.startswith("fc.")}
    )
    config = {"lr": 0.1, "data": tmp_path / "patches", "augment": ["crop", "jitter"]}
    path = save_encoder(
        tmp_path / "enc.pt",
        backbone,
        "resnet18",
        (0.7, 0.6, 0.5),
        (0.2, 0.2, 0.3),
        96,
        config,
        half=half,
    )
    stored = torch.load(path, weights_only=True)
    assert stored["format"] == "histocluster-encoder" and stored["version"] == 1
    expected_dtype = torch.float16 if half else torch.float32
    assert stored["state_dict"]["conv1.weight"].dtype == expected_dtype
    assert not any(k.startswith("fc.") for k in stored["state_dict"])

    encoder = load_encoder(path)
    assert (encoder.arch, encoder.input_px, encoder.mean, encoder.std) == (
        "resnet18",
        96,
        (0.7, 0.6, 0.5),
        (0.2, 0.2, 0.3),
    )
    assert encoder.config == {
        "lr": 0.1,
        "data": str(tmp_path / "patches"),
        "augment": ["crop", "jitter"],
    }
    assert encoder.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert encoder.spec == str(path.resolve())
    assert all(v.dtype != torch.float16 for v in encoder.state_dict().values())
    with torch.no_grad():
        got = encoder(images)
    ref = reference_features(resnet18, images)
    if half:
        assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.999
    else:
        torch.testing.assert_close(got, ref)


def test_save_encoder_refuses_wrong_arch(tmp_path: Path) -> None:
    with torch.device("meta"):
        backbone = build_backbone("resnet18")
    with pytest.raises(ValueError, match="missing"):
        save_encoder(tmp_path / "x.pt", backbone, "resnet34", IMAGENET_MEAN, IMAGENET_STD, 224, {})
    assert not (tmp_path / "x.pt").exists()


def test_encoder_format_version_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format": "histocluster-encoder", "version": 2, "arch": "resnet18"}, path)
    with pytest.raises(CheckpointError, match="version 2"):
        load_encoder(path)


# ----------------------------------------------------------------------------- Ciga et al. release


def test_ciga_checkpoint_matches_torchvision(tmp_path: Path, resnet18, images) -> None:
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save({"state_dict": ciga_state_dict(resnet18), "epoch": 999}, path)
    encoder = load_encoder(path)
    assert (encoder.arch, encoder.input_px, encoder.mean, encoder.std) == (
        "resnet18",
        224,
        CIGA_MEAN,
        CIGA_MEAN,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            encoder(images), reference_features(resnet18, images), rtol=0, atol=0
        )


def test_ciga_checkpoint_with_extra_or_missing_keys_is_refused(tmp_path: Path, resnet18) -> None:
    extra = ciga_state_dict(resnet18)
    extra["model.queue"] = torch.zeros(4)
    extra["model.resnet.layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_encoder(tmp_path / "extra.ckpt")
    message = assert_one_line(err)
    assert (
        "unexpected (2)" in message
        and "model.queue" in message
        and "layer5.0.conv1.weight" in message
    )

    missing = ciga_state_dict(resnet18)
    del missing["model.resnet.layer4.1.bn2.running_var"]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_encoder(tmp_path / "missing.ckpt")
    assert "missing (1): layer4.1.bn2.running_var" in assert_one_line(err)


def test_ciga_spec_reads_the_fetch_weights_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet18, images
) -> None:
    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY"):  # a proxy that refuses: never downloads
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CheckpointError) as err:
        load_encoder("ciga-resnet18")
    message = assert_one_line(err)
    assert "python -m engine.fetch_weights ciga-resnet18" in message
    assert "ciga-resnet18:/path/to/pytorchnative_tenpercent_resnet18.ckpt" in message
    assert "releases/download/nativetenpercent" in message  # names the URL
    assert not list(tmp_path.glob("*.part"))
    torch.save(
        {"state_dict": ciga_state_dict(resnet18)},
        tmp_path / "pytorchnative_tenpercent_resnet18.ckpt",
    )
    encoder = load_encoder("ciga-resnet18")
    assert encoder.spec == "ciga-resnet18" and encoder.mean == CIGA_MEAN
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference_features(resnet18, images))


def test_lightning_pickle_needs_trust(tmp_path: Path, resnet18, images) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "epoch": 99,
            "global_step": 1000,
            "state_dict": ciga_state_dict(resnet18),
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
            "hyper_parameters": argparse.Namespace(batch_size=512, optimizer="lars"),
        },
        path,
    )
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    message = assert_one_line(err)
    assert "--trust-checkpoint" in message and "argparse.Namespace" in message

    with pytest.warns(UserWarning, match="pickle"):
        encoder = load_encoder(path, trust_checkpoint=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference_features(resnet18, images))


# ----------------------------------------------------------------------------- plain state_dicts


def test_plain_torchvision_state_dict(tmp_path: Path, resnet18, images) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18.state_dict(), path)  # includes fc.weight / fc.bias: dropped
    encoder = load_encoder(str(path))
    assert (encoder.arch, encoder.mean, encoder.input_px) == ("resnet18", IMAGENET_MEAN, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), reference_features(resnet18, images))

    ddp = tmp_path / "ddp.pt"  # DDP-wrapped keys, nested under "state_dict", no num_batches_tracked
    torch.save(
        {
            "state_dict": {
                f"module.{k}": v
                for k, v in resnet18.state_dict().items()
                if not k.endswith("num_batches_tracked")
            }
        },
        ddp,
    )
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(ddp)(images), reference_features(resnet18, images))


def test_mismatched_state_dict_lists_missing_and_unexpected(tmp_path: Path, resnet18) -> None:
    state = dict(resnet18.state_dict())
    state["layer2.0.conv1.weights"] = state.pop("layer2.0.conv1.weight")  # a misspelt key
    state["layer3.1.bn1.bias"] = torch.zeros(7)  # a wrong shape
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    message = assert_one_line(err)
    assert str(path) in message
    assert "missing (1): layer2.0.conv1.weight" in message
    assert "unexpected (1): layer2.0.conv1.weights" in message
    assert "layer3.1.bn1.bias (7,)≠(256,)" in message


@pytest.mark.parametrize(
    ("name", "content"),
    [("junk.pt", os.urandom(2000)), ("empty.pt", b""), ("text.pt", b"not a checkpoint\n")],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no noise from torch either
        with pytest.raises(CheckpointError) as err:
            load_encoder(path)
    assert str(path) in assert_one_line(err)


def test_truncated_and_non_dict_checkpoints(tmp_path: Path, resnet18) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(resnet18.state_dict(), whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_encoder(truncated)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_encoder(listed)
    odd = tmp_path / "odd.pt"
    torch.save({"weights": {"a": torch.zeros(1)}, "meta": 1}, odd)
    with pytest.raises(CheckpointError, match="top-level keys: weights, meta"):
        load_encoder(odd)


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_normalises_and_resizes() -> None:
    encoder = Encoder(
        build_backbone("resnet18"), "resnet18", (0.5, 0.4, 0.3), (0.1, 0.2, 0.25), 32, "t"
    )
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = encoder.preprocess(tiles)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.1, 0.2, 0.25]).view(1, 3, 1, 1)
    expected = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(encoder.preprocess(torch.from_numpy(tiles)), expected)

    # A different size is resized: a constant image stays constant, a 2x2 checkerboard averages out.
    grey = np.full((1, 64, 48, 3), 51, dtype=np.uint8)
    resized = encoder.preprocess(grey)
    assert resized.shape == (1, 3, 32, 32)
    torch.testing.assert_close(resized, ((torch.full((1, 3, 32, 32), 0.2) - mean) / std))
    board = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    board[:, ::2, ::2] = board[:, 1::2, 1::2] = 255
    smooth = encoder.preprocess(board) * std + mean
    torch.testing.assert_close(smooth, torch.full((1, 3, 32, 32), 0.5), atol=0.02, rtol=0)

    # op for op torchvision's to_dtype(scale=True), resize(antialias=True), normalize
    from torchvision.transforms.v2 import functional as TF

    for batch in (tiles, grey, board, rng.integers(0, 256, size=(3, 45, 45, 3), dtype=np.uint8)):
        x = TF.to_dtype(torch.from_numpy(batch).permute(0, 3, 1, 2), torch.float32, scale=True)
        if x.shape[-2:] != (32, 32):
            x = TF.resize(x, [32, 32], antialias=True)
        assert torch.equal(
            encoder.preprocess(batch), TF.normalize(x, list(encoder.mean), list(encoder.std))
        )

    with pytest.raises(ValueError, match="uint8"):
        encoder.preprocess(tiles.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B,H,W,3\)"):
        encoder.preprocess(tiles[0])


def test_encoder_info_is_json_ready() -> None:
    encoder = load_encoder("resnet18-random")
    info = encoder.info()
    assert info == {
        "arch": "resnet18",
        "dim": 512,
        "input_px": 224,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "spec": "resnet18-random",
        "sha256": None,
        "embedding": "pooled",
        "source": None,
    }
