"""Training samplers that shard every global batch across distributed ranks.

Both samplers first build, from ``seed`` and the epoch, the index order a single process would use,
cut it into global batches of ``batch_size`` indices, and give each rank its share of every global
batch. Rank ``r`` of ``R`` takes the ``r``-th contiguous slice of ``batch_size // R`` indices of each full
global batch, so the union over ranks of their ``k``-th local batches is exactly the single process's
``k``-th batch, and every rank runs the same number of iterations as the single process. The loader of
each rank must use ``batch_size // R`` as its batch size (see :func:`datasets.build.build_dataloader`).

A last, smaller global batch of ``m`` indices (random sampler only) is split into ``R`` contiguous slices
whose sizes differ by at most one, the first ``m % R`` ranks taking one more. When ``m < R`` the batch is
first padded with the epoch's first indices up to ``R`` so that no rank runs an iteration fewer (those
few samples are then seen twice in that epoch).

All ranks must be given the same ``seed``; call ``set_epoch(epoch)`` before each epoch to reshuffle.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler

from utils.errors import UserError

logger = logging.getLogger(__name__)


def _check_layout(batch_size: int, num_replicas: int, rank: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise UserError(f"rank must be in [0, world_size) and world_size >= 1; got rank {rank}, world_size {num_replicas}.")
    if batch_size < 1 or batch_size % num_replicas:
        raise UserError(
            f"--batch_size {batch_size} is the global batch and must be a positive multiple of the "
            f"world size {num_replicas}; choose a batch size divisible by {num_replicas}."
        )


def shard_batches(order: Sequence[int], batch_size: int, num_replicas: int, rank: int) -> list[int]:
    """This rank's indices from ``order`` cut into global batches (see the module docstring)."""
    local = batch_size // num_replicas
    out: list[int] = []
    full = len(order) - len(order) % batch_size
    for start in range(0, full, batch_size):
        out.extend(order[start + rank * local : start + (rank + 1) * local])
    tail = list(order[full:])
    if tail:
        if len(tail) < num_replicas:
            tail += list(order[: num_replicas - len(tail)])
        base, extra = divmod(len(tail), num_replicas)
        begin = rank * base + min(rank, extra)
        out.extend(tail[begin : begin + base + (1 if rank < extra else 0)])
    return out


class _EpochSampler(Sampler[int]):
    """Common state: layout, seed, epoch; subclasses build the single-process order of one epoch."""

    def __init__(self, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        _check_layout(batch_size, num_replicas, rank)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self._cache: Optional[tuple[int, list[int]]] = None

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` on the next iteration (same on every rank)."""
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def global_order(self) -> list[int]:
        """Indices of this epoch in the order a single process with the same global batch would use."""
        raise NotImplementedError

    def _local(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            order = shard_batches(self.global_order(), self.batch_size, self.num_replicas, self.rank)
            self._cache = (self.epoch, order)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._local())

    def __len__(self) -> int:
        return len(self._local())


class ShardedRandomSampler(_EpochSampler):
    """Every sample once per epoch in a seeded random order, sharded by global batch.

    With one replica this is a plain shuffle: ``torch.randperm`` of a generator seeded from
    ``(seed, epoch)``.

    Args:
        num_samples: dataset length.
        batch_size: the global batch size (all ranks together).
        num_replicas, rank: distributed layout.
        seed: shuffling seed, identical on all ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(batch_size, num_replicas, rank, seed)
        self.num_samples = num_samples

    def global_order(self) -> list[int]:
        return torch.randperm(self.num_samples, generator=self._generator()).tolist()


class RandomIdentitySampler(_EpochSampler):
    """P identities x K instances per global batch (torchreid's RandomIdentitySampler), sharded.

    Each identity's sample indices are shuffled and cut into groups of ``num_instances`` (an identity with
    fewer samples is re-drawn with replacement up to ``num_instances``; a remainder smaller than a group is
    dropped for the epoch). While at least ``P = batch_size // num_instances`` identities still have
    groups, ``P`` of them are drawn without replacement and one group of each is appended. Every global
    batch therefore holds exactly ``P`` identities with ``K`` samples each, identity groups contiguous; when
    ``batch_size // num_replicas`` is a multiple of ``K`` no group is split across ranks.

    Args:
        pids: identity of every dataset index.
        batch_size: the global batch size; must be a multiple of ``num_instances``.
        num_instances: K, samples per identity in a batch.
        num_replicas, rank, seed: as for :class:`ShardedRandomSampler`.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if num_instances < 1 or batch_size % num_instances:
            raise UserError(
                f"--batch_size {batch_size} must be a multiple of --num_instance {num_instances} for the identity "
                "sampler (each batch holds batch_size / num_instance identities)."
            )
        super().__init__(batch_size, num_replicas, rank, seed)
        self.num_instances = num_instances
        self.pids_per_batch = batch_size // num_instances
        index_of: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            index_of[int(pid)].append(index)
        self.index_of = dict(index_of)
        if len(self.index_of) < self.pids_per_batch:
            raise UserError(
                f"The identity sampler needs batch_size / num_instance = {self.pids_per_batch} identities per batch "
                f"but the training set has only {len(self.index_of)}; lower --batch_size or raise --num_instance."
            )

    def global_order(self) -> list[int]:
        gen = self._generator()
        k = self.num_instances
        groups: dict[int, list[list[int]]] = {}
        for pid in sorted(self.index_of):
            idxs = self.index_of[pid]
            if len(idxs) < k:
                picks = torch.randint(len(idxs), (k,), generator=gen).tolist()
                shuffled = [idxs[i] for i in picks]
            else:
                shuffled = [idxs[i] for i in torch.randperm(len(idxs), generator=gen).tolist()]
            groups[pid] = [shuffled[i : i + k] for i in range(0, len(shuffled) - k + 1, k)]
        available = sorted(groups)
        order: list[int] = []
        while len(available) >= self.pids_per_batch:
            chosen = torch.randperm(len(available), generator=gen)[: self.pids_per_batch].tolist()
            picked = [available[i] for i in chosen]
            for pid in picked:
                order.extend(groups[pid].pop())
            exhausted = {pid for pid in picked if not groups[pid]}
            if exhausted:
                available = [pid for pid in available if pid not in exhausted]
        return order
