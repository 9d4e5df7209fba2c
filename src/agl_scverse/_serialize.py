"""Turn results into what ``write_h5ad`` (``.uns``) and JSON store: None is left out of a dict (NaN in a list)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["to_h5ad", "to_json", "null_as_none"]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def to_h5ad(obj: Any) -> Any:
    """Recursively turn ``obj`` into values ``write_h5ad`` stores: dicts drop None, sequences become typed arrays."""
    if isinstance(obj, dict):
        return {str(k): to_h5ad(v) for k, v in obj.items() if v is not None}
    if obj is None:
        return np.nan
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj)
    if isinstance(obj, str | Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj if obj.dtype.kind in "biuf" else np.asarray([str(v) for v in obj.ravel()])
    if isinstance(obj, list | tuple | pd.Index | pd.Series):
        vals = list(obj)
        if not vals:
            return np.zeros(0, dtype=np.int64)
        if all(isinstance(v, bool | np.bool_) for v in vals):
            return np.asarray(vals, dtype=bool)
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in vals):
            return np.asarray(vals, dtype=np.int64)
        if all(v is None or _is_number(v) for v in vals):
            return np.asarray([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        return np.asarray([str(v) for v in vals])
    return str(obj)


def to_json(obj: Any) -> Any:
    """Recursively turn ``obj`` into JSON values (None and non-finite floats -> ``null``)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | pd.Index | pd.Series):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def null_as_none(value: Any) -> Any:
    """``value``, or None when it is a stored null (absent, or agl-scverse 0.1's ``"None"`` / ``""``)."""
    if value is None or (isinstance(value, str) and value in ("None", "")):
        return None
    return value
