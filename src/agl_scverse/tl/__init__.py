"""Tools: fit, predict, evaluate, compare and cross-validate AGL models; baselines and per-gene metrics."""

from agl_scverse._stats import per_gene_metrics

from ._baselines import mean_predictor, pca_ridge, reduced_rank_ridge
from ._chunked import predict_chunked
from ._compare import compare_methods
from ._cross_validate import cross_validate
from ._evaluate import evaluate
from ._fit import agl_fit, k_search_grid
from ._predict import agl_predict, predict_anndata

__all__ = [
    "agl_fit",
    "k_search_grid",
    "agl_predict",
    "predict_anndata",
    "predict_chunked",
    "evaluate",
    "compare_methods",
    "cross_validate",
    "mean_predictor",
    "pca_ridge",
    "reduced_rank_ridge",
    "per_gene_metrics",
]
