"""What a prediction writes about itself: its layers' record and the model's run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys
from agl_scverse._serialize import to_h5ad
from agl_scverse.model import AGLModel

from ._predict_values import model_transform

__all__ = ["model_run_record", "prediction_record", "run_writes"]


def prediction_record(model: AGLModel, scale: str, genes, n_genes: int, observed: bool) -> dict:
    """The ``.uns[f"{key_added}_pred"]`` entry describing a run's prediction layers (h5ad-ready)."""
    return to_h5ad(
        {
            "scale": scale,
            "transform": model_transform(model),
            "layer": model.config.get("layer"),
            "genes": genes if isinstance(genes, str) else "list",
            "n_genes": int(n_genes),
            "observed": bool(observed),
            "method": model.method,
            "refit": bool(model.config.get("refit", False)),
        }
    )


def model_run_record(model: AGLModel, var_names: pd.Index, keys: Keys) -> tuple[dict[str, Any], dict]:
    """The model's own description of its run: ``.var`` columns over ``var_names`` and a ``.uns[key]`` entry."""
    cfg = model.config
    genes, roles = list(model.genes), list(model.roles)
    n_t = sum(r == consts.ROLE_TARGET for r in roles)
    aux = [g for g, r in zip(genes, roles) if r == consts.ROLE_AUX]
    n_aux_all = int(cfg.get("n_auxiliary_candidates") or len(aux))
    pos = var_names.get_indexer(genes)
    role = np.full(len(var_names), consts.ROLE_EXCLUDED, dtype=object)
    weight, prior = np.zeros(len(var_names)), np.full(len(var_names), np.nan)
    rank = np.full(len(var_names), -1, dtype=np.int64)
    have = pos >= 0
    role[pos[have]] = np.asarray(roles, dtype=object)[have]
    weight[pos[have]] = np.asarray(model.weights, dtype=float)[have]
    aux_pos = var_names.get_indexer(aux)
    ranks = np.asarray(cfg.get("prior_ranks") or np.arange(len(aux)) / max(n_aux_all - 1, 1), dtype=float)
    scores = np.asarray([np.nan if v is None else v for v in cfg.get("prior_scores") or [None] * len(aux)], float)
    ok = aux_pos >= 0
    rank[aux_pos[ok]] = np.rint(ranks[ok] * max(n_aux_all - 1, 1)).astype(np.int64)
    prior[aux_pos[ok]] = scores[ok]
    var = {
        keys.role: pd.Categorical(role, categories=[consts.ROLE_TARGET, consts.ROLE_AUX, consts.ROLE_EXCLUDED]),
        keys.prior: prior,
        keys.prior_rank: rank,
        keys.weight: weight,
        keys.selected: weight > 0.5,
    }
    history = {name: list(values) for name, values in (cfg.get("history") or {}).items()}
    params = {
        **(cfg.get("hyperparameters") or {}),
        **{n: cfg.get(n) for n in ("method", "mode", "head", "transform", "layer", "refit", "prior")},
    }
    entry = {
        "params": params,
        "method": model.method,
        "mode": model.mode,
        "k": model.k,
        "threshold": model.threshold if model.threshold is not None else float("nan"),
        "n_auxiliary": n_aux_all if model.method == "dkgsb" else len(aux),
        "n_targets": n_t,
        "targets": list(model.targets),
        "embedding_key": cfg.get("embedding_key"),
        "history": history,
        "metrics": {n: cfg.get(n) for n in ("best_epoch", "val_pcc", "n_train", "n_val", "refit")},
        "source": "model",
    }
    return var, to_h5ad(entry)


def run_writes(adata: AnnData, model: AGLModel, keys: Keys) -> tuple[dict[str, Any], dict | None]:
    """The ``.var`` columns and ``.uns`` entry of :func:`model_run_record` that ``adata`` lacks."""
    if keys.role in adata.var:  # fitted (or predicted before) under this key: its gene description stays
        return {}, None
    var, entry = model_run_record(model, adata.var_names, keys)
    var = {c: v for c, v in var.items() if c not in adata.var}
    return var, (entry if keys.uns not in adata.uns else None)
