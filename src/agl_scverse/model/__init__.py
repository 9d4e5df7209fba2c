"""Torch parts of AGL: heads, Pearson loss, DkGSB mask, bi-level step, trainer, checkpoints."""

from .bilevel import hypergradient, unrolled_val_loss
from .checkpoint import AGLModel, build_network, package_versions
from .heads import EmbeddingHead, FinetuneNet
from .loss import mse_loss, pearson_loss, per_gene_loss, weighted_loss
from .mask import GeneMask, normalized_ranks
from .trainer import METHODS, TensorInputs, TrainResult, genes_for_method, predict_raw, train_network, val_pcc

__all__ = [
    "AGLModel",
    "build_network",
    "package_versions",
    "EmbeddingHead",
    "FinetuneNet",
    "GeneMask",
    "METHODS",
    "TensorInputs",
    "TrainResult",
    "genes_for_method",
    "hypergradient",
    "mse_loss",
    "normalized_ranks",
    "pearson_loss",
    "per_gene_loss",
    "predict_raw",
    "train_network",
    "unrolled_val_loss",
    "val_pcc",
    "weighted_loss",
]
