"""Networks from an image (or its embedding) to every modelled gene: one output layer above a shared trunk."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingEnsemble", "EmbeddingHead", "FinetuneNet"]


class _Calibrated(nn.Module):
    """Mixin: output calibration buffers and helpers shared by both networks."""

    out: nn.Linear
    out_scale: torch.Tensor
    out_shift: torch.Tensor
    out_lo: torch.Tensor
    out_hi: torch.Tensor

    def _init_calibration(self, n_out: int) -> None:
        self.register_buffer("out_scale", torch.ones(n_out))
        self.register_buffer("out_shift", torch.zeros(n_out))
        self.register_buffer("out_lo", torch.full((n_out,), -float("inf")))
        self.register_buffer("out_hi", torch.full((n_out,), float("inf")))

    def _linear_out(self, h: torch.Tensor, n_first: int | None, cols: torch.Tensor | None = None) -> torch.Tensor:
        if cols is None and n_first is None:
            return self.out(h)
        rows = slice(n_first) if cols is None else cols  # only these outputs: cost proportional to them
        return F.linear(h, self.out.weight[rows], self.out.bias[rows])

    def predict_expression(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated predictions (of ``cols`` only), clipped to each gene's training range."""
        c = slice(None) if cols is None else cols
        raw = self(x, cols=cols)
        return torch.maximum(torch.minimum(raw * self.out_scale[c] + self.out_shift[c], self.out_hi[c]), self.out_lo[c])


class EmbeddingHead(_Calibrated):
    """Standardise the embedding, shared MLP trunk, one linear output layer for all genes.

    Parameters
    ----------
    n_in
        Embedding dimension.
    n_out
        Number of genes (targets first, then auxiliaries).
    hidden
        Widths of the shared hidden layers; ``()`` gives a linear head (then AGL cannot differ from PGL).
    dropout
        Dropout after every hidden layer.

    Examples
    --------
    >>> import torch
    >>> net = EmbeddingHead(16, 5, hidden=(8,))
    >>> net(torch.randn(4, 16)).shape, net(torch.randn(4, 16), n_first=2).shape
    (torch.Size([4, 5]), torch.Size([4, 2]))
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (256,), dropout: float = 0.1):
        super().__init__()
        self.n_in, self.n_out, self.dropout = int(n_in), int(n_out), float(dropout)
        self.hidden = tuple(int(h) for h in hidden)
        self.register_buffer("x_mean", torch.zeros(self.n_in))
        self.register_buffer("x_std", torch.ones(self.n_in))
        layers: list[nn.Module] = []
        width = self.n_in
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout)]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(width, self.n_out)
        self._init_calibration(self.n_out)

    def set_input_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training-spot mean and std of the embedding (std floored to avoid division by zero)."""
        self.x_mean.copy_(mean.to(self.x_mean))
        self.x_std.copy_(std.to(self.x_std).clamp_min(1e-6))

    def forward(self, x: torch.Tensor, n_first: int | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs for all genes, or only the first ``n_first`` (the targets, cheaper), or only ``cols``."""
        h = self.trunk((x - self.x_mean) / self.x_std)
        return self._linear_out(h, n_first, cols)

    def config(self) -> dict:
        """JSON-able constructor arguments."""
        shape = {"kind": "embedding", "n_in": self.n_in, "n_out": self.n_out}
        return {**shape, "hidden": list(self.hidden), "dropout": self.dropout}


class FinetuneNet(_Calibrated):
    """Image backbone trained end to end plus one linear layer to all genes (the paper's network).

    Parameters
    ----------
    backbone
        Module mapping a normalised ``(n, 3, H, W)`` float batch to ``(n, n_features)`` features.
    n_features
        Backbone output dimension.
    n_out
        Number of genes (targets first, then auxiliaries).
    mean
        Per-channel mean of the input normalisation.
    std
        Per-channel standard deviation of the input normalisation.

    Examples
    --------
    >>> import torch
    >>> bb = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 6))
    >>> FinetuneNet(bb, 6, 4)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape
    torch.Size([2, 4])
    """

    img_mean: torch.Tensor
    img_std: torch.Tensor

    def __init__(
        self, backbone: nn.Module, n_features: int, n_out: int, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ):
        super().__init__()
        self.backbone = backbone
        self.n_features, self.n_out = int(n_features), int(n_out)
        self.register_buffer("img_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("img_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.out = nn.Linear(self.n_features, self.n_out)
        self._init_calibration(self.n_out)
        self._mean, self._std = [float(v) for v in mean], [float(v) for v in std]

    def config(self) -> dict:
        """JSON-able constructor arguments (the backbone is rebuilt from the encoder name in the model config)."""
        shape = {"kind": "finetune", "n_features": self.n_features, "n_out": self.n_out}
        return {**shape, "mean": self._mean, "std": self._std}

    def forward(self, x: torch.Tensor, n_first: int | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs from image patches: ``(n, 3, H, W)`` or ``(n, H, W, 3)``, ``uint8`` or float in [0, 1]."""
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.img_mean) / self.img_std
        h = self.backbone(x)
        if h.ndim > 2:
            h = torch.flatten(h, 1)
        with torch.autocast(device_type=h.device.type, enabled=False):  # under bf16/fp16 autocast: a float32 head
            return self._linear_out(h.float(), n_first, cols)


class EmbeddingEnsemble(nn.Module):
    """Embedding-mode heads of the same shape trained from different seeds; predictions are their mean.

    With ``linear`` (``agl_fit(head="hybrid")``) the first ``linear.n_out`` outputs are blended with it.

    Parameters
    ----------
    members
        Trained :class:`EmbeddingHead` networks with the same constructor arguments.
    linear
        A linear :class:`EmbeddingHead` of the same input and the first outputs, or None.
    linear_weight
        Its share of those outputs, in [0, 1].

    Examples
    --------
    >>> import torch
    >>> ens = EmbeddingEnsemble([EmbeddingHead(4, 3, hidden=(5,)) for _ in range(2)])
    >>> ens.predict_expression(torch.randn(6, 4)).shape, ens.n_members
    (torch.Size([6, 3]), 2)
    """

    def __init__(
        self, members: Sequence[EmbeddingHead], linear: EmbeddingHead | None = None, linear_weight: float = 0.5
    ):
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, EmbeddingHead) for m in members):
            raise TypeError("EmbeddingEnsemble takes a non-empty list of EmbeddingHead networks.")
        if any(m.config() != members[0].config() for m in members[1:]):
            raise ValueError("The members of an ensemble must have the same shape (n_in, n_out, hidden, dropout).")
        self.members = nn.ModuleList(members)
        self.n_in, self.n_out = members[0].n_in, members[0].n_out
        if linear is not None:
            if not isinstance(linear, EmbeddingHead) or linear.hidden or linear.n_in != self.n_in:
                raise ValueError(f"linear must be an EmbeddingHead({self.n_in}, n, hidden=()) (a linear head).")
            if not 1 <= linear.n_out <= self.n_out or not 0.0 <= float(linear_weight) <= 1.0:
                raise ValueError(
                    f"linear must predict 1..{self.n_out} first outputs and linear_weight be in [0, 1]; got "
                    f"{linear.n_out} outputs and weight {linear_weight!r}."
                )
        elif len(members) < 2:
            raise ValueError("An ensemble without a linear head needs at least 2 members.")
        self.linear, self.linear_weight = linear, float(linear_weight)

    @property
    def n_members(self) -> int:
        """Number of member networks."""
        return len(self.members)

    def heads(self) -> list[EmbeddingHead]:
        """The member networks."""
        return cast(list[EmbeddingHead], list(self.members))

    def member_predictions(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated predictions of every member, ``(n_members, n, n_genes)``."""
        return torch.stack([m.predict_expression(x, cols=cols) for m in self.heads()])

    def predict_expression(self, x: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the members' calibrated predictions (each clipped), blended with the linear head's outputs."""
        out = self.member_predictions(x, cols).mean(0)
        if self.linear is None:
            return out
        cols = torch.arange(self.n_out, device=x.device) if cols is None else cols
        if len(pos := torch.nonzero(cols < self.linear.n_out).flatten()):
            w, lin = self.linear_weight, self.linear.predict_expression(x, cols=cols[pos])
            out[:, pos] = (1.0 - w) * out[:, pos] + w * lin
        return out

    def forward(self, x: torch.Tensor, n_first: int | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble prediction (calibrated: an ensemble is not trained as one network)."""
        if cols is None and n_first is not None:
            cols = torch.arange(n_first, device=x.device)
        return self.predict_expression(x, cols)

    def config(self) -> dict:
        """JSON-able constructor arguments: the members' shape and their number."""
        out = {**self.heads()[0].config(), "kind": "ensemble", "n_members": self.n_members}
        if self.linear is not None:
            out["linear"] = {"n_out": self.linear.n_out, "weight": self.linear_weight}
        return out
