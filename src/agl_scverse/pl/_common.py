"""Shared pieces of the plotting functions: run lookup, colours, saving and showing figures."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias, TypeVar

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agl_scverse import _constants as consts
from agl_scverse import _spatial
from agl_scverse._constants import Keys
from agl_scverse._serialize import null_as_none
from agl_scverse._stats import pearson_per_gene

#: What a plot returns when neither shown nor asked for its Figure: its one Axes, or an array of them.
_AxesT = TypeVar("_AxesT", Axes, np.ndarray)

#: Types of the keywords every plot takes (``ax``, ``figsize``, ``save``) and of what it returns (see :func:`finish`).
AxesArg: TypeAlias = Sequence[Axes] | np.ndarray | None
FigSize: TypeAlias = tuple[float, float] | None
SavePath: TypeAlias = str | Path | bool | None
PlotResult: TypeAlias = np.ndarray | Figure | None

#: Colours used across all plots, so a gene role looks the same everywhere.
COLORS = {
    "target": "#1b9e77",
    "selected": "#d95f02",
    "unselected": "#b3b3b3",
    "threshold": "#7570b3",
    "model": "#d95f02",
    "baseline": "#7570b3",
    "diagonal": "#666666",
}
#: Colour map for expression maps (observed and predicted).
EXPRESSION_CMAP = "viridis"


def get_run(adata: AnnData, key: str) -> tuple[Keys, dict]:
    """``Keys`` and ``.uns`` entry of the run ``key``, with a clear error when it is absent."""
    keys = Keys(key)
    run = adata.uns.get(keys.uns)
    if not isinstance(run, dict):
        runs = [k for k, v in adata.uns.items() if isinstance(v, dict) and "params" in v]
        hint = f"Runs found in adata.uns: {runs}; pass key=<one of them>." if runs else "No AGL run found."
        raise KeyError(
            f"adata.uns[{keys.uns!r}] is missing: no AGL run with key={key!r}. Fit one with "
            f"agl.tl.agl_fit(adata, key_added={key!r}) first. {hint}"
        )
    return keys, run


def require_var(adata: AnnData, columns: Sequence[str], what: str) -> None:
    """Raise a KeyError naming every missing ``.var`` column and the step that writes it."""
    missing = [c for c in columns if c not in adata.var.columns]
    if not missing:
        return
    if any(c.endswith(("_pcc", "_spearman", "_mse")) for c in missing):
        hint = "Run agl.tl.evaluate(adata, key_added=...) after agl.tl.agl_predict to add per-gene metrics."
    else:
        hint = "Run agl.tl.agl_fit(adata, key_added=...) to add gene roles and weights."
    raise KeyError(f"adata.var lacks {missing}, needed to plot {what}. {hint}")


def new_axes(
    ax: Axes | Sequence[Axes] | np.ndarray | None,
    n: int,
    figsize: tuple[float, float] | None,
    ncols: int | None = None,
    what: str | None = None,
    **kw,
) -> tuple[Figure, np.ndarray]:
    """``n`` axes (an object array): the given ``ax`` (checked, read row-major) or a new figure's ``n`` panels."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axs = np.asarray([ax] if isinstance(ax, Axes) else ax, dtype=object).ravel()
        if len(axs) != n or not all(isinstance(a, Axes) for a in axs):
            need = "an Axes" if n == 1 else f"a sequence of {n} Axes"
            got = "one Axes" if isinstance(ax, Axes) else f"{len(axs)} items"
            raise ValueError(f"ax must be {need} for this plot{f' ({what})' if what else ''}, got {got}.")
        fig = axs[0].figure
        if not isinstance(fig, Figure):  # Axes in a SubFigure: its root Figure saves and shows
            fig = fig.figure
        return fig, axs
    ncols = n if ncols is None else ncols
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **kw)
    flat = axs.ravel()
    for extra in flat[n:]:
        extra.remove()
    return fig, flat[:n]


def save_path(save: str | Path | bool | None, writekey: str) -> Path | None:
    """Where a plot named ``writekey`` is saved: scanpy's rule, except that a path with a folder is taken as written."""
    import scanpy as sc

    if save is None:
        save = bool(sc.settings.autosave)
    if save is False:
        return None
    figdir, fmt, suffix = Path(sc.settings.figdir), str(sc.settings.file_format_figs), str(sc.settings.plot_suffix)
    if save is True:
        return figdir / f"{writekey}{suffix}.{fmt}"
    if not isinstance(save, str | Path):
        raise TypeError(f"save must be True, False, None, a file name or a path, got {type(save).__name__}.")
    formats = set(Figure().canvas.get_supported_filetypes())
    if isinstance(save, str) and Path(save).name == save and save not in ("", ".", ".."):
        stem, ext = save, fmt
        dot = save.rfind(".")
        if dot > 0 and save[dot + 1 :].lower() in formats:
            stem, ext = save[:dot], save[dot + 1 :]
        return figdir / f"{writekey}{stem}{suffix}.{ext}"
    path = Path(save)
    if path.suffix.lstrip(".").lower() not in formats:
        path = path.with_name(f"{path.name}.{fmt}")
    return path


def finish(
    fig: Figure,
    axes: _AxesT,
    *,
    show: bool | None,
    save: str | Path | bool | None,
    return_fig: bool,
    writekey: str,
    dpi: int | None = None,
) -> Figure | _AxesT | None:
    """Save (:func:`save_path`), show (``None``: scanpy's autoshow), then return the Figure, None when shown, or ``axes``."""
    import matplotlib.pyplot as plt
    import scanpy as sc
    from scanpy import logging as logg

    path = save_path(save, writekey)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        logg.warning(f"saving figure to file {path}")
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if show is None:
        show = bool(sc.settings.autoshow)
    if show:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")
            plt.show()
    if return_fig:
        return fig
    return None if show else axes


def as_float(values) -> np.ndarray:
    """A list that may hold None or NaN (an epoch without a value) as a float array with NaN."""
    return np.array([np.nan if null_as_none(v) is None else float(v) for v in values], dtype=float)


def best_epoch(run: dict) -> float | None:
    """The epoch the run kept: ``metrics["best_epoch"]`` when recorded, else the one with the best validation PCC."""
    history = null_as_none(run.get("history")) or {}
    metrics = null_as_none(run.get("metrics")) or {}
    kept = null_as_none(metrics.get("best_epoch"))
    if kept is not None and np.isfinite(float(kept)):
        return float(kept)
    val = as_float(history.get("val_pcc", []))
    epochs = as_float(history.get("epoch", []))
    if len(val) == len(epochs) and np.isfinite(val).any():
        return float(epochs[int(np.nanargmax(val))])
    return None


def dense(x) -> np.ndarray:
    """A dense NumPy array of a dense or sparse matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def finite_pcc(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Pearson correlation over the spots where both values are finite (NaN if fewer than 2 or either is constant)."""
    ok = np.isfinite(observed) & np.isfinite(predicted)
    return float(pearson_per_gene(observed[ok, None], predicted[ok, None], constant_pred=np.nan)[0])


def library_image(adata: AnnData, lib: str, img_res_key: str) -> tuple[_spatial.ImageSource | None, float]:
    """The image of ``lib`` (``img_res_key``, else the next best) and its full-res-to-image scale; (None, 1.0) if none."""
    from scanpy import logging as logg

    order = [img_res_key, *[r for r in (consts.HIRES, consts.LOWRES, consts.FULLRES) if r != img_res_key]]
    try:
        image, scale, _ = _spatial.get_image(adata, lib, prefer=order, warn=False)
    except (KeyError, ValueError, FileNotFoundError) as err:
        logg.warning(f"No image drawn for library {lib!r}: {err}")
        return None, 1.0
    return image, scale


def median_spacing(xy: np.ndarray) -> float | None:
    """Median distance from each spot to its nearest neighbour (None for fewer than 2 spots)."""
    if len(xy) < 2:
        return None
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(dist[:, 1]))


def spot_diameter(adata: AnnData, lib: str, xy: np.ndarray) -> float:
    """``spot_diameter_fullres`` of library ``lib``, else 0.55 x the median spacing of the spots ``xy``."""
    sf = adata.uns.get(consts.SPATIAL_KEY, {}).get(lib, {}).get(consts.SCALEFACTORS, {})
    if consts.SPOT_DIAMETER in sf:
        return float(sf[consts.SPOT_DIAMETER])
    spacing = median_spacing(xy)
    return 1.0 if spacing is None else 0.55 * spacing  # Visium and legacy ST: spot diameter ~ half the spacing


def sd_table(sdata, table_key: str | None, flag: str = "table_key") -> tuple[str, AnnData]:
    """The table of a SpatialData holding a run: ``table_key``, else the only one; errors name the keyword ``flag``."""
    tables = dict(sdata.tables)
    if table_key is None:
        if len(tables) != 1:
            raise ValueError(f"The SpatialData has tables {list(tables)}; pass {flag}=<the one holding the run>.")
        table_key = next(iter(tables))
    if table_key not in tables:
        raise KeyError(f"{flag}={table_key!r} is not a table of the SpatialData; tables are {list(tables)}.")
    return table_key, tables[table_key]


def is_spatialdata(data) -> bool:
    """Whether ``data`` is a :class:`spatialdata.SpatialData` (imported only when asked)."""
    from spatialdata import SpatialData

    return isinstance(data, SpatialData)


def color_norm(values: np.ndarray, robust: bool):
    """Colour range of the finite ``values``: 1st to 99th percentile when ``robust``, else minimum to maximum."""
    from matplotlib.colors import Normalize

    v = values[np.isfinite(values)]
    if v.size == 0:
        return Normalize()
    lo, hi = (float(x) for x in np.percentile(v, (1.0, 99.0) if robust else (0.0, 100.0)))
    return Normalize(lo, hi if hi > lo else lo + 1e-9)
