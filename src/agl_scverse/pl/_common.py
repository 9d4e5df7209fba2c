"""Shared pieces of the plotting functions: run lookup, colours, saving and showing figures."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .._constants import Keys

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


def find_runs(adata: AnnData) -> list[str]:
    """Keys of ``.uns`` that look like an AGL run (a dict holding ``params``)."""
    return [k for k, v in adata.uns.items() if isinstance(v, dict) and "params" in v]


def get_run(adata: AnnData, key: str) -> tuple[Keys, dict]:
    """``Keys`` and ``.uns`` entry of the run ``key``, with a clear error when it is absent."""
    keys = Keys(key)
    run = adata.uns.get(keys.uns)
    if not isinstance(run, dict):
        runs = find_runs(adata)
        hint = f"Runs found in adata.uns: {runs}; pass key=<one of them>." if runs else "No AGL run found."
        raise KeyError(
            f"adata.uns[{keys.uns!r}] is missing: no AGL run with key={key!r}. Fit one with "
            f"agl.tl.agl_fit(adata, key_added={key!r}) first. {hint}"
        )
    return keys, run


def require_var(adata: AnnData, columns: Sequence[str], what: str) -> None:
    """Raise a KeyError naming every missing ``.var`` column and the step that writes it."""
    missing = [c for c in columns if c not in adata.var.columns]
    if missing:
        raise KeyError(f"adata.var lacks {missing}, needed to plot {what}. {_writer_hint(missing)}")


def _writer_hint(missing: Sequence[str]) -> str:
    if any(c.endswith(("_pcc", "_spearman", "_mse")) for c in missing):
        return "Run agl.tl.evaluate(adata, key=...) after agl.tl.agl_predict to add per-gene metrics."
    return "Run agl.tl.agl_fit(adata, key_added=...) to add gene roles and weights."


def new_axes(
    ax: Axes | Sequence[Axes] | None, n: int, figsize: tuple[float, float] | None, ncols: int | None = None, **kw
) -> tuple[Figure, list[Axes]]:
    """``n`` axes: the given ones (checked) or a new figure with ``n`` panels in a row (or ``ncols`` columns)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axs = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axs) != n or not all(isinstance(a, Axes) for a in axs):
            raise ValueError(f"ax must be {'an Axes' if n == 1 else f'a sequence of {n} Axes'} for this plot.")
        return axs[0].figure, axs
    ncols = n if ncols is None else ncols
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, **kw)
    flat = list(axs.ravel())
    for extra in flat[n:]:
        extra.remove()
    return fig, flat[:n]


def finish(fig: Figure, axes, show: bool | None, save: str | Path | None, dpi: int | None = None):
    """Save to ``save`` (a path, format from its suffix), show when asked, return ``axes`` when ``show`` is False.

    ``show=None`` follows :attr:`scanpy.settings.autoshow`, as scanpy plots do.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        path = Path(save)
        if path.suffix == "":
            path = path.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if show is None:
        try:
            import scanpy as sc

            show = bool(sc.settings.autoshow)
        except ImportError:  # pragma: no cover
            show = True
    if show:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")
            plt.show()
        return None
    return axes


def as_float(values) -> np.ndarray:
    """A list that may hold None (an epoch without a value) as a float array with NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def best_epoch(run: dict) -> float | None:
    """The epoch the run kept: ``metrics["best_epoch"]`` when recorded, else the one with the best validation PCC."""
    history = run.get("history") or {}
    metrics = run.get("metrics") or {}
    if "best_epoch" in metrics and metrics["best_epoch"] is not None:
        return float(metrics["best_epoch"])
    val = as_float(history.get("val_pcc", []))
    epochs = as_float(history.get("epoch", []))
    if len(val) == len(epochs) and np.isfinite(val).any():
        return float(epochs[int(np.nanargmax(val))])
    return None
