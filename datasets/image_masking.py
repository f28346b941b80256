"""Blockwise masking of image patches (BEiT), the image-side masking of Bi-IRRA's D-MIM (50% of patches).

BEiT's rule (``beit/masking_generator.py`` in microsoft/unilm; BEiT and BEiT-v2 pre-train with 75 of 14x14
patches and blocks of at least 16): with ``target = round(ratio * grid_h * grid_w)``, repeat until ``target``
patches are masked:

1. ``budget`` = patches still to mask. Up to 10 attempts: draw an area uniformly between ``min_block`` and
   ``budget`` (either may be the larger), an aspect ratio log-uniformly in ``aspect``, and the block size
   ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``. A block with ``h < grid_h`` and
   ``w < grid_w`` is placed at a uniformly drawn top-left corner; it is kept when it masks at least one new patch
   and at most ``budget`` new patches. The first kept block ends the attempts.
2. When 10 attempts keep no block, BEiT stops short of ``target``.

With ``exact=True`` (the default) the patches still missing after that are masked one by one at uniformly drawn
unmasked positions, so every mask covers exactly ``target`` patches; ``exact=False`` returns BEiT's mask as is
(never more than ``target``, sometimes fewer). All draws come from the given ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch

from utils.errors import UserError

#: Attempts to place one block before BEiT gives up (``_mask``'s ``range(10)``).
PLACEMENT_ATTEMPTS = 10


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _integer(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _place_block(mask: torch.Tensor, budget: int, min_block: int, log_aspect: tuple[float, float],
                 generator: torch.Generator) -> int:
    """Try to add one block of at most ``budget`` new patches to ``mask`` (``BoolTensor[grid_h, grid_w]``, edited
    in place); return the number of patches it newly masked (0 when all attempts failed)."""
    grid_h, grid_w = mask.shape
    for _ in range(PLACEMENT_ATTEMPTS):
        area = _uniform(min_block, budget, generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h < grid_h and w < grid_w:
            top = _integer(0, grid_h - h, generator)
            left = _integer(0, grid_w - w, generator)
            block = mask[top : top + h, left : left + w]
            new = int((~block).sum())
            if 0 < new <= budget:
                block.fill_(True)
                return new
    return 0


def blockwise_mask(
    grid_h: int,
    grid_w: int,
    ratio: float,
    generator: torch.Generator,
    min_block: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    exact: bool = True,
) -> torch.Tensor:
    """A blockwise mask over a ``grid_h x grid_w`` patch grid (see the module docstring for the rule).

    Args:
        ratio: share of patches to mask, in [0, 1].
        generator: the only source of randomness (the same seed gives the same mask).
        min_block: smallest block area BEiT draws (in patches).
        aspect: ``(min, max)`` block aspect ratio (height / width).
        exact: top up with single patches so that exactly ``round(ratio * grid_h * grid_w)`` are masked.

    Returns:
        ``BoolTensor[grid_h * grid_w]``, row-major, ``True`` = masked.

    Raises:
        UserError: a non-positive grid size or ``min_block``, ``ratio`` outside [0, 1], or a bad ``aspect``.
    """
    if grid_h < 1 or grid_w < 1 or min_block < 1:
        raise UserError(f"blockwise masking needs a grid of at least 1x1 patches and min_block >= 1, got "
                        f"{grid_h}x{grid_w} and min_block {min_block}.")
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"the image masking ratio must be in [0, 1], got {ratio}.")
    if not 0.0 < aspect[0] <= aspect[1]:
        raise UserError(f"the block aspect range must satisfy 0 < min <= max, got {aspect}.")
    target = int(round(ratio * grid_h * grid_w))
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < target:
        added = _place_block(mask, target - count, min_block, log_aspect, generator)
        if added == 0:
            break
        count += added
    flat = mask.flatten()
    if exact and count < target:
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=generator)[: target - count]]] = True
    return flat
