"""Training / validation / unused spots of a fit."""

from __future__ import annotations

from typing import Any

import numpy as np
from anndata import AnnData

from agl_scverse import _constants as consts
from agl_scverse._validate import check_in_range, check_obs_key

__all__ = ["make_split"]


def make_split(
    adata: AnnData, used: np.ndarray, split_key: str | None, val_groups: Any, val_fraction: float, seed: int
) -> np.ndarray:
    """``"train"`` / ``"val"`` / ``"unused"`` per spot."""
    split = np.full(adata.n_obs, consts.SPLIT_UNUSED, dtype=object)
    if split_key is not None:
        check_obs_key(adata, split_key, "split_key")
        if val_groups is None:
            raise ValueError("split_key needs val_groups: the .obs values whose spots form the validation set.")
        groups = [val_groups] if isinstance(val_groups, str | int | np.integer) else list(val_groups)
        col = adata.obs[split_key].astype(str).to_numpy()
        present = set(col[used])
        missing = [g for g in groups if str(g) not in present]
        if missing:
            raise ValueError(
                f"val_groups {missing} do not occur in .obs[{split_key!r}] among the used spots; "
                f"values there: {sorted(present)[:10]}."
            )
        is_val = np.isin(col, [str(g) for g in groups])
        split[used & is_val] = consts.SPLIT_VAL
        split[used & ~is_val] = consts.SPLIT_TRAIN
    else:
        check_in_range("val_fraction", val_fraction, 0.0, 1.0, closed="neither")
        idx = np.flatnonzero(used)
        rng = np.random.default_rng(seed)
        n_val = int(round(float(val_fraction) * len(idx)))
        val = rng.choice(idx, size=n_val, replace=False) if n_val > 0 else np.zeros(0, dtype=int)
        split[idx] = consts.SPLIT_TRAIN
        split[val] = consts.SPLIT_VAL
    n_tr, n_va = int((split == consts.SPLIT_TRAIN).sum()), int((split == consts.SPLIT_VAL).sum())
    if n_tr < 2 or n_va < 2:
        raise ValueError(
            f"The split leaves {n_tr} training and {n_va} validation spots; at least 2 of each are needed. "
            "Use more spots, another val_fraction, or other val_groups."
        )
    return split
