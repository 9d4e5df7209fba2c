"""Named presets of pathology foundation-model encoders, and timm keyword arguments in a JSON form.

A preset says how to build an encoder that ``timm`` can construct (architecture + keyword arguments), how to feed
it (input normalisation, patch side, native µm per pixel), what it returns (feature size, pooling), where its
weights live on the Hugging Face hub and whether they are gated. The architecture facts are those published in
each model card (linked in :attr:`EncoderPreset.reference`); the tests build every preset on torch's ``meta``
device and compare it with the published numbers (blocks, width, register tokens, LayerScale, parameter count).

timm keyword arguments may name layer classes (``mlp_layer=timm.layers.SwiGLUPacked``); they are stored in a
model's config as JSON, so :func:`kwargs_to_json` writes such classes as names from :data:`LAYER_NAMES` and
:func:`kwargs_from_json` turns the names back into the classes (only names of that table are resolved: a saved
config is data, never a list of things to import).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PRESETS",
    "EncoderPreset",
    "find_preset",
    "kwargs_from_json",
    "kwargs_to_json",
    "list_presets",
]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderPreset:
    """How to build, feed and load one published encoder.

    Attributes
    ----------
    name
        Preset name used as ``encoder=name`` (case-insensitive; ``hf_hub`` ids and ``aliases`` work too).
    arch
        timm architecture the model is built from.
    timm_kwargs
        Keyword arguments of ``timm.create_model`` (JSON form: layer classes by their :data:`LAYER_NAMES` name).
    mean
        Input normalisation mean (0-1 range, per RGB channel).
    std
        Input normalisation standard deviation (per RGB channel).
    mpp
        Native resolution in µm per pixel (the magnification the model was trained at; 0.5 µm/px is 20x).
    patch_px
        Input side in pixels.
    feature_dim
        Size of the feature vector per patch.
    hf_hub
        Hugging Face hub repository of the weights.
    gated
        The weights need a hub account that accepted the model's terms.
    pooling
        ``"timm"`` (timm's own pooling: the class token for these ViTs) or ``"cls+mean"`` (the class token
        concatenated with the mean of the patch tokens, register tokens left out: Virchow2).
    key_format
        Layout of the published weights file: ``"timm"``, or ``"hf-dinov2"`` (transformers' Dinov2Model names,
        converted to timm names on loading).
    ignore_keys
        Tensors of the published file that play no part in the features (e.g. a DINOv2 ``mask_token``); they
        are left out on loading and listed in the load summary. Every other tensor must load.
    reference
        Model card the facts come from.
    notes
        What a user should know (licence, resolution, what is left out).
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


#: The presets, by canonical name. Facts from each model card (``reference``); 0.5 µm/px = 20x.
PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        EncoderPreset(
            name="uni",
            arch="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            mean=_IMAGENET[0],
            std=_IMAGENET[1],
            mpp=0.5,
            patch_px=224,
            feature_dim=1024,
            hf_hub="MahmoodLab/UNI",
            gated=True,
            reference="https://huggingface.co/MahmoodLab/UNI",
            notes="ViT-L/16 with LayerScale (DINOv2 on 100M+ tiles of 100k+ H&E slides); CC-BY-NC-ND, gated.",
            aliases=("uni1", "uni_v1"),
        ),
        EncoderPreset(
            name="uni2-h",
            arch="vit_giant_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },  # fmt: skip
            mean=_IMAGENET[0],
            std=_IMAGENET[1],
            mpp=0.5,
            patch_px=224,
            feature_dim=1536,
            hf_hub="MahmoodLab/UNI2-h",
            gated=True,
            reference="https://huggingface.co/MahmoodLab/UNI2-h",
            notes="ViT-H/14-like (24 blocks, width 1536, SwiGLU, 8 register tokens, 681M parameters); gated.",
            aliases=("uni2", "uni2h", "uni_v2"),
        ),
        EncoderPreset(
            name="virchow2",
            arch="vit_huge_patch14_224",
            timm_kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
            },  # fmt: skip
            mean=_IMAGENET[0],
            std=_IMAGENET[1],
            mpp=0.5,
            patch_px=224,
            feature_dim=2560,
            pooling="cls+mean",
            hf_hub="paige-ai/Virchow2",
            gated=True,
            reference="https://huggingface.co/paige-ai/Virchow2",
            notes="ViT-H/14 (32 blocks, width 1280, SwiGLU, 4 register tokens, 632M parameters); features are the "
            "class token and the mean patch token (2 x 1280). Trained on mixed magnifications (5x-40x); 20x "
            "(0.5 µm/px) is the usual choice. CC-BY-NC-ND, gated.",
        ),
        EncoderPreset(
            name="h-optimus-0",
            arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            mpp=0.5,
            patch_px=224,
            feature_dim=1536,
            hf_hub="bioptimus/H-optimus-0",
            gated=True,
            reference="https://huggingface.co/bioptimus/H-optimus-0",
            notes="ViT-g/14 (40 blocks, width 1536, 4 register tokens, 1.1B parameters), its own normalisation; "
            "Apache-2.0, access after accepting the terms on the hub.",
            aliases=("hoptimus0", "h_optimus_0"),
        ),
        EncoderPreset(
            name="prov-gigapath",
            arch="vit_giant_patch14_dinov2",
            timm_kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },  # fmt: skip
            mean=_IMAGENET[0],
            std=_IMAGENET[1],
            mpp=0.5,
            patch_px=224,
            feature_dim=1536,
            hf_hub="prov-gigapath/prov-gigapath",
            gated=True,
            reference="https://huggingface.co/prov-gigapath/prov-gigapath",
            notes="The tile encoder (ViT-g with 16 px patches, 40 blocks, width 1536, 1.13B parameters); the "
            "LongNet slide encoder is not used. The card resizes 256 px tiles and crops 224; here a 224 px patch "
            "is cut directly. Gated.",
            aliases=("gigapath", "prov_gigapath"),
        ),
        EncoderPreset(
            name="phikon-v2",
            arch="vit_large_patch16_224",
            timm_kwargs={"img_size": 224, "init_values": 1e-5},
            mean=_IMAGENET[0],
            std=_IMAGENET[1],
            mpp=0.5,
            patch_px=224,
            feature_dim=1024,
            hf_hub="owkin/phikon-v2",
            gated=False,
            key_format="hf-dinov2",
            ignore_keys=("mask_token",),
            reference="https://huggingface.co/owkin/phikon-v2",
            notes="ViT-L/16 (DINOv2 on 460M tiles of public slides, no registers); its weights use transformers' "
            "Dinov2Model names and are converted to timm names on loading; features are the class token. "
            "Open (not gated).",
            aliases=("phikon2", "phikon_v2"),
        ),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def find_preset(name: str) -> EncoderPreset | None:
    """The preset a name refers to: its name, an alias or its hub id (``hf-hub:MahmoodLab/UNI``), any case.

    Examples
    --------
    >>> find_preset("hf-hub:MahmoodLab/UNI").name, find_preset("UNI2-h").feature_dim
    ('uni', 1536)
    >>> find_preset("resnet18") is None
    True
    """
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
    return [
        {
            "name": p.name,
            "arch": p.arch,
            "feature_dim": p.feature_dim,
            "mpp": p.mpp,
            "patch_px": p.patch_px,
            "patch_um": p.patch_um,
            "hf_hub": p.hf_hub,
            "gated": p.gated,
            "reference": p.reference,
        }  # fmt: skip
        for p in PRESETS.values()
    ]


# ------------------------------------------------------------------------------------------------ kwargs as JSON
def _layer_table() -> dict[str, Any]:
    import timm.layers
    from torch import nn

    return {
        "SwiGLUPacked": timm.layers.SwiGLUPacked,
        "SwiGLU": timm.layers.SwiGLU,
        "GluMlp": timm.layers.GluMlp,
        "Mlp": timm.layers.Mlp,
        "SiLU": nn.SiLU,
        "GELU": nn.GELU,
        "ReLU": nn.ReLU,
        "LayerNorm": nn.LayerNorm,
        "Identity": nn.Identity,
    }


#: Names of the layer classes a timm keyword argument may hold in a saved config (resolved by :func:`kwargs_from_json`).
LAYER_NAMES = ("SwiGLUPacked", "SwiGLU", "GluMlp", "Mlp", "SiLU", "GELU", "ReLU", "LayerNorm", "Identity")


def kwargs_to_json(kwargs: dict[str, Any] | None) -> str:
    """Canonical JSON of timm keyword arguments (sorted keys; layer classes by name).

    Raises ``TypeError`` naming the argument when a value has no JSON form (e.g. a layer class outside
    :data:`LAYER_NAMES`): such an encoder cannot be rebuilt from a saved config.

    Examples
    --------
    >>> import timm.layers
    >>> kwargs_to_json({"mlp_layer": timm.layers.SwiGLUPacked, "init_values": 1e-5})
    '{"init_values": 1e-05, "mlp_layer": "SwiGLUPacked"}'
    """
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
    """Keyword arguments for ``timm.create_model`` from :func:`kwargs_to_json` output (or a JSON-form dict).

    Values of ``mlp_layer``, ``act_layer``, ``norm_layer`` and ``embed_norm_layer`` that are names of
    :data:`LAYER_NAMES` become the classes (timm also accepts activation names such as ``"silu"`` itself).

    Examples
    --------
    >>> kwargs_from_json('{"mlp_layer": "SwiGLUPacked"}')["mlp_layer"].func.__name__
    'GluMlp'
    """
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
