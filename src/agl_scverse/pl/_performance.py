"""Per-gene performance of a model against baselines, from an evaluated AnnData or a cross-validation table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from agl_scverse._constants import ROLE_TARGET, Keys
from agl_scverse._docs import d
from agl_scverse._serialize import null_as_none
from agl_scverse._validate import check_choice

from ._common import COLORS, FigSize, SavePath, finish, get_run, new_axes, require_var

__all__ = ["gene_performance"]

_METRICS = {"pearson": "pcc", "spearman": "spearman", "mse": "mse"}
_LABELS = {"pearson": "Pearson r", "spearman": "Spearman ρ", "mse": "MSE"}


@d.dedent
def gene_performance(
    data: AnnData | pd.DataFrame,
    key: str = "agl",
    baseline: str | Sequence[str] | None = None,
    metric: Literal["pearson", "spearman", "mse"] = "pearson",
    kind: Literal["scatter", "box", "bar"] | None = None,
    n_labels: int = 5,
    *,
    ax: Axes | None = None,
    figsize: FigSize = None,
    show: bool | None = None,
    save: SavePath = None,
    return_fig: bool = False,
) -> Axes | Figure | None:
    """Plot per-gene performance of a model against baselines.

    ``data`` is an AnnData after :func:`agl_scverse.tl.evaluate` (metrics in ``.var["<key>_pcc"]`` etc.; baselines
    are other runs' ``key_added`` or numeric ``.var`` columns) or the table of :func:`agl_scverse.tl.cross_validate`
    (averaged over folds per gene). ``kind="scatter"`` (default with one baseline): baseline against model per gene,
    the most improved genes labelled; ``"box"`` (default for a table): each method's distribution, mean marked;
    ``"bar"`` (default for an AnnData without baseline): the model's sorted values with each baseline's mean as a
    line. ``ax``, when given, is one Axes.

    Parameters
    ----------
    data
        Evaluated AnnData or cross-validation DataFrame.
    key
        The model: run ``key_added`` for an AnnData, a ``method`` value for a DataFrame.
    baseline
        One or several baselines: run keys or ``.var`` columns (AnnData), ``method`` values (DataFrame).
        ``None``: no baseline for an AnnData, every other method for a DataFrame.
    metric
        ``"pearson"``, ``"spearman"`` or ``"mse"``.
    kind
        ``"scatter"``, ``"box"`` or ``"bar"``; ``None`` picks as described above.
    n_labels
        Genes to label in a scatter plot (largest improvement first).
    %(plot_params)s

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure or None
        The Figure with ``return_fig=True``; otherwise None when shown, else the Axes of the plot.

    Examples
    --------
    >>> import agl_scverse as agl
    >>> cv = agl.tl.cross_validate(adata)  # doctest: +SKIP
    >>> agl.pl.gene_performance(cv, key="agl", baseline="pgl")  # doctest: +SKIP
    >>> agl.pl.gene_performance(cv, kind="box")  # doctest: +SKIP
    """
    check_choice("metric", metric, tuple(_METRICS))
    baselines = [baseline] if isinstance(baseline, str) else list(baseline or [])
    if isinstance(data, AnnData):
        wide, summary = _from_anndata(data, key, baselines, metric)
    elif isinstance(data, pd.DataFrame):
        wide = _from_table(data, key, baselines, metric)
        baselines = [c for c in wide.columns if c != key]
        summary = {b: float(wide[b].mean()) for b in baselines}
    else:
        raise TypeError(f"data must be an AnnData or a pandas DataFrame, got {type(data).__name__}.")
    if kind is None:
        kind = "scatter" if len(baselines) == 1 else ("box" if baselines else "bar")
    if kind not in ("scatter", "box", "bar"):
        raise ValueError(f"kind must be 'scatter', 'box' or 'bar', got {kind!r}.")
    if kind == "scatter" and len(baselines) != 1:
        raise ValueError(f"kind='scatter' needs exactly one baseline, got {baselines}. Pass baseline=<name>.")
    fig, (a,) = new_axes(ax, 1, figsize or ((4.6, 4.4) if kind == "scatter" else (7, 4)))
    label = _LABELS[metric]
    if kind == "scatter":
        _scatter(a, wide, key, baselines[0], metric, n_labels, label)
    elif kind == "box":
        _box(a, wide, [key, *baselines], label)
    else:
        _bar(a, wide[key], key, summary, label)
    return finish(fig, a, show=show, save=save, return_fig=return_fig, writekey="gene_performance")


def _from_anndata(adata: AnnData, key: str, baselines: list[str], metric: str) -> tuple[pd.DataFrame, dict]:
    keys, run = get_run(adata, key)
    col = getattr(keys, _METRICS[metric])
    require_var(adata, [keys.role, col], f"per-gene {metric} of run {key!r}")
    targets = adata.var[keys.role].astype(str).to_numpy() == ROLE_TARGET
    wide = pd.DataFrame({key: adata.var[col].to_numpy(dtype=float)}, index=adata.var_names)
    for b in baselines:
        bcol = getattr(Keys(b), _METRICS[metric])
        if bcol in adata.var.columns:
            wide[b] = adata.var[bcol].to_numpy(dtype=float)
        elif b in adata.var.columns and pd.api.types.is_numeric_dtype(adata.var[b]):
            wide[b] = adata.var[b].to_numpy(dtype=float)
        else:
            raise KeyError(
                f"Baseline {b!r}: neither adata.var[{bcol!r}] (an evaluated run with key_added={b!r}) nor a "
                f"numeric adata.var[{b!r}] column exists."
            )
    wide = wide.loc[targets].dropna()
    if wide.empty:
        raise ValueError(f"No target gene has a finite {metric} for {list(wide.columns)}; run agl.tl.evaluate first.")
    summary = _baseline_means(null_as_none(run.get("metrics")) or {}, metric)
    for b in baselines:
        summary[b] = float(wide[b].mean())
    return wide, summary


def _baseline_means(metrics: dict, metric: str) -> dict[str, float]:
    """Mean ``metric`` of each baseline in ``metrics["test"]`` (or ``metrics``), the model's own entry skipped."""
    test = metrics.get("test")
    scored = test if isinstance(test, dict) else metrics
    out = {}
    for name, entry in scored.items():
        if name == "model" or not isinstance(entry, dict):
            continue
        for field in (metric, f"{metric}_mean"):
            value = null_as_none(entry.get(field))
            if value is not None and np.isfinite(float(value)):
                out[str(name)] = float(value)
                break
    return out


def _from_table(df: pd.DataFrame, key: str, baselines: list[str], metric: str) -> pd.DataFrame:
    missing = [c for c in ("method", "gene", metric) if c not in df.columns]
    if missing:
        raise KeyError(
            f"The table lacks columns {missing}; expected the output of agl.tl.cross_validate "
            f"(fold, method, gene, pearson, spearman, mse). It has {list(df.columns)}."
        )
    methods = [str(m) for m in pd.unique(df["method"])]
    unknown = [m for m in [key, *baselines] if m not in methods]
    if unknown:
        raise KeyError(f"Methods {unknown} are not in the table; its methods are {methods}.")
    keep = [key, *(baselines or [m for m in methods if m != key])]
    sub = df[df["method"].astype(str).isin(keep)]
    wide = sub.groupby([sub["gene"].astype(str), sub["method"].astype(str)])[metric].mean().unstack("method")
    wide = wide[keep].dropna()
    if wide.empty:
        raise ValueError(f"No gene has a finite {metric} for every method in {keep}.")
    return wide


def _scatter(a: Axes, wide: pd.DataFrame, key: str, base: str, metric: str, n_labels: int, label: str) -> None:
    x, y = wide[base].to_numpy(), wide[key].to_numpy()
    better = (y > x) if metric != "mse" else (y < x)
    a.scatter(x[~better], y[~better], s=14, c=COLORS["unselected"], lw=0)
    a.scatter(x[better], y[better], s=14, c=COLORS["model"], lw=0)
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    pad = 0.05 * (hi - lo or 1.0)
    a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", lw=1, color=COLORS["diagonal"])
    a.set(xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad), aspect="equal")
    gain = (y - x) if metric != "mse" else (x - y)
    for rank, i in enumerate(np.argsort(-gain, kind="stable")[: max(n_labels, 0)]):
        a.annotate(  # staggered upwards, so labels of close points do not overlap
            wide.index[i],
            (x[i], y[i]),
            xytext=(-40, 12 + 11 * rank),
            textcoords="offset points",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
        )
    a.set(xlabel=f"{base}: {label}", ylabel=f"{key}: {label}")
    a.set_title(
        f"{key} better on {int(better.sum())}/{len(x)} genes\nmean {x.mean():.3f} → {y.mean():.3f}", fontsize="medium"
    )


def _box(a: Axes, wide: pd.DataFrame, methods: list[str], label: str) -> None:
    vals = [wide[m].to_numpy() for m in methods]
    parts = a.boxplot(vals, showfliers=False, widths=0.6, patch_artist=True)
    for i, box in enumerate(parts["boxes"]):
        box.set(facecolor=COLORS["model"] if i == 0 else COLORS["unselected"], alpha=0.6)
    rng = np.random.default_rng(0)
    for i, v in enumerate(vals, start=1):
        a.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=6, c="k", alpha=0.4, lw=0)
        a.scatter([i], [v.mean()], marker="D", s=30, c="white", edgecolors="k", zorder=3)
    a.set_xticks(range(1, len(methods) + 1), methods)
    a.set(ylabel=f"per-gene {label}", title=f"per-gene {label} over {len(wide)} genes (◇ mean)")


def _bar(a: Axes, values: pd.Series, key: str, summary: dict, label: str) -> None:
    v = values.sort_values(ascending=False)
    a.bar(np.arange(len(v)), v.to_numpy(), color=COLORS["model"], width=0.85, label=f"{key} (mean {v.mean():.3f})")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, mean) in enumerate(summary.items()):
        a.axhline(mean, color=COLORS["baseline"], ls=styles[i % len(styles)], lw=1.2, label=f"{name} mean {mean:.3f}")
    if len(v) <= 60:
        a.set_xticks(np.arange(len(v)), v.index, rotation=90, fontsize=6)
    else:
        a.set_xticks([])
    a.set(xlabel=f"target genes ({len(v)}), sorted", ylabel=label, title=f"{key}: per-gene {label}")
    a.legend(fontsize="small", frameon=False)
