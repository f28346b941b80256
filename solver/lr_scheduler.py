"""Epoch-wise learning-rate schedule with warmup (IRRA's ``LRSchedulerWithWarmup``, same numbers).

The scheduler is stepped once per epoch. After construction ``last_epoch`` is 0, so epoch ``e`` (1-based,
as the trainer counts) trains with the rate for ``last_epoch = e - 1``:

* warmup (``last_epoch < warmup_epochs``): ``linear`` factor goes from ``warmup_factor`` to 1
  (``warmup_factor·(1−a) + a`` with ``a = last_epoch / warmup_epochs``); ``constant`` keeps ``warmup_factor``;
* then, with ``r = (last_epoch − warmup_epochs) / (total_epochs − warmup_epochs)``:
  ``step``: ``gamma ** (number of milestones ≤ last_epoch)``; ``exp``: ``power ** r``; ``linear``: ``1 − r``;
  ``poly``: ``target + (base − target)·power ** (1 − r)``; ``cosine``: ``target + (base − target)·½(1 + cos πr)``.

``timm_cosine`` is timm's own ``CosineLRScheduler`` (:class:`TimmCosineSchedule`), which IVT's released code uses.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from utils.errors import UserError

SCHEDULES = ("step", "exp", "poly", "cosine", "linear", "timm_cosine")
WARMUP_METHODS = ("constant", "linear")


def scheduled_lr(base_lr: float, epoch: int, *, mode: str, milestones: Sequence[int], gamma: float,
                 warmup_factor: float, warmup_epochs: int, warmup_method: str, total_epochs: int,
                 target_lr: float, power: float) -> float:
    """The learning rate for ``epoch`` (the scheduler's ``last_epoch``, 0-based) of a parameter group."""
    if epoch < warmup_epochs:
        if warmup_method == "constant":
            return base_lr * warmup_factor
        alpha = epoch / warmup_epochs
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    if mode == "step":
        return base_lr * gamma ** bisect_right(list(milestones), epoch)
    # A run no longer than its warmup stays in warmup (IRRA accepts it); only the scheduler's step after the
    # last epoch gets here then, and the rate it computes is never used.
    ratio = min(1.0, (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1))
    if mode == "exp":
        return base_lr * power ** ratio
    if mode == "linear":
        return base_lr * (1 - ratio)
    if mode == "poly":
        return target_lr + (base_lr - target_lr) * power ** (1 - ratio)
    return target_lr + (base_lr - target_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def check_schedule(mode: str, milestones: Sequence[int], warmup_method: str, warmup_epochs: int,
                   total_epochs: int) -> None:
    """Raise :class:`UserError` for settings the schedule cannot follow."""
    if mode not in SCHEDULES:
        raise UserError(f"--lrscheduler {mode!r} is not known; choose one of {', '.join(SCHEDULES)}")
    if warmup_method not in WARMUP_METHODS:
        raise UserError(f"--warmup_method {warmup_method!r} is not known; choose one of {', '.join(WARMUP_METHODS)}")
    if list(milestones) != sorted(milestones):
        raise UserError(f"--milestones must be increasing epochs, got {list(milestones)}")
    if warmup_epochs < 0 or total_epochs < 1:
        raise UserError(f"--warmup_epochs ({warmup_epochs}) must be ≥ 0 and --num_epoch ({total_epochs}) ≥ 1")


class LRSchedulerWithWarmup(LRScheduler):
    """Warmup followed by one of the schedules above; rates are computed in closed form from ``last_epoch``."""

    def __init__(self, optimizer: Optimizer, milestones: Sequence[int] = (20, 50), gamma: float = 0.1,
                 mode: str = "step", warmup_factor: float = 1.0 / 3, warmup_epochs: int = 10,
                 warmup_method: str = "linear", total_epochs: int = 100, target_lr: float = 0.0,
                 power: float = 0.9, last_epoch: int = -1) -> None:
        check_schedule(mode, milestones, warmup_method, warmup_epochs, total_epochs)
        self.milestones = list(milestones)
        self.mode = mode
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_epochs = warmup_epochs
        self.warmup_method = warmup_method
        self.total_epochs = total_epochs
        self.target_lr = target_lr
        self.power = power
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [scheduled_lr(base_lr, self.last_epoch, mode=self.mode, milestones=self.milestones, gamma=self.gamma,
                             warmup_factor=self.warmup_factor, warmup_epochs=self.warmup_epochs,
                             warmup_method=self.warmup_method, total_epochs=self.total_epochs,
                             target_lr=self.target_lr, power=self.power)
                for base_lr in self.base_lrs]


class TimmCosineSchedule:
    """timm's ``CosineLRScheduler`` (the schedule of IVT's released code), stepped once per epoch, behind the
    interface the trainer and the checkpointer use (``step()``, ``get_last_lr()``, ``state_dict()``).

    Epoch ``e`` (1-based) trains with timm's rate for ``t = e``, as IVT's CUHK-PEDES loop calls
    ``scheduler.step(epoch)`` before epoch ``epoch``: a linear warmup from ``warmup_lr_init`` (absolute, the same
    for every parameter group) to each group's own rate over ``warmup_epochs``, then one cosine over
    ``total_epochs`` down to ``lr_min`` (``t_initial = total_epochs``, ``cycle_limit = 1``, warmup not prefixed).
    """

    def __init__(self, optimizer: Optimizer, total_epochs: int, warmup_epochs: int, warmup_lr_init: float,
                 lr_min: float) -> None:
        from timm.scheduler import CosineLRScheduler  # timm is imported only by runs that use its schedule

        self.optimizer = optimizer
        self.inner = CosineLRScheduler(optimizer, t_initial=total_epochs, lr_min=lr_min, warmup_t=warmup_epochs,
                                       warmup_lr_init=warmup_lr_init, cycle_limit=1, t_in_epochs=True)
        self.last_epoch = 0
        self.inner.step(1)

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        self.inner.step(self.last_epoch + 1)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "timm": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.inner.load_state_dict(state["timm"])
        self.inner.step(self.last_epoch + 1)
