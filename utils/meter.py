"""Running averages for the training log."""
from __future__ import annotations


class AverageMeter:
    """Weighted running mean of a scalar (``update(value, n)`` counts ``value`` ``n`` times)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, value: float, n: int = 1) -> None:
        self.val = float(value)
        self.sum += float(value) * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0
