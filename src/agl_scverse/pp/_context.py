"""Spatial context of spot embeddings: neighbour aggregates, a wider field of view and a slide summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg
from scipy import sparse

from agl_scverse import _constants as consts
from agl_scverse._docs import d
from agl_scverse._spatial import microns_per_pixel, resolve_library_key
from agl_scverse._transaction import restore_on_error
from agl_scverse._utils import versions
from agl_scverse._validate import check_choice, check_positive
from agl_scverse.encoders._record import RECORD_CHECKED, rebuild_encoder
from agl_scverse.io._spatialdata import as_anndata, tool_return

from ._embed import embed_patches, put_embedding

__all__ = [
    "spatial_context",
    "CONTEXT_AGGREGATIONS",
    "CONTEXT_CHECKED",
    "DEFAULT_CONTEXT_NEIGHS",
    "context_kwargs",
    "context_recipe_diff",
    "check_context_within_groups",
]

#: Neighbour aggregations (see :func:`spatial_context`).
CONTEXT_AGGREGATIONS = ("mean", "gaussian", "max", "std")
CONTEXT_OUTPUTS = ("blend", "concat")
CONTEXT_SLIDE = ("append", "subtract")
#: Defaults of the graph (k nearest spots of the same library) and of the aggregations with ``output="concat"``.
DEFAULT_CONTEXT_NEIGHS = 12
DEFAULT_CONTEXT_AGGREGATION = ("mean", "std")
#: Recipe fields that must agree between a slide's context features and a model's (see agl_predict).
CONTEXT_CHECKED: tuple[str, ...] = ("graph", "n_neighs", "n_rings", "grid_neighs", "radius_um", "aggregation")
CONTEXT_CHECKED += ("include_self", "output", "alpha", "fov_patch_um", "slide")
_CHUNK_BYTES = 64 * 2**20  # output rows computed at a time


def _norm(v: Any) -> Any:
    """A recipe value as compared: numbers as floats, missing / NaN as None, the rest as strings."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    return str(v)


def context_recipe_diff(data_recipe: dict | None, model_recipe: dict | None) -> list[str]:
    """Fields of :data:`CONTEXT_CHECKED` on which two context recipes differ (a missing recipe differs from any)."""
    if not data_recipe and not model_recipe:
        return []
    if not data_recipe or not model_recipe:
        which = "data" if not data_recipe else "model"
        return [f"context: {which} has no spatial-context recipe"]
    out = []
    for f in CONTEXT_CHECKED:
        a, b = data_recipe.get(f), model_recipe.get(f)
        na, nb = _norm(a), _norm(b)
        same = np.isclose(na, nb) if isinstance(na, float) and isinstance(nb, float) else na == nb
        if not same:
            out.append(f"{f}: data {a!r} vs model {b!r}".replace("np.float64(", "(").replace("np.int64(", "("))
    return out


def context_kwargs(recipe: dict) -> dict[str, Any]:
    """Keyword arguments of :func:`spatial_context` that rebuild a recorded recipe (on another slide)."""
    r = {k: _norm(v) for k, v in recipe.items()}
    graph = r.get("graph") or "knn"
    fov = r.get("fov_patch_um")
    return {
        "n_neighs": int(r["n_neighs"]) if graph == "knn" else DEFAULT_CONTEXT_NEIGHS,
        "n_rings": int(r["n_rings"]) if graph == "rings" else None,
        "grid_neighs": int(r.get("grid_neighs") or 6),
        "radius_um": float(r["radius_um"]) if graph == "radius" else None,
        "aggregation": tuple(str(r.get("aggregation") or "mean").split("+")),
        "include_self": bool(r.get("include_self", True)),
        "output": str(r.get("output") or "concat"),
        "alpha": float(r.get("alpha") or 0.0),
        "fov_patch_um": float(fov) if fov else None,
        "slide": r.get("slide"),
    }


def check_context_within_groups(adata: AnnData, key: str, group_key: str) -> None:
    """Refuse context features whose neighbourhoods span several groups of ``group_key`` (folds would leak)."""
    rec = ((adata.uns.get(consts.EMBED_UNS) or {}).get(key) or {}).get("context")
    if not rec:
        return
    lib_key = _norm(rec.get("library_key"))
    grp = adata.obs[group_key].astype(str).to_numpy()
    if lib_key is None:
        spans = len(np.unique(grp)) > 1
        where = "one neighbourhood graph over all spots"
    elif lib_key not in adata.obs:
        raise KeyError(
            f".obsm[{key!r}] was built per library of .obs[{lib_key!r}], which is gone; rebuild the context with "
            f"agl.pp.spatial_context(..., library_key=<the section column>)."
        )
    else:
        per_lib = pd.Series(grp).groupby(adata.obs[lib_key].astype(str).to_numpy()).nunique()
        spans = bool((per_lib > 1).any())
        where = f"libraries of .obs[{lib_key!r}] spanning several groups: {per_lib[per_lib > 1].index.tolist()[:5]}"
    if spans:
        raise ValueError(
            f".obsm[{key!r}] holds spatial context built with {where}; neighbours would cross the groups of "
            f".obs[{group_key!r}] and leak between folds. Rebuild it per section: agl.pp.spatial_context(adata, "
            f"{rec.get('base_key')!r}, library_key={group_key!r})."
        )


def _library_groups(adata: AnnData, library_key: str | None) -> list[tuple[str | None, np.ndarray]]:
    """``(library id, row indices)`` per library (one group of all spots without a library key)."""
    if library_key is None:
        libs = list((adata.uns.get(consts.SPATIAL_KEY) or {}).keys())
        return [(str(libs[0]) if len(libs) == 1 else None, np.arange(adata.n_obs))]
    col = adata.obs[library_key]
    if col.isna().any():
        raise ValueError(f"obs[{library_key!r}] has missing values for {int(col.isna().sum())} spots; fill them.")
    names = col.astype(str).to_numpy()
    return list(pd.Series(names).groupby(names, sort=False).indices.items())


def _graph(
    coords: np.ndarray, graph: str, n_neighs: int, n_rings: int | None, grid_neighs: int, radius_px: float | None
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Connectivities and distances of one library's squidpy spatial graph (self excluded)."""
    import logging
    import warnings

    import squidpy as sq

    tmp = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(len(coords)).astype(str)))
    tmp.obsm[consts.SPATIAL_KEY] = coords
    sq_log = logging.getLogger("spatialdata._logging")  # squidpy logs one line per graph through it
    level = sq_log.level
    sq_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if graph == "knn":
                res = sq.gr.spatial_neighbors_knn(tmp, n_neighs=n_neighs, copy=True)
            elif graph == "rings":
                res = sq.gr.spatial_neighbors_grid(tmp, n_neighs=grid_neighs, n_rings=n_rings, copy=True)
            else:
                res = sq.gr.spatial_neighbors_radius(tmp, radius=radius_px, copy=True)
    finally:
        sq_log.setLevel(level)
    conn, dist = (sparse.csr_matrix(m, dtype=np.float32) for m in (res.connectivities, res.distances))
    conn.setdiag(0)
    conn.eliminate_zeros()
    conn.data[:] = 1.0
    return conn, dist


def _weights(conn: sparse.csr_matrix, dist: sparse.csr_matrix, gaussian: bool, include_self: bool) -> sparse.csr_matrix:
    """Row-normalised neighbourhood weights (self included when asked, or when a spot has no neighbour)."""
    w = conn.copy()
    if gaussian:
        d = conn.multiply(dist).tocsr()  # distances on the graph's edges
        has = np.diff(d.indptr) > 0
        nn = np.minimum.reduceat(d.data, d.indptr[:-1][has]) if has.any() else np.zeros(0)
        sigma = float(np.median(nn)) if len(nn) and np.median(nn) > 0 else 1.0
        d.data = np.exp(-(d.data**2) / (2 * sigma**2)).astype(np.float32)
        w = d
    lonely = np.asarray(w.sum(axis=1)).ravel() == 0
    diag = np.where(lonely | include_self, 1.0, 0.0).astype(np.float32)
    w = (w + sparse.diags(diag, format="csr")).tocsr()
    rowsum = np.asarray(w.sum(axis=1)).ravel()
    w = sparse.diags((1.0 / rowsum).astype(np.float32)) @ w
    return sparse.csr_matrix(w, dtype=np.float32)


def _neighbourhood_max(w: sparse.csr_matrix, X: np.ndarray, rows: slice) -> np.ndarray:
    """Element-wise max of ``X`` over each row's neighbourhood (the non-zeros of ``w[rows]``), slot by slot."""
    sub = w[rows]
    deg = np.diff(sub.indptr)
    out = X[sub.indices[sub.indptr[:-1]]].copy()  # every row has >= 1 entry (self or a neighbour)
    for j in range(1, int(deg.max()) if len(deg) else 0):
        has = np.flatnonzero(deg > j)
        out[has] = np.maximum(out[has], X[sub.indices[sub.indptr[:-1][has] + j]])
    return out


def _fov_features(
    adata: AnnData, base_rec: dict, library_key, fov_patch_um: float, fov_key: str, weights, encoder, embed_kw: dict
) -> tuple[np.ndarray, dict]:
    """The base encoder's features of ``fov_patch_um`` patches (same ``patch_px``), through embed_patches."""
    have = (adata.uns.get(consts.EMBED_UNS) or {}).get(fov_key)
    if fov_key in adata.obsm and have:
        both = [f for f in RECORD_CHECKED if f != "patch_um" and None not in (have.get(f), base_rec.get(f))]
        diffs = [f for f in both if _norm(have.get(f)) != _norm(base_rec.get(f))]
        diffs += [] if np.isclose(float(have.get("patch_um", -1)), fov_patch_um) else ["patch_um"]
        if diffs:
            raise ValueError(
                f".obsm[{fov_key!r}] (the wider field of view) differs from the base embedding's encoder or the "
                f"asked {fov_patch_um:g} µm patches in {diffs}. Pass another fov_key or drop it to recompute."
            )
        return np.asarray(adata.obsm[fov_key], dtype=np.float32), dict(have)
    if not base_rec.get("encoder") or not base_rec.get("patch_px"):
        raise ValueError(
            "A wider field of view needs the base embedding's encoder record (.uns['agl_embeddings'][key], written "
            "by agl.pp.embed_patches); this embedding has none. Embed with agl.pp.embed_patches or leave fov_scale."
        )
    pair = rebuild_encoder(base_rec, weights=weights, encoder=encoder, what="the base embedding")
    shell = AnnData(obs=adata.obs[[library_key]].copy() if library_key else pd.DataFrame(index=adata.obs_names))
    shell.obsm[consts.SPATIAL_KEY] = np.asarray(adata.obsm[consts.SPATIAL_KEY])
    shell.uns[consts.SPATIAL_KEY] = adata.uns.get(consts.SPATIAL_KEY, {})
    tmp = embed_patches(
        shell,
        {
            "encoder": pair,
            "patch_px": int(base_rec["patch_px"]),
            "patch_um": float(fov_patch_um),
            "allow_lowres": bool(base_rec.get("allow_lowres", False)),
            "tta": int(base_rec.get("tta") or 1),
            **{k: v for k, v in embed_kw.items() if k != "device"},
        },
        device=embed_kw.get("device", "auto"),
        library_key=library_key,
        key_added=fov_key,
        on_outside="pad",
        copy=True,
        seed=int(base_rec.get("seed") or 0),
    )
    return np.asarray(tmp.obsm[fov_key], dtype=np.float32), dict(tmp.uns[consts.EMBED_UNS][fov_key])


def _check_recipe(aggregation, output, slide, alpha, n_neighs, n_rings, grid_neighs, radius_um) -> tuple[str, tuple]:
    """Check the recipe's arguments; return the graph kind and the aggregations."""
    aggs = (aggregation,) if isinstance(aggregation, str) else tuple(aggregation)
    if not aggs:
        raise ValueError("aggregation must name at least one of " + str(CONTEXT_AGGREGATIONS))
    for a in aggs:
        check_choice("aggregation", a, CONTEXT_AGGREGATIONS)
    check_choice("output", output, CONTEXT_OUTPUTS)
    if slide is not None:
        check_choice("slide", slide, CONTEXT_SLIDE)
    if output == "blend" and (len(aggs) != 1 or aggs[0] not in ("mean", "gaussian")):
        raise ValueError(
            f"output='blend' takes one mean-type aggregation ('mean' or 'gaussian'), got {aggs}; "
            "use output='concat' for max / std or several aggregations."
        )
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    if n_rings is not None and radius_um is not None:
        raise ValueError("Pass n_rings (grid rings) or radius_um (µm), not both.")
    graph = "rings" if n_rings is not None else "radius" if radius_um is not None else "knn"
    if graph == "knn":
        check_positive("n_neighs", n_neighs, integer=True)
    elif graph == "rings":
        check_positive("n_rings", n_rings, integer=True)
        check_choice("grid_neighs", grid_neighs, (4, 6))
    else:
        check_positive("radius_um", radius_um)
    return graph, aggs


def _fill_library(out, Xl, rows_all, coords, recipe: dict, fov, width: int) -> None:
    """Write one library's context rows ``rows_all`` of ``out`` (chunks of rows; see :func:`spatial_context`)."""
    aggs, output, alpha, d = recipe["aggs"], recipe["output"], float(recipe["alpha"]), Xl.shape[1]
    conn, dist = _graph(
        coords, recipe["graph"], recipe["n_neighs"], recipe["n_rings"], recipe["grid_neighs"], recipe["radius_px"]
    )
    w_plain = _weights(conn, dist, False, recipe["include_self"])
    w_mean = {"mean": w_plain}  # the weights of each mean-type aggregation
    if "gaussian" in aggs:
        w_mean["gaussian"] = _weights(conn, dist, True, recipe["include_self"])
    X2 = np.square(Xl) if "std" in aggs else Xl[:0]
    step = max(1, _CHUNK_BYTES // (4 * max(width, d)))  # rows whose blocks are built at a time
    for s in range(0, len(rows_all), step):
        rows = slice(s, min(s + step, len(rows_all)))
        parts = []
        for a in aggs:
            if a in w_mean:
                parts.append(np.asarray(w_mean[a][rows] @ Xl, dtype=np.float32))
            elif a == "max":
                parts.append(_neighbourhood_max(w_plain, Xl, rows))
            else:  # std: sqrt(W X^2 - (W X)^2)
                m = w_plain[rows] @ Xl
                parts.append(np.sqrt(np.maximum(w_plain[rows] @ X2 - m * m, 0.0)).astype(np.float32, copy=False))
        parts = [alpha * Xl[rows] + (1.0 - alpha) * parts[0]] if output == "blend" else [Xl[rows], *parts]
        if fov is not None:
            parts.append(fov[rows_all[rows]])
        out[rows_all[rows], :width] = np.concatenate(parts, axis=1)
    if recipe["slide"] == "subtract":
        out[rows_all, :width] -= out[rows_all, :width].mean(axis=0, keepdims=True)
    elif recipe["slide"] == "append":
        means = [Xl.mean(axis=0)] + ([fov[rows_all].mean(axis=0)] if fov is not None else [])
        out[rows_all, width:] = np.concatenate(means)[None, :]


@d.dedent
def spatial_context(
    data: Any,
    embedding_key: str,
    *,
    n_neighs: int = DEFAULT_CONTEXT_NEIGHS,
    n_rings: int | None = None,
    grid_neighs: int = 6,
    radius_um: float | None = None,
    aggregation: str | Sequence[str] | None = None,
    include_self: bool = True,
    output: str = "concat",
    alpha: float = 0.0,
    fov_scale: float | None = None,
    fov_patch_um: float | None = None,
    fov_key: str | None = None,
    slide: str | None = None,
    library_key: str | None = None,
    key_added: str | None = None,
    weights: str | Path | None = None,
    encoder: Any = None,
    device: str = "auto",
    batch_size: int = 32,
    num_workers: int = 0,
    precision: str = "auto",
    copy: bool = False,
) -> AnnData | None:
    """Context features of each spot: its neighbours' embeddings, a wider field of view, the slide's mean.

    ``.obsm[embedding_key]`` is left as it is; ``.obsm[key_added]`` gets these blocks, in order:

    1. ``output="concat"``: ``[x, agg_1(x), agg_2(x), ...]``, the spot's own embedding and one aggregate over its
       neighbourhood per aggregation; ``output="blend"``: ``alpha * x + (1 - alpha) * agg(x)`` with one mean-type
       aggregate.
    2. With ``fov_scale`` / ``fov_patch_um``: the same encoder's features of a wider patch at the same ``patch_px``,
       cut by :func:`~agl_scverse.pp.embed_patches` (cached in ``.obsm[fov_key]``).
    3. ``slide="append"``: the library's mean embedding; ``slide="subtract"``: every block above centred on it.

    Neighbours come from a squidpy spatial graph built per library (``library_key``), so they never cross
    libraries. The aggregates are row-normalised sparse adjacency products, float32, computed per library.

    Parameters
    ----------
    %(data)s
        A backed AnnData works (``.obsm`` is in memory either way).
    embedding_key
        ``.obsm`` key of the spot embedding (e.g. ``"X_agl_densenet121"``).
    n_neighs
        Nearest spots of the same library (k-NN graph).
    n_rings
        Rings of a grid graph instead of k-NN (squidpy ``spatial_neighbors_grid``).
    grid_neighs
        Neighbours of a spot on the grid (with ``n_rings``).
    radius_um
        Every spot within this distance in µm instead of k-NN.
    aggregation
        ``"mean"``, ``"gaussian"`` (weights ``exp(-d^2 / 2 sigma^2)``, sigma the library's median nearest-neighbour
        distance), ``"max"``, ``"std"``, or several (``output="concat"``). Default ``("mean", "std")`` with
        ``"concat"``, ``"mean"`` with ``"blend"``.
    include_self
        The spot belongs to its own neighbourhood (a spot without neighbours always does).
    output
        ``"concat"`` (default) or ``"blend"``, see above. The defaults (k = 12, concat, mean and std) are the
        recipe nested leave-one-section-out validation chose on HER2+ (the Method page, "Spatial context").
    alpha
        Weight of the spot's own embedding in ``"blend"``, in [0, 1].
    fov_scale
        Append a wider field of view of ``fov_scale`` times the spot patch's area (e.g. 2 to 4).
    fov_patch_um
        The wider patch's side in µm (instead of ``fov_scale``).
    fov_key
        ``.obsm`` key of the wider-patch embedding, reused when present with a matching record. Default
        ``f"{embedding_key}_fov{fov_patch_um:g}um"``.
    slide
        ``None`` (default), ``"append"`` or ``"subtract"``, see above.
    %(library_key)s
    key_added
        ``.obsm`` key of the context features. Default ``f"{embedding_key}_context"``.
    weights
        Weights file of the base encoder (its sha256 is checked), only to compute a wider field of view.
    encoder
        The base encoder itself, for a custom module (a wider field of view only).
    device
        Device of the encoder (a wider field of view only), as in :func:`~agl_scverse.pp.embed_patches`.
    batch_size
        Patches per forward pass (a wider field of view only).
    num_workers
        DataLoader workers cutting the wider patches.
    precision
        Precision of the encoder, as in :func:`~agl_scverse.pp.embed_patches`.
    %(copy)s

    Returns
    -------
    ``None`` (a SpatialData input gets the results in its table) or a new AnnData (``copy=True``). Writes
    ``.obsm[key_added]`` (float32) and ``.uns["agl_embeddings"][key_added]``: the base embedding's encoder record
    with the context's ``feature_dim`` and ``context``, the recipe. Nothing is written when it fails.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> agl.pp.spatial_context(adata, "X_agl_densenet121")  # doctest: +SKIP
    >>> agl.tl.agl_fit(adata, embedding_key="X_agl_densenet121_context")  # doctest: +SKIP
    """
    adata = as_anndata(data)
    if not isinstance(embedding_key, str) or embedding_key not in adata.obsm:
        raise KeyError(
            f"embedding_key={embedding_key!r} is not in adata.obsm ({list(adata.obsm)}). Compute it with "
            "agl.pp.embed_patches first."
        )
    key = key_added or f"{embedding_key}_context"
    if not isinstance(key, str) or key == embedding_key:
        raise ValueError(f"key_added={key_added!r} must be a new string key (not the embedding's own).")
    if consts.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] (spot coordinates in full-resolution pixels) is missing.")
    if aggregation is None:
        aggregation = DEFAULT_CONTEXT_AGGREGATION if output == "concat" else "mean"
    graph, aggs = _check_recipe(aggregation, output, slide, alpha, n_neighs, n_rings, grid_neighs, radius_um)
    if fov_scale is not None and fov_patch_um is not None:
        raise ValueError("Pass fov_scale or fov_patch_um, not both.")
    if copy and adata.isbacked:
        raise ValueError("copy=True needs an in-memory AnnData; use copy=False on a backed one (or .to_memory()).")

    X = adata.obsm[embedding_key]
    if getattr(X, "ndim", 0) != 2 or X.shape[0] != adata.n_obs:
        raise ValueError(f".obsm[{embedding_key!r}] has shape {getattr(X, 'shape', None)}; expected (spots, features).")
    coords = np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=np.float64)[:, :2]
    if not np.isfinite(coords).all():
        bad = int((~np.isfinite(coords).all(axis=1)).sum())
        raise ValueError(f"adata.obsm['spatial'] holds NaN/inf for {bad} spots; fix or drop them.")
    lib_key = resolve_library_key(adata, library_key)
    groups = _library_groups(adata, lib_key)
    base_rec = dict((adata.uns.get(consts.EMBED_UNS) or {}).get(embedding_key) or {})
    base_ctx = base_rec.get("context")
    if base_ctx:
        raise ValueError(
            f".obsm[{embedding_key!r}] already holds context features; start from the spot embedding "
            f"({base_ctx.get('base_key')!r})."
        )
    if graph == "knn":
        small = [(lib, len(idx)) for lib, idx in groups if len(idx) <= n_neighs]
        if small:
            raise ValueError(
                f"n_neighs={n_neighs} needs more than {n_neighs} spots per library; library {small[0][0]!r} has "
                f"{small[0][1]}. Choose n_neighs <= {min(s for _, s in small) - 1} or drop that library."
            )
    d = int(X.shape[1])
    fov_um = None
    if fov_scale is not None:
        check_positive("fov_scale", fov_scale)
        if not base_rec.get("patch_um"):
            raise ValueError("fov_scale needs the base embedding's patch_um record; pass fov_patch_um instead.")
        fov_um = float(base_rec["patch_um"]) * math.sqrt(float(fov_scale))
    elif fov_patch_um is not None:
        check_positive("fov_patch_um", fov_patch_um)
        fov_um = float(fov_patch_um)
    if fov_um is not None:
        fov_key = fov_key or f"{embedding_key}_fov{fov_um:g}um"

    # ---- the output array: [core blocks, fov, (slide means)]
    fov = fov_rec = None
    if fov_um is not None and fov_key is not None:
        embed_kw = {"device": device, "batch_size": batch_size, "num_workers": num_workers, "precision": precision}
        fov, fov_rec = _fov_features(adata, base_rec, lib_key, fov_um, fov_key, weights, encoder, embed_kw)
    d_fov = 0 if fov is None else int(fov.shape[1])
    width = (1 if output == "blend" else 1 + len(aggs)) * d + d_fov
    d_out = width + (d + d_fov if slide == "append" else 0)
    out = np.empty((adata.n_obs, d_out), dtype=np.float32)
    recipe = {
        "base_key": embedding_key,
        "graph": graph,
        "n_neighs": int(n_neighs) if graph == "knn" else None,
        "n_rings": int(n_rings) if n_rings is not None else None,
        "grid_neighs": int(grid_neighs) if n_rings is not None else None,
        "radius_um": float(radius_um) if radius_um is not None else None,
        "aggregation": "+".join(aggs),
        "include_self": bool(include_self),
        "output": output,
        "alpha": float(alpha),
        "fov_patch_um": fov_um,
        "fov_key": fov_key,
        "slide": slide,
        "library_key": lib_key,
        "base_dim": d,
    }
    for lib, idx in groups:
        Xl = np.asarray(X[idx], dtype=np.float32)
        if not np.isfinite(Xl).all():
            raise ValueError(f".obsm[{embedding_key!r}] holds NaN/inf in library {lib!r}; recompute the embedding.")
        radius_px = None
        if radius_um is not None:  # graph == "radius"
            if lib is None:
                raise ValueError("radius_um needs the µm per pixel of a library (uns['spatial']); none is known.")
            radius_px = float(radius_um) / microns_per_pixel(adata, lib)
        _fill_library(out, Xl, idx, coords[idx], {**recipe, "aggs": aggs, "radius_px": radius_px}, fov, width)
    record = {k: v for k, v in base_rec.items() if k not in ("feature_dim", "n_spots", "versions")}
    record.update(
        feature_dim=int(d_out), n_spots=int(adata.n_obs), context={k: v for k, v in recipe.items() if v is not None}
    )
    record["versions"] = versions()
    target = adata.copy() if copy else adata
    new: dict[str, tuple[np.ndarray, dict | None]] = {key: (out, record)}
    if fov is not None and fov_key is not None and fov_key not in adata.obsm:
        new[fov_key] = (fov, fov_rec)
    written = list(new)
    with restore_on_error(target, obsm=written, uns=[consts.EMBED_UNS]):
        for k, (arr, rec) in new.items():
            put_embedding(target, k, arr, rec)
    logg.info(f"Added .obsm[{key!r}] ({out.shape[0]} x {out.shape[1]}: {graph} context of {embedding_key!r}).")
    return tool_return(data, target, copy, obsm=written, uns=[consts.EMBED_UNS])
