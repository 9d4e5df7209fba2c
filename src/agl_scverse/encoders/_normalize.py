"""Input normalisation of image encoders: uint8 patches to the mean/std an encoder was trained with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "channel_stats", "normalize"]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    batch: torch.Tensor | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Turn uint8 patches into a normalised float tensor: ``(batch / 255 - mean) / std`` per channel.

    Parameters
    ----------
    batch
        uint8 ``(B, 3, H, W)`` or ``(3, H, W)`` tensor (or array), as :class:`SpotPatches` gives; stays on its device.
    mean
        Per-channel mean in the 0-1 range (3 values, or 1 for all channels), e.g. ``info["mean"]`` from
        :func:`agl_scverse.model.get_encoder`.
    std
        Per-channel standard deviation, the same way (``info["std"]``).

    Returns
    -------
    float32 tensor of the same shape.

    Examples
    --------
    >>> import torch
    >>> x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    >>> normalize(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).unique().tolist()
    [1.0]
    """
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"normalize expects a uint8 torch tensor, got {type(batch).__name__}.")
    if batch.dtype != torch.uint8:
        raise TypeError(
            f"normalize expects uint8 patches (0-255), got dtype {batch.dtype}. Pass the raw SpotPatches output; "
            "a float input may already be normalised."
        )
    if batch.ndim not in (3, 4) or batch.shape[-3] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) or (3, H, W) patches, got shape {tuple(batch.shape)}.")
    m = channel_stats(mean, "mean")
    s = channel_stats(std, "std")
    if np.any(np.asarray(s) <= 0):
        raise ValueError(f"std must be positive, got {std}.")
    m_t, s_t = (torch.tensor(v, dtype=torch.float32, device=batch.device).view(3, 1, 1) for v in (m, s))
    return (batch.float().div_(255.0) - m_t) / s_t


def channel_stats(values: Sequence[float] | float, name: str) -> list[float]:
    arr = np.atleast_1d(np.asarray(values, dtype=float)).ravel()
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}.")
    return [float(v) for v in arr]
