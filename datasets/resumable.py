"""Training data that can be resumed at any iteration and gives the same samples whoever loads them.

Two pieces make a training run's data a pure function of ``(seed, epoch, position)``:

* :class:`EpochSampler` wraps a sampler with ``set_epoch`` (see :mod:`datasets.sampler`): it yields
  :class:`SampleKey` ``(epoch, index)`` pairs and can start an epoch after its first ``k`` iterations, so a run
  resumed in the middle of an epoch loads exactly the batches it had not trained on yet.
* :class:`SeededSamples` wraps the training set: before reading sample ``index`` of ``epoch`` it seeds the
  global random generators (torch, numpy, Python's ``random``) from :func:`sample_seed` ``(seed, epoch,
  index)``, and restores them afterwards. Every random draw of the item (flip, crop, erasing, MLM masking)
  therefore depends only on the run seed, the epoch and the index — not on which DataLoader worker reads it,
  how many workers there are, what was read before, or whether the run was interrupted. A training set only
  has to draw its randomness from those global generators (as torchvision's transforms do).

Loader workers ignore the stop signals (``utils.signals.STOP_SIGNALS``): a Ctrl-C in the terminal or a
scheduler's SIGTERM reaches the whole process group, and the main process finishes the iteration with its
workers still serving it (see :func:`worker_init`).
"""
from __future__ import annotations

import atexit
import hashlib
import random
import weakref
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.signals import ignore_stop_signals


class SampleKey(NamedTuple):
    """Which sample to read, and in which epoch (the epoch selects the sample's random draws)."""

    epoch: int
    index: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` in ``epoch`` of a run seeded with ``seed`` (a hash: distinct keys give
    unrelated seeds)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and Python's global generators with ``seed`` for the block, then put
    back the states they had before it."""
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


class SeededSamples(Dataset):
    """``dataset`` read by :class:`SampleKey`, each item under the random state :func:`sample_seed` gives it.

    Args:
        dataset: a map-style dataset indexed by integers (e.g. :class:`datasets.bases.ImageTextDataset`).
        seed: the run seed (the same on every process, so a sample's draws do not depend on the process layout).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey):
        epoch, index = key
        with seeded_global_rngs(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochSampler(Sampler[SampleKey]):
    """The indices of ``sampler`` for one epoch as :class:`SampleKey` s, optionally from a later iteration on.

    Args:
        sampler: a sampler with ``set_epoch(epoch)`` whose order depends only on its seed and the epoch.
        batch_size: the loader's batch size (this process's share of the global batch): an iteration consumes
            that many indices.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0
        self.start_iteration = 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        """Yield ``epoch``'s order next, skipping the indices of its first ``start_iteration`` iterations."""
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        self.epoch = int(epoch)
        self.start_iteration = int(start_iteration)
        set_inner = getattr(self.sampler, "set_epoch", None)
        if callable(set_inner):
            set_inner(self.epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        order = list(self.sampler)
        for index in order[self.start_iteration * self.batch_size:]:
            yield SampleKey(self.epoch, int(index))

    def __len__(self) -> int:
        total = len(self.sampler) if isinstance(self.sampler, Sized) else 0
        return max(0, total - self.start_iteration * self.batch_size)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: workers leave the stop signals to the main process."""
    ignore_stop_signals()


# Live iterators of loaders whose workers ignore the stop signals, and those workers; see stop_workers_at_exit.
_ITERATORS_WITH_WORKERS: "weakref.WeakSet" = weakref.WeakSet()
_WORKER_PROCESSES: "weakref.WeakSet" = weakref.WeakSet()


def stop_workers_at_exit(loader):
    """Have the workers of every iterator of ``loader`` (a ``DataLoader`` with :func:`worker_init` workers)
    stopped when the interpreter exits; returns the loader.

    At exit ``multiprocessing`` sends SIGTERM to the worker processes still alive and waits for them, and
    workers ignore SIGTERM (:func:`worker_init`). Two ways to be left with workers then: an iterator still alive
    (a persistent loader's), and an iterator finalised by the garbage collector together with its queues (the
    traceback of an epoch that failed holds the loader in a reference cycle): its last message to the workers
    never leaves, and they wait for it. The exit handler below asks live iterators to stop their workers, as
    deleting them would, and kills workers still running after that: they only read data.
    """
    owner = weakref.ref(loader)  # (a strong reference here would keep every loader in a reference cycle)

    def tracked_iterator():
        this = owner()
        iterator = type(this)._get_iterator(this)  # what DataLoader.__iter__ calls for each new iterator
        _ITERATORS_WITH_WORKERS.add(iterator)
        _WORKER_PROCESSES.update(getattr(iterator, "_workers", ()))
        return iterator

    loader._get_iterator = tracked_iterator
    return loader


def _stop_loader_workers() -> None:
    for iterator in list(_ITERATORS_WITH_WORKERS):
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()
    for process in list(_WORKER_PROCESSES):
        if process.is_alive():
            process.kill()
            process.join(timeout=10)


# Registered after multiprocessing's own exit handler (torch imports multiprocessing first), so it runs before it.
atexit.register(_stop_loader_workers)


def item_generator() -> torch.Generator:
    """A ``torch.Generator`` for the random draws of one training item, seeded from torch's global generator.

    Read under :class:`SeededSamples` the global generator holds the sample's own seed, so a pipeline that takes
    an explicit generator (caption levels, image masks) stays a function of ``(seed, epoch, index)`` too.
    """
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
