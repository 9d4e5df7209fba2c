"""``agl_fit``: train an AGL model (PGL, AGL-all, top-k or DkGSB) in stages; one write block at the end."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse import _distributed as dist
from agl_scverse._constants import Keys
from agl_scverse._docs import d
from agl_scverse._legacy_keywords import merge_legacy
from agl_scverse._modeldir import check_overwritable
from agl_scverse._serialize import to_h5ad
from agl_scverse._spatial import resolve_library_key
from agl_scverse._stats import per_gene_metrics
from agl_scverse._transaction import check_owned, restore_on_error
from agl_scverse._utils import resolve_device, show_progress, versions
from agl_scverse.configs import DkGSBConfig, EncoderConfig, GeneConfig, NetworkConfig, TrainingConfig
from agl_scverse.io._spatialdata import as_anndata, update_table
from agl_scverse.model import AGLModel, EmbeddingEnsemble, GeneMask, train_network
from agl_scverse.pp._embed import put_embedding
from agl_scverse.pp._genes import write_gene_roles
from agl_scverse.train._inference import forward, index_batches
from agl_scverse.train._trainer import TrainResult, empty_history

from ._config import FitConfig
from ._fit_inputs import FitData, FitGenes, build_network, checkpointer, prepare_data, prepare_genes, with_k
from ._linear_head import choose_rrr, hybrid_linear, linear_head, rrr_head, search_record

__all__ = ["agl_fit", "k_search_grid"]


def _train(
    net, inputs, genes: FitGenes, data: FitData, cfg: FitConfig, dev, progress: bool, desc: str, epochs=None, **kw
) -> TrainResult:
    """:func:`agl_scverse.model.train_network` with the run's configs (``epochs`` overrides the training's)."""
    training = cfg.training if epochs is None else replace(cfg.training, epochs=int(epochs))
    return train_network(
        net, inputs, genes.expr, data.train_idx, data.val_idx, genes.n_targets, training=training, dkgsb=cfg.dkgsb,
        seed=kw.pop("seed", cfg.seed), device=dev, progress=progress, desc=desc, precision=cfg.precision, **kw,
    )  # fmt: skip


def k_search_grid(n_aux: int, grid: Sequence[int] | None = None) -> list[int]:
    """The numbers of auxiliaries that ``k="auto"`` tries: 0 and five geometric steps from 1/64 to 1/4 of them.

    The grid stops at a quarter of the auxiliaries (AGL-all is ``method="agl"``): each fit costs in proportion to its
    number of outputs, and the validation score was flat above that on the data sets tried (the Method page).

    Examples
    --------
    >>> k_search_grid(16000)
    [0, 250, 500, 1000, 2000, 4000]
    >>> k_search_grid(10, grid=(0, 5, 50))
    [0, 5, 10]
    """
    if grid is None:
        grid = [0] + (
            []
            if n_aux == 0
            else np.geomspace(max(1.0, n_aux / 64), max(1.0, n_aux / 4), 5).round().astype(int).tolist()
        )
    return sorted({min(int(v), int(n_aux)) for v in grid})


def _search_k(adata, cfg: FitConfig, data: FitData, genes: FitGenes, enc: dict, dev, progress: bool):
    """Top-k fits over :func:`k_search_grid`, scored on the validation spots; the best one and the scores."""
    grid = k_search_grid(len(genes.roles.auxiliaries), cfg.k_grid)
    scores, best = [], None
    for kk in grid:
        g_k = with_k(genes, kk)
        net, inputs, record = build_network(adata, cfg, data, len(g_k.genes), enc, dev)
        res = _train(net, inputs, g_k, data, cfg, dev, progress, f"agl_fit (topk, k={kk})")
        scores.append(float(res.best_val_pcc))
        if best is None or res.best_val_pcc > best[3].best_val_pcc + 1e-6:
            best = (g_k, net, inputs, res, record)
    logg.info("k search (validation PCC): " + ", ".join(f"k={kk}: {v:.4f}" for kk, v in zip(grid, scores)))
    return best, {"k_grid": np.asarray(grid), "val_pcc": np.asarray(scores)}


def _refit(
    adata, cfg: FitConfig, data: FitData, genes: FitGenes, res: TrainResult, enc: dict, dev, progress: bool, seed=None
):
    """Retrain from the initialisation on train + validation spots for the selected number of epochs."""
    seed = cfg.seed if seed is None else int(seed)
    both = np.sort(np.concatenate([data.train_idx, data.val_idx]))
    data2 = FitData(data.used, data.split, both, np.zeros(0, dtype=np.int64), data.emb_key, data.features)
    net, inputs, _ = build_network(adata, cfg, data2, len(genes.genes), enc, dev, seed=seed)
    res2 = _train(
        net, inputs, genes, data2, cfg, dev, progress, f"agl_fit ({cfg.method}, refit, seed {seed})",
        epochs=res.best_epoch + 1, aux_weights=_learned_weights(cfg, res), seed=seed,
    )  # fmt: skip
    return net, inputs, res2


def _learned_weights(cfg: FitConfig, res: TrainResult) -> np.ndarray | None:
    """DkGSB's learned auxiliary weights (held fixed in a refit or an ensemble member); None for other methods."""
    return np.asarray(res.aux_weights, dtype=np.float64) if cfg.method == "dkgsb" else None


def _ensemble(adata, cfg: FitConfig, data: FitData, genes: FitGenes, net, res: TrainResult, enc: dict, dev, progress):
    """``n_seeds - 1`` more networks, seeds ``seed + 1, ...``, averaged with ``net`` (:class:`EmbeddingEnsemble`)."""
    members: list[Any] = [net]
    for i in range(1, cfg.n_seeds):
        seed = cfg.seed + i
        if cfg.training.refit:
            m, _, _ = _refit(adata, cfg, data, genes, res, enc, dev, progress, seed=seed)
        else:
            m, inputs, _ = build_network(adata, cfg, data, len(genes.genes), enc, dev, seed=seed)
            _train(
                m, inputs, genes, data, cfg, dev, progress, f"agl_fit ({cfg.method}, seed {seed})",
                aux_weights=_learned_weights(cfg, res), seed=seed,
            )  # fmt: skip
        members.append(m.cpu().eval())
    return EmbeddingEnsemble(members)


def _fit_linear(cfg: FitConfig, data: FitData, genes: FitGenes) -> tuple[FitGenes, torch.nn.Module, TrainResult, dict]:
    """``head="rrr"``: number of auxiliaries (``k="auto"``) and rank chosen on validation, the fit on training spots."""
    n_t = genes.n_targets
    auto = cfg.method == "topk" and cfg.k == consts.K_AUTO
    ks = k_search_grid(len(genes.roles.auxiliaries), cfg.k_grid) if auto else [len(genes.model_aux)]
    widest = with_k(genes, max(ks))
    feats = data.features
    assert feats is not None  # embedding mode
    k, rank, scores, fit = choose_rrr(feats, widest.expr, data.train_idx, data.val_idx, n_t, ks)
    genes = with_k(genes, k)
    if fit is None:  # no validation spots
        net, info = rrr_head(feats, genes.expr, data.train_idx, n_t, rank)
    else:
        net, info = linear_head(fit.first(n_t + k), rank, n_t + k)
    hist = empty_history()
    res = TrainResult(history=hist, best_epoch=0, best_val_pcc=scores.get((k, rank), float("nan")))
    return genes, net, res, {**info, "k": int(k), "search": search_record(scores)}


def _add_linear(cfg: FitConfig, data: FitData, genes: FitGenes, net, mlp_val) -> tuple[EmbeddingEnsemble, dict]:
    """``head="hybrid"``: the trained network(s) and the linear head of the targets (:func:`hybrid_linear`)."""
    ks = [0] if cfg.method == "pgl" else k_search_grid(len(genes.model_aux))
    widest, feats = with_k(genes, max(ks)), data.features
    assert feats is not None  # embedding mode
    lin, info = hybrid_linear(
        feats, widest.expr, data.train_idx, data.val_idx, genes.n_targets, ks, bool(cfg.training.refit), mlp_val
    )
    members: list[Any] = list(net.members) if isinstance(net, EmbeddingEnsemble) else [net]
    return EmbeddingEnsemble(members, lin, info["weight"]), info


def _make_model(cfg: FitConfig, genes: FitGenes, res: TrainResult, net, enc_record: dict, data: FitData, extra: dict):
    n_t, n_aux_all = genes.n_targets, len(genes.roles.auxiliaries)
    if cfg.method == "dkgsb":
        aux_w = np.asarray(res.aux_weights, dtype=np.float64)
        assert res.k is not None and res.theta is not None  # set by DkGSB
        k_sel, threshold = int(res.k), float(res.theta)
    else:
        aux_w = np.ones(len(genes.model_aux))
        k_sel, threshold = len(genes.model_aux), float("nan")
    ranks = genes.roles.normalized_rank.astype(np.float64)
    config = {
        "head": cfg.network.head,
        "genes": genes.genes,
        "roles": [consts.ROLE_TARGET] * n_t + [consts.ROLE_AUX] * len(genes.model_aux),
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
        "refit": bool(cfg.training.refit),
        "n_train": len(data.train_idx),
        "n_val": len(data.val_idx),
        "augment": bool(cfg.training.augment),
        "precision": res.precision if cfg.mode == "finetune" else None,  # embedding mode: see config["encoder"]
        # per epoch, so a slide predicted with the saved model plots the training history (pl.training_history)
        "history": {kk: [float(x) for x in np.asarray(v, dtype=float)] for kk, v in res.history.items()},
    }
    return AGLModel(net, config)


def _write_results(
    adata, model: AGLModel, cfg: FitConfig, genes: FitGenes, data: FitData, res, keys: Keys, extra: dict
):
    """Every write of ``agl_fit``, in one block that restores what it touched when it fails."""
    n_t = genes.n_targets
    val_df = extra["val_metrics"]
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
        "refit": bool(cfg.training.refit),
    }
    if extra.get("k_search") is not None:
        metrics["k_search"] = extra["k_search"]
    if extra.get("linear") is not None:  # head="rrr" or "hybrid": the linear head's rank / k choice on validation
        lin = extra["linear"]
        metrics.update(
            {"rrr_rank": lin["rank"], "rrr_alpha": lin["alpha"], "rrr_k": lin["k"], "rrr_search": lin["search"]}
        )
        if "weight" in lin:  # head="hybrid": the linear head's share, chosen on validation
            metrics.update({"hybrid_weight": float(lin["weight"]), "hybrid_weight_search": lin["weight_search"]})
    if extra.get("refit_history") is not None:
        metrics["refit_train_loss"] = np.asarray(extra["refit_history"]["train_loss"], dtype=float)
    entry = {
        "params": params, "method": cfg.method, "mode": cfg.mode, "k": model.k,
        "threshold": model.threshold if model.threshold is not None else float("nan"),
        "n_auxiliary": len(genes.roles.auxiliaries) if cfg.method == "dkgsb" else len(genes.model_aux),
        "n_targets": n_t, "targets": list(genes.roles.targets), "embedding_key": data.emb_key,
        "history": {kk: np.asarray(v) for kk, v in res.history.items()}, "metrics": metrics,
    }  # fmt: skip
    written = _written(keys)
    written["uns"] += [consts.EMBED_UNS] if data.new_embedding else []
    written["obsm"] = [data.emb_key] if data.new_embedding and data.emb_key else []
    with restore_on_error(adata, **written):
        write_gene_roles(adata, genes.roles, key_added=keys.prefix)
        adata.var[keys.weight] = w_col
        adata.var[keys.selected] = w_col > 0.5
        adata.obs[keys.split] = pd.Categorical(data.split, categories=list(consts.SPLITS))
        if data.new_embedding and data.emb_key:  # as in written["obsm"]
            put_embedding(adata, data.emb_key, *data.new_embedding)
        adata.uns[keys.uns] = to_h5ad(entry)
    return metrics, written


def _written(keys: Keys) -> dict[str, list[str]]:
    """The keys ``agl_fit`` writes (a computed embedding adds its own)."""
    return {
        "var": [keys.role, keys.prior, keys.prior_rank, keys.weight, keys.selected],
        "obs": [keys.split],
        "uns": [keys.uns, keys.gene_roles],
    }


@d.dedent
def agl_fit(
    data: Any,
    *,
    method: consts.Method = "dkgsb",
    mode: consts.Mode = "embedding",
    embedding_key: str | None = None,
    genes: GeneConfig | Mapping[str, Any] | None = None,
    network: NetworkConfig | Mapping[str, Any] | None = None,
    training: TrainingConfig | Mapping[str, Any] | None = None,
    dkgsb: DkGSBConfig | Mapping[str, Any] | None = None,
    encoder: EncoderConfig | Mapping[str, Any] | None = None,
    spots: Any = None,
    split_key: str | None = None,
    val_groups: Any = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    key_added: str = consts.DEFAULT_KEY,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    library_key: str | None = None,
    **legacy: Any,
) -> AGLModel:
    """Train an AGL model that predicts gene expression from H&E patches (or their embeddings).

    Every setting lives in a config of :mod:`agl_scverse.configs` (a ``dict`` of its fields works too), documented
    there; fields left at ``None`` take the mode's default. The flat keywords of earlier releases (``epochs=``,
    ``tau=``, ``encoder="densenet121"``, ...) still work for one release, with a :class:`FutureWarning` naming the
    new spelling.

    Parameters
    ----------
    %(data)s
    method
        ``"dkgsb"`` (learned soft top-k of auxiliaries, default), ``"agl"`` (all auxiliaries, weight 1),
        ``"topk"`` (the first ``k`` auxiliaries by prior, ``DkGSBConfig(k=...)``) or ``"pgl"`` (targets only).
    mode
        ``"embedding"`` (a network on cached features; CPU friendly) or ``"finetune"`` (the encoder and a linear
        head trained end to end on patches, as in the paper).
    embedding_key
        ``.obsm`` key of cached features (embedding mode). Default ``"X_agl_<encoder>"``, computed with
        :func:`agl_scverse.pp.embed_patches` when absent. A named key that is absent is an error. Spatial-context
        features (:func:`agl_scverse.pp.spatial_context`) work like any embedding.
    genes
        Targets, auxiliaries, prior, expression scale: :class:`~agl_scverse.configs.GeneConfig`. Gene roles are
        computed on the **training spots only**.
    network
        The network: :class:`~agl_scverse.configs.NetworkConfig`. Embedding mode's default head is ``"hybrid"``: the
        MLP networks blended with a closed-form reduced-rank ridge of the targets, the share chosen on the
        validation spots (``NetworkConfig(head="mlp")``: the networks alone).
    training
        Epochs, learning rate, refit, seed ensemble, checkpoints: :class:`~agl_scverse.configs.TrainingConfig`.
    dkgsb
        The bi-level step and top-k's ``k``: :class:`~agl_scverse.configs.DkGSBConfig`.
    encoder
        The image encoder, for a missing embedding or fine-tune mode: :class:`~agl_scverse.configs.EncoderConfig`.
    %(spots)s
        The others are ``"unused"`` (e.g. held-out test spots).
    split_key
        With ``val_groups``: validation spots are those whose ``.obs[split_key]`` is in ``val_groups``.
    val_groups
        The ``.obs[split_key]`` values (e.g. a slide) that validate.
    val_fraction
        Without ``split_key``: the fraction of used spots drawn (seeded) for validation.
    seed
        Seeds the split, initialisation, batches and meta batches (results are identical on CPU for a seed).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``...
    %(key_added)s
    save_dir
        Save the model there (atomically); training checkpoints (``TrainingConfig(checkpoint_every=...)``) go to
        ``<save_dir>.checkpoint/``.
    overwrite
        Replace an existing ``save_dir`` that holds a saved model or nothing (any other folder is refused before
        training), and the checkpoint of an unfinished run (without ``resume``).
    %(progress)s
    %(library_key)s

    Returns
    -------
    The :class:`~agl_scverse.model.AGLModel`. Results are written in place (for a SpatialData, into its table),
    with ``k = Keys(key_added)``:

    - ``.var[k.role]`` (target / auxiliary / excluded), ``.var[k.prior]``, ``.var[k.prior_rank]`` (0 = best),
      ``.var[k.weight]`` (1 for targets, mask weight for auxiliaries, 0 excluded), ``.var[k.selected]``;
    - ``.obs[k.split]``: ``"train"`` / ``"val"`` / ``"unused"``;
    - ``.uns[k.uns]``: ``params`` (every setting), ``method``, ``k``, ``threshold``, ``n_auxiliary``,
      ``n_targets``, ``targets``, ``embedding_key``, ``history`` (per epoch) and ``metrics`` (validation);
      ``.uns[k.gene_roles]``: how the roles were chosen.

    Notes
    -----
    Under ``torchrun`` the processes share each batch (see the Scaling out page); rank 0 writes ``save_dir`` and
    the checkpoints, and every rank returns the same model.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide(seed=0)  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(
    ...     adata, method="topk", dkgsb=agl.DkGSBConfig(k="auto"), training={"n_seeds": 1}
    ... )  # doctest: +SKIP
    >>> adata.uns["agl"]["k"], adata.var["agl_selected"].sum()  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    given: dict[str, Any]  # configs, dicts or an old encoder name: FitConfig.build sorts them out
    given = {"genes": genes, "network": network, "training": training, "dkgsb": dkgsb, "encoder": encoder}
    if legacy or (encoder is not None and not isinstance(encoder, EncoderConfig | Mapping)):
        given = merge_legacy("agl_fit", given, legacy)
    cfg = FitConfig.build(method, mode, **given, seed=seed)
    t, enc_cfg = cfg.training, cfg.encoder
    keys = Keys(key_added)
    if (t.checkpoint_every or t.resume) and save_dir is None:
        raise ValueError("checkpoint_every and resume need save_dir (the checkpoint is kept beside the model).")
    dist.init_from_env()  # joins torchrun's process group; nothing in a plain python process
    if save_dir is not None and Path(save_dir).exists() and not overwrite:
        raise FileExistsError(f"save_dir {save_dir} already exists; pass overwrite=True or choose another path.")
    if save_dir is not None:
        check_overwritable(Path(save_dir))  # before training: overwrite=True replaces only a saved model
    dev = resolve_device(device)
    adata = as_anndata(data)
    check_owned(adata, **_written(keys))  # before training: key_added must not name data that is not ours
    if library_key is not None:
        resolve_library_key(adata, library_key)  # a column of slide labels, not coordinates
    progress = show_progress(progress)

    fit_data = prepare_data(adata, cfg, spots, split_key, val_groups, val_fraction, embedding_key)
    fg = prepare_genes(adata, cfg, fit_data, library_key)
    enc = {"library_key": library_key, "progress": progress}  # what embedding and patches need beyond the config
    k_search, checkpoint, linear = None, None, None  # the k search and the refit are short runs: not checkpointed
    if cfg.network.head == consts.HEAD_RRR:
        _, inputs, enc_record = build_network(adata, cfg, fit_data, len(fg.genes), enc, dev)  # the features
        fg, net, res, linear = _fit_linear(cfg, fit_data, fg)
    elif cfg.method == "topk" and cfg.k == consts.K_AUTO:
        (fg, net, inputs, res, enc_record), k_search = _search_k(adata, cfg, fit_data, fg, enc, dev, progress)
    else:
        net, inputs, enc_record = build_network(adata, cfg, fit_data, len(fg.genes), enc, dev)
        mask = (
            GeneMask(fg.roles.normalized_rank.astype(np.float64), tau=cfg.dkgsb.tau) if cfg.method == "dkgsb" else None
        )
        checkpoint = checkpointer(save_dir, overwrite, cfg, fg, fit_data, net, enc_record)
        desc = f"agl_fit ({cfg.method})"
        res = _train(net, inputs, fg, fit_data, cfg, dev, progress, desc, mask=mask, checkpoint=checkpoint)
    n_t = fg.n_targets  # validation metrics of the selected network, before any refit has seen those spots
    val_pred = forward(net, index_batches(inputs, fit_data.val_idx, 512), len(fg.genes), calibrated=True, n_first=n_t)
    val_metrics = per_gene_metrics(fg.expr.batch(fit_data.val_idx, n_t), val_pred, genes=fg.roles.targets)
    refit_history = None
    if cfg.training.refit and linear is not None:
        both = np.sort(np.concatenate([fit_data.train_idx, fit_data.val_idx]))
        net, _ = rrr_head(fit_data.features, fg.expr, both, n_t, linear["rank"])
    elif cfg.training.refit:
        net, inputs, res_refit = _refit(adata, cfg, fit_data, fg, res, enc, dev, progress)
        refit_history = res_refit.history
        res.fit_seconds += res_refit.fit_seconds
    net.cpu().eval()
    if cfg.n_seeds > 1:
        t_ens = time.perf_counter()
        net = _ensemble(adata, cfg, fit_data, fg, net, res, enc, dev, progress)
        res.fit_seconds += time.perf_counter() - t_ens
    if cfg.network.head == consts.HEAD_HYBRID:
        t_lin = time.perf_counter()
        net, linear = _add_linear(cfg, fit_data, fg, net, val_pred)
        res.fit_seconds += time.perf_counter() - t_lin
    extra = {
        "t_start": t_start, "library_key": library_key, "inputs": inputs, "val_metrics": val_metrics,
        "k_search": k_search, "refit_history": refit_history, "linear": linear,
        "params": {
            "embedding_key": fit_data.emb_key, "spots": int(fit_data.used.sum()) if spots is not None else None,
            "split_key": split_key, "val_groups": val_groups, "val_fraction": val_fraction, "device": str(dev),
            "key_added": key_added, "save_dir": save_dir, "library_key": library_key, "patch_px": enc_cfg.patch_px,
            "patch_um": enc_cfg.patch_um, "allow_lowres": enc_cfg.allow_lowres, "versions": versions(),
            "num_workers": enc_cfg.num_workers, "prefetch_factor": enc_cfg.prefetch_factor,
            "checkpoint_every": t.checkpoint_every, "resume": t.resume, "world_size": dist.world_size(),
        },
    }  # fmt: skip
    model = _make_model(cfg, fg, res, net, enc_record, fit_data, extra)
    if save_dir is not None:
        if dist.is_main():
            model.save(save_dir, overwrite=overwrite)
        dist.barrier()
    if checkpoint is not None:
        checkpoint.remove()  # the model is saved: the run is finished
    metrics, written = _write_results(adata, model, cfg, fg, fit_data, res, keys, extra)
    if adata is not data:  # a SpatialData: results go into its table
        update_table(data, adata, **written)
    logg.info(
        f"agl_fit ({cfg.method}): {fg.n_targets} targets, k = {model.k} of {len(fg.roles.auxiliaries)} auxiliaries, "
        f"validation PCC {metrics['val_pcc']:.4f} (best epoch {res.best_epoch}); wrote .var[{keys.role!r}, "
        f"{keys.weight!r}, {keys.selected!r}], .obs[{keys.split!r}], .uns[{keys.uns!r}]"
    )
    return model
