"""What keeps a training run safe between iterations: checkpoints to resume from exactly, stop requests, and a
watch for a loss that is no longer a number.

* **Exact resume.** ``last.pth`` holds, beside the model, optimizer, scheduler and scaler states, the run's
  position (epoch, iteration, running means, best score: :class:`processor.processor.Progress`) and the random
  states the training process consumes (torch CPU and CUDA, numpy, Python; one set per process,
  :func:`capture_rng_state`). The data side needs none: every sample's draws follow from ``(seed, epoch,
  index)`` (:mod:`datasets.resumable`). A run resumed from any ``last.pth`` therefore repeats, number for number,
  what the uninterrupted run did after that point.
* **Checkpoints** (:class:`TrainingGuard`): every ``--checkpoint_every`` iterations and at each epoch's end.
  A checkpoint is written only after the loss terms of every iteration since the last check were found finite
  and the weights too, so ``last.pth`` never holds NaN weights.
* **Stop requests**: a SIGTERM, SIGUSR1 or Ctrl-C recorded by :class:`utils.signals.DeferredStop` ends the run
  after the current iteration with a checkpoint; all processes of a job stop at the same iteration
  (:class:`utils.comm.StopVote`).
* **Non-finite loss** (:class:`NonFiniteWatch`): the first iteration whose loss terms are not all finite, and
  the terms' values then, are kept on the device without a sync per step and checked at log lines and before
  each checkpoint; the run stops with one message naming them (:class:`utils.errors.TrainingDiverged`).
"""
from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.checkpoint import Checkpointer, unwrap_model
from utils.comm import DistEnv, StopVote, all_gather_objects, get_rank, run_on_main
from utils.errors import PeerError, Stopped, TrainingDiverged
from utils.signals import DeferredStop, exit_code, signal_name

logger = logging.getLogger(__name__)

DIVERGED_ADVICE = "lower --lr, or train with --precision fp32 or amp instead of fp16"


# -- random states -----------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's global random states as plain values and tensors (loadable with ``weights_only``)."""
    keys, position, has_gauss, gauss = np.random.get_state()[1:]
    version, words, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the random states :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(int(w) for w in python["words"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_states(states: list, env: DistEnv, source: str) -> None:
    """Restore this process's random states from the per-process list a checkpoint holds; a checkpoint from
    another number of processes cannot be continued exactly (said in the log)."""
    if len(states) != env.world_size:
        logger.warning("%s was written by %d process(es) and this run has %d: the random states are not restored, "
                       "so the run continues correctly but not number for number", source, len(states),
                       env.world_size)
        return
    restore_rng_state(states[env.rank])


# -- non-finite loss -----------------------------------------------------------------------------------------
class NonFiniteWatch:
    """The first iteration whose loss terms were not all finite, kept on the device (no sync per step)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._first: torch.Tensor | None = None  # iteration, -1 while all were finite
        self._epoch: torch.Tensor | None = None
        self._values: torch.Tensor | None = None  # [len(names)] the terms at that iteration

    def update(self, epoch: int, iteration: int, terms: Mapping[str, torch.Tensor]) -> None:
        """Look at one iteration's ``terms`` (the ``*_loss`` entries and ``loss``, scalar tensors)."""
        names = sorted(k for k in terms if k == "loss" or k.endswith("_loss"))
        if not names:
            return
        values = torch.stack([terms[k].detach().float().reshape(()) for k in names])
        if self._first is None or names != self.names:
            self.names = names
            self._first = torch.full((), -1, dtype=torch.long, device=values.device)
            self._epoch = torch.zeros((), dtype=torch.long, device=values.device)
            self._values = torch.zeros_like(values)
        newly = (~torch.isfinite(values).all()) & (self._first < 0)
        self._first = torch.where(newly, torch.full_like(self._first, iteration), self._first)
        self._epoch = torch.where(newly, torch.full_like(self._epoch, epoch), self._epoch)
        self._values = torch.where(newly, values, self._values)

    def check(self, saved: str) -> None:
        """Raise :class:`TrainingDiverged` when an iteration since the start was not finite (on every rank: the
        lowest rank that saw one reports it, the others stop silently). ``saved`` says what ``last.pth`` holds.
        A collective when distributed."""
        seen = None
        if self._first is not None and int(self._first.item()) >= 0:
            values = ", ".join(f"{name} = {value:.4g}" for name, value in zip(self.names, self._values.tolist()))
            seen = (int(self._epoch.item()), int(self._first.item()), values)
        reports = all_gather_objects(seen)
        failed = [rank for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return
        epoch, iteration, values = reports[failed[0]]
        message = (f"the training loss is not a finite number at epoch {epoch}, iteration {iteration} ({values}); "
                   f"training stopped and {saved}; {DIVERGED_ADVICE}")
        if seen is not None and get_rank() == failed[0]:
            raise TrainingDiverged(message)
        raise PeerError(message, exit_code=TrainingDiverged.exit_code)


def non_finite_weights(model: nn.Module) -> list[str]:
    """Names of the model's floating-point parameters and buffers that hold a NaN or an infinity."""
    tensors = {name: t for name, t in unwrap_model(model).state_dict().items() if t.is_floating_point()}
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one sync, not one each
    return [name for name, ok in zip(tensors, finite) if not ok]


# -- checkpoints and stops between iterations ----------------------------------------------------------------
def describe_position(epoch: int, iteration: int) -> str:
    """Where a run stands, in words: after ``epoch`` completed epochs and ``iteration`` iterations of the next."""
    return f"the end of epoch {epoch}" if iteration == 0 else f"epoch {epoch + 1}, iteration {iteration}"


class TrainingGuard:
    """Checkpoints, stop requests and the non-finite watch of one training run (see the module docstring).

    Every rank makes the same calls at the same iterations: :meth:`save_last` and :meth:`should_stop` are
    collectives when distributed.

    Args:
        checkpointer: writes ``last.pth`` (on rank 0).
        model: the trained model (its weights are checked before each save).
        checkpoint_every: write ``last.pth`` every N iterations (0: at the end of each epoch only).
        num_epoch: the run's length (recorded in ``last.pth``).
        run_facts: what ``last.pth`` records about the run (``{"options": …, "data": …}``), for the checks made
            when it is resumed.
        stop: the signal recorder installed around the training loop.
    """

    def __init__(self, checkpointer: Checkpointer, model: nn.Module, checkpoint_every: int, num_epoch: int,
                 run_facts: Mapping[str, Any], stop: DeferredStop) -> None:
        self.checkpointer = checkpointer
        self.model = model
        self.checkpoint_every = checkpoint_every
        self.num_epoch = num_epoch
        self.run_facts = dict(run_facts)
        self.stop = stop
        self.watch = NonFiniteWatch()
        self.vote = StopVote()
        self.saved_at: tuple[int, int] | None = None  # (epoch, iteration) of the last save by this guard
        self.stop_signal = 0  # the signal every rank agreed to stop for

    def _what_is_saved(self) -> str:
        if self.saved_at is None:
            return "last.pth was not overwritten"
        return (f"{os.path.join(self.checkpointer.save_dir, 'last.pth')} holds the state at "
                f"{describe_position(*self.saved_at)}")

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` when a loss term of an iteration so far was not finite (collective)."""
        self.watch.check(self._what_is_saved())

    def save_last(self, progress) -> None:
        """Write ``last.pth`` with everything needed to continue exactly from ``progress`` (a
        :class:`processor.processor.Progress`), after checking that the loss and the weights are finite."""
        self.check_finite()
        bad = non_finite_weights(self.model)  # identical on every rank: DDP keeps the weights in step
        if bad:
            raise TrainingDiverged(f"the weights hold NaN or infinite values at "
                                   f"{describe_position(progress.epoch, progress.iteration)} ({', '.join(bad[:3])}"
                                   f"{', …' if len(bad) > 3 else ''}); training stopped and "
                                   f"{self._what_is_saved()}; {DIVERGED_ADVICE}")
        rng = all_gather_objects(capture_rng_state())
        state = progress.state_dict()
        run_on_main(lambda: self.checkpointer.save(
            "last", epoch=progress.epoch, num_epoch=self.num_epoch, best_top1=progress.best_top1,
            best_epoch=progress.best_epoch, progress=state, rng=rng, run=self.run_facts))
        self.saved_at = (progress.epoch, progress.iteration)

    def after_iteration(self, progress) -> bool:
        """The periodic checkpoint, then whether to stop now (the same answer on every rank)."""
        if self.checkpoint_every and progress.global_step % self.checkpoint_every == 0:
            self.save_last(progress)
        return self.should_stop()

    def should_stop(self) -> bool:
        self.stop_signal = self.vote.poll(self.stop.received or 0)
        return self.stop_signal > 0

    def stopped(self, progress) -> Stopped:
        """Save ``last.pth`` at ``progress`` (unless it was just saved there) and return the exception that ends
        the run, its message saying where it stopped and how to continue."""
        if self.saved_at != (progress.epoch, progress.iteration):
            self.save_last(progress)
        signum = self.stop_signal or self.stop.received or int(signal.SIGTERM)
        where = describe_position(progress.epoch, progress.iteration)
        last = os.path.join(self.checkpointer.save_dir, "last.pth")
        message = (f"stopped by {signal_name(signum)} at {where}; {last} holds everything to continue: run the same "
                   f"command with --resume --resume_ckpt_file {last} (or --auto_resume)")
        return Stopped(message, exit_code(signum))

    def close(self) -> None:
        self.vote.close()
