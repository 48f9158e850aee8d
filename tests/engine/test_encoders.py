"""The encoder registry: every transformer entry built with random weights in its released layout
(fewer blocks), saved as the release does, loaded by ``name:path``; embedding rules by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.encoders import REGISTRY, entry, weights_path
from engine.errors import CheckpointError
from engine.models import load_encoder
from engine.vit import build_model

torch.set_num_threads(1)

TIMM = [e.name for e in REGISTRY.values() if e.family == "timm"]
BLOCKS = 1


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def seeded(name: str, seed: int = 1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(entry(name), blocks=BLOCKS).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TIMM)
def test_timm_entry_loads_its_released_layout(name: str, tmp_path: Path, image) -> None:
    e = REGISTRY[name]
    reference = seeded(name)
    state = reference.model.state_dict()
    assert not any(k.startswith("head.") and state[k].numel() for k in state)
    path = tmp_path / e.filename  # type: ignore[operator]
    torch.save(state, path)  # pytorch_model.bin: a plain state dict, as released
    encoder = load_encoder(f"{name}:{path}", blocks=BLOCKS)
    assert encoder.dim == e.dim and encoder.input_px == e.input_px
    assert encoder.mean == e.mean and encoder.std == e.std
    with torch.no_grad():
        tokens = reference.model.forward_features(image)
        got = encoder(image)
    assert got.shape == (1, e.dim)
    width = tokens.shape[-1]
    if e.embedding == "cls+mean_patch":
        prefix = 1 + int(e.kwargs.get("reg_tokens", 0))
        expected = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)
    else:
        expected = tokens[:, 0]
    assert expected.shape[-1] == e.dim == (2 * width if e.embedding == "cls+mean_patch" else width)
    torch.testing.assert_close(got, expected)
    ident = encoder.identity()
    assert ident.embedding == e.embedding and ident.dim == e.dim and ident.arch == e.arch
    assert ident.sha256 and len(ident.sha256) == 64 and ident.name == f"{name}:{path.resolve()}"


def test_virchow2_excludes_its_four_register_tokens(image) -> None:
    model = seeded("virchow2")
    assert model.prefix_tokens == 5 and "reg_token" in model.model.state_dict()
    with torch.no_grad():
        tokens = model.model.forward_features(image)
        got = model(image)
    assert tokens.shape[1] == 5 + (224 // 14) ** 2
    by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    torch.testing.assert_close(got, by_hand)
    assert not torch.allclose(got, with_registers)


def test_safetensors_and_directories_load(tmp_path: Path, image) -> None:
    reference = seeded("h-optimus-0")
    folder = tmp_path / "H-optimus-0"
    folder.mkdir()
    save_file(reference.model.state_dict(), str(folder / "model.safetensors"))
    for spec in (f"h-optimus-0:{folder}", f"h-optimus-0:{folder / 'model.safetensors'}"):
        encoder = load_encoder(spec, blocks=BLOCKS)
        with torch.no_grad():
            torch.testing.assert_close(encoder(image), reference(image))


def test_every_key_mismatch_is_listed_in_one_line(tmp_path: Path) -> None:
    state = dict(seeded("uni").model.state_dict())
    state.pop("cls_token")
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"uni:{path}", blocks=BLOCKS)
    message = one_line(err)
    for words in ("missing (1): cls_token", "unexpected (1): extra.weight", "wrong shape (1)"):
        assert words in message
    assert "nothing was loaded" in message


def test_a_pickle_file_is_refused_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": seeded("lunit-dino-vits16").model.state_dict(), "x": Path("/")}, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"lunit-dino-vits16:{path}", blocks=BLOCKS)
    assert "--trust-checkpoint" in one_line(err)


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_transformers_directory_loads(name: str, tmp_path: Path, image) -> None:
    pytest.importorskip("transformers")
    e = REGISTRY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        reference = build_model(e, blocks=BLOCKS).eval()
    folder = tmp_path / name
    reference.model.save_pretrained(folder)  # config.json + model.safetensors, as released
    assert (folder / "model.safetensors").is_file()
    encoder = load_encoder(f"{name}:{folder}")  # depth comes from the directory's config.json
    with torch.no_grad():
        expected = reference.model(pixel_values=image).last_hidden_state[:, 0, :]
        torch.testing.assert_close(encoder(image), expected)
    assert encoder.dim == e.dim == expected.shape[-1]
    assert encoder.identity().embedding == "cls"


def test_transformers_missing_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"phikon:{tmp_path}")
    assert 'pip install "histocluster[hf]"' in one_line(err)


def test_offline_by_name_names_the_hub_id_and_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_encoder("virchow2")
    message = one_line(err)
    assert "hf:paige-ai/Virchow2" in message and "virchow2:/path/to/pytorch_model.bin" in message
    assert weights_path(REGISTRY["virchow2"]) == tmp_path / "virchow2" / "pytorch_model.bin"
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"uni:{tmp_path / 'absent.bin'}")
    assert "no such file" in one_line(err)


def test_registry_entries_are_complete() -> None:
    for e in REGISTRY.values():
        assert e.dim > 0 and e.input_px > 0 and e.licence and e.card
        assert e.embedding in ("pooled", "cls", "cls+mean_patch")
        if e.family in ("timm", "transformers"):
            assert e.hub_id or e.url
            assert e.filename
    assert REGISTRY["virchow2"].dim == 2560 and REGISTRY["uni2-h"].dim == 1536
