"""``agl_fit``: train an AGL model (PGL, AGL-all, top-k or DkGSB) on one or several slides.

Order of work (so that a bad input never leaves a half-modified AnnData): check every argument and the data
(counts, spots, split, genes, embedding), compute the gene roles on the training spots, then compute a missing
embedding, train, and only then write ``.var``, ``.obs`` and ``.uns`` (and save the model when ``save_dir`` is
given, atomically).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from .. import _constants as K
from .._constants import Keys
from .._utils import as_anndata, resolve_device, seed_everything
from .._validate import check_adata
from ..model import AGLModel, EmbeddingHead, FinetuneNet, GeneMask, TensorInputs, genes_for_method, train_network
from ..model.checkpoint import package_versions
from ..model.loss import LOSSES
from ..model.trainer import METHODS

__all__ = ["agl_fit", "MODES", "DEFAULTS"]

MODES = ("embedding", "finetune")

#: Defaults of the network and trainer per mode (``None`` arguments of :func:`agl_fit` take these).
#: Embedding mode: a one-hidden-layer MLP (256 units, dropout 0.1) with Adam lr 1e-3 converges in tens of epochs
#: on cached features; the paper's 3e-5 is for fine-tuning a ResNet18 end to end, kept for ``mode="finetune"``.
DEFAULTS: dict[str, dict[str, Any]] = {
    "embedding": {"hidden": (256,), "epochs": 100, "patience": 10, "lr": 1e-3, "batch_size": 128},
    "finetune": {"hidden": (), "epochs": 50, "patience": 20, "lr": 3e-5, "batch_size": 128},
}


# ----------------------------------------------------------------------------------------------- helpers
def _h5ad_safe(obj: Any) -> Any:
    """Recursively turn a value into something ``write_h5ad`` stores (None -> "None", tuples -> lists...)."""
    if obj is None:
        return "None"
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, str | Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj if obj.dtype.kind in "biuf" else np.asarray([str(v) for v in obj.ravel()])
    if isinstance(obj, list | tuple | pd.Index | pd.Series):
        vals = list(obj)
        if not vals:
            return np.zeros(0, dtype=np.int64)
        if all(isinstance(v, bool | np.bool_) for v in vals):
            return np.asarray(vals, dtype=bool)
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in vals):
            return np.asarray(vals, dtype=np.int64)
        if all(isinstance(v, int | float | np.integer | np.floating) for v in vals):
            return np.asarray(vals, dtype=np.float64)
        return np.asarray([str(v) for v in vals])
    return str(obj)


def _resolve_spots(adata: AnnData, spots: Any) -> np.ndarray:
    """Boolean mask of the spots used by the fit (None: all)."""
    from ..pp.patches import _resolve_spots as positions

    if spots is None:
        return np.ones(adata.n_obs, dtype=bool)
    if isinstance(spots, str) and spots in adata.obs:
        col = adata.obs[spots]
        if not pd.api.types.is_bool_dtype(col):
            raise TypeError(f"spots={spots!r} names an .obs column that is not boolean ({col.dtype}).")
        mask = col.to_numpy(dtype=bool)
    else:
        mask = np.zeros(adata.n_obs, dtype=bool)
        mask[positions(adata, spots)] = True
    if not mask.any():
        raise ValueError("No spots left: `spots` selects 0 spots. Pass None to use every spot.")
    return mask


def _make_split(
    adata: AnnData, used: np.ndarray, split_key: str | None, val_groups: Any, val_fraction: float, seed: int
) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"unused"`` per spot."""
    split = np.full(adata.n_obs, "unused", dtype=object)
    if split_key is not None:
        if split_key not in adata.obs:
            raise KeyError(f"split_key={split_key!r} is not an .obs column; available: {list(adata.obs.columns)[:10]}.")
        if val_groups is None:
            raise ValueError("split_key needs val_groups: the .obs values whose spots form the validation set.")
        groups = [val_groups] if isinstance(val_groups, str | int | np.integer) else list(val_groups)
        col = adata.obs[split_key].astype(str).to_numpy()
        present = set(col[used])
        missing = [g for g in groups if str(g) not in present]
        if missing:
            raise ValueError(
                f"val_groups {missing} do not occur in .obs[{split_key!r}] among the used spots; "
                f"values there: {sorted(present)[:10]}."
            )
        is_val = np.isin(col, [str(g) for g in groups])
        split[used & is_val] = "val"
        split[used & ~is_val] = "train"
    else:
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
        idx = np.flatnonzero(used)
        rng = np.random.default_rng(seed)
        n_val = int(round(float(val_fraction) * len(idx)))
        val = rng.choice(idx, size=n_val, replace=False) if n_val > 0 else np.zeros(0, dtype=int)
        split[idx] = "train"
        split[val] = "val"
    n_tr, n_va = int((split == "train").sum()), int((split == "val").sum())
    if n_tr < 2 or n_va < 2:
        raise ValueError(
            f"The split leaves {n_tr} training and {n_va} validation spots; at least 2 of each are needed. "
            "Use more spots, another val_fraction, or other val_groups."
        )
    return split


def _check_positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | np.integer) if integer else isinstance(value, int | float | np.number)
    ok = ok and not isinstance(value, bool) and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}.")


def _embedding_record(adata: AnnData, key: str) -> dict:
    rec = (adata.uns.get(K.EMBED_UNS, {}) or {}).get(key, {}) or {}
    return {
        "name": str(rec.get("encoder", "")),
        "weights_sha256": str(rec.get("weights_sha256", "")),
        "weights_path": str(rec.get("weights_path", "")),
        "patch_px": int(rec["patch_px"]) if "patch_px" in rec else None,
        "patch_um": float(rec["patch_um"]) if "patch_um" in rec else None,
        "pretrained": bool(rec.get("pretrained", False)),
        "seed": int(rec.get("seed", 0)),
        "recorded": bool(rec),
    }


def _check_features(X: np.ndarray, key: str, rows: np.ndarray) -> None:
    if X.ndim != 2:
        raise ValueError(f".obsm[{key!r}] has shape {X.shape}; expected (n_spots, n_features).")
    bad = ~np.isfinite(X[rows]).all(axis=1)
    if bad.any():
        raise ValueError(
            f".obsm[{key!r}] holds NaN/inf for {int(bad.sum())} of the used spots; recompute the embedding or "
            "leave those spots out with spots=..."
        )


class _PatchInputs:
    """Fine-tune mode inputs: uint8 patches of the requested spots, cached in memory when small."""

    def __init__(self, ds, positions: np.ndarray, device, cache_bytes: float = 2e9):
        self.ds, self.device = ds, device
        self.cache = None
        n = len(positions)
        if n * 3 * ds.patch_px**2 <= cache_bytes:
            self.cache = {int(p): ds[int(p)] for p in positions}

    def __call__(self, idx) -> torch.Tensor:
        get = (lambda i: self.cache[int(i)]) if self.cache is not None else (lambda i: self.ds[int(i)])
        return torch.stack([get(i) for i in np.asarray(idx)]).to(self.device)


# ----------------------------------------------------------------------------------------------- agl_fit
def agl_fit(
    data: Any,
    *,
    method: str = "dkgsb",
    embedding_key: str | None = None,
    encoder: str = "resnet18",
    weights: str | Path | None = None,
    n_targets: int = 50,
    targets: Sequence[str] | None = None,
    auxiliaries: Sequence[str] | None = None,
    prior: str = "hvg",
    min_cells: int | float = 10,
    transform: str = "log1p",
    layer: str | None = None,
    split_key: str | None = None,
    val_groups: Any = None,
    val_fraction: float = 0.2,
    spots: Any = None,
    mode: str = "embedding",
    patch_px: int = K.DEFAULT_PATCH_PX,
    patch_um: float = K.DEFAULT_PATCH_UM,
    hidden: Sequence[int] | None = None,
    dropout: float = 0.1,
    epochs: int | None = None,
    patience: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    batch_size: int | None = None,
    loss: str = "pearson",
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    meta_steps: int = 4,
    meta_batch_size: int = 128,
    tau: float = 0.01,
    beta: float = 3e-3,
    meta_normalizer: str = "detached",
    k: int | None = None,
    seed: int = 0,
    device: str = "auto",
    key_added: str = K.DEFAULT_KEY,
    copy: bool = False,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    library_key: str | None = None,
) -> AGLModel | tuple[AGLModel, AnnData]:
    """Train an AGL model that predicts gene expression from H&E patches (or their embeddings).

    Parameters
    ----------
    data
        AnnData in the agl-scverse layout (raw counts in ``.X`` or ``layer``) or a SpatialData (converted with
        :func:`agl_scverse.io.from_spatialdata`).
    method
        ``"dkgsb"`` (learned soft top-k of auxiliaries, default), ``"agl"`` (all auxiliaries, weight 1),
        ``"topk"`` (the first ``k`` auxiliaries by prior) or ``"pgl"`` (targets only).
    embedding_key
        ``.obsm`` key of cached features (embedding mode). Default ``"X_agl_<encoder>"``, computed with
        :func:`agl_scverse.pp.embed_patches` when absent. A named key that is absent is an error.
    encoder, weights
        Image encoder name and local weights file, for a missing embedding or for fine-tune mode.
    n_targets, targets, auxiliaries, prior, min_cells
        Gene roles, computed on the **training spots only**, see :func:`agl_scverse.pp.compute_gene_roles`.
    transform
        Expression scale of the model (``"log1p"``, ``"log1p_cpm"``, ``"none"``), see
        :func:`agl_scverse.pp.expression_transform`.
    layer
        Layer with raw counts instead of ``.X``.
    split_key, val_groups
        Validation spots are those whose ``.obs[split_key]`` is in ``val_groups`` (e.g. a slide); the others
        are training spots.
    val_fraction
        Without ``split_key``: the fraction of used spots drawn (seeded) for validation.
    spots
        Spots used for the fit (boolean mask, names, positions or a boolean ``.obs`` column); the others are
        ``"unused"`` (e.g. held-out test spots).
    mode
        ``"embedding"`` (an MLP head on cached features; CPU friendly) or ``"finetune"`` (the encoder and a linear
        head trained end to end on patches, as in the paper).
    patch_px, patch_um
        Patch size in pixels and µm (fine-tune mode, and a missing embedding).
    hidden, dropout
        Hidden widths of the embedding-mode MLP trunk (default ``(256,)``) and its dropout.
    epochs, patience, lr, weight_decay, batch_size, loss
        Training (Adam), early stopping on the validation mean target Pearson r; ``None`` takes the per-mode
        :data:`DEFAULTS`. ``loss`` is ``"pearson"`` (``1 - r`` per gene, paper) or ``"mse"``.
    inner_steps, inner_lr, meta_steps, meta_batch_size, tau, beta
        DkGSB: differentiable SGD steps and their lr, meta steps per epoch, spots per meta batch, mask
        temperature, Adam lr on the threshold. See :mod:`agl_scverse.model.trainer`.
    meta_normalizer
        ``"detached"`` (default): the inner step of the bi-level objective divides by ``sum(w)`` held constant,
        so the hypergradient measures how well the gradients of the genes at the threshold align with the
        targets' validation gradient; ``"soft"``: the paper's objective differentiated through ``sum(w)`` too,
        which adds a step-size term that always favours fewer auxiliaries (measured ~10x larger than the
        alignment term on the synthetic slide, driving ``k`` towards 0). See :mod:`agl_scverse.model.bilevel`.
    k
        Number of auxiliaries for ``method="topk"``.
    seed
        Seeds the split, initialisation, batches and meta batches (results are identical on CPU for a seed).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``...
    key_added
        Prefix of every written key (:class:`agl_scverse._constants.Keys`).
    copy
        Work on a copy of the AnnData and return it with the model.
    save_dir, overwrite
        Save the model there (atomically; an existing directory is an error unless ``overwrite``).
    progress
        Show a progress bar over epochs.
    library_key
        ``.obs`` column telling slides apart (patches and the Moran prior).

    Returns
    -------
    The :class:`~agl_scverse.model.AGLModel`. With ``copy=True`` or a SpatialData input: ``(model, adata)``,
    the AnnData that holds the results. Writes (``k = Keys(key_added)``):

    - ``.var[k.role]`` (target / auxiliary / excluded), ``.var[k.prior]``, ``.var[k.prior_rank]`` (0 = best),
      ``.var[k.weight]`` (1 for targets, mask weight for auxiliaries, 0 excluded), ``.var[k.selected]``;
    - ``.obs[k.split]``: ``"train"`` / ``"val"`` / ``"unused"``;
    - ``.uns[k.uns]``: ``params`` (every argument, versions, encoder and weights hash), ``method``, ``k``,
      ``threshold``, ``n_auxiliary``, ``n_targets``, ``targets``, ``embedding_key``, ``history`` (per epoch:
      ``epoch``, ``train_loss``, ``val_pcc``, ``k``, ``theta``, ``seconds``) and ``metrics`` (validation).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata, method="dkgsb", n_targets=50)  # doctest: +SKIP
    >>> adata.uns["agl"]["k"], adata.var["agl_selected"].sum()  # doctest: +SKIP
    """
    from .._expression import expression_transform
    from ..pp.genes import compute_gene_roles, write_gene_roles

    t_start = time.perf_counter()
    args = dict(locals())
    args.pop("data")
    args.pop("t_start")
    for name in ("compute_gene_roles", "expression_transform", "write_gene_roles"):
        args.pop(name, None)
    is_anndata = isinstance(data, AnnData)
    adata = as_anndata(data)
    keys = Keys(key_added)

    # ---------------------------------------------------------------- argument checks
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}.")
    if transform not in K.TRANSFORMS:
        raise ValueError(f"Unknown transform {transform!r}; choose one of {K.TRANSFORMS}.")
    if meta_normalizer not in ("detached", "soft"):
        raise ValueError(f"meta_normalizer must be 'detached' or 'soft', got {meta_normalizer!r}.")
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
    d = DEFAULTS[mode]
    hidden = tuple(d["hidden"] if hidden is None else hidden)
    epochs = d["epochs"] if epochs is None else epochs
    patience = d["patience"] if patience is None else patience
    lr = d["lr"] if lr is None else lr
    batch_size = d["batch_size"] if batch_size is None else batch_size
    for name, val, integer in (
        ("epochs", epochs, True), ("patience", patience, True), ("batch_size", batch_size, True),
        ("meta_batch_size", meta_batch_size, True), ("lr", lr, False), ("tau", tau, False),
        ("beta", beta, False), ("inner_lr", inner_lr, False),
    ):  # fmt: skip
        _check_positive(name, val, integer)
    _check_positive("inner_steps", inner_steps, True)
    _check_positive("meta_steps", meta_steps, True, allow_zero=True)
    _check_positive("weight_decay", weight_decay, False, allow_zero=True)
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if any((not isinstance(h, int | np.integer)) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}.")
    if method == "topk" and k is None:
        raise ValueError("method='topk' needs k, the number of auxiliary genes to use (e.g. k=500).")
    if method == "topk":
        _check_positive("k", k, True, allow_zero=True)
    if save_dir is not None and Path(save_dir).exists() and not overwrite:
        raise FileExistsError(f"save_dir {save_dir} already exists; pass overwrite=True or choose another path.")
    dev = resolve_device(device)

    # ---------------------------------------------------------------- data checks (nothing written yet)
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers ({list(adata.layers)}).")
    check_adata(adata, layer=layer)
    used = _resolve_spots(adata, spots)
    split = _make_split(adata, used, split_key, val_groups, val_fraction, seed)
    train_mask, val_mask = split == "train", split == "val"
    train_idx, val_idx = np.flatnonzero(train_mask), np.flatnonzero(val_mask)

    emb_key = None
    features = None
    if mode == "embedding":
        emb_key = embedding_key or f"{K.EMBED_PREFIX}{encoder}"
        if emb_key in adata.obsm:
            features = np.asarray(adata.obsm[emb_key], dtype=np.float32)
            _check_features(features, emb_key, np.flatnonzero(used))
        elif embedding_key is not None:
            raise KeyError(
                f"embedding_key={embedding_key!r} is not in adata.obsm ({list(adata.obsm)}). Compute it with "
                "agl.pp.embed_patches or leave embedding_key=None to embed with `encoder`."
            )
    elif embedding_key is not None:
        raise ValueError("embedding_key applies to mode='embedding' only; fine-tune mode reads image patches.")

    roles = compute_gene_roles(
        adata,
        n_targets=n_targets,
        targets=targets,
        auxiliaries=auxiliaries,
        prior=prior,
        min_cells=min_cells,
        train_mask=train_mask,
        layer=layer,
        library_key=library_key,
    )
    n_aux_all = len(roles.auxiliaries)
    if method == "topk" and int(k) > n_aux_all:
        raise ValueError(f"k={k} exceeds the {n_aux_all} auxiliary genes available; choose k <= {n_aux_all}.")
    if method in ("agl", "dkgsb") and n_aux_all == 0:
        raise ValueError(f"method={method!r} needs auxiliary genes but none is left; use method='pgl'.")
    aux_cols = genes_for_method(method, n_aux_all, k=k)
    model_aux = [roles.auxiliaries[i] for i in aux_cols]
    genes = list(roles.targets) + model_aux
    gene_pos = adata.var_names.get_indexer(genes)
    X = adata.layers[layer] if layer is not None else adata.X
    fit_rows = np.flatnonzero(used)
    Y_used = expression_transform(X[fit_rows], transform, columns=gene_pos)
    n_t = len(roles.targets)
    Y = np.zeros((adata.n_obs, len(genes)), dtype=np.float32)
    Y[fit_rows] = Y_used
    del Y_used
    t_tr = Y[train_idx, :n_t]
    flat = np.ptp(t_tr, axis=0) == 0
    if flat.any():
        bad = [g for g, f in zip(roles.targets, flat) if f]
        raise ValueError(f"Target gene(s) {bad[:10]} are constant (e.g. all zero) on the training spots; drop them.")

    # ---------------------------------------------------------------- embedding / patches (may compute)
    enc_info: dict[str, Any]
    if mode == "embedding":
        if features is None:
            from ..pp.embeddings import embed_patches

            logg.info(f"No .obsm[{emb_key!r}]: embedding patches with {encoder!r} first.")
            embed_patches(
                adata, encoder=encoder, weights=weights, patch_px=patch_px, patch_um=patch_um,
                device=str(dev), library_key=library_key, key_added=emb_key, seed=seed,
            )  # fmt: skip
            features = np.asarray(adata.obsm[emb_key], dtype=np.float32)
            _check_features(features, emb_key, fit_rows)
        enc_info = _embedding_record(adata, emb_key)
    else:
        from ..pp.embeddings import get_encoder
        from ..pp.patches import SpotPatches

        ds = SpotPatches(adata, patch_px=patch_px, patch_um=patch_um, library_key=library_key)
        seed_everything(seed)
        backbone, info = get_encoder(encoder, weights=weights, seed=seed)
        enc_info = {
            "name": str(info["name"]), "weights_sha256": str(info.get("weights_sha256", "")),
            "weights_path": str(info.get("weights_path", "")), "patch_px": int(patch_px),
            "patch_um": float(patch_um), "pretrained": False, "seed": int(seed), "recorded": True,
            "mean": list(info["mean"]), "std": list(info["std"]),
        }  # fmt: skip

    # ---------------------------------------------------------------- network and training
    seed_everything(seed)
    if mode == "embedding":
        net = EmbeddingHead(features.shape[1], len(genes), hidden=hidden, dropout=dropout)
        ft = torch.as_tensor(features[train_idx], dtype=torch.float64)
        net.set_input_scaling(ft.mean(0).float(), ft.std(0, unbiased=False).float())
        inputs = TensorInputs(features, device=dev)
    else:
        n_feat = info.get("feature_dim")
        if not n_feat:
            with torch.no_grad():
                n_feat = int(backbone(torch.zeros(1, 3, patch_px, patch_px)).reshape(1, -1).shape[1])
        net = FinetuneNet(backbone, n_feat, len(genes), mean=info["mean"], std=info["std"])
        inputs = _PatchInputs(ds, np.concatenate([train_idx, val_idx]), dev)
    ranks = roles.normalized_rank.astype(np.float64)
    mask = GeneMask(ranks, tau=tau) if method == "dkgsb" else None
    res = train_network(
        net, inputs, Y, train_idx, val_idx, n_t, mask=mask, epochs=int(epochs), patience=int(patience),
        lr=float(lr), weight_decay=float(weight_decay), batch_size=int(batch_size), loss=loss,
        inner_steps=int(inner_steps), inner_lr=float(inner_lr), meta_steps=int(meta_steps),
        meta_batch_size=int(meta_batch_size), beta=float(beta), normalizer=meta_normalizer, seed=int(seed), device=dev,
        progress=progress, desc=f"agl_fit ({method})",
    )  # fmt: skip
    net = net.cpu().eval()

    # ---------------------------------------------------------------- results
    if method == "dkgsb":
        aux_w = np.asarray(res.aux_weights, dtype=np.float64)
        k_sel, threshold = int(res.k), float(res.theta)
    else:
        aux_w = np.ones(len(model_aux))
        k_sel, threshold = len(model_aux), float("nan")
    out_weights = np.concatenate([np.ones(n_t), aux_w])
    val_pred = predict_rows(net, inputs, val_idx, n_t)
    from .._stats import per_gene_metrics

    val_df = per_gene_metrics(Y[val_idx, :n_t], val_pred, genes=roles.targets)
    versions = package_versions()
    hyper = {
        "hidden": list(hidden), "dropout": float(dropout), "epochs": int(epochs), "patience": int(patience),
        "lr": float(lr), "weight_decay": float(weight_decay), "batch_size": int(batch_size), "loss": loss,
        "inner_steps": int(inner_steps), "inner_lr": float(inner_lr), "meta_steps": int(meta_steps),
        "meta_batch_size": int(meta_batch_size), "tau": float(tau), "beta": float(beta), "meta_normalizer": meta_normalizer, "k": k, "seed": int(seed),
    }  # fmt: skip
    config = {
        "genes": genes,
        "roles": [K.ROLE_TARGET] * n_t + [K.ROLE_AUX] * len(model_aux),
        "weights": out_weights.tolist(),
        "method": method,
        "mode": mode,
        "prior": str(prior),
        "prior_ranks": ranks[aux_cols].tolist(),
        "prior_scores": roles.prior.reindex(model_aux).to_numpy(dtype=float).tolist(),
        "theta": threshold if method == "dkgsb" else None,
        "threshold": threshold if method == "dkgsb" else None,
        "k": k_sel,
        "n_auxiliary_candidates": n_aux_all,
        "transform": transform,
        "layer": layer,
        "embedding_key": emb_key,
        "encoder": {kk: v for kk, v in enc_info.items() if kk != "recorded"} | {"recorded": enc_info["recorded"]},
        "library_key": library_key,
        "hyperparameters": hyper,
        "versions": versions,
        "best_epoch": res.best_epoch,
        "val_pcc": res.best_val_pcc,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
    }
    model = AGLModel(net, config)

    # ---------------------------------------------------------------- write (last)
    if copy:
        adata = adata.copy()
    if save_dir is not None:
        model.save(save_dir, overwrite=overwrite)
    write_gene_roles(adata, roles, key_added=key_added)
    w_col = np.zeros(adata.n_vars)
    w_col[gene_pos] = out_weights
    adata.var[keys.weight] = w_col
    adata.var[keys.selected] = w_col > 0.5
    adata.obs[keys.split] = pd.Categorical(split, categories=["train", "val", "unused"])
    params = dict(args)
    params["encoder"] = enc_info["name"] or (
        encoder if isinstance(encoder, str) else getattr(encoder, "__name__", type(encoder).__name__)
    )
    params["weights_sha256"] = enc_info.get("weights_sha256", "")
    params["spots"] = int(used.sum()) if spots is not None else "None"
    params["hidden"] = list(hidden)
    params.update({"epochs": int(epochs), "patience": int(patience), "lr": float(lr), "batch_size": int(batch_size)})
    params["versions"] = versions
    params["device"] = str(dev)
    params["save_dir"] = str(save_dir) if save_dir is not None else "None"
    hist = {kk: np.asarray(v) for kk, v in res.history.items()}
    metrics = {
        "val_pcc": float(np.nanmean(val_df["pearson"])),
        "val_spearman": float(np.nanmean(val_df["spearman"])),
        "val_mse": float(np.nanmean(val_df["mse"])),
        "val_pcc_per_target": val_df["pearson"].to_numpy(dtype=float),
        "best_epoch": int(res.best_epoch),
        "n_epochs": len(res.history["epoch"]),
        "fit_seconds": float(time.perf_counter() - t_start),
        "train_seconds": float(res.fit_seconds),
        "meta_seconds": float(res.meta_seconds),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
    }
    adata.uns[keys.uns] = _h5ad_safe(
        {
            "params": params,
            "method": method,
            "mode": mode,
            "k": k_sel,
            "threshold": threshold,
            "n_auxiliary": len(model_aux) if method != "dkgsb" else n_aux_all,
            "n_targets": n_t,
            "targets": list(roles.targets),
            "embedding_key": emb_key if emb_key else "None",
            "history": hist,
            "metrics": metrics,
        }
    )
    logg.info(
        f"agl_fit ({method}): {n_t} targets, k = {k_sel} of {n_aux_all} auxiliaries, validation PCC "
        f"{metrics['val_pcc']:.4f} (best epoch {res.best_epoch}); wrote .var[{keys.role!r}, {keys.weight!r}, "
        f"{keys.selected!r}], .obs[{keys.split!r}], .uns[{keys.uns!r}]"
    )
    if copy or not is_anndata:
        return model, adata
    return model


def predict_rows(net, inputs, idx: np.ndarray, n_first: int | None = None, batch_size: int = 512) -> np.ndarray:
    """Calibrated predictions (transformed scale) of ``net`` for rows ``idx`` of ``inputs``, float32."""
    net.eval()
    dev = next(net.parameters()).device
    outs = []
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            x = inputs(idx[s : s + batch_size]).to(dev)
            out = net.predict_expression(x)
            outs.append(out[:, :n_first].float().cpu().numpy() if n_first else out.float().cpu().numpy())
    return np.concatenate(outs, 0) if outs else np.zeros((0, n_first or net.n_out), dtype=np.float32)
