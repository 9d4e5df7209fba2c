"""Apply a fitted :class:`~agl_scverse.model.AGLModel` to a slide.

:func:`agl_predict` writes predictions into a slide that measured the model's genes; :func:`predict_anndata`
returns a new AnnData of predictions for any slide, e.g. an H&E-only one. Everything is checked before anything
is written: the model's genes against the slide's, the embedding's recorded encoder settings against the
model's, the embedding itself (shape, NaN). A missing embedding is computed with the model's recorded encoder,
weights file (passed as ``encoder={"weights": ...}``; its sha256 is checked against the recorded one; a path recorded in the
model is never opened) and patch size, into a copy, and written together with the predictions. A model trained on
spatial-context features (:func:`agl_scverse.pp.spatial_context`) has them rebuilt with its recorded recipe from the
slide's spot embedding (itself computed when missing); context features of another recipe are refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as K
from agl_scverse._constants import Keys, PredScale
from agl_scverse._docs import d
from agl_scverse._encoder_args import as_encoder_config, encoder_keywords, explicit_fields
from agl_scverse._expression import predicted_library_size, rescale_predictions
from agl_scverse._serialize import to_h5ad
from agl_scverse._spatial import resolve_library_key
from agl_scverse._transaction import check_owned, restore_on_error
from agl_scverse._utils import resolve_device
from agl_scverse._validate import check_choice, check_positive
from agl_scverse.configs import EncoderConfig
from agl_scverse.io._spatialdata import as_anndata, update_table
from agl_scverse.model import AGLModel
from agl_scverse.model._encoders import RECORD_CHECKED, rebuild_encoder
from agl_scverse.pp._context import context_kwargs, context_recipe_diff, spatial_context
from agl_scverse.pp._embed import embed_patches
from agl_scverse.pp._patches import SpotPatches, check_patch_batch

__all__ = [
    "agl_predict",
    "predict_anndata",
    "predict_core",
    "predict_options",
    "predictions_anndata",
    "check_embedding_matches",
    "check_source_resolution",
    "prediction_layer",
    "prediction_record",
    "model_run_record",
    "spread_layer",
    "PREDICT_GENES",
]

#: Accepted string values of ``genes`` in :func:`agl_predict`.
PREDICT_GENES = ("selected", "targets", "all")
PredictGenes = Literal["selected", "targets", "all"]
#: The old keywords of the predict functions, now fields of their ``encoder`` (an EncoderConfig); kept one release.
PREDICT_KEYWORDS = ("weights", "precision", "num_workers", "prefetch_factor", "allow_lowres", "backend")
#: Largest dense prediction layer (bytes) before :func:`agl_predict` writes a chunked dask array instead.
DENSE_LAYER_BYTES = 2**30
#: Spots x genes (float32 bytes) predicted at a time.
_CHUNK_BYTES = 128 * 2**20


def _effective_um_per_px(rec: dict) -> float | None:
    """The coarsest detail of a record's patches: max over libraries of ``max(source µm/px, patch µm/px)``."""
    src = rec.get("source_um_per_px")
    if not src or not rec.get("patch_um") or not rec.get("patch_px"):
        return None
    vals = src.values() if isinstance(src, dict) else [src]
    patch = float(rec["patch_um"]) / float(rec["patch_px"])
    return max(max(float(v), patch) for v in vals)


def check_source_resolution(data_rec: dict, model_rec: dict, allow_lowres: bool = False, what: str = "slide") -> None:
    """Refuse patches cut from a coarser image than the model was trained on (unless ``allow_lowres``).

    Each side's resolution is the coarsest over its libraries of ``max(source_um_per_px, patch_um / patch_px)``
    (the detail the patches carry); the data may be up to ``LOWRES_TOLERANCE`` (x1.2) coarser. Skipped when either
    side does not record ``source_um_per_px`` (embeddings made before it was recorded, or brought by the user).

    Examples
    --------
    >>> m = {"patch_px": 224, "patch_um": 112.0, "source_um_per_px": {"A": 0.25}}
    >>> check_source_resolution({**m, "source_um_per_px": {"B": 0.5}}, m)  # patches are 0.5 µm/px anyway
    >>> check_source_resolution({**m, "source_um_per_px": {"B": 3.6}}, m)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The slide's patches were cut from a 3.6 µm/px image ...
    """
    data_mpp, model_mpp = _effective_um_per_px(data_rec or {}), _effective_um_per_px(model_rec or {})
    if data_mpp is None or model_mpp is None or data_mpp <= model_mpp * K.LOWRES_TOLERANCE:
        return
    where = ", ".join(
        f"{lib}: {float(v):.3g} µm/px ({(data_rec.get('image') or {}).get(lib, '?')}, level "
        f"{(data_rec.get('level') or {}).get(lib, 0)})"
        for lib, v in (data_rec.get("source_um_per_px") or {}).items()
    )
    msg = (
        f"The {what}'s patches were cut from a {data_mpp:.3g} µm/px image ({where}), coarser than the "
        f"{model_mpp:.3g} µm/px the model was trained on: predictions from upsampled patches are worse."
    )
    if not allow_lowres:
        raise ValueError(
            msg
            + " Give the slide's full-resolution image (agl.io.read_visium(..., fullres_image=...), the SpatialData "
            "full-res image element) and re-embed, or pass allow_lowres=True to predict anyway."
        )
    warnings.warn(msg + " Predicting anyway (allow_lowres=True).", UserWarning, stacklevel=3)


def check_embedding_matches(
    adata: AnnData, key: str, model: AGLModel, allow_lowres: bool = False, context: bool = True
) -> None:
    """Raise if ``.uns["agl_embeddings"][key]`` records other encoder settings than the model was trained with.

    Compared: encoder name, weights sha256, patch size in pixels and in µm, timm keyword arguments, test-time
    augmentation views (each only when both sides record it), the source resolution (:func:`check_source_resolution`: patches from a coarser
    image than the model's are refused unless ``allow_lowres=True``) and, with ``context``, the spatial-context
    recipe (:func:`agl_scverse.pp.spatial_context`; features with and without context never match). An embedding
    without a record (brought by the user) is accepted with a warning when the model has one.

    Examples
    --------
    >>> check_embedding_matches(adata, "X_agl_resnet18", model)  # doctest: +SKIP
    """
    enc = model.config.get("encoder") or {}
    rec = (adata.uns.get(K.EMBED_UNS, {}) or {}).get(key)
    if not rec:
        if enc.get("recorded"):
            logg.warning(
                f".obsm[{key!r}] has no record in .uns[{K.EMBED_UNS!r}]; cannot check that it was computed with the "
                f"model's encoder ({enc.get('encoder')!r}, {enc.get('patch_px')} px, {enc.get('patch_um')} µm)."
            )
        return
    if not enc.get("recorded"):
        return
    diffs = []
    for f in RECORD_CHECKED:
        a, b = rec.get(f), enc.get(f)
        if a in (None, "") or b in (None, ""):
            continue
        same = np.isclose(float(a), float(b)) if f in ("patch_px", "patch_um") else str(a) == str(b)
        if not same:
            diffs.append(f"{f}: data {a!r} vs model {b!r}")
    if diffs:
        raise ValueError(
            f".obsm[{key!r}] was computed with other encoder settings than the model was trained on ("
            + "; ".join(diffs)
            + "). Re-embed the slide with the model's settings (agl.pp.embed_patches(adata, agl.EncoderConfig("
            f"{enc.get('spec') or enc.get('encoder')!r}, weights=<the same file>, "
            + (f"encoder_kwargs={enc['encoder_kwargs']}, " if enc.get("encoder_kwargs") not in (None, "{}") else "")
            + f"patch_px={enc.get('patch_px')}, "
            f"patch_um={enc.get('patch_um')}), key_added=<a new key>)) or drop .obsm[{key!r}] to let "
            "agl_predict do it."
        )
    check_source_resolution(rec, enc, allow_lowres, what=f"slide (.obsm[{key!r}])")
    ctx_diffs = context_recipe_diff(rec.get("context"), enc.get("context")) if context else []
    if ctx_diffs:
        recipe = enc.get("context")
        fix = (
            f"agl.pp.spatial_context(adata, {recipe.get('base_key')!r}, **{context_kwargs(recipe)}, key_added=<a new "
            "key>)"
            if recipe
            else f"the spot embedding the model was trained on ({model.config.get('embedding_key')!r})"
        )
        raise ValueError(
            f".obsm[{key!r}] was built with another spatial-context recipe than the model's features ("
            + "; ".join(ctx_diffs)
            + f"). Use {fix}, or drop .obsm[{key!r}] to let agl_predict rebuild it from the spot embedding."
        )


def _compute_context(
    adata: AnnData, model: AGLModel, key: str, weights, device, library_key, encoder=None, run=None,
    allow_lowres: bool = False, progress: bool | None = None, embed_batch_size: int = 32,
) -> tuple:  # fmt: skip
    """Rebuild the model's spatial-context features on this slide from its recorded recipe (into a shell AnnData).

    The base embedding is taken from the slide (checked against the model's encoder) or computed with the model's
    encoder. Returns (features, record).
    """
    enc = model.config.get("encoder") or {}
    recipe = dict(enc["context"])
    base_key = str(recipe["base_key"])
    if K.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: the model's spatial-context features need spot coordinates.")
    shell = AnnData(obs=adata.obs.copy())
    shell.obsm[K.SPATIAL_KEY] = np.asarray(adata.obsm[K.SPATIAL_KEY])
    shell.uns[K.SPATIAL_KEY] = adata.uns.get(K.SPATIAL_KEY, {})
    records = dict(adata.uns.get(K.EMBED_UNS, {}) or {})
    fov_key = recipe.get("fov_key")
    for k in (base_key, fov_key):
        if k and k in adata.obsm:
            shell.obsm[k] = adata.obsm[k]
    if base_key in adata.obsm:
        check_embedding_matches(adata, base_key, model, allow_lowres, context=False)
    else:
        feats, rec = _compute_embedding(
            adata, model, base_key, weights, device, library_key, encoder, run, allow_lowres, progress, embed_batch_size
        )
        shell.obsm[base_key] = feats
        records[base_key] = rec
    shell.uns[K.EMBED_UNS] = records
    run = run or {}
    spatial_context(
        shell, base_key, **context_kwargs(recipe), fov_key=fov_key, library_key=library_key, key_added=key,
        weights=weights, encoder=encoder, device=device, precision=run.get("precision", "auto"),
        num_workers=run.get("num_workers", 0),
    )  # fmt: skip
    logg.info(f"Rebuilt .obsm[{key!r}] from .obsm[{base_key!r}] with the model's spatial-context recipe.")
    return np.asarray(shell.obsm[key], dtype=np.float32), dict(shell.uns[K.EMBED_UNS][key])


def _compute_embedding(
    adata: AnnData,
    model: AGLModel,
    key: str,
    weights,
    device,
    library_key,
    encoder=None,
    run=None,
    allow_lowres: bool = False,
    progress: bool | None = None,
    embed_batch_size: int = 32,
) -> tuple:
    """Embed with the model's recorded encoder (rebuilt from its config, or ``encoder``) into a copy.

    ``run``: how the encoder runs (precision, workers). Returns (features, record).
    """
    enc = model.config.get("encoder") or {}
    if encoder is None and (not enc.get("recorded") or not enc.get("encoder")):
        raise KeyError(
            f".obsm[{key!r}] is missing and the model records no encoder settings (its training embedding was "
            "brought by the user). Compute the same embedding for this slide and store it in .obsm first, or pass "
            "the encoder: agl.tl.agl_predict(adata, model, encoder=<module or name>)."
        )
    pair = rebuild_encoder(enc, weights=weights, encoder=encoder)  # never opens the path recorded in the model
    run = {k: v for k, v in (run or {}).items() if k in ("precision", "num_workers", "prefetch_factor", "backend")}
    cfg = EncoderConfig(
        encoder=pair, patch_px=int(enc.get("patch_px") or K.DEFAULT_PATCH_PX),
        patch_um=float(enc.get("patch_um") or K.DEFAULT_PATCH_UM), tta=int(enc.get("tta") or 1),
        allow_lowres=allow_lowres, batch_size=embed_batch_size, **run,
    )  # fmt: skip
    tmp = embed_patches(
        adata, cfg, device=device, library_key=library_key, key_added=key, seed=int(enc.get("seed", 0)), copy=True,
        progress=progress,
    )  # fmt: skip
    rec = tmp.uns[K.EMBED_UNS][key]
    check_source_resolution(rec, enc, allow_lowres)
    return np.asarray(tmp.obsm[key], dtype=np.float32), rec


def _features(
    adata: AnnData,
    model: AGLModel,
    embedding_key,
    weights,
    device,
    library_key,
    batch_size=512,
    encoder=None,
    run=None,
    allow_lowres=False,
    progress: bool | None = None,
    embed_batch_size: int = 32,
):
    """Model inputs for every spot, and ``(key, features, record)`` when an embedding was computed here."""
    enc = model.config.get("encoder") or {}
    if model.mode != "embedding":
        patch_px, patch_um = (
            int(enc.get("patch_px") or K.DEFAULT_PATCH_PX),
            float(enc.get("patch_um") or K.DEFAULT_PATCH_UM),
        )
        ds = SpotPatches(
            adata, patch_px=patch_px, patch_um=patch_um, library_key=library_key, allow_lowres=allow_lowres
        )
        check_source_resolution(ds.record(), enc, allow_lowres)
        run = run or {}
        check_patch_batch(ds.patch_px, batch_size, max(1, run.get("num_workers", 0) * run.get("prefetch_factor", 2)))
        return ds, None
    key = embedding_key or model.config.get("embedding_key")
    if not key:
        raise ValueError("The model records no embedding key; pass embedding_key=.")
    new_emb = None
    if key in adata.obsm:
        check_embedding_matches(adata, key, model, allow_lowres)
        features = np.asarray(adata.obsm[key], dtype=np.float32)
    else:
        compute = _compute_context if enc.get("context") else _compute_embedding
        features, rec = compute(
            adata, model, key, weights, device, library_key, encoder, run, allow_lowres=allow_lowres, progress=progress,
            embed_batch_size=embed_batch_size,
        )  # fmt: skip
        new_emb = (key, features, rec)
    n_in = (model.config.get("net") or {}).get("n_in")
    if features.ndim != 2 or (n_in is not None and features.shape[1] != n_in):
        raise ValueError(
            f".obsm[{key!r}] has shape {features.shape}; the model expects {n_in} features per spot. "
            "Embed the slide with the model's encoder."
        )
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ValueError(f".obsm[{key!r}] holds NaN/inf for {int(bad.sum())} spots; recompute the embedding.")
    return features, new_emb


def _run_options(precision: str, num_workers: int, prefetch_factor: int, backend: str = "auto") -> dict:
    """How encoders run here (checked): passed to ``AGLModel.predict`` and ``embed_patches``."""
    check_choice("precision", precision, K.PRECISIONS)
    check_choice("backend", backend, K.BACKENDS)
    check_positive("num_workers", num_workers, integer=True, allow_zero=True)
    check_positive("prefetch_factor", prefetch_factor, integer=True)
    return {
        "precision": precision, "num_workers": int(num_workers), "prefetch_factor": int(prefetch_factor),
        "backend": backend,
    }  # fmt: skip


def _rows(features, start: int, stop: int):
    """Rows ``start:stop`` of an array of features or of a patch Dataset."""
    if isinstance(features, torch.utils.data.Dataset):
        return torch.utils.data.Subset(features, range(start, stop))
    return features[start:stop]


def _predict_rows(
    model: AGLModel, features, start: int, stop: int, device: str, batch_size: int, columns=None, run=None
):
    rows = _rows(features, start, stop)
    return model.predict(rows, batch_size=batch_size, columns=columns, device=device, **(run or {}))


def _transform(model: AGLModel) -> str:
    return str(model.config.get("transform") or K.TRANSFORM_LOG1P)


def _library_cols(model: AGLModel, scale: str) -> np.ndarray | None:
    """Model outputs summed into the library size of ``scale`` (None when the scale needs none).

    The trained outputs (targets and selected auxiliaries, whatever ``genes=`` writes), so a gene's normalised
    value does not depend on which other genes are written; unselected auxiliaries were not trained.
    """
    if scale != K.SCALE_LOG1P_CP10K or _transform(model) == K.TRANSFORM_LOG1P_CPM:
        return None
    col = {g: i for i, g in enumerate(model.genes)}
    return np.asarray([col[g] for g in model.predicted_genes], dtype=np.int64)


def _row_chunks(
    model: AGLModel,
    features,
    n: int,
    model_cols: np.ndarray,
    device: str,
    batch_size: int,
    width: int = 0,
    scale: str = K.SCALE_MODEL,
    run=None,
):
    """``(start, stop, predictions of model_cols in scale)`` for chunks of spots of about :data:`_CHUNK_BYTES`."""
    step = max(1, int(_CHUNK_BYTES // (4 * max(len(model.genes), width))))
    lib_cols, transform = _library_cols(model, scale), _transform(model)
    for s in range(0, n, step):
        e = min(s + step, n)
        full = _predict_rows(model, features, s, e, device, batch_size, run=run)
        library = predicted_library_size(full[:, lib_cols], transform) if lib_cols is not None else None
        yield s, e, rescale_predictions(full[:, model_cols], transform, scale, library)


def _choose_genes(adata: AnnData | None, model: AGLModel, genes) -> list[str]:
    """The model genes to predict: ``"selected"`` (targets + selected auxiliaries), ``"targets"``, ``"all"``, a list."""
    if isinstance(genes, str):
        check_choice("genes", genes, PREDICT_GENES)
        chosen = {"selected": model.predicted_genes, "targets": model.targets, "all": model.genes}[genes]
    else:
        chosen = [str(g) for g in genes]
        unknown = [g for g in chosen if g not in set(model.genes)]
        if unknown:
            raise KeyError(f"{len(unknown)} gene(s) are not outputs of the model: {unknown[:10]}.")
    if adata is not None:
        lacking = [g for g in chosen if g not in adata.var_names]  # targets were checked: these are auxiliaries
        if lacking:
            warnings.warn(
                f"genes={genes if isinstance(genes, str) else 'a list'!r} asks for {len(chosen)} genes, but the slide "
                f"lacks {len(lacking)} of them ({lacking[:5]}{' ...' if len(lacking) > 5 else ''}), so the layer "
                f"holds predictions for the other {len(chosen) - len(lacking)} only (.var['..._predicted'] says "
                "which). agl.tl.predict_anndata(adata, model) returns the selected genes in a new AnnData, whatever the "
                "slide measured.",
                UserWarning,
                stacklevel=5,  # the caller of agl_predict (through its keyword wrapper)
            )
        chosen = [g for g in chosen if g in adata.var_names]
    return chosen


def _check_genes(adata: AnnData, model: AGLModel) -> None:
    if adata.n_vars == 0:
        raise ValueError(
            "The slide has no genes (n_vars == 0), so there is no layer to write predictions into. Use "
            "agl.tl.predict_anndata(adata, model) to get a new AnnData of predictions."
        )
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate gene names {dup}; run adata.var_names_make_unique() first.")
    present = adata.var_names.isin(model.genes)
    if not present.any():
        raise KeyError(
            f"None of the model's {len(model.genes)} genes (e.g. {model.genes[:3]}) is in adata.var_names (e.g. "
            f"{adata.var_names[:3].tolist()}). Check the gene naming (symbols vs Ensembl ids), or use "
            "agl.tl.predict_anndata(adata, model) for a new AnnData of predictions."
        )
    missing = [g for g in model.targets if g not in adata.var_names]
    if missing:
        raise KeyError(
            f"{len(missing)} target gene(s) of the model are not in adata.var_names: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({int(present.sum())} of the model's {len(model.genes)} genes "
            "are). Use a slide measuring the same genes (check the gene naming: symbols vs Ensembl ids), or "
            "agl.tl.predict_anndata(adata, model) for a new AnnData of predictions."
        )


def predict_core(
    adata: AnnData,
    model: AGLModel,
    *,
    into: AnnData | None,
    genes: str | Sequence[str] = "selected",
    embedding_key: str | None = None,
    weights=None,
    device: str = "auto",
    library_key: str | None = None,
    batch_size: int = 512,
    max_dense_bytes: float = DENSE_LAYER_BYTES,
    encoder=None,
    scale: PredScale = "model",
    run: dict | None = None,
    allow_lowres: bool = False,
    spread: bool = False,
    progress: bool | None = None,
    embed_batch_size: int = 32,
):
    """The one prediction path of :func:`agl_predict`, :func:`predict_anndata` and :func:`predict_chunked`.

    Checks, embeds when needed (into a copy) and predicts, writing nothing. ``into``: the slide whose genes the
    layer spans (:func:`agl_predict`), or None for a layer of the chosen genes only (:func:`predict_anndata`).
    Returns ``(layer, spread or None, (key, features, record) of a computed embedding or None, predicted genes)``;
    the layer is a NumPy array, or a chunked dask array when it (with ``into=None``: it, ``.X`` and the spread)
    would exceed ``max_dense_bytes``. Predictions are made in row chunks, so memory is that of a chunk of spots x
    model genes (plus the layer when it is dense).
    """
    check_choice("scale", scale, K.PRED_SCALES)
    check_positive("batch_size", batch_size, integer=True)
    if into is not None:
        _check_genes(into, model)
    dev = str(resolve_device(device))
    run = run if run is not None else _run_options("auto", 0, 2)
    features, new_emb = _features(
        adata, model, embedding_key, weights, dev, library_key, int(batch_size), encoder, run, allow_lowres, progress,
        embed_batch_size,
    )  # fmt: skip
    pred_genes = _choose_genes(into, model, genes)
    col = {g: i for i, g in enumerate(model.genes)}
    model_cols = np.asarray([col[g] for g in pred_genes], dtype=np.int64)
    n_obs = adata.n_obs
    if into is not None:
        width, var_cols, copies = into.n_vars, into.var_names.get_indexer(pred_genes), 1
    else:
        width, var_cols, copies = len(pred_genes), np.arange(len(pred_genes)), 2 + spread  # .X, layer, spread
    dense = copies * n_obs * width * 4 <= max_dense_bytes
    args = (features, n_obs, width, var_cols, model_cols, dev, int(batch_size), scale, run, dense)
    layer = _layer(model, *args)
    if not dense:
        logg.info(
            f"predict: a dense layer would take {copies * n_obs * width * 4 / 2**30:.1f} GiB (> "
            f"{max_dense_bytes / 2**30:.1f} GiB): writing a chunked dask array ({layer.numblocks[0]} x "
            f"{layer.numblocks[1]} chunks), computed when read or written."
        )
    sd = spread_layer(model, *args) if spread else None
    return layer, sd, new_emb, pred_genes


def prediction_layer(adata: AnnData, model: AGLModel, genes: str | Sequence[str] = "selected", **kwargs: Any):
    """The prediction layer of :func:`agl_predict`, computed without writing anything.

    ``kwargs`` are those of :func:`agl_predict` that say how to predict (``embedding_key``, ``device``, ``scale``,
    ``batch_size``, ``encoder``, ...; not ``key_added`` / ``copy``). Returns the layer (spots x genes of ``adata``,
    0 where not predicted; a NumPy array, or a chunked dask array when the dense layer would exceed
    ``max_dense_bytes``), ``(key, features, record)`` of an embedding computed on the way (or None), and the
    predicted genes. ``spread=True`` (a seed ensemble): the layer is the pair ``(layer, spread)``
    (:func:`spread_layer`).
    """
    opts = predict_options(model, **{"spread": False, **kwargs})  # the spread only when asked for
    layer, sd, new_emb, pred_genes = predict_core(adata, model, into=adata, genes=genes, **opts)
    return ((layer, sd) if opts["spread"] else layer), new_emb, pred_genes


def _layer(model, features, n, width, var_cols, model_cols, device, batch_size, scale, run, dense):
    """Predictions of ``model_cols`` into columns ``var_cols`` of an ``(n, width)`` layer (0 elsewhere).

    Dense (a NumPy array filled in row chunks) or a lazy dask array (:func:`_dask_layer`).
    """
    if not dense:
        return _dask_layer(model, features, n, width, var_cols, model_cols, device, batch_size, scale=scale, run=run)
    layer = np.zeros((n, width), dtype=np.float32)
    for s, e, pred in _row_chunks(
        model, features, n, model_cols, device, batch_size, width=width, scale=scale, run=run
    ):
        layer[s:e, var_cols] = pred
    return layer


def spread_layer(model: AGLModel, *args):
    """The standard deviation (``ddof=1``) over a seed ensemble's members of their prediction layers.

    ``args`` are those of the prediction layer (each member's layer is made the same way, in the same scale);
    dense layers are folded in one at a time (Welford), so memory is that of three layers.
    """
    _want_spread(model, True)
    members, dense = model.members(), args[-1]
    if not dense:
        import dask.array as da

        return da.stack([_layer(m, *args) for m in members]).std(axis=0, ddof=1).astype(np.float32)
    mean, m2 = None, None
    for i, m in enumerate(members, start=1):
        x = _layer(m, *args)
        if mean is None:
            mean, m2 = x, np.zeros_like(x)
            continue
        delta = x - mean
        mean += delta / i
        m2 += delta * (x - mean)
    return np.sqrt(m2 / (len(members) - 1), dtype=np.float32)


def _want_spread(model: AGLModel, spread: bool | None) -> bool:
    """Whether to write the spread layer: ``None`` for an ensemble; ``True`` needs one (checked before any work)."""
    if spread is None:
        return model.n_members > 1
    if not isinstance(spread, bool | np.bool_):
        raise TypeError(f"spread must be True, False or None, got {spread!r}.")
    if spread and model.n_members < 2:
        raise ValueError(
            "spread=True needs a seed ensemble (a model fitted with agl_fit(..., n_seeds=5)); this model has one "
            "network, so its predictions have no spread."
        )
    return bool(spread)


def _dask_layer(
    model,
    features,
    n_obs,
    n_vars,
    var_cols,
    model_cols,
    device,
    batch_size,
    rows=4096,
    cols=2048,
    scale="model",
    run=None,
):
    """A lazy spots x genes layer of (spots, genes) chunks, each predicting only its own genes.

    Chunks of genes without predictions are zero chunks that are never computed. Chunks are 32 MiB (4096 x 2048
    float32): dask's writer holds a few per thread, so 128 MiB chunks cost ~1 GB more RSS at write time. With
    ``scale="log1p_cp10k"`` each row of chunks shares one task computing its spots' library size (a forward pass
    over the trained outputs only: rows x trained genes), computed once per dask computation.
    """
    import dask
    import dask.array as da

    by_var = np.full(n_vars, -1, dtype=np.int64)
    by_var[var_cols] = model_cols
    lib_cols, transform = _library_cols(model, scale), _transform(model)

    def library(s: int, e: int) -> np.ndarray:
        pred = _predict_rows(model, features, s, e, device, batch_size, columns=lib_cols)
        return predicted_library_size(pred, transform)

    def chunk(s: int, e: int, c0: int, c1: int, lib) -> np.ndarray:
        out = np.zeros((e - s, c1 - c0), dtype=np.float32)
        local = np.flatnonzero(by_var[c0:c1] >= 0)
        pred = _predict_rows(model, features, s, e, device, batch_size, columns=by_var[c0:c1][local], run=run)
        out[:, local] = rescale_predictions(pred, transform, scale, lib)
        return out

    grid = []
    for s in range(0, n_obs, rows):
        e, row = min(s + rows, n_obs), []
        lib = dask.delayed(library)(s, e) if lib_cols is not None else None
        for c0 in range(0, n_vars, cols):
            c1 = min(c0 + cols, n_vars)
            if (by_var[c0:c1] >= 0).any():
                delayed = dask.delayed(chunk)(s, e, c0, c1, lib)
                row.append(da.from_delayed(delayed, shape=(e - s, c1 - c0), dtype=np.float32))
            else:
                row.append(da.zeros((e - s, c1 - c0), dtype=np.float32))
        grid.append(row)
    return da.block(grid)


def prediction_record(model: AGLModel, scale: str, genes, n_genes: int, observed: bool) -> dict:
    """The ``.uns[f"{key_added}_pred"]`` entry describing a run's prediction layers (h5ad-ready).

    ``scale`` (``"model"`` or ``"log1p_cp10k"``), ``transform`` (the model's expression scale), ``layer`` (the
    counts layer the model was trained on; absent for ``.X``), ``genes`` (the ``genes=`` choice, ``"list"`` for a
    list), ``n_genes``, and ``observed``: whether the AnnData's counts are measured expression of the predicted
    genes (True after :func:`agl_predict`, False for the AnnData of :func:`predict_anndata`, whose ``.X`` is the
    predictions), ``method``, and ``refit`` (whether the model was retrained on its validation spots, so plots
    do not call a score on them a validation score). Plots and :func:`~agl_scverse.tl.evaluate` read it, so they
    need no ``.uns["agl"]``.
    """
    return to_h5ad(
        {
            "scale": scale,
            "transform": _transform(model),
            "layer": model.config.get("layer"),
            "genes": genes if isinstance(genes, str) else "list",
            "n_genes": int(n_genes),
            "observed": bool(observed),
            "method": model.method,
            "refit": bool(model.config.get("refit", False)),
        }
    )


def model_run_record(model: AGLModel, var_names: pd.Index, keys: Keys) -> tuple[dict[str, Any], dict]:
    """The model's own description of its run: ``.var`` columns over ``var_names`` and a ``.uns[key]`` entry.

    What :func:`~agl_scverse.tl.agl_fit` writes about a run, rebuilt from the saved model, so a slide predicted with
    a loaded model (e.g. the CLI's output) plots like a fitted one (:func:`agl_scverse.pl.selected_genes`,
    :func:`~agl_scverse.pl.training_history`, :func:`~agl_scverse.pl.gene_performance`): ``.var`` columns ``role``
    (the model's genes; ``"excluded"`` for the others), ``prior`` (the auxiliaries' prior score), ``prior_rank``
    (0 = best, -1 for the others), ``weight`` (the learned mask, 1 for targets, 0 for the others) and ``selected``
    (weight > 0.5, as ``agl_fit`` writes it); the ``.uns`` entry holds ``params``, ``method``, ``mode``, ``k``,
    ``threshold``, ``n_auxiliary``, ``n_targets``, ``targets``, ``embedding_key``, ``history`` (per epoch; empty
    for a model saved before models carried it) and ``metrics`` (the kept epoch, its validation PCC, the spot
    counts), plus ``source="model"``.
    """
    cfg = model.config
    genes, roles = list(model.genes), list(model.roles)
    n_t = sum(r == K.ROLE_TARGET for r in roles)
    aux = [g for g, r in zip(genes, roles) if r == K.ROLE_AUX]
    n_aux_all = int(cfg.get("n_auxiliary_candidates") or len(aux))
    pos = var_names.get_indexer(genes)
    role = np.full(len(var_names), K.ROLE_EXCLUDED, dtype=object)
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
        keys.role: pd.Categorical(role, categories=[K.ROLE_TARGET, K.ROLE_AUX, K.ROLE_EXCLUDED]),
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
        "metrics": {
            "best_epoch": cfg.get("best_epoch"),
            "val_pcc": cfg.get("val_pcc"),
            "n_train": cfg.get("n_train"),
            "n_val": cfg.get("n_val"),
            "refit": cfg.get("refit"),
        },
        "source": "model",
    }
    return var, to_h5ad(entry)


def _run_writes(adata: AnnData, model: AGLModel, keys: Keys) -> tuple[dict[str, Any], dict | None]:
    """The ``.var`` columns and ``.uns`` entry of :func:`model_run_record` that ``adata`` lacks.

    A fit's own record under this key (richer: split, per-gene prior of every candidate) is kept as it is.
    """
    if keys.role in adata.var:  # fitted (or predicted before) under this key: its gene description stays
        return {}, None
    var, entry = model_run_record(model, adata.var_names, keys)
    var = {c: v for c, v in var.items() if c not in adata.var}
    return var, (entry if keys.uns not in adata.uns else None)


# The parameters of both front doors (agl_predict adds ``copy``), described once.
d.params["predict"] = d.dedent(
    """\
model
    A fitted :class:`~agl_scverse.model.AGLModel` or the directory it was saved to.
genes
    Which of the model's genes get predictions: ``"selected"`` (default: the targets and the auxiliaries the
    mask kept), ``"targets"``, ``"all"`` (every output, also the auxiliaries with weight ~0) or a list.
scale
    ``"model"`` (default): the model's expression scale (its ``transform``: ``log1p`` raw counts unless the model
    was trained otherwise), the scale :func:`~agl_scverse.tl.evaluate` scores. ``"log1p_cp10k"``: the scale of a
    scanpy pipeline (``sc.pp.normalize_total(target_sum=1e4)`` then ``sc.pp.log1p``): each spot's predicted
    counts are divided by their sum over the model's trained genes (targets and selected auxiliaries, the only
    library an H&E slide has), times 10,000, then ``log1p``. A model trained with ``transform="log1p_cpm"``
    already predicts that scale and its values are written unchanged.
encoder
    How the image encoder runs when patches go through it (a fine-tuned model's backbone, or an embedding
    computed here because the slide lacks it): an :class:`~agl_scverse.EncoderConfig` or a dict of its fields.
    The encoder, patch size and test-time augmentation are the model's recorded ones; from the config are used

    - ``weights``: the encoder weights file the model was trained with, needed only to embed a slide without the
      embedding (embedding mode; its sha256 must match the one recorded). The path recorded in the model is never
      opened. A fine-tuned model carries its backbone in its own weights and needs no file.
    - ``encoder``, when set: the encoder itself (a torch module or callable, with its weights loaded) for a model
      whose features came from a custom module (it cannot be rebuilt from the config). Models of a preset,
      ``hf-hub:`` or timm encoder rebuild it from their config (see :func:`agl_scverse.model.rebuild_encoder`).
      A bare module (``encoder=my_module``) is read as this field.
    - ``precision`` (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``; see :func:`agl_scverse.pp.embed_patches`):
      ``"fp32"`` reproduces earlier versions bit for bit; the output layer and the embedding-mode head run in
      float32.
    - ``backend``: what runs the frozen encoder of an embedding computed here: ``"auto"`` (ONNX Runtime on a CPU
      when it is installed and agrees with torch, else torch), ``"torch"`` or ``"onnx"``. Features of either
      engine feed the same model. A fine-tuned model's network runs in torch (``"onnx"`` is refused there).
    - ``num_workers`` / ``prefetch_factor``: DataLoader workers cutting patches and the batches each prepares
      ahead (predictions are the same with any number); ``batch_size``: patches per pass of an embedding
      computed here.
    - ``allow_lowres``: predict from patches cut from a coarser image than the model was trained on (e.g. the
      ``"hires"`` thumbnail of a slide without its full-resolution image). Refused by default: each embedding and
      model record the µm per pixel of the image their patches came from (``source_um_per_px``), and a slide more
      than 1.2 x coarser than the model's is an error (see :func:`check_source_resolution`).

    The old keywords (``weights=``, ``precision=``, ``num_workers=``, ``prefetch_factor=``, ``allow_lowres=``,
    ``backend=``) still work for one release, with a ``FutureWarning`` giving the new spelling.
embedding_key
    ``.obsm`` key of the features (embedding mode); default the key the model was trained on. When absent it
    is computed with the model's recorded encoder, weights and patch settings.
%(key_added)s
device
    Torch device for the forward passes: ``"auto"`` (default: CUDA when available, else CPU), ``"cpu"``
    (bit-for-bit reproducible predictions), ``"cuda"``, ...
%(library_key)s
batch_size
    Spots per forward pass.
max_dense_bytes
    Largest dense layer held in memory (default 1 GiB). A larger one is written as a chunked dask array whose
    chunks (rows of spots) are predicted when read or written (``write_h5ad`` / ``write_zarr`` stream it).
spread
    Also write the standard deviation of a seed ensemble's member predictions (``agl_fit(n_seeds=...)``), per
    spot and gene, in ``scale``: a measure of how much the prediction depends on the training seed (not a
    calibrated error bar). Default ``None``: written for an ensemble; ``True`` with a single network is an
    error.
progress
    Progress bar of an embedding computed here: ``True``, ``False``, or ``None`` (default) to follow scanpy's
    verbosity (shown unless ``sc.settings.verbosity`` is 0, ``"error"``).
"""
)


def predict_options(
    model: AGLModel,
    *,
    encoder: Any = None,
    embedding_key: str | None = None,
    device: str = "auto",
    library_key: str | None = None,
    batch_size: int = 512,
    max_dense_bytes: float = DENSE_LAYER_BYTES,
    scale: PredScale = "model",
    spread: bool | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The arguments of :func:`predict_core` from those of a front door, checked before any work.

    ``encoder`` (an :class:`~agl_scverse.EncoderConfig`, a dict of its fields, an encoder module or name, or None)
    gives the weights file, how encoders run (precision, backend, workers, batch size of an embedding computed
    here), ``allow_lowres``, and an explicit encoder; the fields the model records (patch size, test-time
    augmentation, timm arguments) are the model's, and setting them is warned about.
    """
    check_choice("scale", scale, K.PRED_SCALES)
    cfg, given = as_encoder_config(encoder), explicit_fields(encoder)
    ignored = sorted(set(given) & {"patch_px", "patch_um", "tta", "encoder_kwargs", "pretrained", "strict"})
    if ignored:
        warnings.warn(
            f"encoder fields {ignored} are not used when predicting: the model's recorded encoder settings are "
            "(an embedding with other settings would not match the model). Leave them out.",
            UserWarning,
            stacklevel=4,  # the caller of a front door (through its keyword wrapper)
        )
    return {
        "embedding_key": embedding_key, "weights": cfg.weights, "device": device, "library_key": library_key,
        "batch_size": batch_size, "max_dense_bytes": max_dense_bytes, "encoder": given.get("encoder"),
        "scale": scale, "run": _run_options(cfg.precision, cfg.num_workers, cfg.prefetch_factor, cfg.backend),
        "allow_lowres": cfg.allow_lowres, "spread": _want_spread(model, spread), "progress": progress,
        "embed_batch_size": cfg.batch_size,
    }  # fmt: skip


def _open(data: Any, model: AGLModel | str | Path, key_added: str) -> tuple[AnnData, AGLModel, Keys]:
    """The slide's AnnData (a SpatialData's table), the model (loaded from its directory) and the keys."""
    adata = as_anndata(data)
    model = AGLModel.coerce(model)
    if adata.n_obs == 0:
        raise ValueError("The slide has no spots.")
    return adata, model, Keys(key_added)


@encoder_keywords(*PREDICT_KEYWORDS)
@d.dedent
def agl_predict(
    data: Any,
    model: AGLModel | str | Path,
    *,
    genes: PredictGenes | Sequence[str] = "selected",
    scale: PredScale = "model",
    encoder: EncoderConfig | Mapping[str, Any] | Any = None,
    embedding_key: str | None = None,
    key_added: str = K.DEFAULT_KEY,
    device: str = "auto",
    library_key: str | None = None,
    batch_size: int = 512,
    max_dense_bytes: float = DENSE_LAYER_BYTES,
    spread: bool | None = None,
    progress: bool | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Predict expression of the model's genes into a slide that measured them (scanpy style: in place or a copy).

    One of the two front doors of one prediction path: this one writes into the slide, beside its measured
    counts; :func:`predict_anndata` returns a new AnnData holding only the predictions (for an H&E-only slide, or
    a pipeline on predictions alone). Both take the same arguments and give the same values.

    Parameters
    ----------
    %(data)s
        It must hold the model's target genes (for an H&E-only slide use :func:`predict_anndata`).
    %(predict)s
    %(copy)s

    Returns
    -------
    None, or the copy with ``copy=True``. Writes

    - ``.layers[f"{key_added}_pred"]``: spots x all genes, float32, predictions (in ``scale``) for the chosen
      genes and **0** for every other gene, never NaN, so scanpy and squidpy tools accept it;
    - ``.var[f"{key_added}_predicted"]``: True for the genes with predictions. Pass it to scanpy as
      ``sc.pp.pca(adata, layer="agl_pred", mask_var="agl_predicted")`` and to squidpy as
      ``genes=adata.var_names[adata.var["agl_predicted"]]`` (a gene of zeros has no Moran's I);
    - ``.layers[f"{key_added}_pred_sd"]`` (seed ensembles): the members' spread, 0 where not predicted;
    - ``.uns[f"{key_added}_pred"]``: how the layer was made (:func:`prediction_record`: scale, transform, ...);
    - the model's description of its run (``.var`` roles and weights, ``.uns[key_added]``) where the slide has none;
    - a computed embedding.

    A SpatialData input gets them in its table.

    Raises
    ------
    KeyError
        The slide lacks some target genes of the model (or all its genes).
    ValueError
        The embedding was computed with other encoder settings, has another width, or holds NaN.

    Examples
    --------
    >>> agl.tl.agl_predict(adata_new, model)  # doctest: +SKIP
    >>> sc.pp.pca(adata_new, layer="agl_pred", mask_var="agl_predicted")  # doctest: +SKIP
    >>> pred = agl.tl.agl_predict(adata_new, model, scale="log1p_cp10k", copy=True)  # doctest: +SKIP
    """
    adata, model, keys = _open(data, model, key_added)
    opts = predict_options(
        model, encoder=encoder, embedding_key=embedding_key, device=device, library_key=library_key,
        batch_size=batch_size, max_dense_bytes=max_dense_bytes, scale=scale, spread=spread, progress=progress,
    )  # fmt: skip
    check_owned(adata, layers=[keys.pred_layer, keys.spread_layer], var=[keys.predicted], uns=[keys.pred_uns])
    if library_key is not None:
        resolve_library_key(adata, library_key)  # a column of slide labels, not coordinates
    layer, sd, new_emb, pred_genes = predict_core(adata, model, into=adata, genes=genes, **opts)
    record = prediction_record(model, scale, genes, len(pred_genes), observed=True)
    target = adata.copy() if copy else adata
    run_var, run_uns = _run_writes(target, model, keys)
    written = {
        "layers": [keys.pred_layer] + ([keys.spread_layer] if sd is not None else []),
        "var": [keys.predicted, *run_var],
        "obsm": [new_emb[0]] if new_emb else [],
        "uns": [keys.pred_uns] + ([K.EMBED_UNS] if new_emb else []) + ([keys.uns] if run_uns is not None else []),
    }
    with restore_on_error(target, **written):
        target.layers[keys.pred_layer] = layer
        if sd is not None:
            target.layers[keys.spread_layer] = sd
        target.var[keys.predicted] = target.var_names.isin(pred_genes)
        for col, values in run_var.items():
            target.var[col] = values
        if run_uns is not None:
            target.uns[keys.uns] = run_uns
        target.uns[keys.pred_uns] = record
        if new_emb is not None:
            _put_embedding(target, new_emb)
    logg.info(
        f"agl_predict: .layers[{keys.pred_layer!r}] holds predictions for {len(pred_genes)} genes "
        f"({len(model.targets)} targets; .var[{keys.predicted!r}]), 0 elsewhere."
    )
    if copy:
        return target
    if target is not data:  # a SpatialData: write into its table
        update_table(data, target, **written)
    return None


def _put_embedding(target: AnnData, new_emb: tuple) -> None:
    """Write an embedding computed while predicting, and its record, into ``target``."""
    key, features, rec = new_emb
    target.obsm[key] = features
    target.uns[K.EMBED_UNS] = {**dict(target.uns.get(K.EMBED_UNS, {}) or {}), key: rec}


@encoder_keywords(*PREDICT_KEYWORDS)
@d.dedent
def predict_anndata(
    data: Any,
    model: AGLModel | str | Path,
    *,
    genes: PredictGenes | Sequence[str] = "selected",
    scale: PredScale = "model",
    encoder: EncoderConfig | Mapping[str, Any] | Any = None,
    embedding_key: str | None = None,
    key_added: str = K.DEFAULT_KEY,
    device: str = "auto",
    library_key: str | None = None,
    batch_size: int = 512,
    max_dense_bytes: float = DENSE_LAYER_BYTES,
    spread: bool | None = None,
    progress: bool | None = None,
) -> AnnData:
    """A new AnnData of predicted expression at a slide's spots (e.g. an H&E-only slide).

    The other front door of :func:`agl_predict`'s prediction path: the same arguments (but ``copy``) and the same
    values, returned as an AnnData of the predicted genes only; ``data`` is not modified.

    Parameters
    ----------
    %(data)s
        Only its spots, images (and embedding) are used; it may have no genes at all.
    %(predict)s

    Returns
    -------
    An AnnData of the model's predicted genes (``genes``: by default the targets and selected auxiliaries) at the
    slide's spots, ready for a scanpy pipeline without masks (``sc.pp.pca(pred)``, ``sc.pp.neighbors``,
    ``sc.tl.leiden``, ``sq.gr.spatial_autocorr``): ``.X`` and ``.layers[f"{key_added}_pred"]`` hold the
    predictions (in ``scale``; with ``max_dense_bytes`` exceeded, both are one chunked dask array, computed when
    read or written); ``.obs``, ``.obsm`` and ``.uns["spatial"]`` are carried over; ``.var`` describes the genes
    as ``agl_fit`` does (``role``, ``prior``, ``prior_rank``, ``weight``, ``selected``) and ``.uns[key_added]``
    holds the model's run record (:func:`model_run_record`: k, threshold, training history), so every plot of
    :mod:`agl_scverse.pl` reads it; ``.var[f"{key_added}_predicted"]`` is True for all of them (the same code
    runs on this AnnData and on a slide after :func:`agl_predict`); ``.layers[f"{key_added}_pred_sd"]`` holds a
    seed ensemble's spread; ``.uns[f"{key_added}_pred"]`` records the scale, with ``observed=False`` (``.X`` is
    not measured expression).

    Examples
    --------
    >>> he = agl.io.read_legacy_st("sections", sections=["C6"])[:, []].copy()  # doctest: +SKIP
    >>> pred = agl.tl.predict_anndata(he, "my_model", scale="log1p_cp10k")  # doctest: +SKIP
    >>> sc.pp.pca(pred); sc.pp.neighbors(pred); sc.tl.leiden(pred)  # doctest: +SKIP
    """
    adata, model, keys = _open(data, model, key_added)
    opts = predict_options(
        model, encoder=encoder, embedding_key=embedding_key, device=device, library_key=library_key,
        batch_size=batch_size, max_dense_bytes=max_dense_bytes, scale=scale, spread=spread, progress=progress,
    )  # fmt: skip
    X, sd, new_emb, pred_genes = predict_core(adata, model, into=None, genes=genes, **opts)
    out = predictions_anndata(adata, model, keys, X, pred_genes, scale, genes)
    if sd is not None:
        out.layers[keys.spread_layer] = sd
    if new_emb is not None:
        _put_embedding(out, new_emb)
    logg.info(f"predict_anndata: new AnnData of {len(pred_genes)} predicted genes at {out.n_obs} spots.")
    return out


def predictions_anndata(
    adata: AnnData, model: AGLModel, keys: Keys, X, pred_genes: Sequence[str], scale: str, genes="selected"
) -> AnnData:
    """The AnnData of :func:`predict_anndata` around predictions ``X`` (spots x ``pred_genes``) of ``adata``.

    ``.obs``, ``.obsm`` and ``.uns["spatial"]`` / ``.uns["agl_embeddings"]`` come from ``adata``; ``.var`` and
    ``.uns`` describe the model's run (:func:`model_run_record`) and the predictions (:func:`prediction_record`).
    """
    var = pd.DataFrame(index=pd.Index(list(pred_genes), name=None))
    run_var, run_uns = model_run_record(model, var.index, keys)
    for c, v in run_var.items():
        var[c] = v
    var[keys.role] = var[keys.role].cat.remove_unused_categories().cat.set_categories([K.ROLE_TARGET, K.ROLE_AUX])
    var[keys.predicted] = True
    out = AnnData(X=X.astype(np.float32), obs=adata.obs.copy(), var=var)
    for kk, v in adata.obsm.items():
        out.obsm[kk] = v.copy() if hasattr(v, "copy") else v
    for kk in (K.SPATIAL_KEY, K.EMBED_UNS):
        if kk in adata.uns:
            out.uns[kk] = adata.uns[kk]
    out.layers[keys.pred_layer] = out.X.copy() if isinstance(out.X, np.ndarray) else out.X
    out.uns[keys.pred_uns] = prediction_record(model, scale, genes, len(pred_genes), observed=False)
    out.uns[keys.uns] = run_uns
    return out
