"""The one batched forward loop: raw outputs (training, calibration) or calibrated predictions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ._data import batch_stream, index_batches_of

__all__ = ["forward", "index_batches", "array_batches"]


def index_batches(inputs: Callable, idx: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches ``inputs(idx[s : s + batch_size])`` of a row-indexed input source (:func:`batch_stream`)."""
    return batch_stream(inputs, index_batches_of(idx, batch_size))


def array_batches(features, batch_size: int, float_input: bool = True) -> Iterator[torch.Tensor]:
    """Batches of an array of features (or uint8 patches), or of a torch Dataset yielding them."""
    n = len(features)
    is_dataset = isinstance(features, torch.utils.data.Dataset)
    for s in range(0, n, batch_size):
        if is_dataset:
            x = torch.stack([torch.as_tensor(np.asarray(features[i])) for i in range(s, min(s + batch_size, n))])
        else:
            chunk = features[s : s + batch_size]
            x = chunk if torch.is_tensor(chunk) else torch.as_tensor(np.asarray(chunk))
        yield x.to(dtype=torch.float32) if float_input else x


@torch.no_grad()
def forward(
    net: nn.Module,
    batches: Iterable[torch.Tensor],
    n_out: int,
    *,
    calibrated: bool,
    n_first: int | None = None,
    cols: np.ndarray | None = None,
) -> np.ndarray:
    """Run ``net`` in eval mode over ``batches``: calibrated float32 predictions or raw float64 outputs, stacked."""
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    cols_t = None if cols is None else torch.as_tensor(np.asarray(cols), dtype=torch.long, device=dev)
    outs = []
    try:
        for x in batches:
            x = x.to(dev)
            if calibrated:
                out = net.predict_expression(x, cols=cols_t)  # type: ignore[operator]  # the networks' method
                # a slice is copied: as a view it would keep every output of the batch alive
                out = (out[:, :n_first].clone() if n_first is not None else out).float()
            else:
                out = net(x, n_first=n_first).double()
            outs.append(out.cpu().numpy())
    finally:
        net.train(was)
    if outs:
        return np.concatenate(outs, 0)
    width = len(cols) if cols is not None else (n_first or n_out)
    return np.zeros((0, width), dtype=np.float32 if calibrated else np.float64)
