"""The engine: image encoders, networks, Pearson loss, DkGSB mask, bi-level step, trainer, the saved model.

``model`` stands on the package-private helpers only (``_constants``, ``_validate``, ``_stats``, ``_serialize``,
``_utils``); preprocessing (``pp``) and tools (``tl``) use it.
"""

from ._bilevel import AdamState, hypergradient, meta_scope_names, unrolled_val_loss
from ._checkpoint import AGLModel
from ._encoders import (
    encoder_record,
    get_encoder,
    list_encoders,
    load_weights,
    normalize,
    rebuild_encoder,
    register_encoder,
)
from ._heads import EmbeddingEnsemble, EmbeddingHead, FinetuneNet
from ._loss import pearson_loss, per_gene_loss, weighted_loss
from ._mask import GeneMask
from ._presets import EncoderPreset, list_presets
from ._trainer import TrainResult, train_network

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
