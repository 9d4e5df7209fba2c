"""How an image encoder runs: float32, or ``channels_last`` with bf16 / fp16 autocast."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from scanpy import logging as logg
from torch import nn

from agl_scverse import _constants as consts
from agl_scverse._validate import check_choice

__all__ = ["Precision", "resolve_precision", "native_bf16", "uses_convolutions"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively (CUDA: without emulation; CPU: oneDNN's check)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
            return False
    return False


def uses_convolutions(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2-d convolution (only then is ``channels_last`` worth using)."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


@dataclass
class Precision:
    """A resolved precision: the ``precision=`` asked, what runs (``name``), device type, layout, gradient scaler."""

    requested: str
    name: str
    device_type: str
    channels_last: bool
    scaler: Any = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32: no autocast)."""
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context of the encoder's forward pass: ``torch.autocast`` in :attr:`dtype`, or nothing for float32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def image_batch(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch ``(B, C, H, W)`` in the memory format the encoder runs in (values unchanged)."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def for_module(self, module: nn.Module) -> Precision:
        """The same precision for ``module``: ``channels_last`` only when it holds 2-d convolutions."""
        return replace(self, channels_last=self.channels_last and uses_convolutions(module))

    def to_layout(self, module: nn.Module) -> bool:
        """Convert ``module`` in place (same parameter objects) to this memory format; whether it was converted."""
        if not (self.channels_last and uses_convolutions(module)):
            return False
        module.to(memory_format=torch.channels_last)
        return True

    def restore_layout(self, module: nn.Module, converted: bool) -> None:
        """Bring a module converted by :meth:`to_layout` back to the default (contiguous) layout."""
        if converted:
            module.to(memory_format=torch.contiguous_format)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``zero_grad``, ``backward`` and ``step`` of ``optimizer`` (through the gradient scaler with fp16)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def record(self) -> dict[str, Any]:
        """JSON-serialisable description (``.uns`` embedding records, model configs)."""
        return {
            "precision": self.name,
            "channels_last": bool(self.channels_last),
            "precision_requested": self.requested,
        }


def resolve_precision(
    precision: str, device: torch.device | str, module: nn.Module | None = None, training: bool = False
) -> Precision:
    """The :class:`Precision` that ``precision=`` means on ``device`` for ``module`` (``training``: fp16 scaler)."""
    check_choice("precision", precision, consts.PRECISIONS)
    device = torch.device(device)
    dev_type = device.type
    if precision == "fp32":
        return Precision(precision, "fp32", dev_type, False)
    if precision == "auto":
        if dev_type == "cuda":
            name = "bf16" if native_bf16(device) else "fp16"
        elif dev_type == "cpu":
            name = "bf16" if native_bf16(device) else "fp32"
        else:  # e.g. mps: float32, default layout
            return Precision(precision, "fp32", dev_type, False)
    else:
        name = precision
        if name == "fp16" and dev_type != "cuda":
            raise ValueError(
                f"precision='fp16' needs a CUDA GPU (fp16 autocast with a gradient scaler); the device is {dev_type!r}. "
                "Use precision='bf16' or 'fp32' (or 'auto') on a CPU."
            )
        if name == "bf16" and dev_type == "cuda" and not native_bf16(device):
            raise ValueError(
                "precision='bf16' was asked but this CUDA GPU has no bf16 support; use precision='fp16' (with a "
                "gradient scaler) or 'auto'."
            )
        if name == "bf16" and dev_type == "cpu" and not native_bf16(device):
            logg.warning(
                "precision='bf16' on a CPU without native bf16 (no AVX512-BF16 / AMX): bf16 is emulated and usually "
                "slower than float32; precision='auto' picks float32 with channels_last here."
            )
        if dev_type not in ("cuda", "cpu"):
            raise ValueError(
                f"precision={precision!r} is supported on CPU and CUDA devices; use 'fp32' on {dev_type!r}."
            )
    scaler = torch.amp.GradScaler("cuda") if training and name == "fp16" else None
    prec = Precision(precision, name, dev_type, True, scaler)
    return prec if module is None else prec.for_module(module)
