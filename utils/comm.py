"""Device and process layout in one place.

:func:`init_distributed` reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), starts the
process group (NCCL on GPUs, gloo on CPU), picks this process's device, and falls back to a single process
when torchrun is not used. Nothing else in the project spells ``"cuda"``: it asks for the device it was given.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs and who its peers are."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """Turn ``--device`` into a ``torch.device``; ``None``/``'auto'`` means CUDA when available, else CPU.

    Under torchrun a bare ``cuda`` becomes ``cuda:<local_rank>`` so each process gets its own GPU.
    """
    if requested in (None, "", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise UserError(f"--device {requested!r} is not a device torch knows ({err}); use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested} asks for a GPU but torch sees none; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def init_distributed(requested_device: str | None = None) -> DistEnv:
    """Read torchrun's environment, start the process group if needed, and return this process's layout.

    Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) this is a single process on ``requested_device``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, init_method="env://")
        logger.info("Process group started: backend %s, rank %d of %d, device %s", backend, rank, world_size, device)
    return DistEnv(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def synchronize() -> None:
    """Barrier across processes; a no-op in a single process."""
    if get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] from every rank along dim 0, in rank order; gradients flow back.

    Ranks may hold different ``n_r`` (the last batch of an epoch): sizes are exchanged first and shorter
    tensors padded, then the padding is dropped. In a single process this returns ``tensor`` itself.
    The backward pass sums, on each rank, the gradients every rank computed for that rank's rows, so with
    DDP's gradient averaging a loss computed on the gathered batch gives the single-process gradients.
    """
    if get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad], dim=0)
    parts = dist_fn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` for tensors that need no gradient (ids, hit indicators)."""
    if get_world_size() == 1:
        return tensor
    with torch.no_grad():
        return all_gather_with_grad(tensor.detach())


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]
