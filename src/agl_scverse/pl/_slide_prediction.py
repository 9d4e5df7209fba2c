"""Whole-slide maps of predicted genes over the H&E image, optionally beside a section's measured expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._constants import Keys, Transform
from agl_scverse._docs import d
from agl_scverse._expression import expression_transform, observed_transform
from agl_scverse._serialize import null_as_none

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
    median_spacing,
    new_axes,
    sd_table,
    spot_diameter,
)
from ._spatial_prediction import r_phrase

__all__ = ["slide_prediction"]


@d.dedent
def slide_prediction(
    pred: AnnData | Any,
    genes: str | Sequence[str],
    *,
    measured: AnnData | Any | None = None,
    table_key: str | None = None,
    measured_table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    layer: str | None = None,
    measured_layer: str | None = None,
    transform: Transform | None = None,
    img: bool = True,
    img_res_key: str = consts.HIRES,
    crop: bool = True,
    cmap: str = EXPRESSION_CMAP,
    robust: bool = True,
    spot_scale: float = 1.0,
    alpha: float = 1.0,
    ax: AxesArg = None,
    figsize: FigSize = None,
    show: bool | None = None,
    save: SavePath = None,
    return_fig: bool = False,
) -> PlotResult:
    """Map predicted genes over a whole slide's H&E image, optionally beside the section's measured expression.

    ``pred`` holds predictions in ``.X`` at spots (usually a grid from :func:`agl_scverse.pp.spot_grid`) with
    centres in full-resolution pixels in ``.obsm["spatial"]`` and the slide's image in ``.uns["spatial"]``. Each spot
    is a disk of its ``spot_diameter_fullres``, at most the spots' median spacing, so a grid tiles.

    With ``measured`` (counts of the **same section**, in the same pixels), each gene's row has the measured
    expression (on the prediction's scale) and the prediction, with one colour range over both; the predicted title
    gives the Pearson r between each measured spot and its nearest predicted spot. ``ax``, when given, holds
    ``n_genes * n_cols`` Axes, row by row. Each row has one colour bar.

    Parameters
    ----------
    pred
        Predictions at spots of one slide: the AnnData of :func:`~agl_scverse.tl.predict_anndata`, or a SpatialData.
    genes
        One gene or several, among ``pred.var_names`` (and ``measured.var_names`` with ``measured``).
    measured
        Measured counts of the same section, drawn beside the prediction: an AnnData, or a SpatialData whose table
        carries ``.obsm["spatial"]`` and ``.uns["spatial"]`` (as :func:`agl_scverse.io.slide_to_spatialdata` writes).
    table_key
        The table of a SpatialData ``pred`` holding the predictions (default: the only table).
    measured_table_key
        The table of a SpatialData ``measured`` holding the counts (default: the only table).
    library_id
        The slide, when ``pred`` or ``measured`` holds several; default the only one.
    library_key
        ``.obs`` column naming the slides (default ``"library_id"`` where it tells several apart).
    layer
        Layer of ``pred`` holding the predictions (default ``.X``).
    measured_layer
        Layer of ``measured`` holding the counts (default ``.X``).
    transform
        How measured counts are put on the prediction's scale; default the one recorded in ``pred.uns["agl_pred"]``.
    img
        Draw the H&E image under the spots.
    img_res_key
        Which image of ``.uns['spatial'][library]['images']`` to draw (the next best one when it is absent).
    crop
        Limit the maps to the spots (of both AnnData) with a margin of one spot, rather than the whole image.
    cmap
        Colour map.
    robust
        Colour range from the 1st to the 99th percentile of the gene's values (over both panels); ``False``: all.
    spot_scale
        Factor on each AnnData's spot diameter (e.g. ``0.8`` leaves gaps between grid spots).
    alpha
        Opacity of the spots.
    %(plot_params)s

    Returns
    -------
    numpy.ndarray or matplotlib.figure.Figure or None
        The Figure with ``return_fig=True``; otherwise None when shown, else the Axes:
        an array of shape ``(n_genes, 2)`` (measured, predicted), or ``(n_genes, 1)``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> slide = agl.io.read_he_image("he.jpg", microns_per_pixel=0.73)  # doctest: +SKIP
    >>> grid = agl.pp.spot_grid(slide, model="my_model")  # doctest: +SKIP
    >>> pred = agl.tl.predict_anndata(grid, "my_model")  # doctest: +SKIP
    >>> agl.pl.slide_prediction(pred, ["ERBB2", "GRB7"])  # doctest: +SKIP
    >>> agl.pl.slide_prediction(pred, "ERBB2", measured=visium_of_the_same_section)  # doctest: +SKIP
    >>> agl.pl.slide_prediction(spatialdata.read_zarr("slide_predicted.zarr"), "ERBB2")  # doctest: +SKIP
    >>> visium = spatialdata.read_zarr("section_measured.zarr")  # doctest: +SKIP
    >>> agl.pl.slide_prediction(pred, "ERBB2", measured=visium, measured_table_key="table")  # doctest: +SKIP
    """
    if is_spatialdata(pred):
        pred = _sd_spots(pred, table_key, "table_key", "the predictions")
    if not isinstance(pred, AnnData):
        raise TypeError(
            f"pred must be an AnnData (from agl.tl.predict_anndata) or a SpatialData, got {type(pred).__name__}."
        )
    if measured is not None and is_spatialdata(measured):
        measured = _sd_spots(measured, measured_table_key, "measured_table_key", "the measured counts")
    if measured is not None and not isinstance(measured, AnnData):
        raise TypeError(
            f"measured must be an AnnData or a SpatialData of measured counts, got {type(measured).__name__}."
        )
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise ValueError("genes is empty; pass at least one gene name.")
    _check_genes(pred, genes, measured)
    lib, p_mask = _slide(pred, library_id, library_key, "pred")
    p_xy = _xy(pred, "pred")[p_mask]
    p_vals = dense(_matrix(pred, layer, "pred")[:, pred.var_names.get_indexer(genes)]).astype(float)[p_mask]
    p_diam = _diameter(pred, lib, p_xy) * spot_scale
    layers = [(pred, lib, p_xy, p_vals, p_diam)]
    if measured is not None:
        m_lib, m_mask = _slide(measured, library_id if library_id is not None else lib, library_key, "measured")
        m_xy = _xy(measured, "measured")[m_mask]
        record = null_as_none(pred.uns.get(Keys().pred_uns)) or {}
        how = transform if transform is not None else observed_transform(record, consts.TRANSFORM_LOG1P)
        X = _matrix(measured, measured_layer, "measured")[np.flatnonzero(m_mask)]
        m_vals = expression_transform(X, transform=how, columns=measured.var_names.get_indexer(genes)).astype(float)
        m_diam = _diameter(measured, m_lib, m_xy) * spot_scale
        layers.insert(0, (measured, m_lib, m_xy, m_vals, m_diam))
    n_cols = len(layers)
    what = f"{'measured and predicted' if n_cols == 2 else 'predicted'} for each of {len(genes)} genes"
    fig, axs = new_axes(ax, n_cols * len(genes), figsize or (4.2 * n_cols, 3.8 * len(genes)), ncols=n_cols, what=what)
    axs = axs.reshape(len(genes), n_cols)
    images = [library_image(a, lb, img_res_key) if img else (None, 1.0) for a, lb, *_ in layers]
    if img and images[-1][0] is None and n_cols == 2:  # the prediction's slide has no image: use the measured one
        images[-1] = images[0]
    extent = _extent(layers, images, crop)
    nearest = None
    if measured is not None and len(p_xy):
        from scipy.spatial import cKDTree

        nearest = cKDTree(p_xy).query(layers[0][2])[1]
    for g, gene in enumerate(genes):
        vals = [vs[:, g] for *_, vs, _ in layers]
        norm = color_norm(np.concatenate(vals), robust)
        colls = []
        for c, ((_, _, xy, _, diam), (image, scale), v) in enumerate(zip(layers, images, vals)):
            a = axs[g, c]
            if image is not None:
                arr = np.asarray(image)
                h, w = arr.shape[:2]
                a.imshow(arr, extent=(0, w / scale, h / scale, 0), interpolation="antialiased")
            colls.append(_disks(a, xy, diam, v, cmap, norm, alpha))
            a.set(xlim=extent[:2], ylim=(extent[3], extent[2]), aspect="equal", xticks=[], yticks=[])  # y down
        if nearest is not None:
            r = finite_pcc(vals[0], vals[1][nearest])
            axs[g, 0].set_title(f"{gene} measured ({layers[0][1]}, {len(nearest)} spots)")
            axs[g, 1].set_title(f"{gene} predicted ({len(p_xy)} spots)\n{_r_title(r, len(nearest))}")
        else:
            axs[g, -1].set_title(f"{gene} predicted ({len(p_xy)} spots)")
        fig.colorbar(colls[-1], ax=list(axs[g]), shrink=0.8)
    return finish(fig, axs, show=show, save=save, return_fig=return_fig, writekey="slide_prediction")


def _r_title(r: float, n: int) -> str:
    """``"r = 0.271 at 25 measured spots"`` (each against its nearest predicted spot), or why there is no r."""
    phrase = r_phrase(r, n, "all")
    if phrase.startswith("r = "):
        return f"r = {r:.3f} at {n} measured spots"
    return phrase


def _check_genes(pred: AnnData, genes: list[str], measured: AnnData | None) -> None:
    """Clear errors for genes the prediction (or the measured AnnData) lacks, naming the fix."""
    missing = [g for g in genes if g not in pred.var_names]
    if missing:
        have = list(pred.var_names[:5])
        raise KeyError(
            f"Genes {missing} have no predictions in pred (its {pred.n_vars} genes include {have}). Pick genes it "
            "holds, or predict them: agl.tl.predict_anndata(slide, model, genes=[...]) or genes='all' (any gene "
            "the model outputs, model.genes)."
        )
    if measured is not None:
        missing = [g for g in genes if g not in measured.var_names]
        if missing:
            raise KeyError(
                f"Genes {missing} are not in measured.var_names; pick genes measured on the section, or pass "
                "measured=None to draw the prediction alone."
            )


def _slide(adata: AnnData, library_id: str | None, library_key: str | None, name: str) -> tuple[str, np.ndarray]:
    """The library drawn from ``adata`` and the mask of its spots."""
    key = _spatial.resolve_library_key(adata, library_key)
    libs = list((adata.uns.get(consts.SPATIAL_KEY) or {}).keys())
    if key is None:
        if library_id is None and len(libs) > 1:
            raise ValueError(f"{name} holds libraries {libs}; pass library_id=<the slide>.")
        lib = library_id if library_id is not None else (libs[0] if libs else "slide")
        if libs and lib not in libs:
            raise KeyError(f"library_id={lib!r} is not a library of {name} (.uns['spatial'] holds {libs}).")
        return str(lib), np.ones(adata.n_obs, dtype=bool)
    masks = _spatial.spot_masks(adata, key)
    if library_id is None:
        if len(masks) != 1:
            raise ValueError(f"{name} holds slides {list(masks)} in .obs[{key!r}]; pass library_id=<the slide>.")
        library_id = next(iter(masks))
    if library_id not in masks:
        raise KeyError(f"library_id={library_id!r} is not a slide of {name}; .obs[{key!r}] holds {list(masks)}.")
    return str(library_id), masks[library_id]


def _sd_spots(sdata: Any, table_key: str | None, flag: str, what: str) -> AnnData:
    """A SpatialData's table (``table_key``, else the only one), checked to carry spot pixels and the image entry."""
    key, table = sd_table(sdata, table_key, flag)
    if consts.SPATIAL_KEY not in table.obsm or not table.uns.get(consts.SPATIAL_KEY):
        raise ValueError(
            f"Table {key!r} has no .obsm['spatial'] / .uns['spatial'] (spot pixels and the slide's image), as the "
            "SpatialData of agl-scverse predict-slide --out OUT.zarr and agl.io.slide_to_spatialdata have. Pass "
            f"agl.io.from_spatialdata(sdata, table_key=...) with {what} in .X instead."
        )
    return table


def _diameter(adata: AnnData, lib: str, xy: np.ndarray) -> float:
    """The spots' diameter (``spot_diameter_fullres``), at most their median spacing (so a grid tiles)."""
    spacing = median_spacing(xy)
    diameter = spot_diameter(adata, lib, xy)
    return diameter if spacing is None else min(diameter, spacing)


def _xy(adata: AnnData, name: str) -> np.ndarray:
    if consts.SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"{name}.obsm['spatial'] is missing: spot centres (full-resolution pixels) are needed.")
    return np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=float)[:, :2]


def _matrix(adata: AnnData, layer: str | None, name: str):
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"{name}.layers[{layer!r}] is missing; layers are {list(adata.layers)}.")
    return adata.X if layer is None else adata.layers[layer]


def _extent(layers, images, crop: bool) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` in full-resolution pixels shared by every panel: the spots plus one spot, or the image."""
    if crop or all(im is None for im, _ in images):
        boxes = [(xy.min(axis=0) - diam, xy.max(axis=0) + diam) for _, _, xy, _, diam in layers if len(xy)]
        if boxes:
            lo = np.min([b[0] for b in boxes], axis=0)
            hi = np.max([b[1] for b in boxes], axis=0)
            return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])
    sizes = [(im.width / s, im.height / s) for im, s in images if im is not None]
    if not sizes:
        return 0.0, 1.0, 0.0, 1.0
    return 0.0, float(max(w for w, _ in sizes)), 0.0, float(max(h for _, h in sizes))


def _disks(a: Axes, xy: np.ndarray, diameter: float, values: np.ndarray, cmap: str, norm, alpha: float):
    """Spots as disks of ``diameter`` data units (full-resolution pixels) coloured by ``values``."""
    from matplotlib.collections import EllipseCollection

    kw = {"offsets": xy, "offset_transform": a.transData, "cmap": cmap, "norm": norm, "alpha": alpha, "linewidths": 0}
    coll = EllipseCollection(widths=diameter, heights=diameter, angles=0.0, units="xy", **kw)
    coll.set_array(np.asarray(values, dtype=float))
    a.add_collection(coll)
    return coll
