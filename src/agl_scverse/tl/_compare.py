"""``compare_methods``: several AGL methods fitted on one split and scored on the same held-out spots."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys
from agl_scverse._validate import check_in_range

from ._config import merge_configs
from ._evaluate import evaluate
from ._fit import agl_fit
from ._predict import agl_predict

__all__ = ["compare_methods"]


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

    A seeded ``test_fraction`` of the spots is held out of every fit; each method is fitted on a copy of ``adata``
    with :func:`agl_fit`, predicted and scored with :func:`evaluate` on the held-out spots.

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
        Boolean ``.var`` column of known helpful auxiliaries (the synthetic slide's ``"informative"``), for the
        precision of the selected auxiliaries.
    method_kwargs
        Extra :func:`agl_fit` arguments per method name (e.g. ``{"topk": {"dkgsb": agl.DkGSBConfig(k=500)}}``);
        a config also given in ``fit_kwargs`` is updated field by field, as in
        :func:`agl_scverse.tl.cross_validate`.
    **fit_kwargs
        Passed to every :func:`agl_fit` call (``embedding_key``, the configs, ``device``, ...).

    Returns
    -------
    One row per method: ``method``, ``test_pcc`` (mean held-out target Pearson), ``test_spearman``, ``test_mse``,
    ``val_pcc``, ``k``, ``n_auxiliary``, ``threshold``, ``precision``, ``k_start`` and ``precision_start`` (DkGSB's
    initial selection), ``base_rate``, ``fit_seconds``, ``best_epoch``, ``mean_pcc`` and ``ridge_pcc``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
    >>> agl.tl.compare_methods(adata, ("pgl", "agl", "dkgsb"), embedding_key="X_agl_resnet18")  # doctest: +SKIP
    """
    check_in_range("test_fraction", test_fraction, 0.0, 1.0, closed="neither")
    for name in ("spots", "copy"):
        if name in fit_kwargs:
            raise TypeError(f"compare_methods sets {name!r} itself for every fit; do not pass it.")
    rng = np.random.default_rng(seed)
    n_test = max(2, int(round(test_fraction * adata.n_obs)))
    held = np.zeros(adata.n_obs, dtype=bool)
    held[rng.choice(adata.n_obs, size=n_test, replace=False)] = True
    method_kwargs = method_kwargs or {}
    keys = Keys(fit_kwargs.get("key_added", consts.DEFAULT_KEY))
    rows = []
    for name in methods:
        method = name.split(":")[0]
        kw = merge_configs(fit_kwargs, method_kwargs.get(name, {}))
        kw.setdefault("progress", False)
        t0 = time.perf_counter()
        work = adata.copy()
        model = agl_fit(work, method=method, spots=~held, seed=seed, **kw)
        seconds = time.perf_counter() - t0
        agl_predict(work, model, key_added=keys.prefix)
        evaluate(work, model, key_added=keys.prefix)
        uns = work.uns[keys.uns]
        test = uns["metrics"]["test"]
        aux = (work.var[keys.role].astype(str) == consts.ROLE_AUX).to_numpy()
        sel = aux & work.var[keys.selected].to_numpy(dtype=bool)
        n_aux = int(aux.sum())
        rank = work.var[keys.prior_rank].to_numpy(dtype=float)
        start = aux & (rank / max(n_aux - 1, 1) < 0.5)  # DkGSB's selection at its initial threshold
        has_truth = truth_key is not None and truth_key in work.var
        truth = work.var[truth_key].to_numpy(dtype=bool) if has_truth else np.zeros(0, bool)
        precision, precision_start, base_rate = (
            float(truth[m].mean()) if has_truth and m.any() else float("nan") for m in (sel, start, aux)
        )
        rows.append(
            {
                "method": name,
                "test_pcc": test["model"]["pearson"],
                "test_spearman": test["model"]["spearman"],
                "test_mse": test["model"]["mse"],
                "val_pcc": uns["metrics"]["val_pcc"],
                "k": int(uns["k"]),
                "n_auxiliary": n_aux,
                "threshold": float(uns["threshold"]),
                "precision": precision,
                "k_start": int(start.sum()),
                "precision_start": precision_start,
                "base_rate": base_rate,
                "fit_seconds": seconds,
                "best_epoch": int(uns["metrics"]["best_epoch"]),
                "mean_pcc": test.get("mean_predictor", {}).get("pearson", float("nan")),
                "ridge_pcc": test.get("pca_ridge", {}).get("pearson", float("nan")),
            }
        )
        logg.info(f"compare_methods: {name}: held-out PCC {rows[-1]['test_pcc']:.4f}, k = {rows[-1]['k']}")
    return pd.DataFrame(rows)
