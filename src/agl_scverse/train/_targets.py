"""What the trainer fits and scores against: inputs, the genes of a method, standardised targets, the score."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse._expression import ArrayExpression
from agl_scverse._stats import StreamingMoments, mean_pearson
from agl_scverse._validate import check_choice

from ._inference import forward, index_batches


class TensorInputs:
    """Network inputs held as one tensor (embedding mode): ``inputs(idx)`` returns the rows ``idx`` on ``device``."""

    def __init__(self, X, device="cpu", dtype=torch.float32):
        self.X = torch.as_tensor(np.asarray(X), dtype=dtype).to(device)

    def __len__(self) -> int:
        return self.X.shape[0]

    def __call__(self, idx) -> torch.Tensor:
        return self.X[torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.X.device)]


def genes_for_method(method: str, n_aux: int, k: int | None = None) -> np.ndarray:
    """Positions (in prior-rank order) of the auxiliary genes that enter the network for ``method``."""
    check_choice("method", method, consts.METHODS)
    if method == "pgl":
        return np.arange(0)
    if method == "topk":
        if k is None:
            raise ValueError("method='topk' needs k (the number of auxiliary genes to use).")
        if not 0 <= int(k) <= n_aux:
            raise ValueError(f"k={k} is outside [0, {n_aux}] (the number of auxiliary genes).")
        return np.arange(int(k))
    return np.arange(n_aux)


def predict_raw(net: nn.Module, inputs: Callable, idx: np.ndarray, batch_size: int = 512, n_first: int | None = None):
    """Raw network outputs (eval mode) for spots ``idx``, as a float64 NumPy array."""
    n_out = cast(int, net.n_out)
    return forward(net, index_batches(inputs, idx, batch_size), n_out, calibrated=False, n_first=n_first)


class StandardizedTargets:
    """Expression batches (of an ``ExpressionBatches`` or an array) z-scored with the training spots' statistics."""

    def __init__(self, source, train_idx: np.ndarray, device: torch.device | str = "cpu"):
        if not hasattr(source, "batch"):
            source = ArrayExpression(source.cpu().numpy() if torch.is_tensor(source) else source)
        self.source, self.device = source, torch.device(device)
        moments = StreamingMoments(source.n_cols)
        for _, values in source.chunks(np.asarray(train_idx)):
            moments.update(values)
        self.mean = moments.mean
        self.std = np.where(moments.std > 1e-8, moments.std, 1.0)
        self._mean = torch.as_tensor(self.mean, dtype=torch.float64)
        self._std = torch.as_tensor(self.std, dtype=torch.float64)

    @property
    def n_cols(self) -> int:
        """Number of genes."""
        return self.source.n_cols

    def __call__(self, idx, n_first: int | None = None) -> torch.Tensor:
        """z-scored float32 expression of spots ``idx`` (first ``n_first`` genes when given), on the device."""
        y = torch.as_tensor(self.source.batch(np.asarray(idx), n_first)).double()
        m, s = (self._mean, self._std) if n_first is None else (self._mean[:n_first], self._std[:n_first])
        return ((y - m) / s).float().to(self.device)


def val_pcc(net: nn.Module, inputs: Callable, Y, idx: np.ndarray, n_targets: int, batch_size: int = 512):
    """Mean Pearson r over the target genes on spots ``idx`` (early stopping's score), as ``evaluate`` scores."""
    pred = predict_raw(net, inputs, idx, batch_size, n_first=n_targets)
    if callable(Y):
        obs = Y(idx, n_targets).double().cpu().numpy()
    else:
        obs = np.asarray(Y.cpu() if torch.is_tensor(Y) else Y, dtype=np.float64)[np.asarray(idx)][:, :n_targets]
    r = mean_pearson(obs, pred)
    return r if np.isfinite(r) else 0.0
