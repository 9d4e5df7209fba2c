"""``agl_fit``: train an AGL model (PGL, AGL-all, top-k or DkGSB) on one or several slides.

Stages (so that a bad input never leaves a half-modified AnnData): configuration (:mod:`._config`, every argument
checked), :func:`_prepare_data` (counts, spots, split, embedding), :func:`_prepare_genes` (gene roles on the
training spots, the expression matrix), :func:`_build_network` (features or patches, encoder, network),
:func:`agl_scverse.model.train_network`, :func:`_make_model`, and last :func:`_write_results`, one block that
either completes or restores what it touched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as K
from agl_scverse._constants import Keys
from agl_scverse._docs import d
from agl_scverse._expression import ExpressionBatches
from agl_scverse._serialize import to_h5ad
from agl_scverse._stats import StreamingMoments, per_gene_metrics
from agl_scverse._transaction import restore_on_error
from agl_scverse._utils import resolve_device, seed_everything, versions
from agl_scverse._validate import check_adata, check_feature_variance, check_layer, resolve_spots
from agl_scverse.io._spatialdata import as_anndata, update_table
from agl_scverse.model import AGLModel, EmbeddingHead, FinetuneNet, GeneMask, encoder_record, get_encoder, train_network
from agl_scverse.model._inference import forward, index_batches
from agl_scverse.model._modeldir import check_overwritable
from agl_scverse.model._trainer import TensorInputs, TrainResult, genes_for_method
from agl_scverse.pp._embed import embed_patches
from agl_scverse.pp._genes import GeneRoles, compute_gene_roles, write_gene_roles
from agl_scverse.pp._patches import SpotPatches, check_patch_batch

from ._config import FitConfig, GeneConfig
from ._split import make_split

__all__ = ["agl_fit", "predict_rows"]


@dataclass
class _Data:
    """What :func:`_prepare_data` found: spots, split, the embedding (when present)."""

    used: np.ndarray
    split: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    emb_key: str | None
    features: np.ndarray | None
    new_embedding: tuple[np.ndarray, dict] | None = None  # computed here, written with the results


@dataclass
class _Genes:
    """What :func:`_prepare_genes` found: roles, the genes the network outputs, their expression."""

    roles: GeneRoles
    aux_cols: np.ndarray
    genes: list[str]
    gene_pos: np.ndarray
    expr: ExpressionBatches  # the genes' expression (targets first), sliced per batch from the counts

    @property
    def n_targets(self) -> int:
        return len(self.roles.targets)

    @property
    def model_aux(self) -> list[str]:
        return self.genes[self.n_targets :]


class PatchInputs:
    """Fine-tune mode inputs: uint8 patches of the requested spots, cached in memory when small."""

    def __init__(self, ds: SpotPatches, positions: np.ndarray, device, cache_bytes: float = 2e9):
        self.ds, self.device = ds, device
        self.cache = None
        if len(positions) * 3 * ds.patch_px**2 <= cache_bytes:
            self.cache = {int(p): ds[int(p)] for p in positions}

    def __call__(self, idx) -> torch.Tensor:
        get = (lambda i: self.cache[int(i)]) if self.cache is not None else (lambda i: self.ds[int(i)])
        return torch.stack([get(i) for i in np.asarray(idx)]).to(self.device)


def predict_rows(net, inputs, idx: np.ndarray, n_first: int | None = None, batch_size: int = 512) -> np.ndarray:
    """Calibrated predictions (transformed scale) of ``net`` for rows ``idx`` of ``inputs``, float32."""
    return forward(net, index_batches(inputs, idx, batch_size), net.n_out, calibrated=True, n_first=n_first)


# ----------------------------------------------------------------------------------------------- stages
def _check_features(X: np.ndarray, key: str, rows: np.ndarray) -> None:
    if X.ndim != 2:
        raise ValueError(f".obsm[{key!r}] has shape {X.shape}; expected (n_spots, n_features).")
    n_bad = sum(int((~np.isfinite(X[rows[s : s + 65536]]).all(axis=1)).sum()) for s in range(0, len(rows), 65536))
    if n_bad:  # checked in row blocks: no copy of the whole used embedding
        raise ValueError(
            f".obsm[{key!r}] holds NaN/inf for {n_bad} of the used spots; recompute the embedding or "
            "leave those spots out with spots=..."
        )


def _prepare_data(adata: AnnData, cfg: FitConfig, spots, split_key, val_groups, val_fraction, embedding_key, encoder):
    check_layer(adata, cfg.genes.layer)
    check_adata(adata, layer=cfg.genes.layer, transform=cfg.genes.transform)
    used = resolve_spots(adata, spots, as_mask=True)
    split = make_split(adata, used, split_key, val_groups, val_fraction, cfg.seed)
    emb_key, features = None, None
    if cfg.mode == "embedding":
        emb_key = embedding_key or K.embedding_key(encoder if isinstance(encoder, str) else "encoder")
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
    train_idx, val_idx = np.flatnonzero(split == K.SPLIT_TRAIN), np.flatnonzero(split == K.SPLIT_VAL)
    return _Data(used, split, train_idx, val_idx, emb_key, features)


def _prepare_genes(adata: AnnData, cfg: FitConfig, data: _Data, library_key: str | None) -> _Genes:
    g = cfg.genes
    roles = compute_gene_roles(
        adata, n_targets=g.n_targets, targets=g.targets, auxiliaries=g.auxiliaries, prior=g.prior,
        min_cells=g.min_cells, train_mask=data.split == K.SPLIT_TRAIN, layer=g.layer, library_key=library_key,
    )  # fmt: skip
    n_aux_all = len(roles.auxiliaries)
    if cfg.method == "topk" and int(cfg.k) > n_aux_all:
        raise ValueError(f"k={cfg.k} exceeds the {n_aux_all} auxiliary genes available; choose k <= {n_aux_all}.")
    if cfg.method in ("agl", "dkgsb") and n_aux_all == 0:
        raise ValueError(f"method={cfg.method!r} needs auxiliary genes but none is left; use method='pgl'.")
    aux_cols = genes_for_method(cfg.method, n_aux_all, k=cfg.k)
    genes = list(roles.targets) + [roles.auxiliaries[i] for i in aux_cols]
    gene_pos = adata.var_names.get_indexer(genes)
    X = adata.layers[g.layer] if g.layer is not None else adata.X
    expr = ExpressionBatches(X, gene_pos, g.transform)
    n_t = len(roles.targets)
    moments = StreamingMoments(n_t)
    for _, values in expr.chunks(data.train_idx, n_first=n_t):
        moments.update(values)
    flat = moments.max == moments.min
    if flat.any():
        bad = [t for t, f in zip(roles.targets, flat) if f]
        raise ValueError(f"Target gene(s) {bad[:10]} are constant (e.g. all zero) on the training spots; drop them.")
    return _Genes(roles, aux_cols, genes, gene_pos, expr)


def _build_network(adata, cfg: FitConfig, data: _Data, n_out: int, enc: dict, dev) -> tuple[torch.nn.Module, Any, dict]:
    """Network, input source and encoder record; embeds the slide (into a copy) when the features are missing."""
    if cfg.mode == "embedding":
        if data.features is None:
            logg.info(f"No .obsm[{data.emb_key!r}]: embedding patches with {enc['encoder']!r} first.")
            emb = embed_patches(
                adata, encoder=enc["encoder"], weights=enc["weights"], patch_px=enc["patch_px"],
                patch_um=enc["patch_um"], device=str(dev), library_key=enc["library_key"], key_added=data.emb_key,
                seed=cfg.seed, copy=True, allow_lowres=enc["allow_lowres"],
            )  # fmt: skip
            data.features = np.asarray(emb.obsm[data.emb_key], dtype=np.float32)
            _check_features(data.features, data.emb_key, np.flatnonzero(data.used))
            data.new_embedding = (data.features, emb.uns[K.EMBED_UNS][data.emb_key])
        rec = data.new_embedding[1] if data.new_embedding else (adata.uns.get(K.EMBED_UNS) or {}).get(data.emb_key)
        record = {**dict(rec or {}), "recorded": bool(rec)}
        seed_everything(cfg.seed)
        net = EmbeddingHead(data.features.shape[1], n_out, hidden=cfg.network.hidden, dropout=cfg.network.dropout)
        moments = StreamingMoments(data.features.shape[1])
        for s in range(0, len(data.train_idx), 8192):
            moments.update(data.features[data.train_idx[s : s + 8192]])
        check_feature_variance(moments.std, moments.mean, data.emb_key, len(data.train_idx))
        net.set_input_scaling(torch.as_tensor(moments.mean).float(), torch.as_tensor(moments.std).float())
        return net, TensorInputs(data.features, device=dev), record
    ds = SpotPatches(
        adata, patch_px=enc["patch_px"], patch_um=enc["patch_um"], library_key=enc["library_key"],
        allow_lowres=enc["allow_lowres"],
    )  # fmt: skip
    check_patch_batch(ds.patch_px, max(cfg.training.batch_size, cfg.dkgsb.meta_batch_size))
    backbone, info = get_encoder(enc["encoder"], weights=enc["weights"], seed=cfg.seed)
    n_feat = info.get("feature_dim")
    if not n_feat:
        with torch.no_grad():
            n_feat = int(backbone(torch.zeros(1, 3, ds.patch_px, ds.patch_px)).reshape(1, -1).shape[1])
    patch_rec = {k: v for k, v in ds.record().items() if k not in ("patch_px", "patch_um")}
    record = {
        **encoder_record({**info, "feature_dim": n_feat}, ds.patch_px, ds.patch_um, **patch_rec),
        "recorded": True,
    }
    seed_everything(cfg.seed)
    net = FinetuneNet(backbone, n_feat, n_out, mean=info["mean"], std=info["std"])
    return net, PatchInputs(ds, np.concatenate([data.train_idx, data.val_idx]), dev), record


def _make_model(cfg: FitConfig, genes: _Genes, res: TrainResult, net, enc_record: dict, data: _Data, extra: dict):
    n_t, n_aux_all = genes.n_targets, len(genes.roles.auxiliaries)
    if cfg.method == "dkgsb":
        aux_w = np.asarray(res.aux_weights, dtype=np.float64)
        k_sel, threshold = int(res.k), float(res.theta)
    else:
        aux_w = np.ones(len(genes.model_aux))
        k_sel, threshold = len(genes.model_aux), float("nan")
    ranks = genes.roles.normalized_rank.astype(np.float64)
    config = {
        "genes": genes.genes,
        "roles": [K.ROLE_TARGET] * n_t + [K.ROLE_AUX] * len(genes.model_aux),
        "weights": np.concatenate([np.ones(n_t), aux_w]).tolist(),
        "method": cfg.method,
        "mode": cfg.mode,
        "prior": str(cfg.genes.prior),
        "prior_ranks": ranks[genes.aux_cols].tolist(),
        "prior_scores": genes.roles.prior.reindex(genes.model_aux).to_numpy(dtype=float).tolist(),
        "theta": threshold if cfg.method == "dkgsb" else None,
        "threshold": threshold if cfg.method == "dkgsb" else None,
        "k": k_sel,
        "n_auxiliary_candidates": n_aux_all,
        "transform": cfg.genes.transform,
        "layer": cfg.genes.layer,
        "embedding_key": data.emb_key,
        "encoder": enc_record,
        "library_key": extra["library_key"],
        "hyperparameters": cfg.to_params(genes=False),
        "versions": versions(),
        "best_epoch": res.best_epoch,
        "val_pcc": res.best_val_pcc,
        "n_train": len(data.train_idx),
        "n_val": len(data.val_idx),
    }
    return AGLModel(net, config)


def _write_results(adata, model: AGLModel, cfg: FitConfig, genes: _Genes, data: _Data, res, keys: Keys, extra: dict):
    """Every write of ``agl_fit``, in one block that restores what it touched when it fails."""
    n_t = genes.n_targets
    val_pred = predict_rows(model.net, extra["inputs"], data.val_idx, n_t)
    val_df = per_gene_metrics(genes.expr.batch(data.val_idx, n_t), val_pred, genes=genes.roles.targets)
    w_col = np.zeros(adata.n_vars)
    w_col[genes.gene_pos] = model.weights
    params = {**cfg.to_params(), **extra["params"], "encoder": model.config["encoder"].get("encoder")}
    params["weights_sha256"] = model.config["encoder"].get("weights_sha256")
    metrics = {
        "val_pcc": float(np.nanmean(val_df["pearson"])),
        "val_spearman": float(np.nanmean(val_df["spearman"])),
        "val_mse": float(np.nanmean(val_df["mse"])),
        "val_pcc_per_target": val_df["pearson"].to_numpy(dtype=float),
        "best_epoch": int(res.best_epoch),
        "n_epochs": len(res.history["epoch"]),
        "fit_seconds": float(time.perf_counter() - extra["t_start"]),
        "train_seconds": float(res.fit_seconds),
        "meta_seconds": float(res.meta_seconds),
        "n_train": len(data.train_idx),
        "n_val": len(data.val_idx),
    }
    entry = {
        "params": params, "method": cfg.method, "mode": cfg.mode, "k": model.k,
        "threshold": model.threshold if model.threshold is not None else float("nan"),
        "n_auxiliary": len(genes.roles.auxiliaries) if cfg.method == "dkgsb" else len(genes.model_aux),
        "n_targets": n_t, "targets": list(genes.roles.targets), "embedding_key": data.emb_key,
        "history": {kk: np.asarray(v) for kk, v in res.history.items()}, "metrics": metrics,
    }  # fmt: skip
    written = {
        "var": [keys.role, keys.prior, keys.prior_rank, keys.weight, keys.selected],
        "obs": [keys.split],
        "uns": [keys.uns, keys.gene_roles] + ([K.EMBED_UNS] if data.new_embedding else []),
        "obsm": [data.emb_key] if data.new_embedding else [],
    }
    with restore_on_error(adata, **written):
        write_gene_roles(adata, genes.roles, key_added=keys.prefix)
        adata.var[keys.weight] = w_col
        adata.var[keys.selected] = w_col > 0.5
        adata.obs[keys.split] = pd.Categorical(data.split, categories=list(K.SPLITS))
        if data.new_embedding:
            adata.obsm[data.emb_key] = data.new_embedding[0]
            adata.uns[K.EMBED_UNS] = {**dict(adata.uns.get(K.EMBED_UNS) or {}), data.emb_key: data.new_embedding[1]}
        adata.uns[keys.uns] = to_h5ad(entry)
    return metrics, written


# ----------------------------------------------------------------------------------------------- agl_fit
@d.dedent
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
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    library_key: str | None = None,
    allow_lowres: bool = False,
) -> AGLModel:
    """Train an AGL model that predicts gene expression from H&E patches (or their embeddings).

    Parameters
    ----------
    %(data)s
    method
        ``"dkgsb"`` (learned soft top-k of auxiliaries, default), ``"agl"`` (all auxiliaries, weight 1),
        ``"topk"`` (the first ``k`` auxiliaries by prior) or ``"pgl"`` (targets only).
    embedding_key
        ``.obsm`` key of cached features (embedding mode). Default ``"X_agl_<encoder>"``, computed with
        :func:`agl_scverse.pp.embed_patches` when absent. A named key that is absent is an error.
    encoder
        Image encoder name (see :func:`agl_scverse.model.get_encoder`), for a missing embedding or fine-tune mode.
    weights
        Local weights file of the encoder.
    n_targets
        Number of highly variable target genes (when ``targets`` is None).
    targets
        Explicit target genes.
    auxiliaries
        Explicit auxiliary genes (default: every other gene passing ``min_cells``).
    prior
        Ranking of the auxiliaries: ``"hvg"``, ``"coexpression"``, ``"moran"`` or a numeric ``.var`` column. Gene
        roles are computed on the **training spots only** (:func:`agl_scverse.pp.compute_gene_roles`).
    min_cells
        A candidate gene has counts in at least this many training spots (or this fraction of them).
    transform
        Expression scale of the model (``"log1p"``, ``"log1p_cpm"``, ``"none"``), see
        :func:`agl_scverse.pp.expression_transform`.
    %(layer)s
    split_key
        With ``val_groups``: validation spots are those whose ``.obs[split_key]`` is in ``val_groups``.
    val_groups
        The ``.obs[split_key]`` values (e.g. a slide) that validate.
    val_fraction
        Without ``split_key``: the fraction of used spots drawn (seeded) for validation.
    %(spots)s
        The others are ``"unused"`` (e.g. held-out test spots).
    mode
        ``"embedding"`` (an MLP head on cached features; CPU friendly) or ``"finetune"`` (the encoder and a linear
        head trained end to end on patches, as in the paper).
    patch_px
        Patch side in pixels (fine-tune mode, and a missing embedding).
    patch_um
        Patch side in µm.
    hidden
        Hidden widths of the embedding-mode MLP trunk (default ``(256,)``; fine-tune mode: none).
    dropout
        Dropout after each hidden layer.
    epochs
        Maximum number of epochs (default per mode: 100 in embedding mode, 50 in fine-tune mode).
    patience
        Early stopping: epochs without a better validation mean target Pearson r.
    lr
        Adam learning rate of the network.
    weight_decay
        Adam weight decay.
    batch_size
        Spots per training batch.
    loss
        ``"pearson"`` (``1 - r`` per gene, paper) or ``"mse"``.
    inner_steps
        DkGSB: differentiable SGD steps in the bi-level look-ahead.
    inner_lr
        DkGSB: their learning rate.
    meta_steps
        DkGSB: updates of the threshold per epoch.
    meta_batch_size
        DkGSB: spots per meta batch.
    tau
        DkGSB: mask temperature.
    beta
        DkGSB: Adam learning rate on the threshold.
    meta_normalizer
        ``"detached"`` (default): the inner step divides by ``sum(w)`` held constant; ``"soft"``: differentiated
        through ``sum(w)`` too (see the Method page).
    k
        Number of auxiliaries for ``method="topk"``.
    seed
        Seeds the split, initialisation, batches and meta batches (results are identical on CPU for a seed).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``...
    %(key_added)s
    save_dir
        Save the model there (atomically).
    overwrite
        Replace an existing ``save_dir`` that holds a saved model (only ``config.json`` and
        ``model.safetensors``) or nothing; any other folder or file is refused before training.
    %(progress)s
    %(library_key)s
    allow_lowres
        Cut patches (fine-tune mode, or embedding a slide without its embedding) from a ``"hires"`` image coarser
        than the patches when a library has no full-resolution image; refused by default (see
        :class:`~agl_scverse.pp.SpotPatches`). The source resolution is recorded in the model
        (``config["encoder"]["source_um_per_px"]``) and checked by :func:`agl_predict`.

    Returns
    -------
    The :class:`~agl_scverse.model.AGLModel`. Results are written in place (for a SpatialData, into its table),
    with ``k = Keys(key_added)``:

    - ``.var[k.role]`` (target / auxiliary / excluded), ``.var[k.prior]``, ``.var[k.prior_rank]`` (0 = best),
      ``.var[k.weight]`` (1 for targets, mask weight for auxiliaries, 0 excluded), ``.var[k.selected]``;
    - ``.obs[k.split]``: ``"train"`` / ``"val"`` / ``"unused"``;
    - ``.uns[k.uns]``: ``params``, ``method``, ``k``, ``threshold``, ``n_auxiliary``, ``n_targets``,
      ``targets``, ``embedding_key``, ``history`` (per epoch) and ``metrics`` (validation);
      ``.uns[k.gene_roles]``: how the roles were chosen.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata, method="dkgsb", n_targets=50)  # doctest: +SKIP
    >>> adata.uns["agl"]["k"], adata.var["agl_selected"].sum()  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    genes_cfg = GeneConfig(
        n_targets=n_targets, targets=None if targets is None else tuple(targets),
        auxiliaries=None if auxiliaries is None else tuple(auxiliaries), prior=prior, min_cells=min_cells,
        transform=transform, layer=layer,
    )  # fmt: skip
    cfg = FitConfig.build(
        method, mode, hidden=hidden, dropout=dropout, epochs=epochs, patience=patience, lr=lr, batch_size=batch_size,
        weight_decay=weight_decay, loss=loss, genes=genes_cfg, k=k, seed=seed, inner_steps=inner_steps,
        inner_lr=inner_lr, meta_steps=meta_steps, meta_batch_size=meta_batch_size, tau=tau, beta=beta,
        meta_normalizer=meta_normalizer,
    )  # fmt: skip
    keys = Keys(key_added)
    if save_dir is not None and Path(save_dir).exists() and not overwrite:
        raise FileExistsError(f"save_dir {save_dir} already exists; pass overwrite=True or choose another path.")
    if save_dir is not None:
        check_overwritable(Path(save_dir))  # before training: overwrite=True replaces only a saved model
    dev = resolve_device(device)
    adata = as_anndata(data)

    fit_data = _prepare_data(adata, cfg, spots, split_key, val_groups, val_fraction, embedding_key, encoder)
    genes = _prepare_genes(adata, cfg, fit_data, library_key)
    enc = {
        "encoder": encoder,
        "weights": weights,
        "patch_px": patch_px,
        "patch_um": patch_um,
        "library_key": library_key,
        "allow_lowres": bool(allow_lowres),
    }
    net, inputs, enc_record = _build_network(adata, cfg, fit_data, len(genes.genes), enc, dev)
    mask = GeneMask(genes.roles.normalized_rank.astype(np.float64), tau=cfg.dkgsb.tau) if method == "dkgsb" else None
    t, m = cfg.training, cfg.dkgsb
    res = train_network(
        net, inputs, genes.expr, fit_data.train_idx, fit_data.val_idx, genes.n_targets, mask=mask, epochs=t.epochs,
        patience=t.patience, lr=float(t.lr), weight_decay=float(t.weight_decay), batch_size=t.batch_size, loss=t.loss,
        inner_steps=m.inner_steps, inner_lr=float(m.inner_lr), meta_steps=m.meta_steps,
        meta_batch_size=m.meta_batch_size, beta=float(m.beta), normalizer=m.meta_normalizer, seed=int(seed),
        device=dev, progress=progress, desc=f"agl_fit ({method})",
    )  # fmt: skip
    net.cpu().eval()
    extra = {
        "t_start": t_start, "library_key": library_key, "inputs": inputs,
        "params": {
            "embedding_key": fit_data.emb_key, "spots": int(fit_data.used.sum()) if spots is not None else None,
            "split_key": split_key, "val_groups": val_groups, "val_fraction": val_fraction, "device": str(dev),
            "key_added": key_added, "save_dir": save_dir, "library_key": library_key, "patch_px": patch_px,
            "patch_um": patch_um, "allow_lowres": bool(allow_lowres), "versions": versions(),
        },
    }  # fmt: skip
    model = _make_model(cfg, genes, res, net, enc_record, fit_data, extra)
    if save_dir is not None:
        model.save(save_dir, overwrite=overwrite)
    metrics, written = _write_results(adata, model, cfg, genes, fit_data, res, keys, extra)
    if adata is not data:  # a SpatialData: results go into its table
        update_table(data, adata, **written)
    logg.info(
        f"agl_fit ({method}): {genes.n_targets} targets, k = {model.k} of {len(genes.roles.auxiliaries)} auxiliaries, "
        f"validation PCC {metrics['val_pcc']:.4f} (best epoch {res.best_epoch}); wrote .var[{keys.role!r}, "
        f"{keys.weight!r}, {keys.selected!r}], .obs[{keys.split!r}], .uns[{keys.uns!r}]"
    )
    return model
