"""Preprocessing: spot patches, image embeddings, their spatial context, gene roles and prior scores, the expression scale."""

from agl_scverse._expression import expression_transform

from ._context import spatial_context
from ._embed import embed_patches
from ._genes import GeneRoles, compute_gene_roles, gene_roles
from ._patches import SpotPatches, extract_patches, iter_patch_batches, patch_loader

__all__ = [
    "SpotPatches",
    "extract_patches",
    "patch_loader",
    "iter_patch_batches",
    "embed_patches",
    "spatial_context",
    "expression_transform",
    "gene_roles",
    "compute_gene_roles",
    "GeneRoles",
]
