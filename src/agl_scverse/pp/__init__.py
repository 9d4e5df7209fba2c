"""Preprocessing: spot patches, image embeddings, gene roles and prior scores."""

from .._expression import expression_transform
from .embeddings import *  # noqa: F403
from .embeddings import __all__ as _emb_all
from .genes import *  # noqa: F403
from .genes import __all__ as _genes_all
from .patches import *  # noqa: F403
from .patches import __all__ as _patches_all

__all__ = [*_patches_all, *_emb_all, *_genes_all, "expression_transform"]
