"""The encoder registry: one entry per named model, with where its weights live and how it embeds.

Light on purpose (no torch): the GUI lists names, dims and licences and ``fetch_weights --list``
says what is cached without loading a model. :mod:`engine.models` builds and loads an entry;
:mod:`engine.fetch_weights` downloads one into :func:`weights_path`.

Each pathology foundation model's settings come from its model card (cited beside the entry).
Embedding rules (``EncoderEntry.embedding``):

- ``pooled``: a ResNet's global average pool, (B, C).
- ``cls``: the class token of the final (normed) token sequence, (B, C).
- ``cls+mean_patch``: the class token concatenated with the mean of the patch tokens, register
  tokens excluded, (B, 2C) (Virchow2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from engine.files import cache_dir

__all__ = [
    "CIGA",
    "EMBEDDINGS",
    "REGISTRY",
    "EncoderEntry",
    "entry",
    "registry_names",
    "weights_path",
]

Family = Literal["torchvision", "ciga", "sample", "timm", "transformers"]
EMBEDDINGS = ("pooled", "cls", "cls+mean_patch")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderEntry:
    """One named encoder.

    Attributes:
        name: the spec users type (``--encoder uni``).
        family: how it is built: ``timm`` (``timm.create_model(arch, **kwargs)``), ``transformers``
            (a Hugging Face ``ViTModel`` / ``Dinov2Model``), ``ciga`` / ``sample`` / ``torchvision``
            (the ResNets of :mod:`engine.models`).
        arch: timm model name, transformers model class, or torchvision ResNet name.
        kwargs: the exact keyword arguments of the model card (timm) or the ``config.json``
            values (transformers). Classes are named as strings (``"timm.layers.SwiGLUPacked"``).
        dim: length of one tile's embedding.
        input_px: side of the square image the model was trained on.
        mean, std: normalisation of [0, 1] RGB.
        embedding: one of :data:`EMBEDDINGS`.
        mpp: microns per pixel it was trained at (None when the card does not say).
        licence: the weights' licence as the card states it.
        hub_id / filename: the Hugging Face repository and the weights file in it.
        url: a direct release URL (GitHub releases) instead of a hub id.
        sha256: the published hash of the weights file, where there is one.
        gated: the hub repository needs an accepted licence and the user's token.
        card: the model card the settings come from.
    """

    name: str
    family: Family
    arch: str
    dim: int
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding: str
    licence: str
    mpp: float | None = None
    hub_id: str | None = None
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None
    gated: bool = False
    card: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def source(self) -> str:
        """Where the weights come from: ``hf:<hub id>/<file>``, the release URL, or how they are made."""
        if self.hub_id:
            return f"hf:{self.hub_id}/{self.filename}"
        if self.url:
            return self.url
        return {"torchvision": "torchvision", "sample": "shipped with histocluster"}.get(
            self.family, self.family
        )

    @property
    def downloadable(self) -> bool:
        """True when ``python -m engine.fetch_weights NAME`` can fetch the weights."""
        return bool(self.hub_id or self.url)


def _kw(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


CIGA_URL = (
    "https://github.com/ozanciga/self-supervised-histopathology/releases/download/"
    "nativetenpercent/pytorchnative_tenpercent_resnet18.ckpt"
)


def _resnet(
    name: str, family: Family, arch: str, dim: int, licence: str, **fields: Any
) -> EncoderEntry:
    """A ResNet: 224-px input, ImageNet normalisation, the global average pool as the embedding;
    ``fields`` are its differences (any other :class:`EncoderEntry` field)."""
    shared = {"input_px": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "embedding": "pooled"}
    return EncoderEntry(
        name=name, family=family, arch=arch, dim=dim, licence=licence, **{**shared, **fields}
    )


CIGA = _resnet(
    # Ciga, Xu and Martel 2022 (the paper this project reproduces); README of
    # github.com/ozanciga/self-supervised-histopathology: ResNet-18, 224 px, mean/std 0.5.
    "ciga-resnet18",
    "ciga",
    "resnet18",
    512,
    "MIT (code); weights released with the paper",
    mean=HALF,
    std=HALF,
    url=CIGA_URL,
    filename="pytorchnative_tenpercent_resnet18.ckpt",
    card="https://github.com/ozanciga/self-supervised-histopathology",
)

_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"


def _foundation(
    name: str,
    arch: str,
    kwargs: Mapping[str, Any],
    dim: int,
    licence: str,
    *,
    hub_id: str | None = None,
    filename: str = "pytorch_model.bin",
    gated: bool = True,
    **fields: Any,
) -> EncoderEntry:
    """A pathology foundation model. What most of their cards share is the default: a timm ViT
    on 224-px tiles at 0.5 um/px, ImageNet normalisation, the class token; weights in
    ``pytorch_model.bin`` of a gated hub repository whose page is the card. ``fields`` are the
    card's differences (any other :class:`EncoderEntry` field)."""
    shared: dict[str, Any] = {
        "family": "timm", "input_px": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "embedding": "cls", "mpp": 0.5,
    }  # fmt: skip
    if hub_id is not None:
        shared.update(hub_id=hub_id, gated=gated, card=f"https://huggingface.co/{hub_id}")
    return EncoderEntry(
        name=name, arch=arch, kwargs=kwargs, dim=dim, licence=licence, filename=filename,
        **{**shared, **fields},
    )  # fmt: skip


H_OPTIMUS_0 = _foundation(
    # Card https://huggingface.co/bioptimus/H-optimus-0: timm "hf-hub:bioptimus/H-optimus-0"
    # with init_values=1e-5, dynamic_img_size=False; config.json: vit_giant_patch14_reg4_dinov2,
    # global_pool "token", 1536 features, 224 px, mean (0.707223, 0.578729, 0.703617), std
    # (0.211883, 0.230117, 0.177517), Apache 2.0; 224-px tiles at 0.5 um/px. Same kwargs in
    # mahmoodlab/TRIDENT (local pytorch_model.bin, strict).
    "h-optimus-0",
    "vit_giant_patch14_reg4_dinov2",
    _kw(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0,
        global_pool="token"),
    1536,
    "Apache-2.0",
    hub_id="bioptimus/H-optimus-0",
    gated=False,
    mean=(0.707223, 0.578729, 0.703617),
    std=(0.211883, 0.230117, 0.177517),
)  # fmt: skip
H_OPTIMUS_1 = replace(
    # https://huggingface.co/bioptimus/H-optimus-1 (gated): timm "hf_hub:bioptimus/H-optimus-1"
    # with init_values=1e-5, dynamic_img_size=False; architecture, file (pytorch_model.bin) and
    # normalisation as H-optimus-0 per mahmoodlab/TRIDENT (HOptimus1InferenceEncoder). The
    # card's licence text was not retrieved: read it before use.
    H_OPTIMUS_0,
    name="h-optimus-1",
    licence="other (gated; terms on the model card)",
    hub_id="bioptimus/H-optimus-1",
    gated=True,
    card="https://huggingface.co/bioptimus/H-optimus-1",
)

# The model cards' kwargs are kept to a few lines each.
# fmt: off
_ENTRIES: tuple[EncoderEntry, ...] = (
    _resnet("sample", "sample", "resnet18", 512, "MIT (histocluster)", mpp=0.5,
            card="sample_data/README.md"),
    CIGA,
    *(
        # torchvision's ImageNet releases (downloaded by torchvision into its hub cache).
        _resnet(f"{arch}-imagenet", "torchvision", arch, dim, "BSD-3-Clause (torchvision)",
                card="https://pytorch.org/vision/stable/models.html")
        for arch, dim in (("resnet18", 512), ("resnet50", 2048))
    ),
    # ---- pathology foundation models -------------------------------------------------------
    # Each comment says where the settings were read ("card": the model card or official README;
    # otherwise the authors' own loading code or another named source), read with the search
    # tool; "not retrieved" marks what no source confirmed.
    _foundation(
        # Card https://huggingface.co/MahmoodLab/UNI (gated) and the authors' loader
        # github.com/mahmoodlab/UNI uni/get_encoder/get_encoder.py: timm.create_model(
        # "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
        # dynamic_img_size=True), strict load of pytorch_model.bin, ImageNet normalisation,
        # class token (1024-d). Trained at 20x (0.5 um/px).
        "uni",
        "vit_large_patch16_224",
        _kw(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        1024,
        "CC-BY-NC-ND-4.0",
        hub_id="MahmoodLab/UNI",
    ),
    _foundation(
        # Card https://huggingface.co/MahmoodLab/UNI2-h (gated); the same timm_kwargs in
        # github.com/mahmoodlab/UNI uni/get_encoder/get_encoder.py ('uni2-h') and in kaiko-ai/eva
        # backbones/pathology/mahmood.py: vit_giant_patch14_224, img_size 224, patch 14, depth 24,
        # 24 heads, init_values 1e-5, embed_dim 1536, mlp_ratio 2.66667*2, num_classes 0,
        # no_embed_class, SwiGLUPacked, SiLU, reg_tokens 8, dynamic_img_size; pytorch_model.bin;
        # ImageNet normalisation; class token, 1536-d.
        "uni2-h",
        "vit_giant_patch14_224",
        _kw(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
            mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=_SWIGLU,
            act_layer=_SILU, reg_tokens=8, dynamic_img_size=True),
        1536,
        "CC-BY-NC-ND-4.0",
        hub_id="MahmoodLab/UNI2-h",
    ),
    _foundation(
        # Card https://huggingface.co/paige-ai/Virchow2 (gated, CC-BY-NC-ND-4.0): timm
        # "hf-hub:paige-ai/Virchow2" with mlp_layer=SwiGLUPacked, act_layer=SiLU; embedding =
        # cat(output[:, 0], output[:, 5:].mean(1)) (tokens 1-4 are registers) = 2560-d. Its
        # config.json, as reproduced by mahmoodlab/TRIDENT patch_encoder_models/load.py and
        # kaiko-ai/eva (num_register_tokens=4): vit_huge_patch14_224, img_size 224, init_values
        # 1e-5, num_classes 0, reg_tokens 4, mlp_ratio 5.3375, global_pool "", dynamic_img_size;
        # ImageNet mean/std. Trained at mixed magnifications (5x-40x, arXiv 2408.00738); 0.5 um/px
        # is the nominal 20x, not a card value.
        "virchow2",
        "vit_huge_patch14_224",
        _kw(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, reg_tokens=4,
            global_pool="", dynamic_img_size=True, mlp_layer=_SWIGLU, act_layer=_SILU),
        2560,
        "CC-BY-NC-ND-4.0",
        hub_id="paige-ai/Virchow2",
        embedding="cls+mean_patch",
    ),
    H_OPTIMUS_0,
    H_OPTIMUS_1,
    _foundation(
        # Card https://huggingface.co/prov-gigapath/prov-gigapath (gated; licence
        # "prov-gigapath-license", research use only) and github.com/prov-gigapath/prov-gigapath
        # README: timm "hf_hub:prov-gigapath/prov-gigapath", Resize(256, bicubic) + CenterCrop(224),
        # ImageNet normalisation, model(x) = class token (1536-d). Its config.json, as used for
        # local loading by mahmoodlab/TRIDENT (GigaPathInferenceEncoder): vit_giant_patch14_dinov2,
        # img_size 224, in_chans 3, patch_size 16, embed_dim 1536, depth 40, 24 heads, init_values
        # 1e-5, mlp_ratio 5.33334, num_classes 0, global_pool "token". Tiles at 20x (0.5 um/px).
        # Tiles are resized to 224 here (the card's 256 -> centre 224 crop is not applied).
        "prov-gigapath",
        "vit_giant_patch14_dinov2",
        _kw(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
            init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
        1536,
        "other (prov-gigapath licence; research use only)",
        hub_id="prov-gigapath/prov-gigapath",
    ),
    _foundation(
        # Card https://huggingface.co/owkin/phikon: ViTModel (iBOT ViT-B/16); config.json: hidden
        # 768, 12 layers, 12 heads, intermediate 3072, patch 16, image 224, layer_norm_eps 1e-12;
        # features = last_hidden_state[:, 0, :] (768-d); ImageNet normalisation; 20x. TRIDENT loads
        # it the same way (ViTModel.from_pretrained(dir, add_pooling_layer=False)).
        "phikon",
        "ViTModel",
        _kw(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            patch_size=16, image_size=224, layer_norm_eps=1e-12, qkv_bias=True),
        768,
        "other (Owkin non-commercial)",
        hub_id="owkin/phikon",
        filename="model.safetensors",
        gated=False,
        family="transformers",
    ),
    _foundation(
        # https://huggingface.co/owkin/phikon-v2: AutoModel (Dinov2Model) ViT-L/16, no registers,
        # features = last_hidden_state[:, 0, :] (1024-d), model.safetensors + config.json, ImageNet
        # normalisation, 224-px tiles at 20x — per mahmoodlab/TRIDENT (Phikonv2InferenceEncoder)
        # and arXiv 2409.09173. The card's config.json itself was not retrieved: a local copy is
        # built from the directory's own config.json, these values serve only without one.
        "phikon-v2",
        "Dinov2Model",
        _kw(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
            patch_size=16, image_size=224, layer_norm_eps=1e-6, layerscale_value=1e-5),
        1024,
        "other (Owkin non-commercial)",
        hub_id="owkin/phikon-v2",
        filename="model.safetensors",
        gated=False,
        family="transformers",
    ),
    _foundation(
        # README of github.com/lunit-io/benchmark-ssl-pathology (CVPR 2023): DINO ViT-S/16 =
        # timm VisionTransformer(img_size=224, patch_size=16, embed_dim=384, num_heads=6,
        # num_classes=0), strict load of release "pretrained-weights"/dino_vit_small_patch16_ep200
        # .torch (a plain state dict); Lunit non-commercial licence (LICENSE). Normalisation
        # mean (0.70322989, 0.53606487, 0.66096631), std (0.21716536, 0.26081574, 0.20723464)
        # from kaiko-ai/eva backbones/pathology/lunit.py (not in the README). TCGA patches at
        # 20x and 40x: no single um/px.
        "lunit-dino-vits16",
        "vit_small_patch16_224",
        _kw(img_size=224, num_classes=0),
        384,
        "other (Lunit non-commercial)",
        url=(
            "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
            "pretrained-weights/dino_vit_small_patch16_ep200.torch"
        ),
        filename="dino_vit_small_patch16_ep200.torch",
        card="https://github.com/lunit-io/benchmark-ssl-pathology",
        mean=(0.70322989, 0.53606487, 0.66096631),
        std=(0.21716536, 0.26081574, 0.20723464),
        mpp=None,
    ),
    _foundation(
        # github.com/kaiko-ai/towards_large_pathology_fms (README + hubconf.py, arXiv 2404.15217):
        # timm.create_model("vit_base_patch16_224", dynamic_img_size=True, num_classes=0), strict
        # load of release 0.0.1 vitb16.pth (a plain state dict); preprocessing Resize(224) +
        # CenterCrop(224), mean = std = (0.5, 0.5, 0.5); model(x) = class token, 768-d; Kaiko
        # Non-Commercial Public License v1. The card gives no magnification.
        "kaiko-vitb16",
        "vit_base_patch16_224",
        _kw(img_size=224, num_classes=0, dynamic_img_size=True),
        768,
        "other (Kaiko non-commercial)",
        url=(
            "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/"
            "vitb16.pth"
        ),
        filename="vitb16.pth",
        card="https://github.com/kaiko-ai/towards_large_pathology_fms",
        mean=HALF,
        std=HALF,
        mpp=None,
    ),
)
# fmt: on

REGISTRY: Mapping[str, EncoderEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


def registry_names() -> list[str]:
    """Every registry name, in registry order."""
    return list(REGISTRY)


def entry(name: str) -> EncoderEntry | None:
    """The entry called ``name`` (case-insensitive), or None."""
    return REGISTRY.get(name.strip().lower())


def weights_path(e: EncoderEntry, cache: str | Path | None = None) -> Path | None:
    """Where ``fetch_weights`` keeps the entry's file: ``<cache>/<filename>`` for the paper's release
    (its historical place), ``<cache>/<name>/<filename>`` otherwise; None when nothing downloads."""
    if not e.filename or not e.downloadable:
        return None
    root = Path(cache).expanduser() if cache else cache_dir()
    return root / e.filename if e.family == "ciga" else root / e.name / e.filename
