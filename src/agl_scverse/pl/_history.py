"""Training curves of an AGL run: loss, validation PCC of the targets and k per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes

from ._common import COLORS, as_float, best_epoch, finish, get_run, new_axes

__all__ = ["training_history"]

_PANELS = (
    ("train_loss", "training loss", "loss"),
    ("val_pcc", "validation PCC (targets)", "mean PCC"),
    ("k", "selected auxiliary genes", "k"),
)


def training_history(
    adata: AnnData,
    key: str = "agl",
    *,
    figsize: tuple[float, float] | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> list[Axes] | None:
    """Plot the training history of a run: training loss, validation target PCC and ``k`` per epoch.

    The epoch the run kept (``metrics["best_epoch"]``, else the best validation PCC) is marked in every panel.

    Parameters
    ----------
    adata
        Annotated data after :func:`agl_scverse.tl.agl_fit`.
    key
        ``key_added`` of the run to plot.
    figsize
        Figure size when a new figure is made.
    ax
        Three Axes to draw in.
    show
        Show the figure; ``None`` follows :attr:`scanpy.settings.autoshow`.
    save
        Path to save the figure to.

    Returns
    -------
    The three Axes when ``show`` is False, else None.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide()  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> agl.pl.training_history(adata)  # doctest: +SKIP
    """
    keys, run = get_run(adata, key)
    history = run.get("history")
    if not isinstance(history, dict) or len(history.get("epoch", [])) == 0:
        raise KeyError(f"adata.uns[{keys.uns!r}] has no 'history' with epochs; was the run fitted with agl.tl.agl_fit?")
    epoch = np.asarray(history["epoch"], dtype=float)
    missing = [name for name, _, _ in _PANELS if name not in history]
    if missing:
        raise KeyError(f"adata.uns[{keys.uns!r}]['history'] lacks {missing}; it has {list(history)}.")
    for name, _, _ in _PANELS:
        if len(history[name]) != len(epoch):
            raise ValueError(f"history[{name!r}] has {len(history[name])} values but there are {len(epoch)} epochs.")
    fig, axs = new_axes(ax, 3, figsize or (12, 3.4))
    val = as_float(history["val_pcc"])
    kept = best_epoch(run)
    best = int(np.flatnonzero(epoch == kept)[0]) if kept is not None and (epoch == kept).any() else None
    for a, (name, title, ylabel) in zip(axs, _PANELS):
        y = as_float(history[name])
        a.plot(epoch, y, marker="o", ms=3, color=COLORS["model"] if name != "k" else COLORS["selected"])
        if best is not None:
            a.axvline(epoch[best], color=COLORS["threshold"], ls=":", lw=1)
        a.set_title(title)
        a.set_xlabel("epoch")
        a.set_ylabel(ylabel)
    if best is not None:
        axs[1].annotate(
            f"kept epoch {epoch[best]:g}: PCC {val[best]:.3f}",
            xy=(epoch[best], val[best]),
            xytext=(0.98, 0.05),
            textcoords="axes fraction",
            ha="right",
            fontsize="small",
        )
    if ax is None:
        fig.tight_layout()
    return finish(fig, axs, show, save)
