"""Observed against predicted expression on the H&E image, through squidpy (AnnData) or spatialdata-plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scanpy import logging as logg

from agl_scverse import _constants as K
from agl_scverse import _spatial
from agl_scverse._docs import d
from agl_scverse._expression import expression_transform
from agl_scverse._serialize import null_as_none
from agl_scverse._stats import pearson_per_gene

from ._common import EXPRESSION_CMAP, axes_array, finish, get_run, new_axes

__all__ = ["spatial_prediction"]

_COLS = ["observed", "predicted"]  # obs columns of the temporary tables drawn (titles carry the gene names)


@dataclass
class _Panel:
    gene: str
    library: str
    mask: np.ndarray  # spots of this library
    observed: np.ndarray  # values on those spots
    predicted: np.ndarray
    pcc: float


@d.dedent
def spatial_prediction(
    data: Any,
    genes: str | Sequence[str],
    key: str = "agl",
    library_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    *,
    table_key: str | None = None,
    img: bool = True,
    img_res_key: str = K.HIRES,
    cmap: str = EXPRESSION_CMAP,
    shared_scale: bool = False,
    robust: bool = True,
    size: float | None = None,
    ax: Sequence[Axes] | np.ndarray | None = None,
    figsize: tuple[float, float] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> np.ndarray | Figure | None:
    """Plot observed and predicted expression side by side on the H&E image, one row per gene and slide.

    The observed values are the counts in the run's expression scale (``params["transform"]`` of the run,
    ``log1p`` by default, through :func:`agl_scverse.pp.expression_transform`); the predicted values are
    ``.layers["<key>_pred"]``. The title of each predicted panel gives the Pearson correlation of observed and
    predicted values over the spots of that slide. AnnData input is drawn with :func:`squidpy.pl.spatial_scatter`,
    SpatialData input with spatialdata-plot.

    There are ``n_rows = n_genes * n_slides`` rows (gene-major) of two panels. ``ax``, when given, holds
    ``2 * n_rows`` Axes, the observed and the predicted panel of each row in turn: a sequence, or an array of
    shape ``(n_rows, 2)``. A new figure is 4.2 x 3.8 inches per panel unless ``figsize`` is given.

    Parameters
    ----------
    data
        AnnData after :func:`agl_scverse.tl.agl_predict`, or a SpatialData whose table holds the run
        (``table.uns[key]`` and ``table.layers["<key>_pred"]``).
    genes
        One gene or several; each must have predictions (the model's target and auxiliary genes).
    key
        ``key_added`` of the run.
    %(library_key)s
    library_id
        Slide(s) to draw (default: all). Without ``library_key``, the ``uns['spatial']`` entry to use.
    table_key
        SpatialData table holding the run (default: the only table).
    img
        Draw the H&E image under the spots.
    img_res_key
        Which image of ``uns['spatial'][library]['images']`` to draw (``"hires"``, ``"lowres"``, ``"fullres"``);
        the next best one is used when it is absent.
    cmap
        Colour map of both panels.
    shared_scale
        Use one colour range for the observed and predicted panel of a row (default: each its own range,
        since predictions are usually smoother than observations).
    robust
        Colour range from the 1st to the 99th percentile of the values (of each panel, or of both panels with
        ``shared_scale``), so a few extreme spots do not wash out the map; ``False``: minimum to maximum. The PCC
        in the title always uses every spot.
    size
        Spot size passed to squidpy (scale of ``spot_diameter_fullres``).
    %(plot_params)s
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` (AnnData) or ``render_shapes`` (SpatialData).

    Returns
    -------
    numpy.ndarray or matplotlib.figure.Figure or None
        The :class:`~matplotlib.figure.Figure` with ``return_fig=True``; otherwise None when the figure is shown,
        else a NumPy array of :class:`~matplotlib.axes.Axes` of shape ``(n_rows, 2)``, one row per gene and slide:
        column 0 observed, column 1 predicted (colour bars are extra axes of the figure).

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide()  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> agl.tl.agl_predict(adata, model)  # doctest: +SKIP
    >>> agl.pl.spatial_prediction(adata, ["GENE_0", "GENE_1"])  # doctest: +SKIP
    """
    if isinstance(data, AnnData):
        fig, axs = _plot_anndata(
            data, genes, key, library_key, library_id, img, img_res_key, cmap, (shared_scale, robust), size, ax, figsize,
            kwargs,
        )  # fmt: skip
        return finish(fig, axs, show=show, save=save, return_fig=return_fig)
    try:
        from spatialdata import SpatialData
    except ImportError:  # pragma: no cover
        SpatialData = None  # type: ignore[assignment]
    if SpatialData is not None and isinstance(data, SpatialData):
        fig, axs = _plot_spatialdata(
            data, genes, key, library_id, table_key, img, cmap, (shared_scale, robust), ax, figsize, kwargs
        )
        return finish(fig, axs, show=show, save=save, return_fig=return_fig)
    raise TypeError(f"data must be an AnnData or a SpatialData, got {type(data).__name__}.")


# --------------------------------------------------------------------------------------------------------------
# shared: values and PCC per gene and slide
# --------------------------------------------------------------------------------------------------------------
def _panels(adata: AnnData, genes, key: str, masks: dict[str, np.ndarray]) -> list[_Panel]:
    keys, run = get_run(adata, key)
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes is empty; pass at least one gene name.")
    unknown = [g for g in genes if g not in adata.var_names]
    if unknown:
        raise KeyError(f"Genes {unknown} are not in adata.var_names.")
    if keys.pred_layer not in adata.layers:
        raise KeyError(
            f"adata.layers[{keys.pred_layer!r}] is missing: no predictions of run {key!r}. "
            f"Run agl.tl.agl_predict(adata, model, key_added={key!r}) first."
        )
    idx = adata.var_names.get_indexer(genes)
    pred = _dense(adata.layers[keys.pred_layer][:, idx]).astype(float)
    no_pred = [g for g, col in zip(genes, pred.T) if not np.isfinite(col).any()]
    if no_pred:
        has = np.isfinite(_dense(adata.layers[keys.pred_layer][: min(adata.n_obs, 1)])).ravel()
        example = list(adata.var_names[has][:5])
        raise ValueError(
            f"Genes {no_pred} have no predictions in layers[{keys.pred_layer!r}] (the model does not output them). "
            f"Pick genes the model predicts, e.g. {example}."
        )
    observed = _observed(adata, idx, run.get("params", {}) or {})
    out = []
    for g, gene in enumerate(genes):
        for lib, mask in masks.items():
            o, p = observed[mask, g], pred[mask, g]
            out.append(_Panel(gene, lib, mask, o, p, _pcc(o, p)))
    return out


def _observed(adata: AnnData, idx: np.ndarray, params: dict) -> np.ndarray:
    layer = null_as_none(params.get("layer"))  # absent (or a 0.1 placeholder): the counts are in .X
    if layer is not None and str(layer) not in adata.layers:
        raise KeyError(f"The run was trained on counts in adata.layers[{layer!r}], which this AnnData lacks.")
    X = adata.X if layer is None else adata.layers[str(layer)]
    transform = null_as_none(params.get("transform")) or "log1p"
    return expression_transform(X, transform=transform, columns=idx).astype(float)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _pcc(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation over the spots where both values are finite (NaN if fewer than 2 or either is constant)."""
    ok = np.isfinite(observed) & np.isfinite(predicted)
    return float(pearson_per_gene(observed[ok, None], predicted[ok, None], constant_pred=np.nan)[0])


def _titles(p: _Panel, several: bool) -> tuple[str, str]:
    where = f" ({p.library})" if several else ""
    return f"{p.gene} observed{where}", f"{p.gene} predicted{where}\nPCC = {p.pcc:.3f}"


def _norms(p: _Panel, shared_scale: bool, robust: bool) -> list:
    """Colour ranges of the observed and predicted panel of a row (see ``robust`` and ``shared_scale``)."""
    from matplotlib.colors import Normalize

    q = (1.0, 99.0) if robust else (0.0, 100.0)

    def norm(values: np.ndarray) -> Normalize:
        v = values[np.isfinite(values)]
        if v.size == 0:
            return Normalize()
        lo, hi = (float(x) for x in np.percentile(v, q))
        return Normalize(lo, hi if hi > lo else lo + 1e-9, clip=False)

    if shared_scale:
        both = norm(np.concatenate([p.observed, p.predicted]))
        return [both, both]
    return [norm(p.observed), norm(p.predicted)]


def _grid(n_rows: int, ax, figsize) -> tuple[Figure, np.ndarray]:
    """The figure and the ``(n_rows, 2)`` array of Axes to draw in: the given ``ax`` (checked) or a new grid."""
    what = f"observed and predicted for each of {n_rows} row{'s' if n_rows != 1 else ''}: genes x slides"
    fig, axs = new_axes(ax, 2 * n_rows, figsize or (8.4, 3.8 * n_rows), ncols=2, what=what)
    return fig, axes_array(axs, (n_rows, 2))


# --------------------------------------------------------------------------------------------------------------
# AnnData through squidpy
# --------------------------------------------------------------------------------------------------------------
def _library_masks(adata: AnnData, library_key, library_id) -> dict[str, np.ndarray]:
    library_key = _spatial.resolve_library_key(adata, library_key)
    if library_key is None:
        if library_id is not None:
            lib = library_id if isinstance(library_id, str) else list(library_id)
            if not isinstance(lib, str):
                if len(lib) != 1:
                    raise ValueError("Several library_id values need library_key=<obs column naming the slides>.")
                lib = lib[0]
            _spatial.library_entry(adata, lib)
            return {lib: np.ones(adata.n_obs, dtype=bool)}
        return _spatial.spot_masks(adata, None)
    masks = _spatial.spot_masks(adata, library_key)
    if library_id is None:
        return masks
    wanted = [library_id] if isinstance(library_id, str) else list(library_id)
    unknown = [lib for lib in wanted if lib not in masks]
    if unknown:
        raise KeyError(f"library_id {unknown} not found in adata.obs[{library_key!r}]; slides are {list(masks)}.")
    return {lib: masks[lib] for lib in wanted}


def _library_image(adata: AnnData, lib: str, img_res_key: str) -> tuple[np.ndarray | None, float]:
    order = [img_res_key, *[r for r in (K.HIRES, K.LOWRES, K.FULLRES) if r != img_res_key]]
    try:
        image, scale, _ = _spatial.get_image(adata, lib, prefer=order, warn=False)
    except (KeyError, ValueError, FileNotFoundError) as err:
        logg.warning(f"No image drawn for library {lib!r}: {err}")
        return None, 1.0
    return image, scale


def _spot_diameter(adata: AnnData, lib: str, xy: np.ndarray) -> float:
    sf = adata.uns.get(K.SPATIAL_KEY, {}).get(lib, {}).get(K.SCALEFACTORS, {})
    if K.SPOT_DIAMETER in sf:
        return float(sf[K.SPOT_DIAMETER])
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    return 0.55 * float(np.median(dist[:, 1]))  # Visium and legacy ST: spot diameter ~ half the spacing


def _plot_anndata(adata, genes, key, library_key, library_id, img, img_res_key, cmap, scaling, size, ax, figsize, kwargs):  # fmt: skip
    import squidpy as sq

    if K.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: spot coordinates (full-resolution pixels) are needed.")
    masks = _library_masks(adata, library_key, library_id)
    panels = _panels(adata, genes, key, masks)
    several = len(masks) > 1
    fig, axs = _grid(len(panels), ax, figsize)
    xy_all = np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=float)[:, :2]
    images = {lib: (_library_image(adata, lib, img_res_key) if img else (None, 1.0)) for lib in masks}
    for row, p in enumerate(panels):
        image, scale = images[p.library]
        xy = xy_all[p.mask]
        entry = {K.SCALEFACTORS: {K.HIRES_SCALEF: scale, K.SPOT_DIAMETER: _spot_diameter(adata, p.library, xy)}}
        if image is not None:
            entry[K.IMAGES] = {K.HIRES: image}
        cols = _COLS
        tmp = AnnData(
            np.zeros((len(xy), 0), dtype=np.float32),
            obs={cols[0]: p.observed, cols[1]: p.predicted},
            obsm={K.SPATIAL_KEY: xy},
            uns={K.SPATIAL_KEY: {p.library: entry}},
        )
        for a, col, title, norm in zip(axs[row], cols, _titles(p, several), _norms(p, *scaling)):
            sq.pl.spatial_scatter(
                tmp,
                color=col,
                library_id=p.library,
                img=image is not None,
                img_res_key=K.HIRES,
                size=size,
                cmap=cmap,
                norm=norm,
                title=title,
                ax=a,
                fig=fig,
                **kwargs,
            )
        for a in axs[row]:
            a.set_xlabel("")
            a.set_ylabel("")
    return fig, axs


# --------------------------------------------------------------------------------------------------------------
# SpatialData through spatialdata-plot
# --------------------------------------------------------------------------------------------------------------
def _plot_spatialdata(sdata, genes, key, library_id, table_key, img, cmap, scaling, ax, figsize, kwargs):  # fmt: skip
    try:
        import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    except ImportError as err:
        raise ImportError(
            "Plotting a SpatialData needs spatialdata-plot: pip install spatialdata-plot. "
            "Or convert it first: agl.pl.spatial_prediction(agl.io.from_spatialdata(sdata), ...)."
        ) from err
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    tables = dict(sdata.tables)
    if table_key is None:
        if len(tables) != 1:
            raise ValueError(f"The SpatialData has tables {list(tables)}; pass table_key=<the one holding the run>.")
        table_key = next(iter(tables))
    if table_key not in tables:
        raise KeyError(f"table_key={table_key!r} is not a table of the SpatialData; tables are {list(tables)}.")
    table = tables[table_key]
    attrs = table.uns.get(TableModel.ATTRS_KEY)
    if not attrs:
        raise ValueError(f"Table {table_key!r} is not annotating any element (no uns['spatialdata_attrs']).")
    region_key, instance_key = attrs[TableModel.REGION_KEY_KEY], attrs[TableModel.INSTANCE_KEY]
    regions = [str(r) for r in np.atleast_1d(attrs[TableModel.REGION_KEY])]
    if library_id is not None:
        wanted = [library_id] if isinstance(library_id, str) else list(library_id)
        unknown = [r for r in wanted if r not in regions]
        if unknown:
            raise KeyError(f"library_id {unknown} are not regions of table {table_key!r}; regions are {regions}.")
        regions = wanted
    missing = [r for r in regions if r not in sdata.shapes]
    if missing:
        raise ValueError(f"Regions {missing} are not shapes elements; spatial_prediction draws spots (shapes).")
    col = table.obs[region_key].astype(str).to_numpy()
    masks = {r: col == r for r in regions}
    panels = _panels(table, genes, key, masks)
    several = len(masks) > 1
    fig, axs = _grid(len(panels), ax, figsize)
    for row, p in enumerate(panels):
        obs = table.obs.loc[p.mask, [region_key, instance_key]].copy()
        cols = _COLS
        obs[cols[0]], obs[cols[1]] = p.observed, p.predicted
        obs[region_key] = obs[region_key].astype(str).astype("category")
        tmp = TableModel.parse(
            AnnData(np.zeros((len(obs), 0), dtype=np.float32), obs=obs),
            region=p.library,
            region_key=region_key,
            instance_key=instance_key,
        )
        cs = next(iter(_coordinate_systems(sdata.shapes[p.library])))
        view = SpatialData(
            images={n: im for n, im in sdata.images.items() if cs in _coordinate_systems(im)} if img else {},
            shapes={p.library: sdata.shapes[p.library]},
            tables={"agl_plot": tmp},
        )
        for a, c, title, norm in zip(axs[row], cols, _titles(p, several), _norms(p, *scaling)):
            pl = view.pl.render_images().pl if view.images else view.pl
            pl.render_shapes(p.library, color=c, table_name="agl_plot", cmap=cmap, norm=norm, **kwargs).pl.show(
                coordinate_systems=cs, ax=a, title=title
            )
    return fig, axs


def _coordinate_systems(element) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True).keys())
