"""Gene roles (target / auxiliary / excluded) and the ranking of auxiliaries by a prior score."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg

from agl_scverse import _constants as consts
from agl_scverse._constants import Keys
from agl_scverse._docs import d
from agl_scverse._expression import expression_transform, take_rows
from agl_scverse._serialize import to_h5ad
from agl_scverse._spatial import resolve_library_key
from agl_scverse._transaction import restore_on_error
from agl_scverse._validate import check_adata, check_spatial, is_backed, resolve_spots

from ._priors import (
    coexpression_scores,
    column_nonzero_counts,
    hvg_dispersions,
    log1p_columns,
    moran_scores,
    rank_order,
)

__all__ = ["DEFAULT_MIN_CELLS", "GeneRoles", "compute_gene_roles", "gene_roles", "write_gene_roles"]


DEFAULT_MIN_CELLS = 10
"""Default ``min_cells``: a gene must have counts in at least 10 training spots to be a candidate.

A gene seen in a handful of spots gives a Pearson correlation and an HVG dispersion dominated by those spots (and a
validation split may hold none of them); ten spots is negligible next to the hundreds to thousands of a slide.
Pass ``min_cells=0`` to keep every gene with a non-zero count, or a float in (0, 1) for a fraction of training spots.
"""


@dataclass(frozen=True)
class GeneRoles:
    """Gene roles computed by :func:`gene_roles` (returned with ``inplace=False``).

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
        role = pd.Series(consts.ROLE_EXCLUDED, index=self.var_names, dtype=object)
        role[self.targets] = consts.ROLE_TARGET
        role[self.auxiliaries] = consts.ROLE_AUX
        prior = pd.Series(np.nan, index=self.var_names, dtype=float)
        rank = pd.Series(-1, index=self.var_names, dtype=np.int64)
        if self.auxiliaries:
            prior[self.auxiliaries] = self.prior.loc[self.auxiliaries].to_numpy(dtype=float)
            rank[self.auxiliaries] = np.arange(len(self.auxiliaries), dtype=np.int64)
        cats = [consts.ROLE_TARGET, consts.ROLE_AUX, consts.ROLE_EXCLUDED]
        return pd.DataFrame(
            {"role": pd.Categorical(role.to_numpy(), categories=cats), "prior": prior, "prior_rank": rank},
            index=self.var_names,
        )


def _counts(adata: AnnData, layer: str | None):
    """The counts, in memory (CSR or dense) or, for a backed AnnData, left on disk (read in row blocks)."""
    X = adata.layers[layer] if layer is not None else adata.X
    if is_backed(X):
        return X
    return sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)


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


@d.dedent
def gene_roles(
    adata: AnnData,
    n_targets: int = 50,
    targets: Sequence[str] | None = None,
    auxiliaries: Sequence[str] | None = None,
    prior: consts.Prior | str = "hvg",
    min_cells: int | float = DEFAULT_MIN_CELLS,
    train_mask: Any = None,
    layer: str | None = None,
    library_key: str | None = None,
    n_neighs: int = 6,
    key_added: str = consts.DEFAULT_KEY,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | GeneRoles | None:
    """Choose target and auxiliary genes and rank the auxiliaries by a prior; write them to ``.var`` or return them.

    Everything is computed on the **training spots** only, so no information leaks from validation or test
    spots into the gene choice. With ``k = Keys(key_added)`` it writes

    - ``.var[k.role]``: categorical ``"target"`` / ``"auxiliary"`` / ``"excluded"``;
    - ``.var[k.prior]``: float prior score of auxiliaries (higher = better), NaN for the others;
    - ``.var[k.prior_rank]``: int, 0 = best auxiliary, 1, 2, ...; -1 for targets and excluded genes;
    - ``.uns[k.gene_roles]``: the parameters (``prior``, ``min_cells``, ``n_train_spots``, ``targets``, ...). A
      separate entry from ``.uns[key_added]``, which :func:`agl_scverse.tl.agl_fit` owns.

    Nothing is written when an error is raised, or with ``inplace=False``.

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
        values).
    layer
        Layer holding raw counts instead of ``.X``.
    library_key
        ``.obs`` column telling slides apart, used by ``prior="moran"`` so no edges join different slides.
        Default: ``"library_id"`` when that column exists, else one slide.
    n_neighs
        Neighbours per spot in the Moran's I graph (6 = the hexagonal Visium / legacy-ST lattice).
    key_added
        Prefix of the written keys (default ``"agl"`` -> ``agl_role``, ``agl_prior``, ``agl_prior_rank``).
    inplace
        Write the roles into ``adata`` (default). ``False``: write nothing and return them as a :class:`GeneRoles`
        (as scanpy's ``highly_variable_genes(inplace=False)`` returns its table).
    %(copy)s

    Returns
    -------
    ``inplace=False``: a :class:`GeneRoles`. Otherwise the modified copy with ``copy=True``, else None.

    Raises
    ------
    ValueError, KeyError, TypeError
        Unknown genes or prior, too few candidate genes, constant targets, no training spots, NaN or negative
        counts.

    Examples
    --------
    >>> import numpy as np, anndata as ad
    >>> import agl_scverse as agl
    >>> rng = np.random.default_rng(0)
    >>> a = ad.AnnData(rng.poisson(2.0, (60, 30)).astype(np.float32))
    >>> roles = agl.pp.gene_roles(a, n_targets=5, inplace=False)
    >>> len(roles.targets), len(roles.auxiliaries), roles.normalized_rank[[0, -1]].tolist()
    (5, 25, [0.0, 1.0])
    >>> agl.pp.gene_roles(a, n_targets=5)
    >>> a.var["agl_role"].value_counts()["target"], int(a.var["agl_prior_rank"].max())
    (np.int64(5), 24)
    """
    if not isinstance(inplace, bool | np.bool_):
        raise TypeError(f"inplace must be True or False, got {inplace!r}.")
    if copy and not inplace:
        raise ValueError(
            "copy=True writes the roles into a copy; it needs inplace=True (inplace=False writes nothing)."
        )
    roles = _compute(adata, n_targets, targets, auxiliaries, prior, min_cells, train_mask, layer, library_key, n_neighs)
    if not inplace:
        return roles
    if copy:
        adata = adata.copy()
    write_gene_roles(adata, roles, key_added=key_added)
    keys = Keys(key_added)
    logg.info(
        f"gene roles: {len(roles.targets)} targets, {len(roles.auxiliaries)} auxiliaries (prior {prior!r}), "
        f"{len(roles.excluded)} excluded -> .var[{keys.role!r}, {keys.prior!r}, {keys.prior_rank!r}]"
    )
    return adata if copy else None


def _compute(
    adata: AnnData, n_targets, targets, auxiliaries, prior, min_cells, train_mask, layer, library_key, n_neighs
) -> GeneRoles:
    """The roles of :func:`gene_roles`, computed without writing anything."""
    check_adata(adata, layer=layer)
    mask = resolve_spots(adata, train_mask, as_mask=True, what="train_mask", noun="training spots")
    var_names = adata.var_names
    Xall = _counts(adata, layer)  # no copy: the training rows are read in chunks where the data may be large
    rows = np.flatnonzero(mask)
    n_train = int(mask.sum())

    if isinstance(min_cells, float) and 0 < min_cells < 1:
        min_cells_n = int(np.ceil(min_cells * n_train))
    else:
        if min_cells < 0 or float(min_cells) != int(min_cells):
            raise ValueError(f"min_cells must be a non-negative integer or a fraction in (0, 1), got {min_cells!r}.")
        min_cells_n = int(min_cells)
    n_cells = column_nonzero_counts(Xall, rows)
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
    if prior not in consts.PRIORS:
        if not isinstance(prior, str) or prior not in adata.var.columns:
            raise ValueError(
                f"Unknown prior {prior!r}: use one of {consts.PRIORS} or the name of a numeric .var column "
                f"(columns: {list(adata.var.columns)[:10]})."
            )
        if not pd.api.types.is_numeric_dtype(adata.var[prior]) or pd.api.types.is_bool_dtype(adata.var[prior]):
            raise TypeError(f".var[{prior!r}] has dtype {adata.var[prior].dtype}; a numeric prior column is needed.")
    if prior == "moran":
        check_spatial(adata)
        library_key = resolve_library_key(adata, library_key)

    pos = {g: i for i, g in enumerate(var_names)}
    listed = set(targets or []) | set(auxiliaries or [])
    pool = passing.copy()
    for g in listed:
        if n_cells[pos[g]] > 0:
            pool[pos[g]] = True
    pool_idx = np.flatnonzero(pool)
    pool_genes = var_names[pool_idx]
    X_log = log1p_columns(take_rows(Xall, rows), pool_idx) if prior in ("coexpression", "moran") else None
    need_hvg = targets is None or prior == "hvg"
    disp = hvg_dispersions(Xall, rows, pool_idx, pool_genes) if need_hvg and len(pool_idx) > 0 else None

    # --- targets
    if targets is None:
        n_cand = int(passing.sum())
        if n_cand < n_targets:
            raise ValueError(
                f"Only {n_cand} genes have counts in >= {min_cells_n} of the {n_train} training spots, fewer than "
                f"n_targets={n_targets}. Lower n_targets or min_cells."
            )
        assert disp is not None  # n_targets > 0 genes pass
        cand = disp[passing[pool_idx]]
        order = rank_order(cand.to_numpy())
        targets = cand.index[order[: int(n_targets)]].tolist()
    else:
        t_idx = np.array([pos[g] for g in targets])
        Xt = take_rows(Xall, rows)[:, t_idx]
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
            assert X_log is not None  # computed for these priors
            X_aux = X_log[:, in_pool[has]]
            if prior == "coexpression":
                t_idx = np.array([pos[g] for g in targets])
                X_t = expression_transform(take_rows(Xall, rows), "log1p", columns=t_idx)
                scores[has] = coexpression_scores(X_aux, X_t)
            else:
                sub = adata[mask]
                scores[has] = moran_scores(sub, X_aux, aux_pool[has], library_key, n_neighs)
    else:
        scores = adata.var[prior].reindex(aux_pool).to_numpy(dtype=float)
    order = rank_order(scores)
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
        "layer": layer,
        "library_key": library_key,
        "n_neighs": int(n_neighs),
        "targets": list(targets),
    }
    return GeneRoles(targets=list(targets), auxiliaries=aux_sorted, prior=prior_s, var_names=var_names, params=params)


def compute_gene_roles(adata: AnnData, *args: Any, **kwargs: Any) -> GeneRoles:
    """Deprecated spelling of ``gene_roles(adata, ..., inplace=False)``; removed in the next release.

    Takes the arguments of :func:`gene_roles` but ``key_added``, ``inplace`` and ``copy``, warns with a
    :class:`FutureWarning` and returns the :class:`GeneRoles` without writing anything.

    Examples
    --------
    >>> roles = agl.pp.compute_gene_roles(adata, n_targets=50)  # doctest: +SKIP
    >>> roles = agl.pp.gene_roles(adata, n_targets=50, inplace=False)  # doctest: +SKIP
    """
    warnings.warn(
        "agl.pp.compute_gene_roles(adata, ...) is deprecated and will be removed in the next release; use "
        "agl.pp.gene_roles(adata, ..., inplace=False), which returns the same GeneRoles.",
        FutureWarning,
        stacklevel=2,
    )
    bad = sorted({"key_added", "inplace", "copy"} & set(kwargs))
    if bad:
        raise TypeError(f"compute_gene_roles() got unexpected keyword argument(s) {bad}.")
    return gene_roles(adata, *args, **kwargs, inplace=False)


def write_gene_roles(adata: AnnData, roles: GeneRoles, key_added: str = consts.DEFAULT_KEY) -> None:
    """Write a :class:`GeneRoles` to ``adata.var`` and ``adata.uns[Keys(key_added).gene_roles]`` (in place)."""
    if not roles.var_names.equals(adata.var_names):
        raise ValueError("These gene roles were computed on different genes than adata.var_names.")
    keys = Keys(key_added)
    df = roles.to_frame()
    with restore_on_error(adata, var=[keys.role, keys.prior, keys.prior_rank], uns=[keys.gene_roles]):
        adata.var[keys.role] = df["role"].array
        adata.var[keys.prior] = df["prior"].to_numpy()
        adata.var[keys.prior_rank] = df["prior_rank"].to_numpy()
        adata.uns[keys.gene_roles] = to_h5ad(dict(roles.params))
