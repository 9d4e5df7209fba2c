"""Apply a fitted :class:`~agl_scverse.model.AGLModel` to a slide (everything checked before a write)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys, PredScale
from agl_scverse._docs import d
from agl_scverse._legacy_keywords import PREDICT_KEYWORDS, encoder_keywords
from agl_scverse._spatial import resolve_library_key
from agl_scverse._transaction import check_owned, restore_on_error
from agl_scverse._utils import resolve_device
from agl_scverse._validate import check_choice, check_positive
from agl_scverse.configs import EncoderConfig, as_encoder_config, explicit_fields
from agl_scverse.io._spatialdata import as_anndata, tool_return
from agl_scverse.model import AGLModel
from agl_scverse.pp._embed import put_embedding

from ._predict_inputs import model_inputs, run_options
from ._predict_records import model_run_record, prediction_record, run_writes
from ._predict_values import DENSE_LAYER_BYTES, prediction_values, spread_layer, want_spread

__all__ = [
    "agl_predict",
    "predict_anndata",
    "predict_core",
    "predict_options",
    "predictions_anndata",
    "prediction_layer",
    "prediction_record",
    "model_run_record",
    "spread_layer",
    "PREDICT_GENES",
]

#: Accepted string values of ``genes`` in :func:`agl_predict`.
PREDICT_GENES = ("selected", "targets", "all")
PredictGenes = Literal["selected", "targets", "all"]


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
    """The one prediction path of :func:`agl_predict`, :func:`predict_anndata` and :func:`predict_chunked`."""
    check_choice("scale", scale, consts.PRED_SCALES)
    check_positive("batch_size", batch_size, integer=True)
    if into is not None:
        _check_genes(into, model)
    dev = str(resolve_device(device))
    run = run if run is not None else run_options("auto", 0, 2)
    features, new_emb = model_inputs(
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
    layer = prediction_values(model, *args)
    if not dense:
        logg.info(
            f"predict: a dense layer would take {copies * n_obs * width * 4 / 2**30:.1f} GiB (> "
            f"{max_dense_bytes / 2**30:.1f} GiB): writing a chunked dask array ({layer.numblocks[0]} x "
            f"{layer.numblocks[1]} chunks), computed when read or written."
        )
    sd = spread_layer(model, *args) if spread else None
    return layer, sd, new_emb, pred_genes


def prediction_layer(adata: AnnData, model: AGLModel, genes: str | Sequence[str] = "selected", **kwargs: Any):
    """The prediction layer of :func:`agl_predict`, computed without writing anything."""
    opts = predict_options(model, **{"spread": False, **kwargs})  # the spread only when asked for
    layer, sd, new_emb, pred_genes = predict_core(adata, model, into=adata, genes=genes, **opts)
    return ((layer, sd) if opts["spread"] else layer), new_emb, pred_genes


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
    The encoder, patch size and test-time augmentation are the model's recorded ones (the fit's own config may be
    passed as it is; a patch size or ``tta`` other than the model's is warned about); from the config are used

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
    """The arguments of :func:`predict_core` from those of a front door, checked before any work."""
    check_choice("scale", scale, consts.PRED_SCALES)
    cfg, given = as_encoder_config(encoder), explicit_fields(encoder)
    rec = model.config.get("encoder") or {}
    ignored = sorted(n for n in ("patch_px", "patch_um", "tta") if n in given and _differs_from_record(n, given, rec))
    if ignored:
        warnings.warn(
            f"encoder fields {ignored} differ from the model's and are not used when predicting: the model's recorded "
            "encoder settings are (an embedding with other settings would not match the model). Leave them out.",
            UserWarning,
            stacklevel=4,  # the caller of a front door (through its keyword wrapper)
        )
    module = given.get("encoder")
    if isinstance(module, str) and module in {rec.get(k) for k in ("encoder", "spec", "preset")} - {None}:
        module = None  # the model's own encoder, named (e.g. the fit's EncoderConfig reused): rebuilt from its record
    return {
        "embedding_key": embedding_key, "weights": cfg.weights, "device": device, "library_key": library_key,
        "batch_size": batch_size, "max_dense_bytes": max_dense_bytes, "encoder": module,
        "scale": scale, "run": run_options(cfg.precision, cfg.num_workers, cfg.prefetch_factor, cfg.backend),
        "allow_lowres": cfg.allow_lowres, "spread": want_spread(model, spread), "progress": progress,
        "embed_batch_size": cfg.batch_size,
    }  # fmt: skip


def _differs_from_record(name: str, given: dict, rec: dict) -> bool:
    """Whether an encoder field given to a front door differs from the model's record (absent: it differs)."""
    if name == "tta":
        views = {False: 1, True: 8}.get(given[name], given[name]) if isinstance(given[name], bool) else given[name]
        return int(views) != int(rec.get("tta") or 1)
    default = {"patch_px": consts.DEFAULT_PATCH_PX, "patch_um": consts.DEFAULT_PATCH_UM}[name]
    return not np.isclose(float(given[name]), float(rec.get(name) or default))


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
    key_added: str = consts.DEFAULT_KEY,
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
    run_var, run_uns = run_writes(target, model, keys)
    written = {
        "layers": [keys.pred_layer] + ([keys.spread_layer] if sd is not None else []),
        "var": [keys.predicted, *run_var],
        "obsm": [new_emb[0]] if new_emb else [],
        "uns": [keys.pred_uns] + ([consts.EMBED_UNS] if new_emb else []) + ([keys.uns] if run_uns is not None else []),
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
            put_embedding(target, *new_emb)
    logg.info(
        f"agl_predict: .layers[{keys.pred_layer!r}] holds predictions for {len(pred_genes)} genes "
        f"({len(model.targets)} targets; .var[{keys.predicted!r}]), 0 elsewhere."
    )
    return tool_return(data, target, copy, **written)


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
    key_added: str = consts.DEFAULT_KEY,
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
        put_embedding(out, *new_emb)
    logg.info(f"predict_anndata: new AnnData of {len(pred_genes)} predicted genes at {out.n_obs} spots.")
    return out


def predictions_anndata(
    adata: AnnData, model: AGLModel, keys: Keys, X, pred_genes: Sequence[str], scale: str, genes="selected"
) -> AnnData:
    """The AnnData of :func:`predict_anndata` around predictions ``X`` (spots x ``pred_genes``) of ``adata``."""
    var = pd.DataFrame(index=pd.Index(list(pred_genes), name=None))
    run_var, run_uns = model_run_record(model, var.index, keys)
    for c, v in run_var.items():
        var[c] = v
    var[keys.role] = (
        var[keys.role].cat.remove_unused_categories().cat.set_categories([consts.ROLE_TARGET, consts.ROLE_AUX])
    )
    var[keys.predicted] = True
    out = AnnData(X=X.astype(np.float32), obs=adata.obs.copy(), var=var)
    for kk, v in adata.obsm.items():
        out.obsm[kk] = v.copy() if hasattr(v, "copy") else v
    for kk in (consts.SPATIAL_KEY, consts.EMBED_UNS):
        if kk in adata.uns:
            out.uns[kk] = adata.uns[kk]
    out.layers[keys.pred_layer] = out.X.copy() if isinstance(out.X, np.ndarray) else out.X
    out.uns[keys.pred_uns] = prediction_record(model, scale, genes, len(pred_genes), observed=False)
    out.uns[keys.uns] = run_uns
    return out
