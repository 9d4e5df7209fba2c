"""Public plotting functions, collected from their modules."""

from .history import training_history
from .performance import gene_performance
from .selected import selected_genes
from .spatial import spatial_prediction

__all__ = ["selected_genes", "spatial_prediction", "training_history", "gene_performance"]
