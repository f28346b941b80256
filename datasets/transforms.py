"""Image transforms: IRRA's (CLIP normalisation) and IVT's (:func:`build_ivt_transforms`)."""
from __future__ import annotations

import logging
from typing import Sequence

import torchvision.transforms as T

from utils.errors import UserError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transforms(img_size: Sequence[int] = (384, 128), aug: bool = False, is_train: bool = True) -> T.Compose:
    """PIL image -> normalised ``FloatTensor[3, H, W]``.

    * test: Resize((H, W)), ToTensor, Normalize;
    * train: Resize, RandomHorizontalFlip(0.5), ToTensor, Normalize;
    * train with ``aug``: Resize, RandomHorizontalFlip(0.5), Pad(10), RandomCrop((H, W)), ToTensor,
      Normalize, RandomErasing(scale=(0.02, 0.4), value=CLIP mean).

    Args:
        img_size: ``(height, width)``.

    Raises:
        UserError: ``img_size`` is not two positive integers.
    """
    size = tuple(img_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise UserError(f"--img_size must be two positive integers (height width), got {img_size!r}.")
    height, width = size
    normalize = T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)
    if not is_train:
        return T.Compose([T.Resize((height, width)), T.ToTensor(), normalize])
    steps = [T.Resize((height, width)), T.RandomHorizontalFlip(0.5)]
    if aug:
        steps += [T.Pad(10), T.RandomCrop((height, width))]
    steps += [T.ToTensor(), normalize]
    if aug:
        steps.append(T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)))
    return T.Compose(steps)


IVT_MEAN = (0.5, 0.5, 0.5)
IVT_STD = (0.5, 0.5, 0.5)


def build_ivt_transforms(img_size: Sequence[int] = (384, 128), is_train: bool = True, padding: int = 10,
                         flip: float = 0.5, erasing: float = 0.5) -> T.Compose:
    """IVT's transforms (the released training and test pipelines): PIL image -> ``FloatTensor[3, H, W]``.

    * train: Resize((H, W), bicubic), Pad(padding), RandomCrop((H, W)), RandomHorizontalFlip(flip), ToTensor,
      Normalize(0.5, 0.5), then timm's RandomErasing(erasing, mode='pixel', one box: area 2%-33%, aspect
      0.3-3.3, filled with per-pixel normal noise);
    * test: Resize((H, W)) (bilinear, as released), ToTensor, Normalize(0.5, 0.5).

    Randomness: torchvision's steps draw from torch's global generator, timm's erasing from Python's ``random``
    (both seeded per DataLoader worker by PyTorch).

    Raises:
        UserError: ``img_size`` is not two positive integers.
    """
    if len(img_size) != 2 or not all(isinstance(v, int) and v > 0 for v in img_size):
        raise UserError(f"--img_size must be two positive integers (height width), got {tuple(img_size)!r}.")
    height, width = img_size
    normalize = T.Normalize(mean=IVT_MEAN, std=IVT_STD)
    if not is_train:
        return T.Compose([T.Resize((height, width)), T.ToTensor(), normalize])
    from timm.data.random_erasing import RandomErasing  # timm is needed by IVT only

    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.Pad(padding),
        T.RandomCrop((height, width)),
        T.RandomHorizontalFlip(flip),
        T.ToTensor(),
        normalize,
        RandomErasing(probability=erasing, mode="pixel", max_count=1, device="cpu"),
    ])
