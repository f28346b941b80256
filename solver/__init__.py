from .build import build_lr_scheduler, build_optimizer, make_optimizer, make_param_groups
from .lr_scheduler import LRSchedulerWithWarmup

__all__ = ["build_optimizer", "build_lr_scheduler", "make_optimizer", "make_param_groups", "LRSchedulerWithWarmup"]
