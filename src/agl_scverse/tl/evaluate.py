"""``evaluate``: per-gene Pearson / Spearman / MSE of predictions, with the baselines reported beside them.

Every honest report carries a mean predictor and the HEST-Benchmark baseline (``StandardScaler -> PCA(256) ->
Ridge`` on the same embedding) beside the model: both are fitted on the spots the model was trained on
(``.obs[split] == "train"``) and scored on the same evaluated spots and genes, in the same expression scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from .. import _constants as K
from .._constants import Keys
from ..model import AGLModel
from .fit import _h5ad_safe

__all__ = ["evaluate", "compare_methods"]


def _summary(df: pd.DataFrame) -> dict[str, float]:
    return {
        "pearson": float(np.nanmean(df["pearson"])) if df["pearson"].notna().any() else float("nan"),
        "spearman": float(np.nanmean(df["spearman"])) if df["spearman"].notna().any() else float("nan"),
        "mse": float(np.nanmean(df["mse"])) if df["mse"].notna().any() else float("nan"),
        "pearson_median": float(np.nanmedian(df["pearson"])) if df["pearson"].notna().any() else float("nan"),
        "n_genes": int(df["pearson"].notna().sum()),
    }


def _param(uns_entry: dict, name: str, default: Any) -> Any:
    v = ((uns_entry or {}).get("params") or {}).get(name, default)
    return None if isinstance(v, str) and v == "None" else v


def evaluate(
    adata: AnnData,
    model: AGLModel | str | Path | None = None,
    *,
    genes: str | Sequence[str] = "targets",
    spots: Any = None,
    baselines: bool = True,
    key_added: str = K.DEFAULT_KEY,
    embedding_key: str | None = None,
    n_components: int = 256,
    copy: bool = False,
) -> AnnData | None:
    """Score predictions against the observed expression, gene by gene, beside a mean predictor and PCA+Ridge.

    Parameters
    ----------
    adata
        Slide with raw counts and predictions in ``.layers[f"{key_added}_pred"]`` (computed here with
        :func:`agl_scverse.tl.agl_predict` when ``model`` is given and the layer is missing).
    model
        The fitted model (or its directory). Gives the target genes, expression transform, counts layer and
        embedding key; without it they are read from ``.var[role]`` and ``.uns[key_added]["params"]``.
    genes
        ``"targets"`` (default), ``"predicted"`` (every gene with predictions) or a list of gene names.
    spots
        Evaluated spots (boolean mask, names or positions). Default: the spots held out of the fit
        (``.obs[split] == "unused"``) when there are any, else the validation spots (``"val"``; they were used for
        early stopping, so this is optimistic and logged as such), or every spot of a slide without a split
        column (an unseen slide).
    baselines
        Also fit and score the mean predictor and ``StandardScaler -> PCA(n_components) -> Ridge`` on the
        embedding, trained on the ``"train"`` spots of ``.obs[split]`` (skipped, with a note, when there are no
        training spots in ``adata`` or no embedding).
    key_added
        Prefix of the keys (:class:`agl_scverse._constants.Keys`).
    embedding_key
        ``.obsm`` key for the baselines; default the model's.
    n_components
        PCA components of the baseline (HEST-Benchmark: 256; capped by the number of spots and features).
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    None, or the copy. Writes ``.var[k.pcc]``, ``.var[k.spearman]``, ``.var[k.mse]`` (NaN for genes not
    evaluated) and ``.uns[k.uns]["metrics"]["test"]``: per method (``model``, ``mean_predictor``, ``pca_ridge``)
    the mean / median Pearson, mean Spearman and MSE over genes, plus ``n_spots``, ``spots`` (which spots),
    ``genes``, ``transform``. The validation metrics written by :func:`agl_fit` stay in ``metrics``.

    Examples
    --------
    >>> agl.tl.evaluate(adata, model)  # doctest: +SKIP
    >>> adata.uns["agl"]["metrics"]["test"]["model"]["pearson"]  # doctest: +SKIP
    """
    from .._expression import expression_transform
    from .baselines import mean_predictor, pca_ridge
    from .._stats import per_gene_metrics
    from .predict import _as_model, agl_predict

    if not isinstance(adata, AnnData):
        raise TypeError(f"evaluate expects an AnnData, got {type(adata).__name__}.")
    keys = Keys(key_added)
    if model is not None:
        model = _as_model(model)
    entry = adata.uns.get(keys.uns, {}) or {}
    if adata.n_vars == 0:
        raise ValueError("The slide has no expression to evaluate against (n_vars == 0).")

    # ---- genes
    if isinstance(genes, str) and genes == "targets":
        if model is not None:
            gene_list = list(model.targets)
        elif keys.role in adata.var:
            gene_list = adata.var_names[adata.var[keys.role].astype(str) == K.ROLE_TARGET].tolist()
        else:
            raise KeyError(f"No model given and no .var[{keys.role!r}]: pass model= or genes=[...].")
    elif isinstance(genes, str) and genes == "predicted":
        if keys.pred_layer not in adata.layers:
            raise KeyError(f"genes='predicted' needs .layers[{keys.pred_layer!r}]; run agl_predict first.")
        gene_list = adata.var_names[np.isfinite(adata.layers[keys.pred_layer]).any(axis=0)].tolist()
    elif isinstance(genes, str):
        raise ValueError(f"genes must be 'targets', 'predicted' or a list of gene names, got {genes!r}.")
    else:
        gene_list = [str(g) for g in genes]
    missing = [g for g in gene_list if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} gene(s) to evaluate are not in adata.var_names: {missing[:10]}.")
    if not gene_list:
        raise ValueError("No genes to evaluate.")
    gidx = adata.var_names.get_indexer(gene_list)

    # ---- preprocessing the model used
    transform = model.config.get("transform") if model is not None else _param(entry, "transform", "log1p")
    layer = model.config.get("layer") if model is not None else _param(entry, "layer", None)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"The model was trained on counts in layer {layer!r}, which this AnnData lacks.")
    emb_key = embedding_key or (model.config.get("embedding_key") if model is not None else None)
    emb_key = emb_key or (entry.get("embedding_key") if entry.get("embedding_key") != "None" else None)

    # ---- spots
    split = adata.obs[keys.split].astype(str).to_numpy() if keys.split in adata.obs else None
    if spots is not None:
        from .fit import _resolve_spots

        ev = _resolve_spots(adata, spots)
        spots_desc = "given"
    elif split is not None and (split == "unused").any():
        ev, spots_desc = split == "unused", "unused (held out of the fit)"
    elif split is not None and (split == "val").any():
        ev, spots_desc = split == "val", "val (used for early stopping: optimistic)"
        logg.warning("evaluate: no held-out ('unused') spots; scoring the validation spots, which are optimistic.")
    else:
        ev, spots_desc = np.ones(adata.n_obs, dtype=bool), "all (no split column: unseen slide)"
    if ev.sum() < 2:
        raise ValueError(f"Only {int(ev.sum())} spots to evaluate; correlations need at least 2.")

    if keys.pred_layer not in adata.layers and model is None:
        raise KeyError(f".layers[{keys.pred_layer!r}] is missing; run agl_predict first or pass model=.")
    if copy:
        adata = adata.copy()
    if keys.pred_layer not in adata.layers:
        agl_predict(adata, model, key_added=key_added)
    P = np.asarray(adata.layers[keys.pred_layer])[ev][:, gidx]
    X = adata.layers[layer] if layer is not None else adata.X
    Y = expression_transform(X[np.flatnonzero(ev)], transform, columns=gidx)
    df = per_gene_metrics(Y, P, genes=gene_list)
    results = {"model": _summary(df)}

    notes = ""
    if baselines:
        train = split == "train" if split is not None else None
        if train is None or not train.any():
            notes = "baselines skipped: no training spots ('train' in .obs[split]) in this AnnData"
        elif not emb_key or emb_key not in adata.obsm:
            notes = f"baselines skipped: embedding {emb_key!r} not in .obsm"
        else:
            F = np.asarray(adata.obsm[emb_key], dtype=np.float32)
            Ytr = expression_transform(X[np.flatnonzero(train)], transform, columns=gidx)
            for name, fn in (
                ("mean_predictor", lambda a, b, c: mean_predictor(a, b, c)),
                ("pca_ridge", lambda a, b, c: pca_ridge(a, b, c, n_components=n_components)),
            ):
                pred = fn(F[train], Ytr, F[ev])
                results[name] = _summary(per_gene_metrics(Y, pred, genes=gene_list))
        if notes:
            logg.info(f"evaluate: {notes}")

    for col, name in ((keys.pcc, "pearson"), (keys.spearman, "spearman"), (keys.mse, "mse")):
        full = np.full(adata.n_vars, np.nan)
        full[gidx] = df[name].to_numpy(dtype=float)
        adata.var[col] = full
    entry = dict(adata.uns.get(keys.uns, {}) or {})
    metrics = dict(entry.get("metrics", {}) or {})
    metrics["test"] = _h5ad_safe(
        {
            **results,
            "n_spots": int(ev.sum()),
            "spots": spots_desc,
            "genes": gene_list if not isinstance(genes, str) else genes,
            "transform": transform,
            "embedding_key": emb_key or "None",
            "notes": notes,
        }
    )
    entry["metrics"] = metrics
    adata.uns[keys.uns] = entry
    line = ", ".join(f"{k} {v['pearson']:.4f}" for k, v in results.items())
    logg.info(f"evaluate: mean Pearson over {len(gene_list)} genes on {int(ev.sum())} spots: {line}")
    return adata if copy else None


def compare_methods(
    adata: AnnData,
    methods: Sequence[str] = ("pgl", "agl", "dkgsb"),
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    truth_key: str | None = "informative",
    method_kwargs: dict[str, dict] | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Fit several methods on the same split and score each on the same held-out spots.

    A seeded ``test_fraction`` of the spots is held out of every fit (``.obs[split] == "unused"``); each method
    is trained with :func:`agl_fit` on a copy of ``adata`` (the input is not modified), predicted with
    :func:`agl_predict` and scored with :func:`evaluate` on the held-out spots.

    Parameters
    ----------
    adata
        Slide with raw counts and an embedding (or images for ``agl_fit`` to embed).
    methods
        Methods to compare (``"pgl"``, ``"agl"``, ``"topk"``, ``"dkgsb"``); a name may carry a suffix after
        ``":"`` (e.g. ``"topk:half"``) to run one method with several settings from ``method_kwargs``.
    test_fraction
        Fraction of spots held out for the test.
    seed
        Seed of the held-out draw and of every fit.
    truth_key
        Boolean ``.var`` column of known helpful auxiliaries (the synthetic slide's ``"informative"``); when
        present, the precision of the selected auxiliaries is reported.
    method_kwargs
        Extra :func:`agl_fit` arguments per method name (e.g. ``{"topk": {"k": 500}}``).
    **fit_kwargs
        Passed to every :func:`agl_fit` call (e.g. ``embedding_key``, ``n_targets``, ``epochs``).

    Returns
    -------
    One row per method: ``method``, ``test_pcc`` (mean held-out target Pearson), ``test_spearman``,
    ``test_mse``, ``val_pcc``, ``k``, ``n_auxiliary``, ``threshold``, ``precision`` (selected auxiliaries that
    are ``truth_key``), ``k_start`` and ``precision_start`` (the same for DkGSB's initial selection, the top half
    by prior), ``base_rate`` (``truth_key`` among all auxiliaries), ``fit_seconds``, ``best_epoch``, and the
    baselines ``mean_pcc`` and ``ridge_pcc``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
    >>> agl.tl.compare_methods(adata, ("pgl", "agl", "dkgsb"), embedding_key="X_agl_resnet18")  # doctest: +SKIP
    """
    import time

    from .fit import agl_fit
    from .predict import agl_predict

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    rng = np.random.default_rng(seed)
    n_test = max(2, int(round(test_fraction * adata.n_obs)))
    held = np.zeros(adata.n_obs, dtype=bool)
    held[rng.choice(adata.n_obs, size=n_test, replace=False)] = True
    method_kwargs = method_kwargs or {}
    keys = Keys(fit_kwargs.get("key_added", K.DEFAULT_KEY))
    rows = []
    for name in methods:
        method = name.split(":")[0]
        kw = {**fit_kwargs, **method_kwargs.get(name, {})}
        kw.setdefault("progress", False)
        t0 = time.perf_counter()
        model, work = agl_fit(adata, method=method, spots=~held, seed=seed, copy=True, **kw)
        seconds = time.perf_counter() - t0
        agl_predict(work, model, key_added=keys.prefix)
        evaluate(work, model, key_added=keys.prefix)
        uns = work.uns[keys.uns]
        test = uns["metrics"]["test"]
        aux = (work.var[keys.role].astype(str) == K.ROLE_AUX).to_numpy()
        sel = aux & work.var[keys.selected].to_numpy(dtype=bool)
        precision = precision_start = float("nan")
        n_aux = int(aux.sum())
        rank = work.var[keys.prior_rank].to_numpy(dtype=float)
        start = aux & (rank / max(n_aux - 1, 1) < 0.5)  # DkGSB's selection at its initial threshold
        if truth_key is not None and truth_key in work.var:
            truth = work.var[truth_key].to_numpy(dtype=bool)
            precision = float(truth[sel].mean()) if sel.any() else float("nan")
            precision_start = float(truth[start].mean()) if start.any() else float("nan")
        rows.append(
            {
                "method": name,
                "test_pcc": test["model"]["pearson"],
                "test_spearman": test["model"]["spearman"],
                "test_mse": test["model"]["mse"],
                "val_pcc": uns["metrics"]["val_pcc"],
                "k": int(uns["k"]),
                "n_auxiliary": int(aux.sum()),
                "threshold": float(uns["threshold"]),
                "precision": precision,
                "k_start": int(start.sum()),
                "precision_start": precision_start,
                "base_rate": float(work.var[truth_key].to_numpy(dtype=bool)[aux].mean())
                if truth_key is not None and truth_key in work.var and aux.any()
                else float("nan"),
                "fit_seconds": seconds,
                "best_epoch": int(uns["metrics"]["best_epoch"]),
                "mean_pcc": test.get("mean_predictor", {}).get("pearson", float("nan")),
                "ridge_pcc": test.get("pca_ridge", {}).get("pearson", float("nan")),
            }
        )
        logg.info(f"compare_methods: {name}: held-out PCC {rows[-1]['test_pcc']:.4f}, k = {rows[-1]['k']}")
    return pd.DataFrame(rows)
