"""``evaluate``: per-gene Pearson / Spearman / MSE of predictions, beside a mean predictor and PCA+Ridge."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys
from agl_scverse._expression import expression_transform, observed_transform, predicted_mask, take_rows
from agl_scverse._serialize import null_as_none, to_h5ad
from agl_scverse._stats import per_gene_metrics
from agl_scverse._transaction import restore_on_error
from agl_scverse._validate import check_counts, check_integer_counts, check_unique_names, resolve_spots, scored_spots
from agl_scverse.model import AGLModel
from agl_scverse.pp._embed import put_embedding

from ._baselines import mean_predictor, pca_ridge
from ._predict import prediction_layer, prediction_record

__all__ = ["evaluate"]

#: ``metrics["test"]["spots"]`` for each kind of default spots (:func:`~agl_scverse._validate.scored_spots`).
_SPOTS_DESC = {
    "held-out": "unused (held out of the fit)",
    "validation": "val (used for early stopping: optimistic)",
    "refitted": "val (the model was refitted on them: a training score)",
    "all": "all (no split column: unseen slide)",
}
_BLOCK_BYTES = 256 * 2**20


def _summary(df: pd.DataFrame) -> dict[str, float]:
    def agg(f: Any, col: str) -> float:
        return float(f(df[col])) if df[col].notna().any() else float("nan")

    out = {c: agg(np.nanmean, c) for c in ("pearson", "spearman", "mse")}
    return {**out, "pearson_median": agg(np.nanmedian, "pearson"), "n_genes": int(df["pearson"].notna().sum())}


def _scored_predictions(layer, rows: np.ndarray, cols: np.ndarray, stack: ExitStack):
    """``layer[rows][:, cols]``, to be read in gene blocks ``[:, s:e]``."""
    if isinstance(layer, np.ndarray):
        return _Blocks(lambda: layer, rows, cols)
    import dask.array as da

    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agl-evaluate-"))) / "pred.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows), len(cols)), fortran_order=True)
    sub = layer if len(rows) == layer.shape[0] and (rows == np.arange(len(rows))).all() else layer[rows]
    da.store(sub[:, cols].astype(np.float32), _MappedFile(path), lock=True)  # type: ignore[arg-type]  # a __setitem__ target
    return _Blocks(lambda: np.load(path, mmap_mode="r"), None, None)


class _MappedFile:
    """A ``.npy`` file written through a fresh memory map per chunk, so written pages do not stay mapped."""

    def __init__(self, path: Path):
        self.path = path
        self.shape, self.dtype, self.ndim = np.load(path, mmap_mode="r").shape, np.dtype(np.float32), 2

    def __setitem__(self, key, value) -> None:
        out = np.load(self.path, mmap_mode="r+")
        out[key] = value
        out.flush()
        del out


class _Blocks:
    """Gene blocks ``[:, s:e]`` of ``open()[rows][:, cols]`` (all of them when ``rows``/``cols`` are None), copied."""

    def __init__(self, open_: Any, rows: np.ndarray | None, cols: np.ndarray | None):
        self.open, self.rows, self.cols = open_, rows, cols

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        src = self.open()
        if self.cols is None or self.rows is None:
            return np.array(src[key])
        return src[np.ix_(self.rows, self.cols[key[1]])]


def _genes_to_score(adata: AnnData, model: AGLModel | None, genes, keys: Keys) -> list[str]:
    """The gene names ``evaluate`` scores, checked against ``adata``."""
    if isinstance(genes, str) and genes == "targets":
        if model is not None:
            gene_list = list(model.targets)
        elif keys.role in adata.var:
            gene_list = adata.var_names[adata.var[keys.role].astype(str) == consts.ROLE_TARGET].tolist()
        else:
            raise KeyError(f"No model given and no .var[{keys.role!r}]: pass model= or genes=[...].")
    elif isinstance(genes, str) and genes == "predicted":
        if keys.pred_layer in adata.layers:
            gene_list = adata.var_names[predicted_mask(adata, keys)].tolist()
        elif model is not None:
            gene_list = [g for g in model.predicted_genes if g in adata.var_names]
        else:
            raise KeyError(f"genes='predicted' needs .layers[{keys.pred_layer!r}] or model=; run agl_predict first.")
    elif isinstance(genes, str):
        raise ValueError(f"genes must be 'targets', 'predicted' or a list of gene names, got {genes!r}.")
    else:
        gene_list = [str(g) for g in genes]
    missing = [g for g in gene_list if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} gene(s) to evaluate are not in adata.var_names: {missing[:10]}.")
    if not gene_list:
        raise ValueError("No genes to evaluate.")
    return gene_list


def _check_predicted(gene_list: list[str], ok: np.ndarray, keys: Keys) -> None:
    unpredicted = [g for g, good in zip(gene_list, ok) if not good]
    if unpredicted:
        raise KeyError(
            f"{len(unpredicted)} gene(s) to evaluate have no predictions in .layers[{keys.pred_layer!r}]: "
            f"{unpredicted[:10]}. Predict them (agl_predict(adata, model, genes=[...])) or evaluate "
            "genes='predicted'."
        )


def _param(uns_entry: dict, name: str, default: Any) -> Any:
    value = null_as_none(((uns_entry or {}).get("params") or {}).get(name))  # also reads 0.1 placeholders
    return default if value is None else value


def evaluate(
    adata: AnnData,
    model: AGLModel | str | Path | None = None,
    *,
    genes: str | Sequence[str] = "targets",
    spots: Any = None,
    baselines: bool = True,
    key_added: str = consts.DEFAULT_KEY,
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
        The fitted model (or its directory); without it, the genes and settings are read from ``.var`` / ``.uns``.
    genes
        ``"targets"`` (default), ``"predicted"`` (every gene with predictions) or a list of gene names.
    spots
        Evaluated spots (boolean mask, names or positions). Default: the spots held out of the fit
        (``.obs[split] == "unused"``), else the validation spots (optimistic; logged), or every spot of a slide
        without a split column.
    baselines
        Also fit and score the mean predictor and ``StandardScaler -> PCA(n_components) -> Ridge`` on the
        embedding, trained on the spots the model trained on (skipped, with a note, when there are none or no
        embedding).
    key_added
        Prefix of the keys the run was written under (``key_added`` of :func:`agl_fit`).
    embedding_key
        ``.obsm`` key for the baselines; default the model's.
    n_components
        PCA components of the baseline (capped by the number of spots and features).
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    None, or the copy. Writes ``.var[k.pcc]``, ``.var[k.spearman]``, ``.var[k.mse]`` (NaN for genes not
    evaluated) and ``.uns[k.uns]["metrics"]["test"]``: per method (``model``, ``mean_predictor``, ``pca_ridge``)
    the mean / median Pearson, mean Spearman and MSE over genes, plus ``n_spots``, ``spots``, ``genes``,
    ``transform``.

    Examples
    --------
    >>> agl.tl.evaluate(adata, model)  # doctest: +SKIP
    >>> adata.uns["agl"]["metrics"]["test"]["model"]["pearson"]  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"evaluate expects an AnnData, got {type(adata).__name__}.")
    keys = Keys(key_added)
    if model is not None:
        model = AGLModel.coerce(model)
    entry = adata.uns.get(keys.uns, {}) or {}
    if adata.n_vars == 0:
        raise ValueError("The slide has no expression to evaluate against (n_vars == 0).")
    check_unique_names(adata)

    gene_list = _genes_to_score(adata, model, genes, keys)
    gidx = adata.var_names.get_indexer(gene_list)

    transform = model.config.get("transform") if model is not None else _param(entry, "transform", "log1p")
    if keys.pred_layer in adata.layers:
        transform = observed_transform(adata.uns.get(keys.pred_uns), transform)
        _check_predicted(gene_list, predicted_mask(adata, keys)[gidx], keys)
    layer = model.config.get("layer") if model is not None else _param(entry, "layer", None)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"The model was trained on counts in layer {layer!r}, which this AnnData lacks.")
    emb_key = embedding_key or (model.config.get("embedding_key") if model is not None else None)
    emb_key = emb_key or null_as_none(entry.get("embedding_key"))

    split = adata.obs[keys.split].astype(str).to_numpy() if keys.split in adata.obs else None
    refitted = bool(model.config.get("refit", False) if model is not None else _param(entry, "refit", False))
    if spots is not None:
        ev = resolve_spots(adata, spots, as_mask=True)
        spots_desc = "given"
    else:
        ev, kind = scored_spots(split, adata.n_obs)
        spots_desc = _SPOTS_DESC[kind]
        if kind == "validation" and refitted:
            spots_desc = _SPOTS_DESC["refitted"]
            logg.warning(
                "evaluate: no held-out ('unused') spots; scoring the validation spots, which the model was refitted "
                "on (refit=True): a training score. Hold spots out of agl_fit (spots=) or pass refit=False."
            )
        elif kind == "validation":
            logg.warning("evaluate: no held-out ('unused') spots; scoring the validation spots, which are optimistic.")
    if ev.sum() < 2:
        raise ValueError(f"Only {int(ev.sum())} spots to evaluate; correlations need at least 2.")

    if keys.pred_layer not in adata.layers and model is None:
        raise KeyError(f".layers[{keys.pred_layer!r}] is missing; run agl_predict first or pass model=.")
    X = adata.layers[layer] if layer is not None else adata.X
    fitted_on = (consts.SPLIT_TRAIN, consts.SPLIT_VAL) if refitted else (consts.SPLIT_TRAIN,)
    train = np.isin(split, fitted_on) if split is not None else np.zeros(adata.n_obs, dtype=bool)
    notes = ""
    if baselines and not train.any():
        notes = "baselines skipped: no training spots ('train' in .obs[split]) in this AnnData"
    elif baselines and (not emb_key or emb_key not in adata.obsm):
        notes = f"baselines skipped: embedding {emb_key!r} not in .obsm"
    run_baselines = baselines and not notes
    ev_idx = np.flatnonzero(ev)
    X_ev = take_rows(X, ev_idx)
    X_tr = take_rows(X, np.flatnonzero(train)) if run_baselines else None
    # the counts are checked before anything is predicted or written
    what = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    log1p_recorded = layer is None and consts.SCANPY_LOG1P_UNS in adata.uns
    for part, name in ((X_ev, "evaluated"), (X_tr, "training")):
        if part is not None:
            check_counts(part, what=f"{what} of the {name} spots")
            check_integer_counts(part, f"{what} of the {name} spots", transform, log1p_recorded)
    if notes:
        logg.info(f"evaluate: {notes}")
    new_layer, new_emb, L = None, None, adata.layers.get(keys.pred_layer)
    if L is None:
        assert model is not None  # checked above, before the counts
        new_layer, new_emb, pred_genes = prediction_layer(adata, model)
        _check_predicted(gene_list, np.isin(gene_list, pred_genes), keys)
        L = new_layer
    F: Any = np.asarray(adata.obsm[emb_key], dtype=np.float32) if run_baselines else None
    # gene blocks: memory is that of a block of evaluated spots x genes, whatever the number of genes
    step = max(1, int(_BLOCK_BYTES // (4 * 4 * max(len(ev_idx), int(train.sum()) if run_baselines else 0, 1))))
    frames: dict[str, list[pd.DataFrame]] = {"model": [], "mean_predictor": [], "pca_ridge": []}
    with ExitStack() as stack:
        P = _scored_predictions(L, ev_idx, gidx, stack)
        for s in range(0, len(gidx), step):
            g, names = gidx[s : s + step], gene_list[s : s + step]
            Y = expression_transform(X_ev, transform, columns=g)
            frames["model"].append(per_gene_metrics(Y, P[:, s : s + step], genes=names))
            if run_baselines:
                Ytr = expression_transform(X_tr, transform, columns=g)
                frames["mean_predictor"].append(per_gene_metrics(Y, mean_predictor(F[train], Ytr, F[ev]), names))
                pred = pca_ridge(F[train], Ytr, F[ev], n_components=n_components)
                frames["pca_ridge"].append(per_gene_metrics(Y, pred, genes=names))
    df = pd.concat(frames["model"], ignore_index=True)
    results = {name: _summary(pd.concat(f, ignore_index=True)) for name, f in frames.items() if f}

    test = {**results, "n_spots": int(ev.sum()), "spots": spots_desc}
    test.update(genes=gene_list if not isinstance(genes, str) else genes, transform=transform, embedding_key=emb_key)
    test.update(notes=notes)
    target = adata.copy() if copy else adata
    written = {
        "var": [keys.pcc, keys.spearman, keys.mse] + ([keys.predicted] if new_layer is not None else []),
        "uns": [keys.uns] + [consts.EMBED_UNS] * bool(new_emb) + [keys.pred_uns] * (new_layer is not None),
        "layers": [keys.pred_layer] if new_layer is not None else [],
        "obsm": [new_emb[0]] if new_emb else [],
    }
    with restore_on_error(target, **written):
        for col, name in ((keys.pcc, "pearson"), (keys.spearman, "spearman"), (keys.mse, "mse")):
            full = np.full(target.n_vars, np.nan)
            full[gidx] = df[name].to_numpy(dtype=float)
            target.var[col] = full
        if new_layer is not None and model is not None:  # as agl_predict writes it: the layer, its mask and its record
            target.layers[keys.pred_layer] = new_layer
            target.var[keys.predicted] = target.var_names.isin(pred_genes)
            target.uns[keys.pred_uns] = prediction_record(model, consts.SCALE_MODEL, "selected", len(pred_genes), True)
        if new_emb is not None:
            put_embedding(target, *new_emb)
        entry = dict(target.uns.get(keys.uns, {}) or {})
        entry["metrics"] = {**dict(entry.get("metrics", {}) or {}), "test": to_h5ad(test)}
        target.uns[keys.uns] = entry
    line = ", ".join(f"{k} {v['pearson']:.4f}" for k, v in results.items())
    logg.info(f"evaluate: mean Pearson over {len(gene_list)} genes on {int(ev.sum())} spots: {line}")
    return target if copy else None
