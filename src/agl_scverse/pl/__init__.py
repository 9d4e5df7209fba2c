"""Plots: selected genes, spatial predictions, whole-slide maps, training history, per-gene performance."""

from ._history import training_history
from ._performance import gene_performance
from ._selected import selected_genes
from ._slide_prediction import slide_prediction
from ._spatial_prediction import spatial_prediction

__all__ = ["selected_genes", "spatial_prediction", "slide_prediction", "training_history", "gene_performance"]
