"""Image encoders: the registry, timm and ``hf-hub:`` building, presets, weight loading, normalisation, the record."""

from ._factory import get_encoder
from ._normalize import normalize
from ._presets import EncoderPreset, list_presets
from ._record import encoder_record, rebuild_encoder
from ._registry import list_encoders, register_encoder
from ._weights import load_weights

__all__ = [
    "EncoderPreset",
    "encoder_record",
    "get_encoder",
    "list_encoders",
    "list_presets",
    "load_weights",
    "normalize",
    "rebuild_encoder",
    "register_encoder",
]
