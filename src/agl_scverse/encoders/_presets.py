"""Named presets of pathology foundation-model encoders, and timm keyword arguments in a JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "EncoderPreset", "find_preset", "kwargs_from_json", "kwargs_to_json", "list_presets"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderPreset:
    """How to build, feed and load one published encoder.

    Attributes
    ----------
    name
        ``encoder=name`` (any case; ``hf_hub`` ids and ``aliases`` work too).
    arch, timm_kwargs
        The timm architecture and its ``timm.create_model`` keyword arguments (JSON form).
    mean
        Input normalisation mean (0-1 range, per RGB channel).
    std
        Input normalisation standard deviation (per RGB channel).
    mpp, patch_px
        Native µm per pixel (0.5 is 20x) and input side in pixels.
    feature_dim
        Features per patch.
    hf_hub, gated
        Hub repository of the weights; whether they need an account that accepted the terms.
    pooling
        ``"timm"`` (the class token), or ``"cls+mean"`` (class token and mean patch token: Virchow2).
    key_format, ignore_keys
        Layout of the weights file (``"timm"`` or transformers' ``"hf-dinov2"``, renamed on loading) and file
        tensors that play no part in the features (left out, listed in the load summary).
    reference, notes, aliases
        Model card, what a user should know, other names.
    """

    name: str
    arch: str
    timm_kwargs: dict[str, Any]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    patch_px: int
    feature_dim: int
    hf_hub: str
    gated: bool
    pooling: str = "timm"
    key_format: str = "timm"
    ignore_keys: tuple[str, ...] = ()
    reference: str = ""
    notes: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def patch_um(self) -> float:
        """Side of the input field in µm at the native resolution (``patch_px * mpp``)."""
        return float(self.patch_px * self.mpp)


def _preset(
    name: str, arch: str, timm_kwargs: dict[str, Any], feature_dim: int, hf_hub: str, **kw: Any
) -> EncoderPreset:
    """A preset at 0.5 µm/px, 224 px, ImageNet normalisation and gated unless ``kw`` says otherwise."""
    defaults = {"mean": _IMAGENET[0], "std": _IMAGENET[1], "mpp": 0.5, "patch_px": 224, "gated": True}
    return EncoderPreset(name, arch, timm_kwargs, feature_dim=feature_dim, hf_hub=hf_hub, **{**defaults, **kw})


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
#: The presets, by canonical name. Facts from each model card (``reference``).
PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        _preset(
            "uni", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, 1024, "MahmoodLab/UNI",
            reference="https://huggingface.co/MahmoodLab/UNI", aliases=("uni1", "uni_v1"),
            notes="ViT-L/16 with LayerScale (DINOv2 on 100M+ tiles of 100k+ H&E slides); CC-BY-NC-ND, gated.",
        ),
        _preset(
            "uni2-h", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
             "mlp_ratio": 2.66667 * 2, "no_embed_class": True, **_SWIGLU, "reg_tokens": 8, "dynamic_img_size": True},
            1536, "MahmoodLab/UNI2-h", reference="https://huggingface.co/MahmoodLab/UNI2-h",
            notes="ViT-H/14-like (24 blocks, width 1536, SwiGLU, 8 register tokens, 681M parameters); gated.",
            aliases=("uni2", "uni2h", "uni_v2"),
        ),
        _preset(
            "virchow2", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
             "dynamic_img_size": True, **_SWIGLU},
            2560, "paige-ai/Virchow2", pooling="cls+mean", reference="https://huggingface.co/paige-ai/Virchow2",
            notes="ViT-H/14 (32 blocks, width 1280, SwiGLU, 4 register tokens, 632M parameters); features are the "
            "class token and the mean patch token (2 x 1280). Trained on mixed magnifications (5x-40x); 20x "
            "(0.5 µm/px) is the usual choice. CC-BY-NC-ND, gated.",
        ),
        _preset(
            "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}, 1536, "bioptimus/H-optimus-0",
            mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
            reference="https://huggingface.co/bioptimus/H-optimus-0", aliases=("hoptimus0", "h_optimus_0"),
            notes="ViT-g/14 (40 blocks, width 1536, 4 register tokens, 1.1B parameters), its own normalisation; "
            "Apache-2.0, access after accepting the terms on the hub.",
        ),
        _preset(
            "prov-gigapath", "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
             "init_values": 1e-5, "mlp_ratio": 5.33334},
            1536, "prov-gigapath/prov-gigapath", reference="https://huggingface.co/prov-gigapath/prov-gigapath",
            notes="The tile encoder (ViT-g with 16 px patches, 40 blocks, width 1536, 1.13B parameters); the "
            "LongNet slide encoder is not used. The card resizes 256 px tiles and crops 224; here a 224 px patch "
            "is cut directly. Gated.",
            aliases=("gigapath", "prov_gigapath"),
        ),
        _preset(
            "phikon-v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5}, 1024, "owkin/phikon-v2",
            gated=False, key_format="hf-dinov2", ignore_keys=("mask_token",),
            reference="https://huggingface.co/owkin/phikon-v2", aliases=("phikon2", "phikon_v2"),
            notes="ViT-L/16 (DINOv2 on 460M tiles of public slides, no registers); its weights use transformers' "
            "Dinov2Model names and are converted to timm names on loading; features are the class token. "
            "Open (not gated).",
        ),
    )
}  # fmt: skip


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def find_preset(name: str) -> EncoderPreset | None:
    """The preset a name, alias or hub id (``hf-hub:MahmoodLab/UNI``) refers to, any case; else None."""
    if not isinstance(name, str):
        return None
    key = _norm(name)
    for prefix in ("hf-hub:", "hf-hub-"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    for p in PRESETS.values():
        if key in {_norm(p.name), _norm(p.hf_hub), *(_norm(a) for a in p.aliases)}:
            return p
    return None


def list_presets() -> list[dict[str, Any]]:
    """One row per preset: name, architecture, feature size, native µm/px, patch px, hub id, gated.

    Examples
    --------
    >>> [r["name"] for r in list_presets()][:2]
    ['uni', 'uni2-h']
    """
    keys = ("name", "arch", "feature_dim", "mpp", "patch_px", "patch_um", "hf_hub", "gated", "reference")
    return [{k: getattr(p, k) for k in keys} for p in PRESETS.values()]


#: Names of the layer classes a timm keyword argument may hold in a saved config (resolved by :func:`kwargs_from_json`).
LAYER_NAMES = ("SwiGLUPacked", "SwiGLU", "GluMlp", "Mlp", "SiLU", "GELU", "ReLU", "LayerNorm", "Identity")
_TIMM_LAYERS = LAYER_NAMES[:4]  # the others are torch.nn classes


def _layer_table() -> dict[str, Any]:
    import timm.layers
    from torch import nn

    return {n: getattr(timm.layers if n in _TIMM_LAYERS else nn, n) for n in LAYER_NAMES}


def kwargs_to_json(kwargs: dict[str, Any] | None) -> str:
    """Canonical JSON of timm keyword arguments (sorted keys, layer classes by name); ``TypeError`` without one."""
    if not kwargs:
        return "{}"
    if not isinstance(kwargs, dict):
        raise TypeError(f"encoder_kwargs must be a dict of timm keyword arguments, got {type(kwargs).__name__}.")
    by_object = {id(v): k for k, v in _layer_table().items()}
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if not isinstance(k, str):
            raise TypeError(f"encoder_kwargs keys must be strings, got {k!r}.")
        if id(v) in by_object:
            out[k] = by_object[id(v)]
            continue
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            raise TypeError(
                f"encoder_kwargs[{k!r}] = {v!r} has no JSON form, so a saved model could not rebuild the encoder. "
                f"Use plain values, or one of the layer classes {list(LAYER_NAMES)} (or its name as a string); "
                "or build the module yourself and pass it as encoder=."
            ) from None
        out[k] = v
    return json.dumps(out, sort_keys=True, allow_nan=False)


def kwargs_from_json(text: str | dict | None) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments from :func:`kwargs_to_json` output, :data:`LAYER_NAMES` as classes."""
    if text in (None, "", {}):
        return {}
    obj = json.loads(text) if isinstance(text, str) else dict(text)
    if not isinstance(obj, dict):
        raise ValueError(f"encoder_kwargs must hold a JSON object, got {text!r}.")
    table = _layer_table()
    out = {}
    for k, v in obj.items():
        if k in ("mlp_layer", "act_layer", "norm_layer", "embed_norm_layer") and isinstance(v, str) and v in table:
            v = table[v]
        out[k] = v
    return out
