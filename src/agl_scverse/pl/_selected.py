"""Which auxiliary genes the learned mask kept: prior rank against learned weight."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agl_scverse._constants import ROLE_AUX, ROLE_TARGET
from agl_scverse._docs import d
from agl_scverse._serialize import null_as_none

from ._common import COLORS, FigSize, SavePath, as_float, best_epoch, finish, get_run, new_axes, require_var

__all__ = ["selected_genes"]


@d.dedent
def selected_genes(
    adata: AnnData,
    key: str = "agl",
    n_labels: int = 10,
    show_history: bool = False,
    *,
    s: float = 8.0,
    fontsize: float = 8.0,
    ax: Axes | Sequence[Axes] | np.ndarray | None = None,
    figsize: FigSize = None,
    show: bool | None = None,
    save: SavePath = None,
    return_fig: bool = False,
) -> Axes | np.ndarray | Figure | None:
    """Plot the auxiliary genes' learned weights against their prior rank, with the learned threshold.

    Each auxiliary gene is a point at its prior rank (x, 0 = best prior score) and its learned soft-mask weight
    ``w_i`` (y); the dashed line is the learned threshold ``theta`` at rank ``theta * (n_aux - 1)`` (genes left of it
    are selected). Targets form a band left of rank 0. ``ax``, when given, is one Axes, or two with
    ``show_history=True``.

    Parameters
    ----------
    adata
        Annotated data after :func:`agl_scverse.tl.agl_fit`.
    key
        ``key_added`` of the run to plot.
    n_labels
        Number of selected auxiliary genes to label (best prior rank first); 0 for none.
    show_history
        Add a second panel with the number of selected genes ``k`` per epoch (from the training history).
    s
        Marker size.
    fontsize
        Font size of the gene labels.
    %(plot_params)s

    Returns
    -------
    matplotlib.axes.Axes or numpy.ndarray or matplotlib.figure.Figure or None
        The Figure with ``return_fig=True``; otherwise None when shown, else the Axes:
        the one of the plot, or with ``show_history=True`` an array of shape ``(2,)``.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> adata = agl.datasets.synthetic_slide()  # doctest: +SKIP
    >>> model = agl.tl.agl_fit(adata)  # doctest: +SKIP
    >>> agl.pl.selected_genes(adata, n_labels=5, show_history=True)  # doctest: +SKIP
    """
    keys, run = get_run(adata, key)
    require_var(adata, [keys.role, keys.prior_rank, keys.weight, keys.selected], "the selected genes")
    if n_labels < 0:
        raise ValueError(f"n_labels must be >= 0, got {n_labels}.")
    history = null_as_none(run.get("history")) or {}
    if show_history and len(history.get("epoch", [])) == 0:
        raise KeyError(
            f"adata.uns[{keys.uns!r}]['history'] has no epochs, so show_history=True has nothing to draw. "
            "Use show_history=False."
        )
    var = adata.var
    role = var[keys.role].astype(str).to_numpy()
    aux = role == ROLE_AUX
    n_aux = int(aux.sum())
    if n_aux == 0:
        raise ValueError(f"Run {key!r} has no auxiliary genes (all of .var[{keys.role!r}] are targets or excluded).")
    rank = var[keys.prior_rank].to_numpy()[aux].astype(float)
    weight = var[keys.weight].to_numpy()[aux].astype(float)
    selected = var[keys.selected].to_numpy()[aux].astype(bool)
    names = var.index.to_numpy()[aux]
    order = np.argsort(rank, kind="stable")
    rank, weight, selected, names = rank[order], weight[order], selected[order], names[order]
    n_tgt = int((role == ROLE_TARGET).sum())
    threshold = null_as_none(run.get("threshold"))
    k = null_as_none(run.get("k"))
    if k is None or not np.isfinite(float(k)):
        k = int(selected.sum())

    ratios: dict = {"gridspec_kw": {"width_ratios": [2, 1]}} if ax is None and show_history else {}
    fig, axs = new_axes(
        ax,
        2 if show_history else 1,
        figsize or ((11, 4) if show_history else (7, 4)),
        what="the selection, then k per epoch" if show_history else None,
        **ratios,
    )
    a = axs[0]
    for m, name in ((~selected, "not selected"), (selected, "selected")):
        a.scatter(
            rank[m], weight[m], s=s, c=COLORS[name.replace("not ", "un")], lw=0, label=f"{name} ({int(m.sum()):,})"
        )
    span = max(n_aux - 1, 1)
    band = 0.06 * span
    if n_tgt:
        tw = var[keys.weight].to_numpy()[role == ROLE_TARGET].astype(float)
        tx = -band + np.linspace(0.15, 0.85, n_tgt) * band * 0.8
        a.axvspan(-band, -0.04 * band, color=COLORS["target"], alpha=0.08, lw=0)
        a.scatter(tx, tw, s=s * 1.5, marker="D", c=COLORS["target"], lw=0, label=f"targets ({n_tgt:,})")
    if threshold is not None and np.isfinite(float(threshold)):
        a.axvline(
            float(threshold) * span,  # gene i is selected when i / (n_aux - 1) < theta
            color=COLORS["threshold"],
            ls="--",
            lw=1.2,
            label=f"threshold θ = {float(threshold):.3g} (k = {int(k):,})",
        )
    best = np.flatnonzero(selected)[:n_labels]  # n_labels == 0: none
    _label_genes(a, rank[best], weight[best], names[best], span, fontsize)
    a.set(xlim=(-band * 1.05, span * 1.02), ylim=(-0.05, 1.08), xlabel="prior rank of auxiliary gene (0 = best)")
    a.set(ylabel="learned weight $w_i$", title=f"{key}: {int(selected.sum()):,} of {n_aux:,} auxiliary genes selected")
    top = a.secondary_xaxis("top", functions=(lambda x: np.asarray(x) / span, lambda r: np.asarray(r) * span))
    top.set_xlabel("normalised rank $r_i$", fontsize="small")
    top.tick_params(labelsize="small")
    a.legend(loc="center right", fontsize="small", frameon=False)
    if show_history:
        _k_history(axs[1], history, best_epoch(run))
        return finish(fig, axs, show=show, save=save, return_fig=return_fig, writekey="selected_genes")
    return finish(fig, a, show=show, save=save, return_fig=return_fig, writekey="selected_genes")


def _label_genes(a: Axes, x, y, names, span: float, fontsize: float) -> None:
    """Label points with staggered text to their right, joined by thin lines."""
    n = len(names)
    if n == 0:
        return
    x_text = float(np.max(x)) + 0.08 * span
    ys = np.clip(np.linspace(0.88, 0.88 - 0.07 * (n - 1), n), 0.1, 1.0)
    for xi, yi, yt, name in zip(x, y, ys, names):
        a.annotate(
            str(name),
            xy=(xi, yi),
            xytext=(x_text, yt),
            fontsize=fontsize,
            va="center",
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
        )


def _k_history(a: Axes, history: dict, best: float | None) -> None:
    epoch = np.asarray(history["epoch"], dtype=float)
    k = as_float(history.get("k", [np.nan] * len(epoch)))
    a.plot(epoch, k, marker="o", ms=3, color=COLORS["selected"])
    if best is not None:
        a.axvline(best, color=COLORS["threshold"], ls=":", lw=1, label=f"kept epoch ({best:g})")
        a.legend(fontsize="small", frameon=False)
    a.set(xlabel="epoch", ylabel="selected auxiliary genes $k$", title="k over training")
