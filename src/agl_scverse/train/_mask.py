"""The DkGSB soft gene mask: ``w_i = sigmoid((theta - r_i) / tau)`` over normalised prior ranks."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

__all__ = ["normalized_ranks", "GeneMask"]


def normalized_ranks(ranks) -> np.ndarray:
    """Map prior ranks (1 = best, any ties allowed) to ``[0, 1]`` by their order (best -> 0, worst -> 1)."""
    ranks = np.asarray(ranks, dtype=float)
    if not np.all(np.isfinite(ranks)):
        raise ValueError("Prior ranks hold NaN/inf values.")
    return (rankdata(ranks, method="ordinal") - 1) / max(ranks.size - 1, 1)  # ordinal: ties by position


class GeneMask(nn.Module):
    """Soft top-k mask over auxiliary genes, ``w_i = sigmoid((theta - r_i) / tau)``.

    Parameters
    ----------
    ranks
        Normalised ranks ``r_i`` in ``[0, 1]`` of the auxiliary genes (see :func:`normalized_ranks`).
    tau
        Temperature of the sigmoid (paper: 0.01).
    theta
        Initial threshold; default the mean rank.
    dtype
        Floating dtype of the rank buffer and ``theta`` (float64 for gradient checks).

    Examples
    --------
    >>> import torch
    >>> m = GeneMask(torch.linspace(0, 1, 5), tau=0.01)
    >>> m.k, round(float(m.threshold), 2)
    (2, 0.5)
    """

    ranks: torch.Tensor

    def __init__(self, ranks, tau: float = 0.01, theta: float | None = None, dtype=torch.float32):
        super().__init__()
        r = torch.as_tensor(np.asarray(ranks, dtype=float), dtype=dtype)
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        self.register_buffer("ranks", r)
        self.tau = float(tau)
        init = float(r.mean()) if (theta is None and r.numel()) else (0.5 if theta is None else float(theta))
        self.theta = nn.Parameter(torch.tensor(init, dtype=dtype))

    def weights(self) -> torch.Tensor:
        """Soft weights of the auxiliary genes (differentiable in ``theta``)."""
        return torch.sigmoid((self.theta - self.ranks) / self.tau)

    @property
    def k(self) -> int:
        """Number of auxiliary genes with weight above 0.5."""
        with torch.no_grad():
            return int((self.weights() > 0.5).sum())

    @property
    def threshold(self) -> float:
        """The current threshold ``theta`` on the normalised rank."""
        return float(self.theta.detach())

    def clamp_(self) -> None:
        """Keep ``theta`` in ``[0, 1]`` where the mask still has a gradient."""
        with torch.no_grad():
            self.theta.clamp_(0.0, 1.0)
