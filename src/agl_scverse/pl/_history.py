"""Training curves of an AGL run: loss, validation PCC of the targets and k per epoch."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from agl_scverse._docs import d
from agl_scverse._serialize import null_as_none

from ._common import COLORS, AxesArg, FigSize, PlotResult, SavePath, as_float, best_epoch, finish, get_run, new_axes

__all__ = ["training_history"]

_PANELS = (
    ("train_loss", "training loss", "loss"),
    ("val_pcc", "validation PCC (targets)", "mean PCC"),
    ("k", "selected auxiliary genes", "k"),
)


@d.dedent
def training_history(
    adata: AnnData,
    key: str = "agl",
    *,
    ax: AxesArg = None,
    figsize: FigSize = None,
    show: bool | None = None,
    save: SavePath = None,
    return_fig: bool = False,
) -> PlotResult:
    """Plot the training history of a run: training loss, validation target PCC and ``k`` per epoch.

    The epoch the run kept is marked in every panel. ``ax``, when given, is a sequence of three Axes.

    Parameters
    ----------
    adata
        Annotated data after :func:`agl_scverse.tl.agl_fit`.
    key
        ``key_added`` of the run to plot.
    %(plot_params)s

    Returns
    -------
    numpy.ndarray or matplotlib.figure.Figure or None
        The Figure with ``return_fig=True``; otherwise None when shown, else the Axes:
        an array of shape ``(3,)``: training loss, validation PCC, ``k``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide()  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> axs = agl.pl.training_history(adata, show=False)  # doctest: +SKIP
    >>> axs.shape  # doctest: +SKIP
    (3,)
    """
    keys, run = get_run(adata, key)
    history = null_as_none(run.get("history"))
    if (null_as_none(run.get("params")) or {}).get("head") == "rrr":
        raise ValueError(
            f"Run {keys.uns!r} was fitted with head='rrr', a closed-form ridge fit without epochs: it has no training "
            "history. Its rank choice on the validation spots is in .uns[key]['metrics']['rrr_search']."
        )
    if not isinstance(history, dict) or len(history.get("epoch", [])) == 0:
        if run.get("source") == "model":
            raise KeyError(
                f"adata.uns[{keys.uns!r}] was written by agl_predict from a model saved without its training history "
                "(an older version); plot the AnnData agl_fit wrote, or refit and save the model again."
            )
        raise KeyError(f"adata.uns[{keys.uns!r}] has no 'history' with epochs; was the run fitted with agl.tl.agl_fit?")
    epoch = np.asarray(history["epoch"], dtype=float)
    missing = [name for name, _, _ in _PANELS if name not in history]
    if missing:
        raise KeyError(f"adata.uns[{keys.uns!r}]['history'] lacks {missing}; it has {list(history)}.")
    for name, _, _ in _PANELS:
        if len(history[name]) != len(epoch):
            raise ValueError(f"history[{name!r}] has {len(history[name])} values but there are {len(epoch)} epochs.")
    fig, axs = new_axes(ax, 3, figsize or (12, 3.4), what="training loss, validation PCC and k")
    kept = best_epoch(run)
    best = int(np.flatnonzero(epoch == kept)[0]) if kept is not None and (epoch == kept).any() else None
    for a, (name, title, ylabel) in zip(axs, _PANELS):
        y = as_float(history[name])
        a.plot(epoch, y, marker="o", ms=3, color=COLORS["model"] if name != "k" else COLORS["selected"])
        if best is not None:
            a.axvline(epoch[best], color=COLORS["threshold"], ls=":", lw=1)
        a.set(title=title, xlabel="epoch", ylabel=ylabel)
    if best is not None:
        x, y = epoch[best], as_float(history["val_pcc"])[best]
        where = {"xy": (x, y), "xytext": (0.98, 0.05), "textcoords": "axes fraction", "ha": "right"}
        axs[1].annotate(f"kept epoch {x:g}: PCC {y:.3f}", fontsize="small", **where)
    if ax is None:
        fig.tight_layout()
    return finish(fig, axs, show=show, save=save, return_fig=return_fig, writekey="training_history")
