"""Training: the trainer, the bi-level step, loss, soft mask, precision, batches, forward loop, resume."""

from ._bilevel import AdamState, hypergradient, meta_scope_names, unrolled_val_loss
from ._loss import pearson_loss, per_gene_loss, weighted_loss
from ._mask import GeneMask
from ._trainer import TrainResult, train_network

__all__ = [
    "AdamState",
    "GeneMask",
    "TrainResult",
    "hypergradient",
    "meta_scope_names",
    "pearson_loss",
    "per_gene_loss",
    "train_network",
    "unrolled_val_loss",
    "weighted_loss",
]
