"""The engine's public face: networks, the saved model, and the public names of encoders and train."""

from agl_scverse.encoders import (
    EncoderPreset,
    encoder_record,
    get_encoder,
    list_encoders,
    list_presets,
    load_weights,
    normalize,
    rebuild_encoder,
    register_encoder,
)
from agl_scverse.train import (
    AdamState,
    GeneMask,
    TrainResult,
    hypergradient,
    meta_scope_names,
    pearson_loss,
    per_gene_loss,
    train_network,
    unrolled_val_loss,
    weighted_loss,
)

from ._agl_model import AGLModel
from ._heads import EmbeddingEnsemble, EmbeddingHead, FinetuneNet

__all__ = [
    "AGLModel",
    "EmbeddingEnsemble",
    "EmbeddingHead",
    "EncoderPreset",
    "FinetuneNet",
    "GeneMask",
    "TrainResult",
    "encoder_record",
    "get_encoder",
    "AdamState",
    "hypergradient",
    "list_encoders",
    "list_presets",
    "load_weights",
    "meta_scope_names",
    "normalize",
    "pearson_loss",
    "per_gene_loss",
    "rebuild_encoder",
    "register_encoder",
    "train_network",
    "unrolled_val_loss",
    "weighted_loss",
]
