"""The encoder registry: every transformer entry built with random weights in its released layout
(one block: key names and shapes are those of the released file), saved as the release does,
loaded by ``name:path``, and its embedding rule checked against the token outputs by hand.

Cost: one block per model, and the dynamic-size models (UNI, UNI2-h, Virchow2, kaiko) see a
4 x 4-patch image instead of 224 px, so the whole file takes seconds of CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.encoders import REGISTRY, entry, weights_path
from engine.errors import CheckpointError
from engine.files import sha256_file
from engine.models import load_encoder
from engine.vit import TokenEncoder, build_model

TIMM = [e.name for e in REGISTRY.values() if e.family == "timm"]
HF = [e.name for e in REGISTRY.values() if e.family == "transformers"]
BLOCKS = 1

# Facts of the released files that pin the architecture (a timm default drifting would break
# them): (width, prefix tokens = class + registers, shape of blocks.0.mlp.fc2.weight).
RELEASED = {
    "uni": (1024, 1, (1024, 4096)),
    "uni2-h": (1536, 9, (1536, 4096)),  # SwiGLUPacked: fc1 8192 -> 2 x 4096
    # Paige's answer in huggingface.co/paige-ai/Virchow/discussions/1: fc2 is [1280, 3416].
    "virchow2": (1280, 5, (1280, 3416)),
    "h-optimus-0": (1536, 5, (1536, 4096)),
    "h-optimus-1": (1536, 5, (1536, 4096)),
    "prov-gigapath": (1536, 1, (1536, 4096)),
    "lunit-dino-vits16": (384, 1, (384, 1536)),
    "kaiko-vitb16": (768, 1, (768, 3072)),
}


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def seeded(name: str, seed: int = 1) -> TokenEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(entry(name), blocks=BLOCKS).eval()  # type: ignore[arg-type]


def image_for(model: TokenEncoder, name: str) -> torch.Tensor:
    """(1,3,S,S): 4 x 4 patches where the model takes any size, else the size it was built for."""
    patch = model.model.patch_embed.patch_size[0]
    side = 4 * patch if REGISTRY[name].kwargs.get("dynamic_img_size") else REGISTRY[name].input_px
    return torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def test_every_timm_entry_has_its_released_facts() -> None:
    assert set(RELEASED) == set(TIMM)


@pytest.mark.parametrize("name", TIMM)
def test_timm_entry_loads_its_released_layout(name: str, tmp_path: Path) -> None:
    e = REGISTRY[name]
    reference = seeded(name)
    state = reference.model.state_dict()
    width, prefix, fc2 = RELEASED[name]
    assert tuple(state["blocks.0.mlp.fc2.weight"].shape) == fc2
    assert reference.prefix_tokens == prefix and ("reg_token" in state) == (prefix > 1)
    assert not any(k.startswith("head.") and state[k].numel() for k in state)
    path = tmp_path / e.filename  # type: ignore[operator]
    torch.save(state, path)  # the release: a plain state dict written by torch.save
    encoder = load_encoder(f"{name}:{path}", blocks=BLOCKS)
    assert encoder.dim == e.dim and encoder.input_px == e.input_px
    assert encoder.mean == e.mean and encoder.std == e.std
    image = image_for(reference, name)
    with torch.no_grad():
        tokens = reference.model.forward_features(image)
        got = encoder(image)
    patches = (image.shape[-1] // reference.model.patch_embed.patch_size[0]) ** 2
    assert tokens.shape == (1, prefix + patches, width)
    if e.embedding == "cls+mean_patch":
        expected = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)
        with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)
        assert not torch.allclose(got, with_registers, atol=1e-4)
    else:
        expected = tokens[:, 0]
    assert got.shape == (1, e.dim) and e.dim == expected.shape[-1]
    torch.testing.assert_close(got, expected)
    ident = encoder.identity()
    assert (ident.arch, ident.dim, ident.embedding) == (e.arch, e.dim, e.embedding)
    assert ident.sha256 == sha256_file(path) and ident.name == f"{name}:{path.resolve()}"
    assert ident.source == e.source


def test_safetensors_and_directories_load(tmp_path: Path) -> None:
    reference = seeded("lunit-dino-vits16")
    folder = tmp_path / "lunit"
    folder.mkdir()
    save_file(reference.model.state_dict(), str(folder / "model.safetensors"))
    image = image_for(reference, "lunit-dino-vits16")
    with torch.no_grad():
        expected = reference(image)
    for spec in (f"lunit-dino-vits16:{folder}", f"lunit-dino-vits16:{folder}/model.safetensors"):
        encoder = load_encoder(spec, blocks=BLOCKS)
        with torch.no_grad():
            torch.testing.assert_close(encoder(image), expected)


def test_every_key_mismatch_is_listed_in_one_line(tmp_path: Path) -> None:
    state = dict(seeded("lunit-dino-vits16").model.state_dict())
    state.pop("cls_token")
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"lunit-dino-vits16:{path}", blocks=BLOCKS)
    message = one_line(err)
    for words in ("missing (1): cls_token", "unexpected (1): extra.weight", "wrong shape (1)"):
        assert words in message
    assert "nothing was loaded" in message


def test_a_file_of_another_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(seeded("lunit-dino-vits16").model.state_dict(), path)  # 1 block, not 12
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"lunit-dino-vits16:{path}")
    assert "missing (" in one_line(err) and "blocks.1." in one_line(err)


def test_a_pickle_file_is_refused_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": seeded("lunit-dino-vits16").model.state_dict(), "x": Path("/")}, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"lunit-dino-vits16:{path}", blocks=BLOCKS)
    assert "--trust-checkpoint" in one_line(err)


@pytest.mark.parametrize("name", HF)
def test_transformers_directory_loads(name: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    e = REGISTRY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        reference = build_model(e, blocks=BLOCKS).eval()
    folder = tmp_path / name
    reference.model.save_pretrained(folder)  # config.json + model.safetensors, as released
    assert (folder / "model.safetensors").is_file()
    encoder = load_encoder(f"{name}:{folder}")  # depth comes from the directory's config.json
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
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
    import huggingface_hub.constants

    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (another test may have imported it).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
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
            assert (e.hub_id or e.url) and e.filename and e.card.startswith("https://")
            assert e.gated <= bool(e.hub_id)  # only hub repositories are gated
    assert REGISTRY["virchow2"].dim == 2560 and REGISTRY["uni2-h"].dim == 1536
    assert any(e.name.startswith("kaiko") and e.family == "timm" for e in REGISTRY.values())
