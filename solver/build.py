"""Optimizer with IRRA's per-parameter learning rates, and the epoch scheduler.

Every trainable parameter gets its own group. Its learning rate starts at ``lr`` and is then set by an
ordered list of :data:`LrRule` — ``(name fragments, factor)``: when the parameter's name contains any of the
fragments, its rate becomes ``lr × factor``; a later matching rule overrides an earlier one. IRRA's rules, in
order: ``cross`` → ``lr_factor``; ``bias`` → ``bias_lr_factor``; ``classifier``/``mlm_head`` → ``lr_factor``.
Weight decay is ``weight_decay_bias`` for names containing ``bias`` and ``weight_decay`` otherwise.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from utils.errors import UserError

from .lr_scheduler import LRSchedulerWithWarmup

logger = logging.getLogger(__name__)

LrRule = tuple[tuple[str, ...], float]
OPTIMIZERS = ("SGD", "Adam", "AdamW")


def irra_lr_rules(lr_factor: float, bias_lr_factor: float) -> list[LrRule]:
    return [(("cross",), lr_factor), (("bias",), bias_lr_factor), (("classifier", "mlm_head"), lr_factor)]


def make_param_groups(model: nn.Module, lr: float, weight_decay: float, weight_decay_bias: float,
                      rules: Sequence[LrRule]) -> list[dict]:
    """One optimizer group per trainable parameter, with its rate from ``rules`` (see the module docstring)."""
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        param_lr = lr
        for fragments, factor in rules:
            if any(fragment in name for fragment in fragments):
                param_lr = lr * factor
        decay = weight_decay_bias if "bias" in name else weight_decay
        groups.append({"params": [param], "lr": param_lr, "weight_decay": decay, "name": name})
    return groups


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, alpha: float = 0.9,
                   beta: float = 0.999) -> torch.optim.Optimizer:
    """``Adam`` uses eps 1e-3 (IRRA trains fp16 weights directly), ``AdamW`` eps 1e-8, ``SGD`` momentum."""
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, betas=(alpha, beta), eps=1e-3)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=(alpha, beta), eps=1e-8)
    raise UserError(f"--optimizer {name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def lr_rules_from_args(args, model: nn.Module) -> list[LrRule]:
    """IRRA's rules, followed by any the model adds for its own modules (``model.extra_lr_rules(args)``)."""
    rules = irra_lr_rules(args.lr_factor, args.bias_lr_factor)
    extra = getattr(model, "extra_lr_rules", None)
    if callable(extra):
        rules += list(extra(args))
    return rules


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    model = model.module if hasattr(model, "module") else model
    rules = lr_rules_from_args(args, model)
    groups = make_param_groups(model, args.lr, args.weight_decay, args.weight_decay_bias, rules)
    logger.info("Optimizer %s over %d parameter tensors; learning-rate rules %s", args.optimizer, len(groups), rules)
    return make_optimizer(groups, args.optimizer, args.lr, args.momentum, args.alpha, args.beta)


def build_lr_scheduler(args, optimizer: torch.optim.Optimizer) -> LRSchedulerWithWarmup:
    return LRSchedulerWithWarmup(optimizer, milestones=args.milestones, gamma=args.gamma,
                                 warmup_factor=args.warmup_factor, warmup_epochs=args.warmup_epochs,
                                 warmup_method=args.warmup_method, total_epochs=args.num_epoch,
                                 mode=args.lrscheduler, target_lr=args.target_lr, power=args.power)
