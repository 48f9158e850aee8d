"""engine.encode: the precision choice (whatever CPU runs the test) and TileEncoder's numerics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine.encode as encode
from engine.encode import PRECISIONS, TileEncoder, autocast_dtype, resolve_precision
from engine.errors import HistoclusterError
from engine.models import load_encoder
from engine.slide import open_slide
from engine.tiling import TileGrid

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_on_cpu_follows_native_bf16(
    native_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode, "cpu_supports_bf16", lambda: native_bf16)
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16 else "fp32")


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_on_cuda_prefers_bf16_then_fp16(
    bf16_supported: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(encode, "cpu_supports_bf16", lambda: not bf16_supported)  # not consulted
    assert resolve_precision("auto", CUDA) == ("bf16" if bf16_supported else "fp16")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept_on_any_device(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for native in (True, False):
        monkeypatch.setattr(encode, "cpu_supports_bf16", lambda native=native: native)
        assert resolve_precision(precision, CPU) == precision
        assert resolve_precision(precision, CUDA) == precision
    assert (
        autocast_dtype(precision)
        == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    )  # type: ignore[arg-type]


def test_unknown_precision_is_one_line_naming_the_choices() -> None:
    with pytest.raises(
        HistoclusterError, match="--precision fp8: choose one of auto, fp32, bf16, fp16"
    ):
        resolve_precision("fp8", CPU)
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")


def test_cpu_supports_bf16_answers_a_bool() -> None:
    assert isinstance(encode.cpu_supports_bf16(), bool)


@pytest.fixture(scope="module")
def cmu_tiles(cmu_svs: Path) -> torch.Tensor:
    """(4, 224, 224, 3) uint8 tissue tiles of the real CMU slide."""
    grid = TileGrid(open_slide(cmu_svs), target_mpp=0.5, tile_px=224)
    rows, cols = np.nonzero(grid.selected)
    return torch.from_numpy(
        np.stack([grid.read_tile(int(r), int(c)) for r, c in zip(rows[:4], cols[:4], strict=True)])
    )


def test_bf16_features_match_fp32(cmu_tiles: torch.Tensor) -> None:
    """bf16 autocast on CPU (what --precision auto picks on CPUs with native bf16) vs fp32."""
    encoder = load_encoder("resnet18-random")
    fp32 = TileEncoder(encoder, CPU, "fp32", channels_last=False)(cmu_tiles)
    bf16 = TileEncoder(encoder, CPU, "bf16")(cmu_tiles)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == (4, 512)
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert cosine.min() >= 0.99, cosine
    assert not torch.equal(fp32, bf16)  # bf16 really ran


def test_channels_last_does_not_change_fp32_features(cmu_tiles: torch.Tensor) -> None:
    encoder = load_encoder("resnet18-random")
    a = TileEncoder(encoder, CPU, "fp32", channels_last=False)(cmu_tiles)
    b = TileEncoder(encoder, CPU, "fp32", channels_last=True)(cmu_tiles)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [3, 4])
def test_batch_multiple_pads_and_drops_the_padding(cmu_tiles: torch.Tensor, n: int) -> None:
    """A batch padded up to a multiple of 8 gives the same features for its own tiles, only those."""
    encoder = load_encoder("resnet18-random")
    plain = TileEncoder(encoder, CPU, "fp32", batch_multiple=1)(cmu_tiles[:n])
    padded = TileEncoder(encoder, CPU, "fp32", batch_multiple=8)(cmu_tiles[:n])
    assert padded.shape == plain.shape == (n, 512)
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-4)
    batches: list[int] = []
    handle = encoder.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    try:
        TileEncoder(encoder, CPU, "fp32", batch_multiple=8)(cmu_tiles[:n])
        TileEncoder(encoder, CPU, "fp32", batch_multiple=2)(cmu_tiles[:3])
    finally:
        handle.remove()
    assert batches == [8, 4]  # what the network saw
