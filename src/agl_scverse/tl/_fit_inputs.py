"""What a fit trains on: its spots and split, genes and expression, the network and its inputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._expression import ExpressionBatches
from agl_scverse._stats import StreamingMoments
from agl_scverse._utils import seed_everything, sha256_array
from agl_scverse._validate import check_adata, check_feature_variance, check_layer, resolve_spots
from agl_scverse.encoders._registry import encoder_name
from agl_scverse.model import EmbeddingHead, FinetuneNet, encoder_record, get_encoder
from agl_scverse.pp._embed import embed_patches
from agl_scverse.pp._genes import GeneRoles, gene_roles
from agl_scverse.pp._patches import SpotPatches, check_patch_batch
from agl_scverse.train._data import PatchInputs
from agl_scverse.train._resume import Checkpointer
from agl_scverse.train._trainer import TensorInputs, genes_for_method

from ._config import FitConfig
from ._split import make_split


@dataclass
class FitData:
    """What :func:`prepare_data` found: spots, split, the embedding (when present)."""

    used: np.ndarray
    split: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    emb_key: str | None
    features: np.ndarray | None
    new_embedding: tuple[np.ndarray, dict] | None = None  # computed here, written with the results


@dataclass
class FitGenes:
    """What :func:`prepare_genes` found: roles, the genes the network outputs, their expression."""

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


def check_features(X: np.ndarray, key: str, rows: np.ndarray) -> None:
    if X.ndim != 2:
        raise ValueError(f".obsm[{key!r}] has shape {X.shape}; expected (n_spots, n_features).")
    n_bad = sum(int((~np.isfinite(X[rows[s : s + 65536]]).all(axis=1)).sum()) for s in range(0, len(rows), 65536))
    if n_bad:  # checked in row blocks: no copy of the whole used embedding
        raise ValueError(
            f".obsm[{key!r}] holds NaN/inf for {n_bad} of the used spots; recompute the embedding or "
            "leave those spots out with spots=..."
        )


def prepare_data(adata: AnnData, cfg: FitConfig, spots, split_key, val_groups, val_fraction, embedding_key):
    check_layer(adata, cfg.genes.layer)
    check_adata(adata, layer=cfg.genes.layer, transform=cfg.genes.transform)
    used = resolve_spots(adata, spots, as_mask=True)
    split = make_split(adata, used, split_key, val_groups, val_fraction, cfg.seed)
    emb_key, features = None, None
    if cfg.mode == "embedding":
        emb_key = embedding_key or consts.embedding_key(encoder_name(cfg.encoder.encoder))
        if emb_key in adata.obsm:
            features = np.asarray(adata.obsm[emb_key], dtype=np.float32)
            check_features(features, emb_key, np.flatnonzero(used))
        elif embedding_key is not None:
            raise KeyError(
                f"embedding_key={embedding_key!r} is not in adata.obsm ({list(adata.obsm)}). Compute it with "
                "agl.pp.embed_patches or leave embedding_key=None to embed with the encoder (EncoderConfig)."
            )
    elif embedding_key is not None:
        raise ValueError("embedding_key applies to mode='embedding' only; fine-tune mode reads image patches.")
    train_idx, val_idx = np.flatnonzero(split == consts.SPLIT_TRAIN), np.flatnonzero(split == consts.SPLIT_VAL)
    return FitData(used, split, train_idx, val_idx, emb_key, features)


def prepare_genes(adata: AnnData, cfg: FitConfig, data: FitData, library_key: str | None) -> FitGenes:
    g = cfg.genes
    roles = gene_roles(
        adata, n_targets=g.n_targets, targets=g.targets, auxiliaries=g.auxiliaries, prior=g.prior,
        min_cells=g.min_cells, train_mask=data.split == consts.SPLIT_TRAIN, layer=g.layer, library_key=library_key,
        inplace=False,
    )  # fmt: skip
    n_aux_all = len(roles.auxiliaries)
    if cfg.method == "topk" and cfg.top_k is not None and cfg.top_k > n_aux_all:
        raise ValueError(f"k={cfg.k} exceeds the {n_aux_all} auxiliary genes available; choose k <= {n_aux_all}.")
    if cfg.method in ("agl", "dkgsb") and n_aux_all == 0:
        raise ValueError(f"method={cfg.method!r} needs auxiliary genes but none is left; use method='pgl'.")
    aux_cols = genes_for_method(cfg.method, n_aux_all, k=n_aux_all if cfg.k == consts.K_AUTO else cfg.top_k)
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
    return FitGenes(roles, aux_cols, genes, gene_pos, expr)


def build_network(
    adata, cfg: FitConfig, data: FitData, n_out: int, enc: dict, dev, seed: int | None = None
) -> tuple[torch.nn.Module, Any, dict]:
    """Network, input source and encoder record; embeds the slide (into a copy) when the features are missing."""
    seed = cfg.seed if seed is None else int(seed)
    if cfg.mode == "embedding":
        assert data.emb_key is not None  # set by prepare_data in embedding mode
        if data.features is None:
            e = cfg.encoder
            logg.info(f"No .obsm[{data.emb_key!r}]: embedding patches with {e.encoder!r} first.")
            emb = embed_patches(
                adata, e, device=str(dev), library_key=enc["library_key"], key_added=data.emb_key, copy=True,
                seed=cfg.seed, progress=enc.get("progress"),
            )  # fmt: skip
            data.features = np.asarray(emb.obsm[data.emb_key], dtype=np.float32)
            check_features(data.features, data.emb_key, np.flatnonzero(data.used))
            data.new_embedding = (data.features, emb.uns[consts.EMBED_UNS][data.emb_key])
        rec = data.new_embedding[1] if data.new_embedding else (adata.uns.get(consts.EMBED_UNS) or {}).get(data.emb_key)
        record = {**dict(rec or {}), "recorded": bool(rec)}
        seed_everything(seed)
        net = EmbeddingHead(data.features.shape[1], n_out, hidden=cfg.network.hidden or (), dropout=cfg.network.dropout)
        moments = StreamingMoments(data.features.shape[1])
        for s in range(0, len(data.train_idx), 8192):
            moments.update(data.features[data.train_idx[s : s + 8192]])
        check_feature_variance(moments.std, moments.mean, data.emb_key, len(data.train_idx))
        net.set_input_scaling(torch.as_tensor(moments.mean).float(), torch.as_tensor(moments.std).float())
        return net, TensorInputs(data.features, device=dev), record
    e = cfg.encoder
    ds = SpotPatches(
        adata, patch_px=e.patch_px, patch_um=e.patch_um, library_key=enc["library_key"], allow_lowres=e.allow_lowres
    )
    in_flight = max(1, e.num_workers * e.prefetch_factor)
    check_patch_batch(ds.patch_px, max(cfg.training.batch_size or 0, cfg.dkgsb.meta_batch_size), in_flight)
    backbone, info = get_encoder(
        e.encoder, weights=e.weights, seed=cfg.seed, encoder_kwargs=None if e.encoder_kwargs is None
        else dict(e.encoder_kwargs),
    )  # fmt: skip
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
    ft_net = FinetuneNet(backbone, n_feat, n_out, mean=info["mean"], std=info["std"])
    inputs = PatchInputs(
        ds, np.concatenate([data.train_idx, data.val_idx]), dev, num_workers=e.num_workers,
        prefetch_factor=e.prefetch_factor, seed=cfg.seed,
    )  # fmt: skip
    return ft_net, inputs, record


def expression_sha256(expr: ExpressionBatches, rows: np.ndarray) -> str:
    """sha256 of the model's expression values (every output gene) of ``rows``, in order, read in chunks."""
    h = hashlib.sha256(f"{expr.n_cols}:{len(rows)}".encode())
    for _, values in expr.chunks(rows):
        h.update(np.ascontiguousarray(values, dtype=np.float32).tobytes())
    return h.hexdigest()


def checkpointer(save_dir, overwrite: bool, cfg: FitConfig, genes: FitGenes, data: FitData, net, enc_record: dict):
    """The run's :class:`~agl_scverse.train._resume.Checkpointer` (None without checkpoints or resume)."""
    every, resume = cfg.training.checkpoint_every, cfg.training.resume
    if not every and not resume:
        return None
    fingerprint = {
        "params": cfg.to_params(), "genes": genes.genes, "net": net.config(), "n_train": len(data.train_idx),
        "n_val": len(data.val_idx), "split_sha256": sha256_array(np.concatenate([data.train_idx, data.val_idx])),
        "embedding_key": data.emb_key,
        "encoder": {k: enc_record.get(k) for k in ("encoder", "weights_sha256", "patch_px", "patch_um")},
        "features_sha256": None if data.features is None
        else sha256_array(data.features[np.concatenate([data.train_idx, data.val_idx])]),
        "expression_sha256": expression_sha256(genes.expr, np.concatenate([data.train_idx, data.val_idx])),
    }  # fmt: skip
    return Checkpointer(save_dir, every, fingerprint, resume=resume, overwrite=overwrite)


def with_k(genes: FitGenes, k: int) -> FitGenes:
    """The first ``k`` auxiliaries (prior order) of ``genes``: a top-k fit's outputs."""
    n = genes.n_targets + int(k)
    expr = ExpressionBatches(genes.expr.X, genes.gene_pos[:n], genes.expr.transform)
    return FitGenes(genes.roles, genes.aux_cols[: int(k)], genes.genes[:n], genes.gene_pos[:n], expr)
