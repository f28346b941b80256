"""Device and process layout in one place.

:func:`init_distributed` reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), starts the
process group (NCCL on GPUs, gloo on CPU), picks this process's device, and falls back to a single process
when torchrun is not used. Nothing else in the project spells ``"cuda"``: it asks for the device it was given.

Collectives wait at most ``$IRRA_DIST_TIMEOUT`` seconds (default 30 minutes) for a peer, so a process that
failed alone (its peers waiting for it in a collective) never leaves the others hanging forever; torchrun
also stops the remaining workers as soon as one exits with an error.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.errors import PeerError, UserError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "IRRA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")


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


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is not an integer; torchrun sets RANK, LOCAL_RANK "
                        f"and WORLD_SIZE itself, unset them for a single-process run") from None


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the slowest process: ``$IRRA_DIST_TIMEOUT`` seconds, else 30 minutes.

    Rank 0 evaluates while the other ranks wait at a barrier, so this must exceed one evaluation.
    """
    seconds = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if seconds < 1:
        raise UserError(f"{TIMEOUT_ENV}={seconds}: the collective timeout must be at least 1 second")
    return datetime.timedelta(seconds=seconds)


def pins_memory(device: str | torch.device) -> bool:
    """Whether data loaders feeding ``device`` (a device or its name) should use pinned host memory (GPUs do)."""
    return str(device).startswith("cuda")


def init_distributed(requested_device: str | None = None) -> DistEnv:
    """Read torchrun's environment, start the process group if needed, and return this process's layout.

    Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) this is a single process on ``requested_device``.
    The same command picks NCCL when the device is a GPU and gloo on CPU.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process of the job; "
                        f"launch with torchrun, which sets them")
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = collective_timeout()
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        logger.info("Process group started: backend %s, rank %d of %d, device %s, timeout %ds", backend, rank,
                    world_size, device, timeout.total_seconds())
    return DistEnv(device=device, rank=rank, local_rank=local_rank, world_size=world_size)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def synchronize() -> None:
    """Barrier across processes; a no-op in a single process."""
    if get_world_size() > 1:
        dist.barrier()


def run_on_main(fn: Callable[[], T]) -> T:
    """Call ``fn`` on rank 0 only while the other ranks wait; every rank returns rank 0's (picklable) result.

    This is the single collective of a rank-0-only phase (making the run folder, evaluating). When ``fn``
    fails, rank 0 re-raises and the other ranks raise :class:`PeerError` (rank 0 reports the failure; they
    stay silent) instead of waiting for a peer that has stopped.
    """
    if get_world_size() == 1:
        return fn()
    holder: list = [None]
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            holder[0] = ("ok", fn())
        except UserError as err:
            holder[0], failure = ("user", str(err)), err
        except Exception as err:  # a bug: rank 0 shows the traceback, the others say where to look
            holder[0], failure = ("bug", f"{type(err).__name__}: {err}"), err
    dist.broadcast_object_list(holder, src=0)
    status, value = holder[0]
    if failure is not None:
        raise failure
    if status == "user":
        raise PeerError(f"rank 0 stopped: {value}")
    if status == "bug":
        raise PeerError(f"rank 0 failed with {value} (its traceback is in rank 0's output)", exit_code=1)
    return value


def run_agreed(fn: Callable[[], T]) -> T:
    """Call ``fn`` on every rank, then agree on the outcome: when it failed anywhere, every rank stops.

    The lowest rank that failed re-raises its own error (and reports it); the others raise :class:`PeerError`,
    so a failure that every rank meets alike (a missing file) is reported once, and one that a single rank
    meets stops its peers instead of leaving them in the next collective. ``fn`` must not run collectives.
    """
    if get_world_size() == 1:
        return fn()
    failure: BaseException | None = None
    try:
        result = fn()
    except Exception as err:
        failure = err
    outcome = None if failure is None else ("user" if isinstance(failure, UserError) else "bug", str(failure))
    outcomes = all_gather_objects(outcome)
    failed = [rank for rank, item in enumerate(outcomes) if item is not None]
    if not failed:
        return result
    if failure is not None and get_rank() == failed[0]:
        raise failure
    kind, message = outcomes[failed[0]]
    raise PeerError(f"rank {failed[0]} stopped: {message}", exit_code=2 if kind == "user" else 1)


def all_gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process); a collective."""
    if get_world_size() == 1:
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# Messages of gloo when the process at the other end of a connection has gone.
_PEER_LOSS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` says that another process of the job has gone (it failed and reports why itself)."""
    if get_world_size() == 1:
        return False
    network_error = getattr(dist, "DistNetworkError", None)
    if network_error is not None and isinstance(err, network_error):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _PEER_LOSS)


@contextmanager
def silence_lost_peers() -> Iterator[None]:
    """Within the block, an error saying that another process of the job has gone (:func:`lost_peer`) becomes a
    silent :class:`PeerError`: the process that failed reports why, once."""
    try:
        yield
    except Exception as err:
        if lost_peer(err):
            raise PeerError(f"another process of the job failed ({err})", exit_code=1) from err
        raise


class StopVote:
    """All ranks agree to stop at the same iteration when any of them was asked to.

    :meth:`poll` is called once per iteration by every rank with the signal this rank received (0: none) and
    returns the signal to stop for (0: go on). In one process that is the local signal. With several, each poll
    starts an all-reduce (max) of the local signal on a CPU (gloo) group and reads the one started by the
    previous poll: a request reaches every rank one iteration later, every rank sees it at the same poll, and
    no step waits for the device.
    """

    def __init__(self) -> None:
        self._group = None
        self._pending: tuple | None = None
        if get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def poll(self, signum: int) -> int:
        if get_world_size() == 1:
            return signum
        if self._pending is not None:
            work, vote = self._pending
            self._pending = None
            work.wait()
            if int(vote.item()) > 0:
                return int(vote.item())
        vote = torch.tensor([int(signum)], dtype=torch.int32)
        self._pending = (dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._group, async_op=True), vote)
        return 0

    def close(self) -> None:
        """Finish the vote still under way (every rank calls this at the same point)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself in one process)."""
    if get_world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def wrap_ddp(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when ``env`` has several processes, else ``model`` itself.

    GPU: one device per process (``device_ids``); CPU: ``device_ids=None`` as gloo needs. Every parameter
    takes part in every step for all loss sets of IRRA and PHP, so unused-parameter search stays off.
    Buffers are not re-broadcast before each forward: IRRA has none and PHP's expert counters are
    per-process statistics (one collective per step saved).
    """
    if not env.distributed:
        return model

    options: dict = {"device_ids": [env.device.index] if env.device.type == "cuda" else None,
                     "find_unused_parameters": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        options["forward_sync_buffers"] = False  # newer torch's name for broadcast_buffers
    else:
        options["broadcast_buffers"] = False
    return DistributedDataParallel(model, **options)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] from every rank along dim 0, in rank order; gradients flow back.

    Ranks may hold different ``n_r`` (the last batch of an epoch): sizes are exchanged first and shorter
    tensors padded, then the padding is dropped. In a single process this returns ``tensor`` itself.
    The backward pass sums, on each rank, the gradients every rank computed for that rank's rows, so with
    DDP's gradient averaging a loss computed on the gathered batch gives the single-process gradients.
    """
    if get_world_size() == 1:
        return tensor
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad], dim=0)
    parts = _AllGather.apply(padded)  # [world_size, longest, ...]
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


class _AllGather(torch.autograd.Function):
    """all_gather of equally shaped tensors whose backward returns, on each rank, the sum over all ranks of
    the gradient of that rank's block (one all-reduce; any backend)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = get_rank()
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.rank]


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
