"""Faster float32 CPU kernels for the transformer layers, each beside its plain twin.

* :func:`linear` — ``F.linear`` whose matrix products (forward, input gradient, weight gradient) run in
  oneDNN instead of the BLAS behind ``F.linear`` (MKL). Same float32 arithmetic in another summation
  order; on AVX-512 CPUs that MKL does not tune for (AMD EPYC) about twice as fast. On Intel CPUs MKL is
  as fast or faster (measured on a Xeon with AVX-512 at ViT-B/16's shapes: forward + backward 206-289 GFLOP/s
  in MKL, 141-257 in oneDNN), so there :func:`linear` stays ``F.linear`` (:func:`prefer_onednn_linear`).
* :func:`quick_gelu` — CLIP's ``x * sigmoid(1.702 x)`` computed as ``silu(1.702 x) / 1.702``: the same
  function (to one rounding), with one fused kernel in the backward pass instead of four.

The fast forms are used only where they apply (float32 on the CPU, no autocast, not while
``torch.compile`` or ``torch.jit.trace`` records the model); everywhere else, and inside
``with fast_kernels(False):``, each function is exactly the plain PyTorch expression the model used
before. ``tests/test_kernels.py`` compares the two; ``benchmarks/train_step.py`` times them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

QUICK_GELU_SCALE = 1.702

# The process-wide switches: fast_kernels() (on by default) and prefer_onednn_linear() (None: by CPU vendor).
_FAST = {"enabled": True, "onednn_linear": None}


@contextlib.contextmanager
def fast_kernels(enabled: bool) -> Iterator[None]:
    """Within the block the fast forms are used where they apply (``True``) or never (``False``)."""
    previous = _FAST["enabled"]
    _FAST["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FAST["enabled"] = previous


def fast_kernels_enabled() -> bool:
    """Whether :func:`fast_kernels` currently allows the fast forms."""
    return _FAST["enabled"]


def cpu_vendor_tunes_mkl(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text names an Intel CPU, the vendor MKL's float32 kernels are tuned for."""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[-1].strip() == "GenuineIntel"
    return False


@functools.lru_cache(maxsize=1)
def _onednn_linear_by_vendor() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            return not cpu_vendor_tunes_mkl(handle.read())
    except OSError:  # not Linux: oneDNN, as measured on the machines where MKL is not tuned
        return True


@contextlib.contextmanager
def prefer_onednn_linear(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block :func:`linear` uses oneDNN (``True``), MKL's ``F.linear`` (``False``), or decides by
    the CPU's vendor (``None``, the default: oneDNN unless the CPU is an Intel one)."""
    previous = _FAST["onednn_linear"]
    _FAST["onednn_linear"] = enabled
    try:
        yield
    finally:
        _FAST["onednn_linear"] = previous


def onednn_linear_preferred() -> bool:
    """Whether :func:`linear` would use oneDNN for float32 CPU tensors now (see :func:`prefer_onednn_linear`)."""
    choice = _FAST["onednn_linear"]
    return _onednn_linear_by_vendor() if choice is None else bool(choice)


def _fast_cpu_float32(*tensors: torch.Tensor | None) -> bool:
    """True when the fast forms apply: switched on, float32 CPU tensors, no CPU autocast, no compiler or
    TorchScript tracing (those record the plain forms)."""
    return (
        _FAST["enabled"]
        and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel (``mkldnn::_linear_pointwise``) and it is enabled."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - resolving the op is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` when it is contiguous or the transpose of a contiguous matrix, else a contiguous copy.

    oneDNN multiplies such operands at full speed; other strides (e.g. the class-token rows
    ``tokens[:, 0, :]``, whose row stride is a whole sequence) send it to a reference kernel that is two
    orders of magnitude slower.
    """
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` by oneDNN: x [..., K], weight [N, K] -> [..., N]; see :func:`_dense`."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with its three matrix products in oneDNN; saves the same tensors as ``F.linear``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()  # a no-op for the layers' activations; the backward transposes it
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])  # [M, N]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_matmul(grad_out, weight.t())  # [..., N] @ [N, K]
        if ctx.needs_input_grad[1]:
            grad_weight = _onednn_matmul(grad_rows.t(), x.reshape(-1, x.shape[-1]).t())  # [N, M] @ [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(dim=0)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [..., K], weight [N, K], bias [N] or None -> [..., N].

    In oneDNN for float32 CPU tensors with at least one row where oneDNN is preferred (see the module
    docstring).
    """
    if (x.dim() >= 2 and x.numel() > 0 and _fast_cpu_float32(x, weight, bias) and onednn_linear_preferred()
            and onednn_available()):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``, any shape; ``silu(1.702 x) / 1.702`` when fast."""
    if _fast_cpu_float32(x):
        return F.silu(x * QUICK_GELU_SCALE) / QUICK_GELU_SCALE
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)
