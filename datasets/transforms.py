"""Image transforms: IRRA's (CLIP normalisation), TBPS-CLIP's random-pick policy (ImageNet normalisation) and IVT's
(:func:`build_ivt_transforms`)."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torchvision.transforms as T

from utils.errors import UserError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    height, width = _check_size(img_size)
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


def _check_size(img_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(img_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise UserError(f"--img_size must be two positive integers (height width), got {img_size!r}.")
    return size  # type: ignore[return-value]


class RandomPicks(torch.nn.Module):
    """Apply ``k`` transforms drawn uniformly *with replacement* from ``candidates``, in the order drawn.

    The draw uses torch's global random stream, like the torchvision transforms it picks from (DataLoader
    workers seed it per worker).
    """

    def __init__(self, candidates: Sequence, k: int = 2):
        super().__init__()
        if not candidates or k < 0:
            raise UserError(f"RandomPicks needs at least one candidate transform and k >= 0, got {len(candidates)} "
                            f"and {k}.")
        self.candidates = list(candidates)
        self.k = k

    def forward(self, img):
        for index in torch.randint(len(self.candidates), (self.k,)).tolist():
            img = self.candidates[index](img)
        return img

    def __repr__(self) -> str:
        inner = "".join(f"\n        {t}" for t in self.candidates)
        return f"{type(self).__name__}(k={self.k}, with replacement, from:{inner}\n    )"


def build_tbps_transforms(img_size: Sequence[int] = (224, 224), is_train: bool = True) -> T.Compose:
    """TBPS-CLIP's image transforms (``misc/data.py``; Bi-IRRA trains with them at 224x224).

    * test: Resize((H, W), bicubic), ToTensor, Normalize(ImageNet);
    * train: Resize((H, W)), ToTensor, then 2 transforms drawn with replacement (:class:`RandomPicks`) from
      ColorJitter(0.1, 0.1, 0.1), RandomRotation(15), RandomResizedCrop((H, W), scale (0.9, 1.0)),
      RandomGrayscale (p 0.1), RandomHorizontalFlip (p 0.5), RandomErasing (p 0.5, scale (0.10, 0.20), value
      0), then Normalize(ImageNet). The first three always act once drawn; the last three act with their own
      probability. The picks work on the ``[0, 1]`` tensor, so rotation corners and erased boxes are black.

    Raises:
        UserError: ``img_size`` is not two positive integers.
    """
    height, width = _check_size(img_size)
    normalize = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if not is_train:
        return T.Compose([T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                          normalize])
    picks = RandomPicks([
        T.ColorJitter(0.1, 0.1, 0.1, 0.0),
        T.RandomRotation(15),
        T.RandomResizedCrop((height, width), scale=(0.9, 1.0), antialias=True),
        T.RandomGrayscale(),
        T.RandomHorizontalFlip(),
        T.RandomErasing(scale=(0.10, 0.20)),
    ], k=2)
    return T.Compose([T.Resize((height, width)), T.ToTensor(), picks, normalize])


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
    height, width = _check_size(img_size)
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
