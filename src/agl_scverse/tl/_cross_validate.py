"""Leave-one-group-out cross-validation of AGL methods and baselines on the same folds and embeddings."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys
from agl_scverse._expression import expression_transform
from agl_scverse._legacy_keywords import merge_legacy
from agl_scverse._serialize import to_h5ad
from agl_scverse._stats import mean_pearson, per_gene_metrics
from agl_scverse._transaction import check_owned, restore_on_error
from agl_scverse._utils import show_progress
from agl_scverse._validate import check_adata, check_in_range, check_obs_key
from agl_scverse.configs import GeneConfig, as_config
from agl_scverse.pp._context import check_context_within_groups
from agl_scverse.pp._genes import GeneRoles, gene_roles

from ._baselines import RRR_RANKS, mean_predictor, pca_ridge, reduced_rank_ridge
from ._config import merge_configs
from ._fit import agl_fit

__all__ = ["cross_validate", "BASELINES", "CV_COLUMNS"]

BASELINES = ("mean", "pca_ridge", "rrr")
"""Baselines of :func:`cross_validate` (all added with ``baselines=True``; ``"rrr"``: reduced-rank ridge with
auxiliaries, "linear AGL")."""

#: Auxiliaries (best by prior) offered to the ``"rrr"`` baseline; 0 and these are tried on validation.
RRR_AUX: tuple[int, ...] = (300, 1000, 3000)

CV_COLUMNS = ["fold", "method", "gene", "pearson", "spearman", "mse", "k", "fit_seconds"]
"""Columns of the DataFrame returned by :func:`cross_validate`."""


def _embedding_key(adata: AnnData, embedding_key: str | None) -> str:
    if embedding_key is not None:
        if embedding_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{embedding_key!r}] is missing; available: {list(adata.obsm)}. "
                "Run agl.pp.embed_patches first or pass embedding_key."
            )
        return embedding_key
    keys = [k for k in adata.obsm if k.startswith(consts.EMBED_PREFIX)]
    if len(keys) != 1:
        raise ValueError(
            f"Cannot choose the embedding: .obsm holds {len(keys)} keys starting with {consts.EMBED_PREFIX!r} ({keys}). "
            "Pass embedding_key=."
        )
    return keys[0]


def _val_group(order: list[str], test_group: str) -> str | None:
    """With >= 3 training groups, the group after the held-out one (cyclically) validates; else None."""
    if len(order) - 1 < 3:
        return None
    return order[(order.index(test_group) + 1) % len(order)]


def cross_validate(
    adata: AnnData,
    group_key: str,
    methods: Sequence[str] = ("pgl", "agl", "dkgsb"),
    embedding_key: str | None = None,
    n_targets: int | None = None,
    baselines: bool | Sequence[str] = True,
    seed: int = 0,
    key_added: str = "agl_cv",
    *,
    groups: Sequence[str] | None = None,
    genes: GeneConfig | Mapping[str, Any] | None = None,
    val_fraction: float = 0.2,
    progress: bool | None = None,
    method_kwargs: dict[str, dict] | None = None,
    prior: consts.Prior | str | None = None,
    min_cells: int | float | None = None,
    layer: str | None = None,
    transform: consts.Transform | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-group-out evaluation of AGL methods and baselines.

    For each held-out group (slide, section, patient, ...):

    1. gene roles are recomputed on the **training groups only** (targets = top-``n_targets`` HVG of the
       training spots, auxiliaries ranked by ``prior``; :func:`agl_scverse.pp.gene_roles`), and every
       method of the fold uses exactly these roles;
    2. each method in ``methods`` is fitted with :func:`agl_scverse.tl.agl_fit` on the training groups (same
       embeddings, same validation spots, same seed), then predicts the held-out group;
    3. with ``baselines`` (all by default), the mean predictor, PCA+Ridge and a reduced-rank ridge with auxiliaries
       (:func:`agl_scverse.tl.mean_predictor`, :func:`agl_scverse.tl.pca_ridge`,
       :func:`agl_scverse.tl.reduced_rank_ridge`; the last one's rank and number of auxiliaries chosen on the
       validation spots) are fitted on the **same training spots as the networks**: the training split, or
       training + validation spots when the networks refit on them (``refit``, on by default in embedding mode),
       else the training split (``refit=False``);
    4. per-gene Pearson / Spearman / MSE of the **targets** on the held-out spots, on the ``transform`` scale
       (NaN where a target is constant on the held-out group).

    Validation spots (early stopping, DkGSB's bi-level step): with at least 3 training groups, the whole next
    group (cyclically after the held-out one); otherwise a random ``val_fraction`` of training spots.

    Parameters
    ----------
    adata
        Raw counts in ``.X`` (or ``layer``) and an embedding in ``.obsm`` (see :func:`agl_scverse.pp.embed_patches`).
        Not modified, except for the summary written to ``.uns[key_added]``.
    group_key
        ``.obs`` column with the groups; each group is held out once.
    methods
        AGL methods (``"pgl"``, ``"agl"``, ``"topk"``, ``"dkgsb"``; see :func:`agl_scverse.tl.agl_fit`). A name may
        carry a label after ``":"`` (e.g. ``"pgl:reg"``) to run one method with the settings of
        ``method_kwargs[name]``.
    embedding_key
        ``.obsm`` key of the embeddings; default: the only ``X_agl_*`` key.
    baselines
        Baseline rows: ``True`` every one of :data:`BASELINES` (``"mean"``, ``"pca_ridge"``, ``"rrr"``), ``False``
        none, or a sequence naming the ones wanted (e.g. ``("mean", "pca_ridge")``: ``"rrr"``, the slowest, left
        out).
    seed
        Seed for every fit and the validation split.
    key_added
        ``.uns`` key of the summary.
    groups
        Hold out only these groups (default: every group; the others still train).
    genes
        Targets per fold (``n_targets``), prior (ranked on each fold's training spots), ``min_cells``, counts
        ``layer`` and the expression scale of targets, predictions and metrics (``transform``):
        :class:`~agl_scverse.configs.GeneConfig` or a dict. ``targets`` and ``auxiliaries`` are chosen per fold
        and cannot be given.
    val_fraction
        Fraction of training spots used for validation when there are fewer than 3 training groups.
    progress
        Progress bar over folds: ``True``, ``False``, or ``None`` (default) to follow scanpy's verbosity (shown
        unless ``sc.settings.verbosity`` is 0, ``"error"``).
    method_kwargs
        Extra :func:`agl_scverse.tl.agl_fit` arguments per method name (e.g.
        ``{"pgl:reg": {"network": agl.NetworkConfig(dropout=0.5)}}``). A config (``network``, ``training``,
        ``dkgsb``, ``encoder``; a config object or a dict) also given in ``fit_kwargs`` is merged field by field:
        the method's fields (a dict's keys, or the fields of a config object that differ from the defaults) win,
        the shared config's other fields are kept; other arguments replace the shared ones. With
        ``training=agl.TrainingConfig(epochs=30)`` and ``method_kwargs={"pgl:fast": {"training": {"lr": 1e-2}}}``,
        ``"pgl:fast"`` trains 30 epochs at lr 0.01.
    n_targets
        Deprecated: use ``genes=agl.GeneConfig(n_targets=...)``.
    prior
        Deprecated: use ``genes=agl.GeneConfig(prior=...)``.
    min_cells
        Deprecated: use ``genes=agl.GeneConfig(min_cells=...)``.
    layer
        Deprecated: use ``genes=agl.GeneConfig(layer=...)``.
    transform
        Deprecated: use ``genes=agl.GeneConfig(transform=...)``.
    **fit_kwargs
        Passed to every :func:`agl_scverse.tl.agl_fit` call: its configs (``network=``, ``training=``,
        ``dkgsb=`` with ``k`` for ``"topk"``, ``encoder=``), ``device``, ...

    Returns
    -------
    Tidy DataFrame with columns ``fold`` (held-out group), ``method``, ``gene``, ``pearson``, ``spearman``,
    ``mse``, ``k`` (auxiliary genes used: 0 for PGL, all for AGL-all, the learned ``k`` for DkGSB, NaN for
    baselines) and ``fit_seconds`` (wall time of fitting that method on that fold). One row per fold x method x
    target gene.

    ``.uns[key_added]`` receives (h5ad-serialisable): ``summary`` (a dict of equal-length arrays ``fold``,
    ``method``, ``mean_pearson``, ``mean_spearman``, ``mean_mse``, ``k``, ``fit_seconds``, one entry per fold x
    method), ``mean_pearson`` (per method, mean over folds of the fold's mean target Pearson r), ``folds``,
    ``methods``, and ``params`` (with ``method_fit_kwargs``: the merged arguments each method was fitted with).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> df = agl.tl.cross_validate(adata, "library_id", methods=("pgl", "dkgsb"))  # doctest: +SKIP
    >>> df.groupby(["method", "fold"]).pearson.mean().unstack()  # doctest: +SKIP
    >>> df = agl.tl.cross_validate(
    ...     adata, "library_id", methods=("pgl", "pgl:fast"), training=agl.TrainingConfig(epochs=30),
    ...     method_kwargs={"pgl:fast": {"training": {"lr": 1e-2}}},  # 30 epochs at lr 0.01
    ... )  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    old = {"n_targets": n_targets, "prior": prior, "min_cells": min_cells, "layer": layer, "transform": transform}
    g = _gene_config(genes, {k: v for k, v in old.items() if v is not None})
    n_targets, prior, min_cells, layer, transform = g.n_targets, g.prior, g.min_cells, g.layer, g.transform
    baselines = _baseline_names(baselines)
    grp, order, held, emb_key = _check_inputs(
        adata, group_key, groups, methods, baselines, embedding_key, layer, transform
    )
    methods = tuple(methods)
    method_kwargs = dict(method_kwargs or {})
    unknown_kw = [m for m in method_kwargs if m not in methods]
    if unknown_kw:
        raise KeyError(f"method_kwargs names {unknown_kw}, which are not in methods {list(methods)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods holds duplicate names {list(methods)}; label variants as 'method:label'.")
    emb = np.asarray(adata.obsm[emb_key], dtype=np.float32)
    check_in_range("val_fraction", val_fraction, 0.0, 1.0, closed="neither")
    if fit_kwargs.get("mode", "embedding") != "embedding":
        raise ValueError("cross_validate evaluates embedding mode (cached features); mode='finetune' is not supported.")
    for name in ("spots", "split_key", "val_groups", "targets", "auxiliaries", "copy", "save_dir", "method", "genes"):
        if name in fit_kwargs or any(name in kw for kw in method_kwargs.values()):
            raise TypeError(f"cross_validate sets {name!r} itself for every fold; do not pass it.")
    fit_kwargs_by_method = {name: merge_configs(fit_kwargs, method_kwargs.get(name, {})) for name in methods}
    check_owned(adata, uns=[key_added])  # before the folds run
    counts = adata.layers[layer] if layer is not None else adata.X
    prior_col = Keys(key_added).fold_prior
    rows: list[pd.DataFrame] = []
    summary: list[dict] = []
    bar = tqdm(held, desc="cross-validate", unit="fold", disable=not show_progress(progress))
    for test_group in bar:
        bar.set_postfix_str(str(test_group))
        test = grp == test_group
        train = ~test
        val_group = _val_group(order, test_group)
        roles = gene_roles(
            adata, n_targets=n_targets, prior=prior, min_cells=min_cells, train_mask=train, layer=layer, inplace=False
        )
        t_idx = adata.var_names.get_indexer(roles.targets)
        Y_all = expression_transform(counts, transform, columns=t_idx)
        Y_test = Y_all[test]

        def record(method: str, pred: np.ndarray, k: float, secs: float, _tg=test_group, _Yt=Y_test, _r=roles):
            m = _fold_metrics(_tg, method, _Yt, pred, _r, k, secs)
            rows.append(m)
            summary.append(_fold_summary(m, _tg, method, k, secs))

        if methods:
            sub = _training_anndata(adata, counts, train, group_key, emb_key, roles, prior_col)
        base_rows = np.flatnonzero(train)  # spots the networks train on (all training groups with refit=True)
        for name in methods:
            method = name.split(":")[0]
            kw = {"progress": False, **fit_kwargs_by_method[name]}
            t0 = time.perf_counter()
            model = agl_fit(
                sub,
                method=method,
                embedding_key=emb_key,
                genes=GeneConfig(
                    targets=roles.targets,
                    auxiliaries=roles.auxiliaries,
                    prior=prior_col,
                    min_cells=min_cells,
                    transform=transform,
                ),
                split_key=group_key if val_group else None,
                val_groups=[val_group] if val_group else None,
                val_fraction=val_fraction,
                seed=seed,
                key_added=f"{key_added}_{name.replace(':', '_')}",
                **kw,
            )
            secs = time.perf_counter() - t0
            split_col = sub.obs[Keys(f"{key_added}_{name.replace(':', '_')}").split].astype(str).to_numpy()
            fit_rows = np.flatnonzero(train)[split_col == consts.SPLIT_TRAIN]
            val_rows = np.flatnonzero(train)[split_col == consts.SPLIT_VAL]
            if not sub.uns[f"{key_added}_{name.replace(':', '_')}"]["params"]["refit"]:
                base_rows = fit_rows  # the baselines train on the spots the networks trained on
            n_t = len(roles.targets)
            if list(model.targets) != list(roles.targets):  # pragma: no cover - guards the contract
                raise RuntimeError("agl_fit changed the target genes of the fold.")
            pred = model.predict(emb[test])[:, :n_t]
            record(name, pred, float(model.k if model.k is not None else np.nan), secs)
        if baselines:
            if not methods:
                val_rows = np.flatnonzero(grp == val_group) if val_group else np.flatnonzero(train)[:0]
                fit_rows = np.setdiff1d(np.flatnonzero(train), val_rows)
            for name, pred, k_b, secs in _baselines(baselines, emb, Y_all, counts, transform, roles, adata, fit_rows,
                                                  val_rows, base_rows, test, seed):  # fmt: skip
                record(name, pred, k_b, secs)
        logg.info(
            f"fold {test_group!r} (validation {val_group or 'random spots'}): "
            + ", ".join(f"{s['method']} {s['mean_pearson']:.3f}" for s in summary if s["fold"] == test_group)
        )

    df = pd.concat(rows, ignore_index=True)[CV_COLUMNS]
    summ = pd.DataFrame(summary)
    per_method = summ.groupby("method", sort=False)["mean_pearson"].mean()
    result = to_h5ad(
        {
            "summary": {c: summ[c].to_numpy() for c in summ.columns},
            "mean_pearson": {m: float(v) for m, v in per_method.items()},
            "folds": np.asarray(held, dtype=str),
            "methods": np.asarray(list(per_method.index), dtype=str),
            "params": {
                "group_key": group_key,
                "methods": list(methods),
                "baselines": list(baselines),
                "embedding_key": emb_key,
                "n_targets": int(n_targets),
                "prior": str(prior),
                "min_cells": float(min_cells),
                "transform": transform,
                "layer": layer,
                "seed": int(seed),
                "val_fraction": float(val_fraction),
                "method_kwargs": {m: {k: str(v) for k, v in kw.items()} for m, kw in method_kwargs.items()},
                "fit_kwargs": {k: str(v) for k, v in fit_kwargs.items()},
                "method_fit_kwargs": {m: {k: str(v) for k, v in kw.items()} for m, kw in fit_kwargs_by_method.items()},
            },
        }
    )
    with restore_on_error(adata, uns=[key_added]):
        adata.uns[key_added] = result
    return df


def _gene_config(genes, old: dict[str, Any]) -> GeneConfig:
    """``genes`` with the deprecated gene keywords of :func:`cross_validate` moved in; targets are chosen per fold."""
    g = as_config(GeneConfig, merge_legacy("cross_validate", {"genes": genes}, old, stacklevel=4)["genes"], "genes")
    if g.targets is not None or g.auxiliaries is not None:
        raise ValueError(
            "cross_validate chooses the targets and auxiliaries of each fold; leave GeneConfig(targets=None, "
            "auxiliaries=None)."
        )
    return g


def _baseline_names(baselines: bool | Sequence[str]) -> tuple[str, ...]:
    """``baselines`` as the names asked for (``True``: all of :data:`BASELINES`), checked."""
    if isinstance(baselines, bool | np.bool_):
        return BASELINES if baselines else ()
    if isinstance(baselines, str):
        baselines = [baselines]
    names = tuple(str(b) for b in baselines)
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise ValueError(f"Unknown baseline(s) {unknown}; choose from {list(BASELINES)} (or True / False).")
    return tuple(dict.fromkeys(names))


def _baselines(names, emb, Y_all, counts, transform, roles, adata, fit_rows, val_rows, base_rows, test, seed):
    """``(name, test predictions, k, seconds)`` of each baseline in ``names``, fitted on ``base_rows``."""
    for name in names:
        t0 = time.perf_counter()
        k_b = np.nan
        if name == "mean":
            pred = mean_predictor(emb[base_rows], Y_all[base_rows], emb[test])
        elif name == "pca_ridge":
            pred = pca_ridge(emb[base_rows], Y_all[base_rows], emb[test], seed=seed)
        else:
            pred, k_b = _rrr_baseline(emb, counts, transform, roles, adata, fit_rows, val_rows, base_rows, test)
        yield name, pred, k_b, time.perf_counter() - t0


def _fold_metrics(fold, method: str, Y_test, pred, roles: GeneRoles, k: float, secs: float) -> pd.DataFrame:
    """Per-gene metrics of one method on one fold, with the fold, method, k and fit time columns."""
    m = per_gene_metrics(Y_test, pred, genes=roles.targets)
    m.insert(0, "method", method)
    m.insert(0, "fold", fold)
    m["k"] = float(k)
    m["fit_seconds"] = float(secs)
    return m


def _fold_summary(m: pd.DataFrame, fold, method: str, k: float, secs: float) -> dict:
    """The summary row of :func:`_fold_metrics` (means over the targets)."""

    def mean(col: pd.Series) -> float:
        return float(np.nanmean(col)) if col.notna().any() else np.nan

    return {
        "fold": fold, "method": method, "mean_pearson": mean(m.pearson), "mean_spearman": mean(m.spearman),
        "mean_mse": mean(m.mse), "k": float(k), "fit_seconds": float(secs),
    }  # fmt: skip


def _rrr_baseline(emb, counts, transform, roles: GeneRoles, adata, train_rows, val_rows, final_rows, test):
    """Reduced-rank ridge with auxiliaries: rank and number of auxiliaries chosen on the validation spots."""
    n_t = len(roles.targets)
    n_aux = [0] + [a for a in RRR_AUX if a <= len(roles.auxiliaries)]
    cols = adata.var_names.get_indexer(list(roles.targets) + list(roles.auxiliaries[: max(n_aux)]))
    Y = expression_transform(counts, transform, columns=cols)
    best = (None, 0)
    if len(val_rows) >= 2:
        score = -np.inf
        for a in n_aux:
            preds = reduced_rank_ridge(
                emb[train_rows], Y[train_rows, : n_t + a], emb[val_rows], RRR_RANKS, n_targets=n_t
            )
            for rank, pred in preds.items():
                r = mean_pearson(Y[val_rows, :n_t], pred)
                if r > score + 1e-9:
                    score, best = r, (rank, a)
    rank, a = best
    pred = reduced_rank_ridge(emb[final_rows], Y[final_rows, : n_t + a], emb[test], rank, n_targets=n_t)
    return pred, float(a)


def _check_inputs(adata, group_key, groups, methods, baselines, embedding_key, layer, transform):
    """Validate everything before any work; return the groups per spot, their order, the held-out ones, the key."""
    check_adata(adata, layer=layer, transform=transform)
    check_obs_key(adata, group_key, "group_key")
    col = adata.obs[group_key]
    if col.isna().any():
        raise ValueError(f".obs[{group_key!r}] holds missing values; every spot needs a group.")
    grp = col.astype(str).to_numpy()
    order = (
        list(pd.unique(grp))
        if not isinstance(col.dtype, pd.CategoricalDtype)
        else [str(c) for c in col.cat.categories if (grp == str(c)).any()]
    )
    if len(order) < 2:
        raise ValueError(f".obs[{group_key!r}] has {len(order)} group(s); leave-one-group-out needs at least 2.")
    held = order if groups is None else [str(g) for g in groups]
    unknown = [g for g in held if g not in order]
    if unknown:
        raise KeyError(f"groups {unknown} are not values of .obs[{group_key!r}] ({order}).")
    bad = [m for m in methods if str(m).split(":")[0] not in consts.METHODS]
    if bad:
        raise ValueError(f"Unknown method(s) {bad}; choose from {consts.METHODS}.")
    if not methods and not baselines:
        raise ValueError("Nothing to evaluate: methods is empty and baselines=False.")
    emb_key = _embedding_key(adata, embedding_key)
    emb = np.asarray(adata.obsm[emb_key])
    if emb.ndim != 2 or not np.all(np.isfinite(emb)):
        raise ValueError(f"adata.obsm[{emb_key!r}] must be a finite spots x features matrix.")
    check_context_within_groups(adata, emb_key, group_key)
    return grp, order, held, emb_key


def _training_anndata(
    adata: AnnData, counts, train: np.ndarray, group_key: str, emb_key: str, roles: GeneRoles, prior_col: str
) -> AnnData:
    """A small AnnData of the training spots only (counts, groups, embedding, the fold's prior as a .var column)."""
    import scipy.sparse as sp

    X = counts[train]
    X = X.copy() if sp.issparse(X) else np.array(X)
    sub = AnnData(X, obs=pd.DataFrame(index=adata.obs_names[train]), var=pd.DataFrame(index=adata.var_names))
    sub.obs[group_key] = adata.obs[group_key].astype(str).to_numpy()[train]
    sub.obsm[emb_key] = np.asarray(adata.obsm[emb_key])[train]
    if consts.EMBED_UNS in adata.uns and emb_key in adata.uns[consts.EMBED_UNS]:
        sub.uns[consts.EMBED_UNS] = {emb_key: adata.uns[consts.EMBED_UNS][emb_key]}
    sub.var[prior_col] = roles.prior.reindex(adata.var_names).to_numpy(dtype=float)
    return sub
