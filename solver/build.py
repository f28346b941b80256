"""Optimizer with IRRA's per-parameter learning rates, and the epoch scheduler.

Every trainable parameter gets its own group. Its learning rate starts at ``lr`` and is then set by an
ordered list of :data:`LrRule` — ``(name fragments, factor)``: when the parameter's name contains any of the
fragments, its rate becomes ``lr × factor``; a later matching rule overrides an earlier one. IRRA's rules, in
order: ``cross`` → ``lr_factor``; ``bias`` → ``bias_lr_factor``; ``classifier``/``mlm_head`` → ``lr_factor``.
Weight decay is ``weight_decay_bias`` for names containing ``bias`` (and, with ``--no_decay_1d``, for every parameter
with fewer than two dimensions) and ``weight_decay`` otherwise.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
from torch import nn

from utils.errors import UserError
from utils.options import OptionGroup, non_negative_float, positive_float, positive_int, register_options

from .lr_scheduler import SCHEDULES, WARMUP_METHODS, LRSchedulerWithWarmup, TimmCosineSchedule, check_schedule

logger = logging.getLogger(__name__)

LrRule = tuple[tuple[str, ...], float]
OPTIMIZERS = ("SGD", "Adam", "AdamW")


def irra_lr_rules(lr_factor: float, bias_lr_factor: float) -> list[LrRule]:
    return [(("cross",), lr_factor), (("bias",), bias_lr_factor), (("classifier", "mlm_head"), lr_factor)]


def make_param_groups(model: nn.Module, lr: float, weight_decay: float, weight_decay_bias: float,
                      rules: Sequence[LrRule], one_dim_as_bias: bool = False) -> list[dict]:
    """One optimizer group per trainable parameter, with its rate from ``rules`` (see the module docstring).

    ``one_dim_as_bias``: parameters with fewer than two dimensions (biases, norms, scalars) also get
    ``weight_decay_bias``, as TBPS-CLIP and X-VLM exclude them from weight decay."""
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        param_lr = lr
        for fragments, factor in rules:
            if any(fragment in name for fragment in fragments):
                param_lr = lr * factor
        decay = weight_decay_bias if "bias" in name or (one_dim_as_bias and param.ndim < 2) else weight_decay
        groups.append({"params": [param], "lr": param_lr, "weight_decay": decay, "name": name})
    return groups


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, alpha: float = 0.9,
                   beta: float = 0.999, fused: bool = False) -> torch.optim.Optimizer:
    """``Adam`` uses eps 1e-3 (IRRA trains fp16 weights directly), ``AdamW`` eps 1e-8, ``SGD`` momentum.
    ``fused``: torch's fused kernels (one kernel per step for all parameters), where the parameters' device has
    them."""
    options = {"fused": True} if fused else {}
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **options)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, betas=(alpha, beta), eps=1e-3, **options)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=(alpha, beta), eps=1e-8, **options)
    raise UserError(f"--optimizer {name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def build_optimizer(args, model: nn.Module, rules: Sequence[LrRule] | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``args.optimizer`` over ``model``'s trainable parameters, one group each.

    ``rules`` are the method's learning-rate rules (its ``Method.lr_rules``); None gives IRRA's.
    """
    model = model.module if hasattr(model, "module") else model
    rules = irra_lr_rules(args.lr_factor, args.bias_lr_factor) if rules is None else list(rules)
    groups = make_param_groups(model, args.lr, args.weight_decay, args.weight_decay_bias, rules,
                               one_dim_as_bias=getattr(args, "no_decay_1d", False))
    logger.info("Optimizer %s over %d parameter tensors; learning-rate rules %s", args.optimizer, len(groups), rules)
    try:
        return make_optimizer(groups, args.optimizer, args.lr, args.momentum, args.alpha, args.beta,
                              fused=getattr(args, "fused_optimizer", False))
    except RuntimeError as err:  # torch names what lacks a fused kernel (device, dtype)
        raise UserError(f"--fused_optimizer: {err}; train without it") from None


SCHEDULER_UNITS = ("epoch", "iteration")


def build_lr_scheduler(args, optimizer: torch.optim.Optimizer, iters_per_epoch: int = 1) -> LRSchedulerWithWarmup:
    """The warmup schedule of the options. With ``--scheduler_unit iteration`` it is stepped after every
    iteration: warmup, milestones and the schedule's length are counted in iterations (``x iters_per_epoch``);
    otherwise once per epoch, as IRRA does."""
    scale = iters_per_epoch if getattr(args, "scheduler_unit", "epoch") == "iteration" else 1
    if args.lrscheduler == "timm_cosine":
        if scale != 1:
            raise UserError("--lrscheduler timm_cosine is stepped once per epoch (as IVT's code does); use "
                            "--scheduler_unit epoch")
        return TimmCosineSchedule(optimizer, total_epochs=args.num_epoch, warmup_epochs=args.warmup_epochs,
                                  warmup_lr_init=args.lr * args.warmup_factor, lr_min=args.target_lr)
    return LRSchedulerWithWarmup(optimizer, milestones=[m * scale for m in args.milestones], gamma=args.gamma,
                                 warmup_factor=args.warmup_factor, warmup_epochs=args.warmup_epochs * scale,
                                 warmup_method=args.warmup_method, total_epochs=args.num_epoch * scale,
                                 mode=args.lrscheduler, target_lr=args.target_lr, power=args.power)


def _add_solver_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--optimizer", default="Adam", choices=OPTIMIZERS)
    g.add_argument("--lr", type=positive_float, default=1e-5, help="base learning rate")
    g.add_argument("--lr_factor", type=non_negative_float, default=5.0,
                   help="learning-rate factor of randomly initialised modules (IRRA's rules: cross-modal, "
                        "classifier, MLM head)")
    g.add_argument("--bias_lr_factor", type=non_negative_float, default=2.0)
    g.add_argument("--momentum", type=non_negative_float, default=0.9)
    g.add_argument("--weight_decay", type=non_negative_float, default=4e-5)
    g.add_argument("--weight_decay_bias", type=non_negative_float, default=0.0)
    g.add_argument("--fused_optimizer", action="store_true",
                   help="fused Adam/AdamW/SGD kernels where the device has them (faster steps; float rounding "
                        "differs from the default implementation by ~1e-7 per step, so it is opt-in)")
    g.add_argument("--no_decay_1d", action="store_true",
                   help="parameters with fewer than 2 dimensions (norms, scalars) get --weight_decay_bias too, as "
                        "TBPS-CLIP and X-VLM do (IRRA: only names containing 'bias')")
    g.add_argument("--alpha", type=non_negative_float, default=0.9, help="Adam beta1")
    g.add_argument("--beta", type=non_negative_float, default=0.999, help="Adam beta2")


def _add_schedule_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--num_epoch", type=positive_int, default=60)
    g.add_argument("--milestones", type=int, nargs="+", default=(20, 50))
    g.add_argument("--gamma", type=non_negative_float, default=0.1)
    g.add_argument("--warmup_factor", type=non_negative_float, default=0.1)
    g.add_argument("--warmup_epochs", type=int, default=5,
                   help="epochs of warmup; a run shorter than that stays in warmup, as in IRRA")
    g.add_argument("--warmup_method", default="linear", choices=WARMUP_METHODS)
    g.add_argument("--lrscheduler", default="cosine", choices=SCHEDULES,
                   help="the schedule after warmup; timm_cosine = timm's CosineLRScheduler (IVT): warmup from "
                        "lr*warmup_factor, cosine to target_lr")
    g.add_argument("--target_lr", type=non_negative_float, default=0.0)
    g.add_argument("--power", type=non_negative_float, default=0.9)
    g.add_argument("--scheduler_unit", default="epoch", choices=SCHEDULER_UNITS,
                   help="step the schedule once per epoch (IRRA) or after every iteration (TBPS-CLIP, Bi-IRRA)")


def _derive_schedule(args: argparse.Namespace) -> None:
    args.milestones = tuple(args.milestones)


def _check_schedule(args: argparse.Namespace) -> None:
    check_schedule(args.lrscheduler, args.milestones, args.warmup_method, args.warmup_epochs, args.num_epoch)


register_options(OptionGroup("solver", _add_solver_options))
register_options(OptionGroup("scheduler", _add_schedule_options, _check_schedule,
                             _derive_schedule))
