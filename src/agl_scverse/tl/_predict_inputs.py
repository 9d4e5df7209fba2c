"""What a model reads on a slide: its embedding, checked against the model's record, or computed."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._resolution import check_source_resolution
from agl_scverse._validate import check_choice, check_positive
from agl_scverse.configs import EncoderConfig
from agl_scverse.encoders._record import RECORD_CHECKED, rebuild_encoder
from agl_scverse.model import AGLModel
from agl_scverse.pp._context import context_kwargs, context_recipe_diff, spatial_context
from agl_scverse.pp._embed import embed_patches
from agl_scverse.pp._patches import SpotPatches, check_patch_batch

__all__ = ["check_embedding_matches", "check_source_resolution", "model_inputs", "run_options"]


def check_embedding_matches(
    adata: AnnData, key: str, model: AGLModel, allow_lowres: bool = False, context: bool = True
) -> None:
    """Raise if ``.uns["agl_embeddings"][key]`` records other encoder settings than the model was trained with."""
    enc = model.config.get("encoder") or {}
    rec = (adata.uns.get(consts.EMBED_UNS, {}) or {}).get(key)
    if not rec:
        if enc.get("recorded"):
            logg.warning(
                f".obsm[{key!r}] has no record in .uns[{consts.EMBED_UNS!r}]; cannot check that it was computed with the "
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
    """Rebuild the model's spatial-context features on this slide from its recorded recipe (into a shell AnnData)."""
    enc = model.config.get("encoder") or {}
    recipe = dict(enc["context"])
    base_key = str(recipe["base_key"])
    if consts.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: the model's spatial-context features need spot coordinates.")
    shell = AnnData(obs=adata.obs.copy())
    shell.obsm[consts.SPATIAL_KEY] = np.asarray(adata.obsm[consts.SPATIAL_KEY])
    shell.uns[consts.SPATIAL_KEY] = adata.uns.get(consts.SPATIAL_KEY, {})
    records = dict(adata.uns.get(consts.EMBED_UNS, {}) or {})
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
    shell.uns[consts.EMBED_UNS] = records
    run = run or {}
    spatial_context(
        shell, base_key, **context_kwargs(recipe), fov_key=fov_key, library_key=library_key, key_added=key,
        weights=weights, encoder=encoder, device=device, precision=run.get("precision", "auto"),
        num_workers=run.get("num_workers", 0),
    )  # fmt: skip
    logg.info(f"Rebuilt .obsm[{key!r}] from .obsm[{base_key!r}] with the model's spatial-context recipe.")
    return np.asarray(shell.obsm[key], dtype=np.float32), dict(shell.uns[consts.EMBED_UNS][key])


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
    """Embed with the model's recorded encoder (rebuilt from its config, or ``encoder``) into a copy."""
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
        encoder=pair, patch_px=int(enc.get("patch_px") or consts.DEFAULT_PATCH_PX),
        patch_um=float(enc.get("patch_um") or consts.DEFAULT_PATCH_UM), tta=int(enc.get("tta") or 1),
        allow_lowres=allow_lowres, batch_size=embed_batch_size, **run,
    )  # fmt: skip
    tmp = embed_patches(
        adata, cfg, device=device, library_key=library_key, key_added=key, seed=int(enc.get("seed", 0)), copy=True,
        progress=progress,
    )  # fmt: skip
    rec = tmp.uns[consts.EMBED_UNS][key]
    check_source_resolution(rec, enc, allow_lowres)
    return np.asarray(tmp.obsm[key], dtype=np.float32), rec


def model_inputs(
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
            int(enc.get("patch_px") or consts.DEFAULT_PATCH_PX),
            float(enc.get("patch_um") or consts.DEFAULT_PATCH_UM),
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


def run_options(precision: str, num_workers: int, prefetch_factor: int, backend: str = "auto") -> dict:
    """How encoders run here (checked): passed to ``AGLModel.predict`` and ``embed_patches``."""
    check_choice("precision", precision, consts.PRECISIONS)
    check_choice("backend", backend, consts.BACKENDS)
    check_positive("num_workers", num_workers, integer=True, allow_zero=True)
    check_positive("prefetch_factor", prefetch_factor, integer=True)
    return {
        "precision": precision, "num_workers": int(num_workers), "prefetch_factor": int(prefetch_factor),
        "backend": backend,
    }  # fmt: skip
