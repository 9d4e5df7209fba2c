"""``agl_predict``: apply a fitted :class:`~agl_scverse.model.AGLModel` to a slide.

Everything is checked before anything is written: the model's genes against the slide's (when it has
expression), the embedding's recorded encoder settings against the model's, the embedding itself (shape, NaN).
A missing embedding is computed with the model's recorded encoder, weights file (its sha256 is checked) and patch
size, into a copy, and written together with the predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from .. import _constants as K
from .._constants import Keys
from .._utils import as_anndata, sha256_file
from ..model import AGLModel

__all__ = ["agl_predict", "check_embedding_matches"]

_CHECKED = ("encoder", "weights_sha256", "patch_px", "patch_um")


def _as_model(model: AGLModel | str | Path) -> AGLModel:
    if isinstance(model, AGLModel):
        return model
    if isinstance(model, str | Path):
        return AGLModel.load(model)
    raise TypeError(f"model must be an AGLModel or the path of a saved model, got {type(model).__name__}.")


def check_embedding_matches(adata: AnnData, key: str, model: AGLModel) -> None:
    """Raise if ``.uns["agl_embeddings"][key]`` records other encoder settings than the model was trained with.

    Compared: encoder name, weights sha256, patch size in pixels and in µm (each only when both sides record it).
    An embedding without a record (brought by the user) is accepted with a warning when the model has one.

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
                f"model's encoder ({enc.get('name')!r}, {enc.get('patch_px')} px, {enc.get('patch_um')} µm)."
            )
        return
    if not enc.get("recorded"):
        return
    data_side = {
        "encoder": str(rec.get("encoder", "")),
        "weights_sha256": str(rec.get("weights_sha256", "")),
        "patch_px": rec.get("patch_px"),
        "patch_um": rec.get("patch_um"),
    }
    model_side = {
        "encoder": str(enc.get("name", "")),
        "weights_sha256": str(enc.get("weights_sha256", "")),
        "patch_px": enc.get("patch_px"),
        "patch_um": enc.get("patch_um"),
    }
    diffs = []
    for f in _CHECKED:
        a, b = data_side[f], model_side[f]
        if a in (None, "") or b in (None, ""):
            continue
        same = np.isclose(float(a), float(b)) if f in ("patch_px", "patch_um") else a == b
        if not same:
            diffs.append(f"{f}: data {a!r} vs model {b!r}")
    if diffs:
        raise ValueError(
            f".obsm[{key!r}] was computed with other encoder settings than the model was trained on ("
            + "; ".join(diffs)
            + "). Re-embed the slide with the model's settings (agl.pp.embed_patches(adata, encoder="
            f"{model_side['encoder']!r}, weights=<the same file>, patch_px={model_side['patch_px']}, "
            f"patch_um={model_side['patch_um']}, key_added=<a new key>)) or drop .obsm[{key!r}] to let "
            "agl_predict do it."
        )


def _compute_embedding(adata: AnnData, model: AGLModel, key: str, weights, device, library_key) -> tuple:
    """Embed with the model's recorded encoder settings into a copy; return (features, record)."""
    from ..pp.embeddings import embed_patches

    enc = model.config.get("encoder") or {}
    if not enc.get("recorded") or not enc.get("name"):
        raise KeyError(
            f".obsm[{key!r}] is missing and the model records no encoder settings (its training embedding was "
            "brought by the user). Compute the same embedding for this slide and store it in .obsm first."
        )
    sha = str(enc.get("weights_sha256") or "")
    path = weights if weights is not None else (enc.get("weights_path") or None)
    if sha:
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f".obsm[{key!r}] is missing and the encoder weights file the model was trained with ({path!r}, "
                f"sha256 {sha[:12]}...) is gone. Pass weights=<path to that file> or embed the slide yourself."
            )
        if sha256_file(path) != sha:
            raise ValueError(
                f"The weights file {path} differs from the one the model was trained with (sha256 {sha[:12]}...)."
            )
    else:
        path = None
    tmp = embed_patches(
        adata,
        encoder=enc["name"],
        weights=path,
        patch_px=int(enc.get("patch_px") or K.DEFAULT_PATCH_PX),
        patch_um=float(enc.get("patch_um") or K.DEFAULT_PATCH_UM),
        device=device,
        library_key=library_key,
        key_added=key,
        seed=int(enc.get("seed", 0)),
        copy=True,
    )
    return np.asarray(tmp.obsm[key], dtype=np.float32), tmp.uns[K.EMBED_UNS][key]


def agl_predict(
    data: Any,
    model: AGLModel | str | Path,
    *,
    embedding_key: str | None = None,
    weights: str | Path | None = None,
    key_added: str = K.DEFAULT_KEY,
    copy: bool = False,
    device: str = "cpu",
    library_key: str | None = None,
    batch_size: int = 512,
) -> AnnData | None:
    """Predict expression of the model's genes on a slide.

    Parameters
    ----------
    data
        AnnData (with or without expression) or SpatialData.
    model
        A fitted :class:`~agl_scverse.model.AGLModel` or the directory it was saved to.
    embedding_key
        ``.obsm`` key of the features (embedding mode); default the key the model was trained on. When absent it
        is computed with the model's recorded encoder, weights and patch settings.
    weights
        Encoder weights file, when the path recorded in the model moved (its sha256 must match).
    key_added
        Prefix of the written layer: ``.layers[f"{key_added}_pred"]`` (default ``"agl_pred"``).
    copy
        Return a modified copy instead of writing in place.
    device
        Torch device for the forward passes (``"cpu"`` gives bit-for-bit reproducible predictions).
    library_key
        ``.obs`` column telling slides apart (for patches).
    batch_size
        Spots per forward pass.

    Returns
    -------
    - slide with expression (some of the model's genes in ``var_names``): writes ``.layers[pred_layer]``
      (spots x all genes, float32, predictions in the model's expression scale for the targets and the selected
      auxiliaries, NaN for every other gene); returns None, or the copy with ``copy=True`` (or a SpatialData
      input).
    - H&E-only slide (``n_vars == 0`` or none of the model's genes present): a NEW AnnData of the predicted
      genes at the slide's spots (``.X`` and ``.layers[pred_layer]``), with ``.obs``, ``.obsm`` and
      ``.uns["spatial"]`` carried over and ``.var[role]`` / ``.var[weight]``.

    Raises
    ------
    KeyError
        The slide has expression but lacks some target genes of the model.
    ValueError
        The embedding was computed with other encoder settings, has another width, or holds NaN.

    Examples
    --------
    >>> agl.tl.agl_predict(adata_new, model)  # doctest: +SKIP
    >>> adata_new.layers["agl_pred"].shape  # doctest: +SKIP
    """
    is_anndata = isinstance(data, AnnData)
    adata = as_anndata(data)
    model = _as_model(model)
    keys = Keys(key_added)
    genes = model.genes
    pred_genes = model.predicted_genes
    present = adata.var_names.isin(genes) if adata.n_vars else np.zeros(0, bool)
    has_expression = adata.n_vars > 0 and bool(present.any())
    if adata.n_obs == 0:
        raise ValueError("The slide has no spots.")
    if has_expression:
        missing = [g for g in model.targets if g not in adata.var_names]
        if missing:
            raise KeyError(
                f"{len(missing)} target gene(s) of the model are not in adata.var_names: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}. Use a slide measuring the same genes (check the gene "
                "naming: symbols vs Ensembl ids), or pass the slide without expression (e.g. adata[:, []]) to get "
                "a new AnnData of predictions."
            )

    new_emb = None
    if model.mode == "embedding":
        key = embedding_key or model.config.get("embedding_key")
        if not key:
            raise ValueError("The model records no embedding key; pass embedding_key=.")
        n_in = (model.config.get("net") or {}).get("n_in")
        if key in adata.obsm:
            check_embedding_matches(adata, key, model)
            features = np.asarray(adata.obsm[key], dtype=np.float32)
        else:
            features, rec = _compute_embedding(adata, model, key, weights, device, library_key)
            new_emb = (key, features, rec)
        if features.ndim != 2 or (n_in is not None and features.shape[1] != n_in):
            raise ValueError(
                f".obsm[{key!r}] has shape {features.shape}; the model expects {n_in} features per spot. "
                "Embed the slide with the model's encoder."
            )
        bad = ~np.isfinite(features).all(axis=1)
        if bad.any():
            raise ValueError(f".obsm[{key!r}] holds NaN/inf for {int(bad.sum())} spots; recompute the embedding.")
    else:
        from ..pp.patches import SpotPatches

        enc = model.config.get("encoder") or {}
        features = SpotPatches(
            adata,
            patch_px=int(enc.get("patch_px") or K.DEFAULT_PATCH_PX),
            patch_um=float(enc.get("patch_um") or K.DEFAULT_PATCH_UM),
            library_key=library_key,
        )
    model.net.to(device)
    try:
        pred = model.predict(features, batch_size=batch_size)
    finally:
        model.net.cpu()
    col = {g: i for i, g in enumerate(genes)}
    weights_arr = model.weights

    if not has_expression:
        sel = [col[g] for g in pred_genes]
        var = pd.DataFrame(index=pd.Index(pred_genes, name=None))
        roles = model.roles
        var[keys.role] = pd.Categorical([roles[i] for i in sel], categories=[K.ROLE_TARGET, K.ROLE_AUX])
        var[keys.weight] = weights_arr[sel]
        out = AnnData(X=pred[:, sel].astype(np.float32), obs=adata.obs.copy(), var=var)
        for kk, v in adata.obsm.items():
            out.obsm[kk] = v.copy() if hasattr(v, "copy") else v
        for kk in (K.SPATIAL_KEY, K.EMBED_UNS):
            if kk in adata.uns:
                out.uns[kk] = adata.uns[kk]
        out.layers[keys.pred_layer] = out.X.copy()
        if new_emb is not None:
            out.obsm[new_emb[0]] = new_emb[1]
            out.uns[K.EMBED_UNS] = {**dict(out.uns.get(K.EMBED_UNS, {}) or {}), new_emb[0]: new_emb[2]}
        logg.info(f"agl_predict: new AnnData of {len(pred_genes)} predicted genes at {out.n_obs} spots.")
        return out

    target = adata.copy() if copy else adata
    layer = np.full((target.n_obs, target.n_vars), np.nan, dtype=np.float32)
    pos = target.var_names.get_indexer(pred_genes)
    ok = pos >= 0
    layer[:, pos[ok]] = pred[:, [col[g] for g, o in zip(pred_genes, ok) if o]]
    target.layers[keys.pred_layer] = layer
    if new_emb is not None:
        target.obsm[new_emb[0]] = new_emb[1]
        target.uns[K.EMBED_UNS] = {**dict(target.uns.get(K.EMBED_UNS, {}) or {}), new_emb[0]: new_emb[2]}
    logg.info(
        f"agl_predict: .layers[{keys.pred_layer!r}] holds predictions for {int(ok.sum())} genes "
        f"({len(model.targets)} targets), NaN elsewhere."
    )
    if copy or not is_anndata:
        return target
    return None
