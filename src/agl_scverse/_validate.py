"""Input checks shared by readers and tools. Each raises a clear error naming the problem and the fix."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from . import _constants as consts


def is_backed(X: Any) -> bool:
    """Whether ``X`` is an on-disk matrix of a backed AnnData (h5py / zarr dataset, anndata's backed sparse)."""
    return not (isinstance(X, np.ndarray) or sp.issparse(X)) and hasattr(X, "shape") and hasattr(X, "__getitem__")


def count_blocks(X, rows: int = 16384, values: int = 2**24) -> Iterator[np.ndarray]:
    """The stored values of a counts matrix in blocks of at most ``values`` (row blocks of a backed matrix)."""
    if is_backed(X):
        for s in range(0, X.shape[0], rows):
            yield from count_blocks(X[s : s + rows], rows, values)
        return
    data = (X.data if sp.issparse(X) else np.asarray(X)).reshape(-1)
    for s in range(0, max(data.size, 1), values):
        yield data[s : s + values]


def check_counts(X, what: str = "adata.X") -> None:
    """Counts must be finite and non-negative (checked in blocks; a backed matrix is read in row blocks)."""
    n_bad, low = 0, np.inf
    for data in count_blocks(X):
        if data.size:
            n_bad += int(data.size - np.count_nonzero(np.isfinite(data)))
            low = low if n_bad else min(low, float(data.min()))
    if n_bad:
        raise ValueError(f"{what} holds {n_bad} NaN/inf values; counts must be finite. Fill or drop them first.")
    if low < 0:
        raise ValueError(
            f"{what} holds negative values (min {low:.3g}); raw counts are expected. "
            "Pass the raw counts (e.g. layer='counts' or adata.raw.to_adata())."
        )


#: Values of a counts matrix that :func:`check_integer_counts` reads (evenly spaced stored values, or rows of a
#: dense or backed matrix), so the check costs the same on 400 M non-zeros as on a small slide.
INTEGER_SAMPLE = 2**20
#: A value further than this from the nearest integer is not a count (``log1p`` of a count never is that close).
INTEGER_TOLERANCE = 1e-4


def _sample_values(X) -> np.ndarray:
    """Up to about :data:`INTEGER_SAMPLE` stored values of ``X``, evenly spread, without copying ``X``."""
    if sp.issparse(X):
        if not hasattr(X, "data") or X.format not in ("csr", "csc", "coo", "bsr"):
            X = sp.csr_matrix(X)
        data = X.data
        return np.asarray(data[:: max(1, data.size // INTEGER_SAMPLE)])
    n_rows = int(X.shape[0]) if getattr(X, "ndim", 0) == 2 else 0
    n_cols = int(X.shape[1]) if n_rows else 1
    if not n_rows:
        return np.asarray(X).ravel()
    n_take = max(1, min(n_rows, INTEGER_SAMPLE // max(n_cols, 1)))
    rows: Any
    if isinstance(X, np.ndarray):
        rows = X[np.linspace(0, n_rows - 1, n_take).astype(np.int64)]
    else:  # backed (h5py / zarr / dask) matrices: one contiguous block of rows is the cheap read
        rows = X[:n_take]
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    return rows.ravel()


def check_integer_counts(X, what: str = "adata.X", transform: str = "log1p", log1p_recorded: bool = False) -> None:
    """Counts that the model transforms (``transform != "none"``) must be whole numbers."""
    check_choice("transform", transform, consts.TRANSFORMS)
    if transform == consts.TRANSFORM_NONE:
        return
    vals = _sample_values(X)
    vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
    if vals.dtype.kind not in "fc" or vals.size == 0:
        return
    frac = np.abs(vals - np.round(vals)) > INTEGER_TOLERANCE
    if frac.any():
        hint = " adata.uns['log1p'] is set: scanpy's log1p was run on it." if log1p_recorded else ""
        raise ValueError(
            f"{what} holds non-integer values (e.g. {float(vals[frac][0]):.4g}; {frac.mean():.0%} of the "
            f"{vals.size} values checked), so it is not raw counts (log1p, normalised or scaled data?).{hint} "
            f"transform={transform!r} would transform it a second time. Pass the raw counts (layer='counts', or "
            "adata.raw.to_adata()), or transform='none' if these values already are the model's expression scale "
            "(counts corrected to non-integers, e.g. by ambient-RNA removal, can be rounded first)."
        )
    if log1p_recorded:
        warnings.warn(
            f"adata.uns['log1p'] is set (scanpy's log1p was run), but {what} holds whole numbers; treating them as "
            "raw counts.",
            UserWarning,
            stacklevel=3,
        )


def check_feature_variance(std: np.ndarray, mean: np.ndarray, key: str, n_spots: int, share: float = 0.5) -> None:
    """Refuse an embedding that is constant over the training spots; warn when most of its features are."""
    std, mean = np.asarray(std, dtype=np.float64), np.asarray(mean, dtype=np.float64)
    flat = std <= 1e-6 * np.abs(mean) + 1e-12
    if flat.all():
        raise ValueError(
            f".obsm[{key!r}] is constant over the {n_spots} training spots (all {flat.size} features have zero "
            "variance): nothing can be learned from it. Recompute the embedding (are the patches blank, e.g. an "
            "image of one colour?) or check that the right key is used."
        )
    if flat.mean() > share:
        warnings.warn(
            f".obsm[{key!r}]: {int(flat.sum())} of {flat.size} features are constant over the {n_spots} training "
            "spots; the model learns from the other ones only. Check the embedding (blank patches?).",
            UserWarning,
            stacklevel=3,
        )


def check_unique_names(adata: AnnData) -> None:
    """Gene and spot names must be unique."""
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate gene names {dup}; run adata.var_names_make_unique() first.")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot barcodes {dup}; run adata.obs_names_make_unique() first.")


def check_not_empty(adata: AnnData) -> None:
    """At least one spot and one gene."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The slide is empty ({adata.n_obs} spots x {adata.n_vars} genes).")


def check_spatial(adata: AnnData) -> np.ndarray:
    """``obsm['spatial']`` must be an n x 2 array of finite pixel coordinates; returns it as float."""
    if consts.SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: spot centres in full-resolution pixels are required.")
    xy = np.asarray(adata.obsm[consts.SPATIAL_KEY], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm['spatial'] has shape {xy.shape}; expected (n_spots, 2).")
    if not np.all(np.isfinite(xy[:, :2])):
        raise ValueError("adata.obsm['spatial'] holds NaN/inf coordinates.")
    return xy[:, :2]


def check_adata(adata: AnnData, layer: str | None = None, transform: str | None = None) -> None:
    """All the checks a tool runs on its input before touching it."""
    check_not_empty(adata)
    check_unique_names(adata)
    X = adata.layers[layer] if layer is not None else adata.X
    what = f"adata.layers[{layer!r}]" if layer else "adata.X"
    check_counts(X, what=what)
    if transform is not None:
        check_integer_counts(X, what, transform, log1p_recorded=layer is None and consts.SCANPY_LOG1P_UNS in adata.uns)


# ------------------------------------------------------------------------------------------------ arguments
def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` must be one of ``choices``."""
    if isinstance(value, list | dict | set) or value not in tuple(choices):
        raise ValueError(f"Unknown {name} {value!r}; choose one of {tuple(choices)}.")


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    """``value`` must be a positive (or non-negative) finite number, an integer when ``integer``."""
    ok = isinstance(value, int | np.integer) if integer else isinstance(value, int | float | np.number)
    ok = ok and not isinstance(value, bool | np.bool_) and bool(np.isfinite(value))
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}.")


#: Fewest spots in a training batch: the per-gene Pearson loss (and a variance) needs two.
MIN_BATCH_SPOTS = 2


def check_min_batch_size(batch_size: int, name: str = "batch_size") -> None:
    """A training batch must hold at least :data:`MIN_BATCH_SPOTS` spots."""
    if int(batch_size) < MIN_BATCH_SPOTS:
        raise ValueError(
            f"{name}={batch_size} leaves every training batch with fewer than {MIN_BATCH_SPOTS} spots, so nothing "
            f"would be trained (the per-gene loss needs at least {MIN_BATCH_SPOTS} spots per batch). Use "
            f"{name} >= {MIN_BATCH_SPOTS} (default 128)."
        )


def check_in_range(name: str, value: Any, low: float, high: float, *, closed: str = "both") -> None:
    """``low <= value <= high`` (``closed`` = ``"both"``, ``"left"``, ``"right"`` or ``"neither"``)."""
    left, right = closed in ("both", "left"), closed in ("both", "right")
    try:
        v = float(value)
        ok = not isinstance(value, bool) and np.isfinite(v)
        ok = ok and (v >= low if left else v > low) and (v <= high if right else v < high)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be in {'[' if left else '('}{low:g}, {high:g}{']' if right else ')'}, got {value!r}."
        )


def check_obs_key(adata: AnnData, key: str, name: str = "key") -> None:
    """``key`` must be a column of ``adata.obs``."""
    if key not in adata.obs:
        raise KeyError(f"{name}={key!r} is not an .obs column; columns are {list(adata.obs.columns)[:10]}.")


def check_layer(adata: AnnData, layer: str | None) -> None:
    """``layer`` (when given) must be one of ``adata.layers``."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers ({list(adata.layers)}).")


# ------------------------------------------------------------------------------------------------ spots
def scored_spots(split: np.ndarray | None, n_obs: int) -> tuple[np.ndarray, str]:
    """The default spots to score predictions on, from a split column: ``(mask, kind)``."""
    if split is not None:
        split = np.asarray(split).astype(str)
        if (split == consts.SPLIT_UNUSED).any():
            return split == consts.SPLIT_UNUSED, "held-out"
        if (split == consts.SPLIT_VAL).any():
            return split == consts.SPLIT_VAL, "validation"
    return np.ones(n_obs, dtype=bool), "all"


def resolve_spots(
    adata: AnnData, spots: Any = None, *, as_mask: bool = False, what: str = "spots", noun: str = "spots"
) -> np.ndarray:
    """The one resolver of spot selections used by every function that takes ``spots=`` or ``train_mask=``."""
    n = adata.n_obs
    if spots is None:
        pos = np.arange(n)
    elif isinstance(spots, str) and spots in adata.obs:
        col = adata.obs[spots]
        if pd.api.types.is_bool_dtype(col):
            if col.isna().any():
                raise ValueError(f".obs[{spots!r}] holds missing values; fill them with True/False.")
            pos = np.flatnonzero(col.to_numpy(dtype=bool))
        else:
            pos = np.flatnonzero((col.astype(str) == consts.SPLIT_TRAIN).to_numpy())
            if len(pos) == 0:
                raise ValueError(
                    f".obs[{spots!r}] is not boolean and has no {consts.SPLIT_TRAIN!r} values; pass a boolean column or "
                    f"one holding {consts.SPLIT_TRAIN!r} for the spots to use."
                )
    else:
        arr = np.asarray([spots] if isinstance(spots, str) else spots)
        if arr.dtype == bool:
            if arr.shape != (n,):
                raise ValueError(f"Boolean {what} mask has shape {arr.shape}; expected ({n},), one value per spot.")
            pos = np.flatnonzero(arr)
        elif arr.size == 0:
            pos = np.zeros(0, dtype=int)
        elif np.issubdtype(arr.dtype, np.integer):
            if arr.min() < -n or arr.max() >= n:
                raise IndexError(f"{what} holds positions outside 0..{n - 1}.")
            pos = np.asarray(arr % n, dtype=int)
        elif arr.dtype.kind in "fc":
            raise TypeError(f"{what} must be a boolean mask, integer positions or spot names, got dtype {arr.dtype}.")
        else:
            names = pd.Index(arr.astype(str).ravel())
            pos = adata.obs_names.get_indexer(names)
            if np.any(pos < 0):
                missing = names[pos < 0][:5].tolist()
                raise KeyError(f"{int((pos < 0).sum())} {what} are not in adata.obs_names, e.g. {missing}.")
    if len(pos) == 0:
        raise ValueError(f"No {noun} left: {what} selects 0 spots. Pass None to use every spot.")
    if not as_mask:
        return pos
    mask = np.zeros(n, dtype=bool)
    mask[pos] = True
    return mask


def check_seed(seed: Any) -> None:
    """A seed is an integer in ``[0, 2**32)`` (Python or NumPy integer)."""
    ok = isinstance(seed, int | np.integer) and not isinstance(seed, bool | np.bool_) and 0 <= int(seed) < 2**32
    if not ok:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")


def check_device(device: Any) -> None:
    """``device`` must be ``"auto"``, ``"cpu"``, ``"mps"``, ``"cuda"`` or ``"cuda:<n>"``, and available here."""
    import torch

    name = str(device)
    kind = name.split(":")[0]
    if not isinstance(device, str | torch.device) or kind not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} but MPS is not available here; use device='cpu' or 'auto'.")
