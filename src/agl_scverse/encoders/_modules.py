"""Modules that wrap what an encoder returns: a plain callable, a ViT read as class token plus mean patch token."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from timm.models import VisionTransformer

__all__ = ["CallableEncoder", "ClsMeanPool"]


class CallableEncoder(nn.Module):
    """Wrap a tensor -> tensor callable as a module (no parameters)."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x)
        return y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))


class ClsMeanPool(nn.Module):
    """A ViT whose features are its class token and the mean of its patch tokens, register tokens left out."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.num_features = 2 * int(vit.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        n_prefix = int(getattr(self.vit, "num_prefix_tokens", 1))
        return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)
