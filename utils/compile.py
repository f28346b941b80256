"""``torch.compile`` behind one switch, with one clear error where it cannot work."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from torch import nn

from utils.errors import UserError

logger = logging.getLogger(__name__)

# Compilers Inductor's CPU backend can use: $CXX first, then its own default and the usual names.
_CXX_CANDIDATES = ("c++", "g++", "clang++")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401  (imported to see whether it exists)
    except ImportError:
        return False
    return True


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` (Inductor) cannot compile for ``device`` here, or None when it can.

    Checks the prerequisites that fail late and obscurely otherwise: a Python version TorchDynamo supports,
    a C++ compiler for CPU code, Triton for CUDA code.
    """
    if not hasattr(torch, "compile"):
        return f"torch.compile, which torch {torch.__version__} lacks"
    # TorchDynamo is imported only here, when compilation is asked for: importing it takes seconds
    try:
        import torch._dynamo as dynamo
    except ImportError as err:  # pragma: no cover - depends on the installation
        return f"TorchDynamo, which does not import ({err})"
    if not dynamo.is_dynamo_supported():
        return "a Python version that TorchDynamo supports"
    if device.type == "cpu":
        names = [os.environ.get("CXX")] + list(_CXX_CANDIDATES)
        if not any(name and shutil.which(name) for name in names):
            return "a C++ compiler for CPU code (install g++ or set CXX)"
    elif device.type == "cuda" and not _has_triton():
        return "Triton for CUDA code (pip install triton)"
    return None


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """``model`` with its forward compiled by ``torch.compile`` when ``enabled`` (for the device of its
    parameters), in place: parameter names and checkpoints stay those of the plain model. Returns ``model``.

    Raises:
        UserError: compilation was asked for but cannot work here (see :func:`compile_problem`).
    """
    if not enabled:
        return model
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    problem = compile_problem(device)
    if problem is not None:
        raise UserError(f"--compile needs {problem}; install it or train without --compile.")
    logger.info("Compiling the model with torch.compile (Inductor) for %s", device)
    model.compile()
    return model
