"""Gene roles (target / auxiliary / excluded), auxiliary prior scores, and the expression transform.

Two public entry points:

- :func:`compute_gene_roles` is pure: it reads an AnnData and returns a :class:`GeneRoles` (targets, ranked
  auxiliaries, prior scores, parameters) without writing anything. :func:`agl_scverse.tl.agl_fit` uses it.
- :func:`gene_roles` calls it and writes the result to ``.var`` (columns named by
  :class:`agl_scverse._constants.Keys`) and its parameters to ``.uns[f"{key_added}_gene_roles"]`` (a separate
  entry, so that the ``.uns[key_added]`` written by ``agl_fit`` never collides with it).

:func:`expression_transform` is the one place that turns raw counts into the model's expression targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from .. import _constants as K
from .._constants import Keys
from .._expression import expression_transform
from .._validate import check_adata

__all__ = [
    "DEFAULT_MIN_CELLS",
    "GeneRoles",
    "resolve_train_mask",
    "compute_gene_roles",
    "gene_roles",
    "write_gene_roles",
]


DEFAULT_MIN_CELLS = 10
"""Default ``min_cells``: a gene must have counts in at least 10 training spots to be a candidate.

Why 10: the model is trained and early-stopped on per-gene Pearson correlation, and the HVG dispersion is a
variance estimate; a gene seen in a handful of spots gives both a value dominated by those few spots (and a
validation split may hold none of them). Ten spots is negligible next to the hundreds to thousands of spots of
a slide, so it keeps most expressed genes while dropping the near-empty ones (HER2+, four training sections,
730 spots: 13,691 of the 16,647 genes seen at least once). Pass ``min_cells=0`` to keep every gene with a non-zero count, or a float in (0, 1) for a
fraction of training spots.
"""


# --------------------------------------------------------------------------------------------------------------
# gene roles
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneRoles:
    """Gene roles computed by :func:`compute_gene_roles`.

    Attributes
    ----------
    targets
        Target genes: by decreasing ``dispersions_norm`` (HVG) or in the user's order.
    auxiliaries
        Auxiliary genes, best prior first (position = ``prior_rank``).
    prior
        Prior score of each auxiliary gene (float; higher = better; NaN ranks last), indexed by
        ``auxiliaries`` in rank order.
    var_names
        All genes of the AnnData the roles were computed on, in ``.var`` order.
    params
        The arguments and counts behind the roles (h5ad-serialisable).
    """

    targets: list[str]
    auxiliaries: list[str]
    prior: pd.Series
    var_names: pd.Index
    params: dict = field(default_factory=dict)

    @property
    def excluded(self) -> list[str]:
        """Genes that are neither targets nor auxiliaries, in ``.var`` order."""
        used = set(self.targets) | set(self.auxiliaries)
        return [g for g in self.var_names if g not in used]

    @property
    def normalized_rank(self) -> np.ndarray:
        """Normalised prior rank ``r_i`` in [0, 1] of each auxiliary (0 = best), in ``auxiliaries`` order.

        ``r_i = rank_i / (n_aux - 1)`` (0 when there is a single auxiliary); this is the rank the DkGSB mask
        ``w_i = sigmoid((theta - r_i) / tau)`` thresholds.
        """
        n = len(self.auxiliaries)
        return np.arange(n, dtype=np.float32) / max(n - 1, 1)

    def to_frame(self) -> pd.DataFrame:
        """Per-gene table indexed by ``var_names``: ``role`` (categorical), ``prior`` (float), ``prior_rank`` (int).

        ``prior`` is NaN and ``prior_rank`` is -1 for targets and excluded genes.
        """
        role = pd.Series(K.ROLE_EXCLUDED, index=self.var_names, dtype=object)
        role[self.targets] = K.ROLE_TARGET
        role[self.auxiliaries] = K.ROLE_AUX
        prior = pd.Series(np.nan, index=self.var_names, dtype=float)
        rank = pd.Series(-1, index=self.var_names, dtype=np.int64)
        if self.auxiliaries:
            prior[self.auxiliaries] = self.prior.loc[self.auxiliaries].to_numpy(dtype=float)
            rank[self.auxiliaries] = np.arange(len(self.auxiliaries), dtype=np.int64)
        cats = [K.ROLE_TARGET, K.ROLE_AUX, K.ROLE_EXCLUDED]
        return pd.DataFrame(
            {"role": pd.Categorical(role.to_numpy(), categories=cats), "prior": prior, "prior_rank": rank},
            index=self.var_names,
        )


def resolve_train_mask(adata: AnnData, train_mask: Any = None) -> np.ndarray:
    """Boolean mask of training spots.

    Parameters
    ----------
    adata
        The AnnData.
    train_mask
        ``None`` (all spots), a boolean array of length ``n_obs``, or the name of an ``.obs`` column that is
        boolean or holds ``"train"`` for training spots (e.g. the ``<key_added>_split`` column of ``agl_fit``).

    Returns
    -------
    Boolean array of length ``n_obs``.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> a = ad.AnnData(np.ones((3, 2)))
    >>> a.obs["split"] = ["train", "val", "train"]
    >>> resolve_train_mask(a, "split")
    array([ True, False,  True])
    """
    n = adata.n_obs
    if train_mask is None:
        mask = np.ones(n, dtype=bool)
    elif isinstance(train_mask, str):
        if train_mask not in adata.obs:
            raise KeyError(
                f"train_mask={train_mask!r} is not an .obs column; available: {list(adata.obs.columns)[:10]}."
            )
        col = adata.obs[train_mask]
        if pd.api.types.is_bool_dtype(col):
            if col.isna().any():
                raise ValueError(f".obs[{train_mask!r}] holds missing values; fill them with True/False.")
            mask = col.to_numpy(dtype=bool)
        else:
            mask = (col.astype(str) == "train").to_numpy()
            if not mask.any():
                raise ValueError(
                    f".obs[{train_mask!r}] is not boolean and has no 'train' values; "
                    "pass a boolean column or one holding 'train' for training spots."
                )
    else:
        mask = np.asarray(train_mask)
        if mask.dtype != bool:
            raise TypeError(f"train_mask must be boolean (or an .obs column name), got dtype {mask.dtype}.")
        if mask.shape != (n,):
            raise ValueError(f"train_mask has shape {mask.shape}; expected ({n},), one value per spot.")
    if not mask.any():
        raise ValueError("No training spots left: train_mask selects 0 spots.")
    return mask


def _counts(adata: AnnData, layer: str | None):
    X = adata.layers[layer] if layer is not None else adata.X
    return sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)


def _log1p_cols(X, cols: np.ndarray):
    """log1p of selected columns, sparse stays sparse (float32)."""
    sub = X[:, cols]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub, dtype=np.float32)
        sub.data = np.log1p(sub.data)
        return sub
    return np.log1p(np.asarray(sub, dtype=np.float32))


def _hvg_dispersions(X_log, genes: pd.Index) -> pd.Series:
    """scanpy seurat-flavour ``dispersions_norm`` on log1p counts (NaN for genes without variance)."""
    import scanpy as sc

    tmp = AnnData(X_log, var=pd.DataFrame(index=genes))
    with np.errstate(divide="ignore", invalid="ignore"):
        df = sc.pp.highly_variable_genes(tmp, flavor="seurat", inplace=False)
    return pd.Series(np.asarray(df["dispersions_norm"], dtype=float), index=genes)


def _col_mean_std(M) -> tuple[np.ndarray, np.ndarray]:
    n = M.shape[0]
    mean = np.asarray(M.mean(axis=0), dtype=np.float64).ravel()
    if sp.issparse(M):
        sq = np.asarray(M.multiply(M).sum(axis=0), dtype=np.float64).ravel() / n
    else:
        sq = (np.asarray(M, dtype=np.float64) ** 2).mean(axis=0)
    return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))


def _coexpression(X_aux, X_tgt: np.ndarray) -> np.ndarray:
    """Mean absolute Pearson correlation of each auxiliary column with the target columns (NaN if constant)."""
    n = X_aux.shape[0]
    T = np.asarray(X_tgt, dtype=np.float64)
    t_mean, t_std = _col_mean_std(T)
    ok_t = t_std > 0
    Tz = (T[:, ok_t] - t_mean[ok_t]) / t_std[ok_t]  # standardised targets
    if Tz.shape[1] == 0:
        return np.full(X_aux.shape[1], np.nan)
    a_mean, a_std = _col_mean_std(X_aux)
    # cov(a, t_z) = E[a t_z] - E[a] E[t_z] = E[a t_z] since t_z has zero mean
    cross = np.asarray(X_aux.T @ Tz, dtype=np.float64) / n  # n_aux x n_targets
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = cross / a_std[:, None]
    corr = np.clip(corr, -1.0, 1.0)
    out = np.abs(corr).mean(axis=1)
    out[a_std <= 0] = np.nan
    return out


def _moran(adata_sub: AnnData, X_log, genes: pd.Index, library_key: str | None, n_neighs: int) -> np.ndarray:
    """Moran's I of each column of ``X_log`` on the spatial kNN graph of ``adata_sub`` (one graph per slide)."""
    import squidpy as sq

    tmp = AnnData(X_log, obs=pd.DataFrame(index=adata_sub.obs_names), var=pd.DataFrame(index=genes))
    tmp.obsm[K.SPATIAL_KEY] = np.asarray(adata_sub.obsm[K.SPATIAL_KEY], dtype=float)[:, :2]
    if library_key is not None:
        tmp.obs[library_key] = pd.Categorical(adata_sub.obs[library_key].astype(str))
    n_neighs = int(min(n_neighs, max(tmp.n_obs - 1, 1)))
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)
    if knn is not None:
        knn(tmp, library_key=library_key, n_neighs=n_neighs)
    else:  # pragma: no cover - squidpy < 1.8
        sq.gr.spatial_neighbors(tmp, library_key=library_key, coord_type="generic", n_neighs=n_neighs)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = sq.gr.spatial_autocorr(
            tmp, mode="moran", genes=list(genes), n_perms=None, copy=True, n_jobs=1, show_progress_bar=False
        )
    return df["I"].reindex(genes).to_numpy(dtype=float)


def _rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` high to low, NaN last, ties kept in input order."""
    s = np.asarray(scores, dtype=float)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, kind="stable")


def _check_gene_list(genes: Sequence[str], var_names: pd.Index, what: str) -> list[str]:
    if isinstance(genes, str):
        raise TypeError(f"{what} must be a list of gene names, not a single string ({genes!r}).")
    genes = [str(g) for g in genes]
    missing = [g for g in genes if g not in var_names]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise KeyError(f"{len(missing)} {what} gene(s) are not in adata.var_names: {missing[:10]}{more}.")
    dup = pd.Index(genes)
    if not dup.is_unique:
        raise ValueError(f"{what} lists genes more than once: {dup[dup.duplicated()].unique()[:10].tolist()}.")
    return genes


def compute_gene_roles(
    adata: AnnData,
    n_targets: int = 50,
    targets: Sequence[str] | None = None,
    auxiliaries: Sequence[str] | None = None,
    prior: str = "hvg",
    min_cells: int | float = DEFAULT_MIN_CELLS,
    train_mask: Any = None,
    layer: str | None = None,
    library_key: str | None = None,
    n_neighs: int = 6,
) -> GeneRoles:
    """Choose target and auxiliary genes and rank the auxiliaries by a prior, without writing anything.

    Everything is computed on the **training spots** only, so no information leaks from validation or test
    spots into the gene choice.

    Parameters
    ----------
    adata
        Spots x genes with raw counts in ``.X`` (or ``layer``).
    n_targets
        Number of targets chosen when ``targets`` is None: the top-``n_targets`` highly variable genes by
        scanpy's seurat-flavour ``dispersions_norm`` on ``log1p`` counts of the training spots, among genes
        passing ``min_cells``. Ignored when ``targets`` is given.
    targets
        Explicit target genes (kept in this order). Each must be in ``var_names`` and not constant over the
        training spots.
    auxiliaries
        Explicit auxiliary genes (must not overlap ``targets``; ``[]`` means none, i.e. PGL). Default: every
        other gene counted in at least ``min_cells`` training spots.
    prior
        How auxiliaries are ranked (higher score = better = lower rank); all scores use ``log1p`` counts of
        the training spots:

        - ``"hvg"`` (paper default): seurat-flavour ``dispersions_norm``, computed over the candidate genes
          (genes passing ``min_cells`` plus any listed ones).
        - ``"coexpression"``: mean absolute Pearson correlation of the gene with the targets.
        - ``"moran"``: Moran's I on a spatial kNN graph (``n_neighs`` neighbours,
          :func:`squidpy.gr.spatial_neighbors_knn` then :func:`squidpy.gr.spatial_autocorr`, no permutations);
          one graph per slide when ``library_key`` names the slide column.
        - the name of any numeric ``.var`` column (higher = better).

        Genes whose score is NaN (e.g. constant on the training spots) rank last; ties keep ``.var`` order.
    min_cells
        A gene is a candidate (HVG target or default auxiliary) when it has a non-zero count in at least this
        many training spots; a float in (0, 1) is a fraction of training spots. See
        :data:`DEFAULT_MIN_CELLS` for why the default is 10.
    train_mask
        Training spots: ``None`` (all), a boolean array, or an ``.obs`` column (boolean, or ``"train"``
        values). See :func:`resolve_train_mask`.
    layer
        Layer holding raw counts instead of ``.X``.
    library_key
        ``.obs`` column telling slides apart, used by ``prior="moran"`` so no edges join different slides.
        Default: ``"library_id"`` when that column exists, else one slide.
    n_neighs
        Neighbours per spot in the Moran's I graph (6 = the hexagonal Visium / legacy-ST lattice).

    Returns
    -------
    A :class:`GeneRoles`.

    Raises
    ------
    ValueError, KeyError, TypeError
        Unknown genes or prior, too few candidate genes, constant targets, no training spots, NaN or negative
        counts.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (60, 30)).astype(np.float32))
    >>> roles = compute_gene_roles(a, n_targets=5)
    >>> len(roles.targets), len(roles.auxiliaries), roles.normalized_rank[[0, -1]].tolist()
    (5, 25, [0.0, 1.0])
    """
    check_adata(adata, layer=layer)
    mask = resolve_train_mask(adata, train_mask)
    var_names = adata.var_names
    X = _counts(adata, layer)[mask]
    n_train = int(mask.sum())

    if isinstance(min_cells, float) and 0 < min_cells < 1:
        min_cells_n = int(np.ceil(min_cells * n_train))
    else:
        if min_cells < 0 or float(min_cells) != int(min_cells):
            raise ValueError(f"min_cells must be a non-negative integer or a fraction in (0, 1), got {min_cells!r}.")
        min_cells_n = int(min_cells)
    n_cells = np.asarray((X > 0).sum(axis=0)).ravel()
    passing = (n_cells >= max(min_cells_n, 1)) & (n_cells > 0)

    # --- validate the explicit lists and the prior before any heavy work
    targets_given, aux_given = targets is not None, auxiliaries is not None
    if targets is not None:
        targets = _check_gene_list(targets, var_names, "target")
        if len(targets) == 0:
            raise ValueError("targets is empty; give at least one target gene (or targets=None for HVGs).")
    elif int(n_targets) < 1:
        raise ValueError(f"n_targets must be >= 1, got {n_targets}.")
    if auxiliaries is not None:
        auxiliaries = _check_gene_list(auxiliaries, var_names, "auxiliary")
    if prior not in K.PRIORS:
        if not isinstance(prior, str) or prior not in adata.var.columns:
            raise ValueError(
                f"Unknown prior {prior!r}: use one of {K.PRIORS} or the name of a numeric .var column "
                f"(columns: {list(adata.var.columns)[:10]})."
            )
        if not pd.api.types.is_numeric_dtype(adata.var[prior]) or pd.api.types.is_bool_dtype(adata.var[prior]):
            raise TypeError(f".var[{prior!r}] has dtype {adata.var[prior].dtype}; a numeric prior column is needed.")
    if prior == "moran":
        from .._validate import check_spatial

        check_spatial(adata)
        if library_key is None and K.LIBRARY_KEY in adata.obs:
            library_key = K.LIBRARY_KEY
        if library_key is not None and library_key not in adata.obs:
            raise KeyError(f"library_key={library_key!r} is not an .obs column.")

    pos = {g: i for i, g in enumerate(var_names)}
    listed = set(targets or []) | set(auxiliaries or [])
    pool = passing.copy()
    for g in listed:
        if n_cells[pos[g]] > 0:
            pool[pos[g]] = True
    pool_idx = np.flatnonzero(pool)
    pool_genes = var_names[pool_idx]
    X_log = _log1p_cols(X, pool_idx)
    need_hvg = targets is None or prior == "hvg"
    disp = _hvg_dispersions(X_log, pool_genes) if need_hvg and len(pool_idx) > 0 else None

    # --- targets
    if targets is None:
        n_cand = int(passing.sum())
        if n_cand < n_targets:
            raise ValueError(
                f"Only {n_cand} genes have counts in >= {min_cells_n} of the {n_train} training spots, fewer than "
                f"n_targets={n_targets}. Lower n_targets or min_cells."
            )
        cand = disp[passing[pool_idx]]
        order = _rank_order(cand.to_numpy())
        targets = cand.index[order[: int(n_targets)]].tolist()
    else:
        t_idx = np.array([pos[g] for g in targets])
        Xt = X[:, t_idx]
        Xt = Xt.toarray() if sp.issparse(Xt) else np.asarray(Xt)
        const = Xt.max(axis=0) == Xt.min(axis=0)
        if const.any():
            bad = [g for g, c in zip(targets, const) if c]
            zero = [g for g, c in zip(targets, n_cells[t_idx] == 0) if c]
            detail = f" ({len(zero)} of them all-zero: {zero[:10]})" if zero else ""
            raise ValueError(
                f"Target gene(s) {bad[:10]} are constant over the {n_train} training spots{detail}; their "
                "correlation is undefined. Drop them from targets."
            )

    # --- auxiliaries
    tset = set(targets)
    if auxiliaries is None:
        auxiliaries = [g for g in var_names[passing] if g not in tset]
    else:
        overlap = [g for g in auxiliaries if g in tset]
        if overlap:
            raise ValueError(f"Gene(s) {overlap[:10]} are listed as both targets and auxiliaries.")

    # --- prior scores for the auxiliaries
    aux_pool = pd.Index(auxiliaries)
    if prior == "hvg":
        scores = disp.reindex(aux_pool).to_numpy(dtype=float) if disp is not None else np.full(len(aux_pool), np.nan)
    elif prior in ("coexpression", "moran"):
        in_pool = pd.Index(pool_genes).get_indexer(aux_pool)
        has = in_pool >= 0
        scores = np.full(len(aux_pool), np.nan)
        if has.any():
            X_aux = X_log[:, in_pool[has]]
            if prior == "coexpression":
                t_idx = np.array([pos[g] for g in targets])
                X_t = expression_transform(X, "log1p", columns=t_idx)
                scores[has] = _coexpression(X_aux, X_t)
            else:
                sub = adata[mask]
                scores[has] = _moran(sub, X_aux, aux_pool[has], library_key, n_neighs)
    else:
        scores = adata.var[prior].reindex(aux_pool).to_numpy(dtype=float)
    order = _rank_order(scores)
    aux_sorted = [auxiliaries[i] for i in order]
    prior_s = pd.Series(scores[order], index=pd.Index(aux_sorted), dtype=float, name="prior")

    params = {
        "n_targets": len(targets),
        "targets_given": targets_given,
        "auxiliaries_given": aux_given,
        "prior": str(prior),
        "min_cells": min_cells_n,
        "n_train_spots": n_train,
        "n_auxiliaries": len(aux_sorted),
        "n_excluded": int(len(var_names) - len(targets) - len(aux_sorted)),
        "layer": layer if layer is not None else "",
        "library_key": library_key if library_key is not None else "",
        "n_neighs": int(n_neighs),
        "targets": list(targets),
    }
    return GeneRoles(targets=list(targets), auxiliaries=aux_sorted, prior=prior_s, var_names=var_names, params=params)


def gene_roles(
    adata: AnnData,
    n_targets: int = 50,
    targets: Sequence[str] | None = None,
    auxiliaries: Sequence[str] | None = None,
    prior: str = "hvg",
    min_cells: int | float = DEFAULT_MIN_CELLS,
    train_mask: Any = None,
    layer: str | None = None,
    library_key: str | None = None,
    n_neighs: int = 6,
    key_added: str = K.DEFAULT_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Mark target / auxiliary / excluded genes and rank auxiliaries by a prior, in ``.var``.

    Computes :func:`compute_gene_roles` (see it for every parameter) and writes, with ``k = Keys(key_added)``:

    - ``.var[k.role]``: categorical ``"target"`` / ``"auxiliary"`` / ``"excluded"``;
    - ``.var[k.prior]``: float prior score of auxiliaries (higher = better), NaN for the others;
    - ``.var[k.prior_rank]``: int, 0 = best auxiliary, 1, 2, ...; -1 for targets and excluded genes;
    - ``.uns[f"{key_added}_gene_roles"]``: the parameters (``prior``, ``min_cells``, ``n_train_spots``,
      ``targets``, ...). A separate entry from ``.uns[key_added]``, which :func:`agl_scverse.tl.agl_fit` owns.

    Nothing is written when an error is raised.

    Parameters
    ----------
    adata
        Spots x genes with raw counts.
    n_targets, targets, auxiliaries, prior, min_cells, train_mask, layer, library_key, n_neighs
        See :func:`compute_gene_roles`.
    key_added
        Prefix of the written keys (default ``"agl"`` -> ``agl_role``, ``agl_prior``, ``agl_prior_rank``).
    copy
        Return a modified copy instead of writing in place.

    Returns
    -------
    The modified copy when ``copy=True``, else None.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> import agl_scverse as agl
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (60, 30)).astype(np.float32))
    >>> agl.pp.gene_roles(a, n_targets=5)
    >>> a.var["agl_role"].value_counts()["target"], int(a.var["agl_prior_rank"].max())
    (np.int64(5), 24)
    """
    keys = Keys(key_added)
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
        n_neighs=n_neighs,
    )
    if copy:
        adata = adata.copy()
    write_gene_roles(adata, roles, key_added=key_added)
    logg.info(
        f"gene roles: {len(roles.targets)} targets, {len(roles.auxiliaries)} auxiliaries (prior {prior!r}), "
        f"{len(roles.excluded)} excluded -> .var[{keys.role!r}, {keys.prior!r}, {keys.prior_rank!r}]"
    )
    return adata if copy else None


def write_gene_roles(adata: AnnData, roles: GeneRoles, key_added: str = K.DEFAULT_KEY) -> None:
    """Write a :class:`GeneRoles` to ``adata.var`` and ``adata.uns[f"{key_added}_gene_roles"]`` (in place).

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> a = ad.AnnData(np.random.default_rng(0).poisson(2.0, (40, 12)).astype(np.float32))
    >>> write_gene_roles(a, compute_gene_roles(a, n_targets=3))
    >>> sorted(a.uns["agl_gene_roles"])[:3]
    ['auxiliaries_given', 'layer', 'library_key']
    """
    if not roles.var_names.equals(adata.var_names):
        raise ValueError("These gene roles were computed on different genes than adata.var_names.")
    keys = Keys(key_added)
    df = roles.to_frame()
    adata.var[keys.role] = df["role"].array
    adata.var[keys.prior] = df["prior"].to_numpy()
    adata.var[keys.prior_rank] = df["prior_rank"].to_numpy()
    adata.uns[f"{key_added}_gene_roles"] = dict(roles.params)
