"""Observed against predicted expression on the H&E image, through squidpy (AnnData) or spatialdata-plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._constants import Keys
from agl_scverse._docs import d
from agl_scverse._expression import expression_transform, observed_transform, predicted_mask
from agl_scverse._serialize import null_as_none
from agl_scverse._validate import resolve_spots, scored_spots

from ._common import (
    EXPRESSION_CMAP,
    AxesArg,
    FigSize,
    PlotResult,
    SavePath,
    color_norm,
    dense,
    finish,
    finite_pcc,
    is_spatialdata,
    library_image,
    new_axes,
    sd_table,
    spot_diameter,
)

__all__ = ["spatial_prediction"]

_COLS = ["observed", "predicted"]  # obs columns of the temporary tables drawn (titles carry the gene names)


@dataclass
class _Panel:
    gene: str
    library: str
    mask: np.ndarray  # spots of this library
    observed: np.ndarray | None  # values on those spots (None: no measured expression drawn)
    predicted: np.ndarray
    pcc: float  # over the scored spots of this library
    n_scored: int
    scored: str  # which spots: "held-out", "validation", "refitted", "training", "all", "selected"


@d.dedent
def spatial_prediction(
    data: Any,
    genes: str | Sequence[str],
    key: str = "agl",
    library_key: str | None = None,
    library_id: str | Sequence[str] | None = None,
    *,
    table_key: str | None = None,
    observed: bool | None = None,
    spots: Any = None,
    img: bool = True,
    img_res_key: str = consts.HIRES,
    crop: bool = True,
    cmap: str = EXPRESSION_CMAP,
    shared_scale: bool = True,
    robust: bool = True,
    size: float | None = None,
    ax: AxesArg = None,
    figsize: FigSize = None,
    show: bool | None = None,
    save: SavePath = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> PlotResult:
    """Plot observed and predicted expression side by side on the H&E image, one row per gene and slide.

    Read from ``.layers["<key>_pred"]``, ``.var["<key>_predicted"]`` and ``.uns["<key>_pred"]`` (written by
    :func:`agl_scverse.tl.agl_predict` / :func:`~agl_scverse.tl.predict_anndata`), so a slide predicted with a loaded
    model plots without the fit's ``.uns["<key>"]``; observed values are the counts in the layer's scale. Each
    predicted title gives the Pearson r and its spots, chosen per slide: held-out (``.obs["<key>_split"] ==
    "unused"``), else validation ("refitted on" with ``refit``), else training; all spots without a split column.
    Where r is undefined the title says why. AnnData is drawn with :func:`squidpy.pl.spatial_scatter`, SpatialData
    with spatialdata-plot.

    There are ``n_rows = n_genes * n_slides`` rows (gene-major) of two panels (one without observed expression).
    ``ax``, when given, holds the panels of each row in turn (a sequence, or an array of shape ``(n_rows, 2)``).

    Parameters
    ----------
    data
        AnnData after :func:`agl_scverse.tl.agl_predict` / ``predict_anndata``, or a SpatialData whose table holds it.
    genes
        One gene or several; each must have predictions (``.var["<key>_predicted"]``).
    key
        ``key_added`` of the run.
    %(library_key)s
    library_id
        Slide(s) to draw (default: all). Without ``library_key``, the ``uns['spatial']`` entry to use.
    table_key
        SpatialData table holding the run (default: the only table).
    observed
        Draw the measured expression beside the prediction (and r in the titles). ``None``: when the AnnData holds
        measured counts (``.uns["<key>_pred"]["observed"]``).
    spots
        Spots r is computed on (as ``spots`` of :func:`~agl_scverse.tl.evaluate`); every spot is drawn.
    img
        Draw the H&E image under the spots.
    img_res_key
        Which image of ``uns['spatial'][library]['images']`` to draw (the next best one when it is absent).
    crop
        Limit each map to the spots with a margin of one spot, rather than the whole image.
    cmap
        Colour map of both panels.
    shared_scale
        One colour range for the observed and the predicted panel of a row (default); ``False``: one per panel.
    robust
        Colour range from the 1st to the 99th percentile of the values; ``False``: minimum to maximum.
    size
        Spot size passed to squidpy (scale of ``spot_diameter_fullres``).
    %(plot_params)s
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` (AnnData) or ``render_shapes`` (SpatialData).

    Returns
    -------
    numpy.ndarray or matplotlib.figure.Figure or None
        The Figure with ``return_fig=True``; otherwise None when shown, else the Axes:
        an array of shape ``(n_rows, 2)`` (observed, predicted), or ``(n_rows, 1)``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide()  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> agl.tl.agl_predict(adata, model)  # doctest: +SKIP
    >>> agl.pl.spatial_prediction(adata, ["GENE_0", "GENE_1"])  # doctest: +SKIP
    >>> pred = agl.tl.predict_anndata(he_only, "my_model")  # doctest: +SKIP
    >>> agl.pl.spatial_prediction(pred, "GENE_0")  # predictions only  # doctest: +SKIP
    """
    scaling, what = (shared_scale, robust), (observed, spots, crop)
    if isinstance(data, AnnData):
        args: tuple = (library_key, library_id, img, img_res_key, cmap, scaling, size, ax, figsize, kwargs, what)
        fig, axs = _plot_anndata(data, genes, key, *args)
    elif is_spatialdata(data):
        fig, axs = _plot_spatialdata(
            data, genes, key, library_id, table_key, img, cmap, scaling, ax, figsize, kwargs, what
        )
    else:
        raise TypeError(f"data must be an AnnData or a SpatialData, got {type(data).__name__}.")
    return finish(fig, axs, show=show, save=save, return_fig=return_fig, writekey="spatial_prediction")


def _panels(adata: AnnData, genes, key: str, masks: dict[str, np.ndarray], observed, spots) -> list[_Panel]:
    keys = Keys(key)
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
    has = predicted_mask(adata, keys)
    no_pred = [g for g, j in zip(genes, idx) if not has[j]]
    if no_pred:
        raise ValueError(
            f"Genes {no_pred} have no predictions in layers[{keys.pred_layer!r}] (the model does not output them, "
            f"or they were not asked for). Pick genes the model predicts, e.g. {list(adata.var_names[has][:5])}."
        )
    pred = dense(adata.layers[keys.pred_layer][:, idx]).astype(float)
    record = null_as_none(adata.uns.get(keys.pred_uns)) or {}
    if observed is None:
        observed = bool(record.get("observed", True))
    obs_values = _observed(adata, idx, keys, record) if observed else None
    split = adata.obs[keys.split].astype(str).to_numpy() if keys.split in adata.obs else None
    given = resolve_spots(adata, spots, as_mask=True) if spots is not None else None
    params = (null_as_none(adata.uns.get(keys.uns)) or {}).get("params") or {}
    refit = bool(null_as_none(record.get("refit", params.get("refit"))))  # the layer's record, else the fit's
    out = []
    for lib, mask in masks.items():
        sc, kind = _scored(split, mask, given, refit)
        for g, gene in enumerate(genes):
            p = pred[mask, g]
            o = obs_values[mask, g] if obs_values is not None else None
            r = finite_pcc(o[sc], p[sc]) if o is not None else float("nan")
            out.append(_Panel(gene, lib, mask, o, p, r, int(sc.sum()), kind))
    order = {lib: i for i, lib in enumerate(masks)}
    return sorted(out, key=lambda q: (genes.index(q.gene), order[q.library]))  # gene-major rows


def _scored(split: np.ndarray | None, mask: np.ndarray, given: np.ndarray | None, refit: bool):
    """The spots of one slide its r is over (chosen per slide) and what they are, for the title."""
    if given is not None:
        return given[mask], "selected"
    if split is None:
        return np.ones(int(mask.sum()), dtype=bool), "all"
    sc, kind = scored_spots(split[mask], int(mask.sum()))
    if kind == "validation" and refit:
        kind = "refitted"  # validation spots the model was retrained on after early stopping
    elif kind == "all":
        kind = "training"  # a split column, but neither held-out nor validation spots on this slide
    return sc, kind


def _observed(adata: AnnData, idx: np.ndarray, keys: Keys, record: dict) -> np.ndarray:
    """Measured counts of genes ``idx`` in the scale of the prediction layer."""
    params = (null_as_none(adata.uns.get(keys.uns)) or {}).get("params", {}) or {}
    source = record if record else params  # the layer's record; a layer written before it: the fit's parameters
    layer = null_as_none(source.get("layer"))  # absent (or a 0.1 placeholder): the counts are in .X
    if layer is not None and str(layer) not in adata.layers:
        raise KeyError(f"The model was trained on counts in adata.layers[{layer!r}], which this AnnData lacks.")
    if adata.n_vars == 0:
        raise ValueError("The AnnData holds no measured expression; pass observed=False.")
    X = adata.X if layer is None else adata.layers[str(layer)]
    transform = observed_transform(record, null_as_none(params.get("transform")) or consts.TRANSFORM_LOG1P)
    return expression_transform(X, transform=transform, columns=idx).astype(float)


def _titles(p: _Panel, several: bool) -> list[str]:
    """Titles of a row: the observed panel (when drawn), then the predicted one with its :func:`r_phrase`."""
    where = f" ({p.library})" if several else ""
    if p.observed is None:
        return [f"{p.gene} predicted{where}"]
    return [f"{p.gene} observed{where}", f"{p.gene} predicted{where}\n{r_phrase(p.pcc, p.n_scored, p.scored)}"]


def r_phrase(r: float, n: int, kind: str) -> str:
    """``"r = 0.190 on 178 held-out spots"``, ``"r = 0.190 on all 178 spots"``, or why there is no r (never NaN)."""
    word, note = _KIND_WORDS.get(kind, (kind, ""))
    spots = "spot" if n == 1 else "spots"
    what = f"all {n} {spots}" if kind == "all" else f"{n} {word} {spots}{note}"
    if n == 0:
        return f"no r: no {word} spots" if kind != "all" else "no r: no spots"
    if n < 2:
        return f"no r: only {what}"
    if not np.isfinite(r):
        return f"no r on {what}: constant values"
    return f"r = {r:.3f} on {what}"


#: How each kind of scored spots reads in a title: the word before "spots", and a note after it.
_KIND_WORDS = {"refitted": ("validation", " (refitted on)")}


def _norms(p: _Panel, shared_scale: bool, robust: bool) -> list:
    """Colour ranges of the observed and predicted panel of a row (see ``robust`` and ``shared_scale``)."""
    values = _values(p)
    if shared_scale:
        return [color_norm(np.concatenate(values), robust)] * len(values)
    return [color_norm(v, robust) for v in values]


def _grid(n_rows: int, n_cols: int, ax, figsize) -> tuple[Figure, np.ndarray]:
    """The figure and the ``(n_rows, n_cols)`` array of Axes to draw in: the given ``ax`` (checked) or a new grid."""
    panels = "observed and predicted" if n_cols == 2 else "predicted"
    what = f"{panels} for each of {n_rows} row{'s' if n_rows != 1 else ''}: genes x slides"
    fig, axs = new_axes(ax, n_cols * n_rows, figsize or (4.2 * n_cols, 3.8 * n_rows), ncols=n_cols, what=what)
    return fig, axs.reshape(n_rows, n_cols)


def _crop(a: Axes, xy: np.ndarray, margin: float) -> None:
    """Limit an image-oriented map (y down) to the points ``xy`` plus ``margin`` on every side."""
    if len(xy) == 0:
        return
    (x0, y0), (x1, y1) = xy.min(axis=0) - margin, xy.max(axis=0) + margin
    a.set(xlim=(x0, x1), ylim=(y1, y0))


def _values(p: _Panel) -> list[np.ndarray]:
    return [p.predicted] if p.observed is None else [p.observed, p.predicted]


def _library_masks(adata: AnnData, library_key, library_id) -> dict[str, np.ndarray]:
    library_key = _spatial.resolve_library_key(adata, library_key)
    if library_key is None:
        if library_id is not None:
            libs = [library_id] if isinstance(library_id, str) else list(library_id)
            if len(libs) != 1:
                raise ValueError("Several library_id values need library_key=<obs column naming the slides>.")
            lib = libs[0]
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


def _plot_anndata(
    adata, genes, key, library_key, library_id, img, img_res_key, cmap, scaling, size, ax, figsize, kwargs, what
):
    import squidpy as sq

    if consts.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: spot coordinates (full-resolution pixels) are needed.")
    observed, spots, crop = what
    masks = _library_masks(adata, library_key, library_id)
    panels = _panels(adata, genes, key, masks, observed, spots)
    fig, axs = _grid(len(panels), len(_values(panels[0])), ax, figsize)
    xy_all = np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=float)[:, :2]
    images = {lib: (library_image(adata, lib, img_res_key) if img else (None, 1.0)) for lib in masks}
    for row, p in enumerate(panels):
        image, scale = images[p.library]
        xy = xy_all[p.mask]
        diameter = spot_diameter(adata, p.library, xy)
        entry = {consts.SCALEFACTORS: {consts.HIRES_SCALEF: scale, consts.SPOT_DIAMETER: diameter}}
        if image is not None:
            entry[consts.IMAGES] = {consts.HIRES: image}
        values = _values(p)
        cols = _COLS[-len(values) :]
        tmp = AnnData(
            np.zeros((len(xy), 0), dtype=np.float32),
            obs=dict(zip(cols, values)),
            obsm={consts.SPATIAL_KEY: xy},
            uns={consts.SPATIAL_KEY: {p.library: entry}},
        )
        opts: dict[str, Any] = {"library_id": p.library, "img": image is not None, "img_res_key": consts.HIRES}
        for a, col, title, norm in zip(axs[row], cols, _titles(p, len(masks) > 1), _norms(p, *scaling)):
            sq.pl.spatial_scatter(
                tmp, color=col, size=size, cmap=cmap, norm=norm, title=title, ax=a, fig=fig, **opts, **kwargs
            )
        for a in axs[row]:
            a.set(xlabel="", ylabel="")
            if crop:  # squidpy draws in the image's pixels: full-resolution pixels times its scale factor
                _crop(a, xy * scale, diameter * scale)
    return fig, axs


def _plot_spatialdata(sdata, genes, key, library_id, table_key, img, cmap, scaling, ax, figsize, kwargs, what):
    try:
        import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    except ImportError as err:
        raise ImportError(
            "Plotting a SpatialData needs spatialdata-plot: pip install spatialdata-plot. "
            "Or convert it first: agl.pl.spatial_prediction(agl.io.from_spatialdata(sdata), ...)."
        ) from err
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    table_key, table = sd_table(sdata, table_key)
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
    observed, spots, crop = what
    panels = _panels(table, genes, key, masks, observed, spots)
    fig, axs = _grid(len(panels), len(_values(panels[0])), ax, figsize)
    for row, p in enumerate(panels):
        obs = table.obs.loc[p.mask, [region_key, instance_key]].copy()
        values = _values(p)
        cols = _COLS[-len(values) :]
        for c, v in zip(cols, values):
            obs[c] = v
        obs[region_key] = obs[region_key].astype(str).astype("category")
        tmp = TableModel.parse(
            AnnData(np.zeros((len(obs), 0), dtype=np.float32), obs=obs),
            region=p.library,
            region_key=region_key,
            instance_key=instance_key,
        )
        cs = next(iter(_spatial.coordinate_systems(sdata.shapes[p.library])))
        view = SpatialData(
            images={n: im for n, im in sdata.images.items() if cs in _spatial.coordinate_systems(im)} if img else {},
            shapes={p.library: sdata.shapes[p.library]},
            tables={"agl_plot": tmp},
        )
        for a, c, title, norm in zip(axs[row], cols, _titles(p, len(masks) > 1), _norms(p, *scaling)):
            pl = view.pl.render_images().pl if view.images else view.pl
            pl.render_shapes(p.library, color=c, table_name="agl_plot", cmap=cmap, norm=norm, **kwargs).pl.show(
                coordinate_systems=cs, ax=a, title=title
            )
            if crop:
                _crop_to_shapes(a, sdata.shapes[p.library], cs)
    return fig, axs


def _crop_to_shapes(a: Axes, shapes, cs: str) -> None:
    """Limit a spatialdata-plot map to the shapes (in coordinate system ``cs``) plus a margin of one spot."""
    from spatialdata import get_extent

    ext = get_extent(shapes, coordinate_system=cs)
    lo = np.array([ext["x"][0], ext["y"][0]], dtype=float)
    hi = np.array([ext["x"][1], ext["y"][1]], dtype=float)
    margin = 0.05 * float(max(hi - lo))
    y0, y1 = a.get_ylim()
    ylim = (lo[1] - margin, hi[1] + margin)
    a.set(xlim=(lo[0] - margin, hi[0] + margin), ylim=ylim[::-1] if y0 > y1 else ylim)  # y down: as images are drawn
