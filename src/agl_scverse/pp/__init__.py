"""Preprocessing: tissue masks and spot grids of bare H&E slides, spot patches, image embeddings, their spatial context, gene roles and prior scores, the expression scale."""

from agl_scverse._expression import expression_transform

from ._context import spatial_context
from ._embed import embed_patches
from ._genes import GeneRoles, compute_gene_roles, gene_roles
from ._grid import spot_grid
from ._patches import SpotPatches, extract_patches, iter_patch_batches, patch_loader
from ._tissue import TissueMask, tissue_mask

__all__ = [
    "SpotPatches",
    "extract_patches",
    "patch_loader",
    "iter_patch_batches",
    "embed_patches",
    "spatial_context",
    "tissue_mask",
    "TissueMask",
    "spot_grid",
    "expression_transform",
    "gene_roles",
    "compute_gene_roles",
    "GeneRoles",
]
