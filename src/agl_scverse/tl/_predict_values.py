"""Predictions in row chunks: a dense or dask layer in the asked scale, and an ensemble's spread."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch

from agl_scverse import _constants as consts
from agl_scverse._expression import predicted_library_size, rescale_predictions
from agl_scverse.model import AGLModel

__all__ = ["DENSE_LAYER_BYTES", "model_transform", "prediction_values", "spread_layer", "want_spread"]

#: Largest dense prediction layer (bytes) before :func:`agl_scverse.tl.agl_predict` writes a chunked dask array.
DENSE_LAYER_BYTES = 2**30
#: Spots x genes (float32 bytes) predicted at a time.
_CHUNK_BYTES = 128 * 2**20
#: Spots and genes of a chunk of the dask layer.
_DASK_ROWS, _DASK_COLS = 4096, 2048


def _predict_rows(model: AGLModel, features, s: int, e: int, device: str, batch_size: int, columns=None, run=None):
    """Predictions of rows ``s:e`` of an array of features or of a patch Dataset."""
    is_dataset = isinstance(features, torch.utils.data.Dataset)
    rows = torch.utils.data.Subset(features, range(s, e)) if is_dataset else features[s:e]
    return model.predict(rows, batch_size=batch_size, columns=columns, device=device, **(run or {}))


def model_transform(model: AGLModel) -> consts.Transform:
    return cast(consts.Transform, str(model.config.get("transform") or consts.TRANSFORM_LOG1P))


def _library_cols(model: AGLModel, scale: str) -> np.ndarray | None:
    """Model outputs summed into the library size of ``scale`` (None when the scale needs none)."""
    if scale != consts.SCALE_LOG1P_CP10K or model_transform(model) == consts.TRANSFORM_LOG1P_CPM:
        return None
    col = {g: i for i, g in enumerate(model.genes)}
    return np.asarray([col[g] for g in model.predicted_genes], dtype=np.int64)


def prediction_values(model, features, n, width, var_cols, model_cols, device, batch_size, scale, run, dense):
    """Predictions of ``model_cols`` into columns ``var_cols`` of an ``(n, width)`` layer (0 elsewhere)."""
    if not dense:
        return _dask_layer(model, features, n, width, var_cols, model_cols, device, batch_size, scale, run)
    layer = np.zeros((n, width), dtype=np.float32)
    step = max(1, int(_CHUNK_BYTES // (4 * max(len(model.genes), width))))  # spots x genes of about _CHUNK_BYTES
    lib_cols, transform = _library_cols(model, scale), model_transform(model)
    for s in range(0, n, step):
        e = min(s + step, n)
        full = _predict_rows(model, features, s, e, device, batch_size, run=run)
        library = predicted_library_size(full[:, lib_cols], transform) if lib_cols is not None else None
        layer[s:e, var_cols] = rescale_predictions(full[:, model_cols], transform, scale, library)
    return layer


def spread_layer(model: AGLModel, *args):
    """The standard deviation (``ddof=1``) over a seed ensemble's members of their prediction layers."""
    want_spread(model, True)
    members, dense = model.members(), args[-1]
    if not dense:
        import dask.array as da

        return da.stack([prediction_values(m, *args) for m in members]).std(axis=0, ddof=1).astype(np.float32)
    mean = prediction_values(members[0], *args)
    m2 = np.zeros_like(mean)
    for i, m in enumerate(members[1:], start=2):
        x = prediction_values(m, *args)
        delta = x - mean
        mean += delta / i
        m2 += delta * (x - mean)
    return np.sqrt(m2 / (len(members) - 1), dtype=np.float32)


def want_spread(model: AGLModel, spread: bool | None) -> bool:
    """Whether to write the spread layer: ``None`` for an ensemble; ``True`` needs one (checked before any work)."""
    if spread is None:
        return model.n_members > 1
    if not isinstance(spread, bool | np.bool_):
        raise TypeError(f"spread must be True, False or None, got {spread!r}.")
    if spread and model.n_members < 2:
        raise ValueError(
            "spread=True needs a seed ensemble (a model fitted with agl_fit(..., n_seeds=5)); this model has one "
            "network, so its predictions have no spread."
        )
    return bool(spread)


def _dask_layer(model, features, n_obs, n_vars, var_cols, model_cols, device, batch_size, scale, run):
    """A lazy spots x genes layer of (spots, genes) chunks, each predicting only its own genes."""
    import dask
    import dask.array as da

    by_var = np.full(n_vars, -1, dtype=np.int64)
    by_var[var_cols] = model_cols
    lib_cols, transform = _library_cols(model, scale), model_transform(model)

    def library(s: int, e: int) -> np.ndarray:
        pred = _predict_rows(model, features, s, e, device, batch_size, columns=lib_cols)
        return predicted_library_size(pred, transform)

    def chunk(s: int, e: int, c0: int, c1: int, lib) -> np.ndarray:
        out = np.zeros((e - s, c1 - c0), dtype=np.float32)
        local = np.flatnonzero(by_var[c0:c1] >= 0)
        pred = _predict_rows(model, features, s, e, device, batch_size, columns=by_var[c0:c1][local], run=run)
        out[:, local] = rescale_predictions(pred, transform, scale, lib)
        return out

    grid = []
    for s in range(0, n_obs, _DASK_ROWS):
        e, row = min(s + _DASK_ROWS, n_obs), []
        lib = dask.delayed(library)(s, e) if lib_cols is not None else None
        for c0 in range(0, n_vars, _DASK_COLS):
            c1 = min(c0 + _DASK_COLS, n_vars)
            if (by_var[c0:c1] >= 0).any():
                delayed = dask.delayed(chunk)(s, e, c0, c1, lib)
                row.append(da.from_delayed(delayed, shape=(e - s, c1 - c0), dtype=np.float32))
            else:
                row.append(da.zeros((e - s, c1 - c0), dtype=np.float32))
        grid.append(row)
    return da.block(grid)
