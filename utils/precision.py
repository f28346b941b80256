"""Numerical precision chosen in one place.

Four modes (``--precision``):

* ``fp16`` — IRRA's released behaviour: Linear/Conv/attention weights and CLIP's projections are stored in
  half precision (``model.build`` converts them) and trained directly, no autocast, no loss scaling. This is
  the default on CUDA, so released recipes reproduce.
* ``amp`` — fp32 master weights, fp16 autocast and a gradient scaler (PyTorch's automatic mixed precision, as IVT's
  recipe uses it). On a CPU, where fp16 autocast is slow or missing, it autocasts to bf16 without a scaler.
* ``bf16`` — fp32 master weights with bf16 autocast, no scaler (bf16 has fp32's range).
* ``fp32`` — everything in float32. The default on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

from utils.errors import UserError

PRECISIONS = ("fp16", "amp", "bf16", "fp32")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``None``/``'auto'`` → fp16 on CUDA (as IRRA), fp32 elsewhere; anything else must be a known mode."""
    if precision in (None, "", "auto"):
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is not known; choose one of {', '.join(PRECISIONS)} or auto")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: the GPU {device} has no bfloat16 support; use --precision amp (fp16 "
                        f"autocast with a gradient scaler)")
    return precision


@dataclass
class Precision:
    """The autocast context and gradient scaler that go with a precision mode on a device."""

    mode: str
    device: torch.device

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: no autocast)."""
        if self.mode == "bf16":
            return torch.bfloat16
        if self.mode != "amp":
            return None
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def autocast(self) -> ContextManager:
        """A fresh autocast context for the forward pass (a no-op for ``fp16`` and ``fp32``)."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is only enabled for fp16 autocast (bf16 and fp32 need none; IRRA's fp16 uses none)."""
        enabled = self.amp_dtype == torch.float16
        return torch.amp.GradScaler(self.device.type, enabled=enabled)
