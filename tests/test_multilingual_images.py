"""Blockwise image masking (BEiT) and TBPS-CLIP's augmentation policy."""
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from datasets.image_masking import blockwise_mask
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomPicks, build_tbps_transforms
from utils.errors import UserError


def _components(mask: torch.Tensor, h: int, w: int) -> int:
    """Number of 4-connected groups of masked patches (a plain flood fill)."""
    grid = mask.view(h, w).tolist()
    seen = [[False] * w for _ in range(h)]
    count = 0
    for i in range(h):
        for j in range(w):
            if grid[i][j] and not seen[i][j]:
                count += 1
                stack = [(i, j)]
                seen[i][j] = True
                while stack:
                    y, x = stack.pop()
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < h and 0 <= nx < w and grid[ny][nx] and not seen[ny][nx]:
                            seen[ny][nx] = True
                            stack.append((ny, nx))
    return count


@pytest.mark.parametrize("h, w, ratio", [(14, 14, 0.5), (24, 8, 0.5), (12, 4, 0.3), (2, 2, 0.5), (14, 14, 0.0),
                                         (7, 7, 1.0)])
def test_exact_masks_cover_the_requested_share(h, w, ratio):
    g = torch.Generator().manual_seed(0)
    target = round(ratio * h * w)
    for _ in range(100):
        mask = blockwise_mask(h, w, ratio, g)
        assert mask.dtype == torch.bool and mask.shape == (h * w,)
        assert int(mask.sum()) == target


def test_beit_rule_never_exceeds_and_nearly_reaches_the_share():
    g = torch.Generator().manual_seed(1)
    counts = [int(blockwise_mask(14, 14, 0.5, g, exact=False).sum()) for _ in range(300)]
    assert max(counts) <= 98
    assert sum(counts) / len(counts) > 0.97 * 98  # BEiT stops short only when 10 placements in a row fail
    assert blockwise_mask(2, 2, 0.5, g, exact=False).sum() == 0  # no 16-patch block fits a 2x2 grid


def test_masks_are_blocks_not_scattered_patches():
    g = torch.Generator().manual_seed(2)
    blocky = sum(_components(blockwise_mask(14, 14, 0.5, g), 14, 14) for _ in range(50)) / 50
    scattered = sum(_components(torch.randperm(196, generator=g) < 98, 14, 14) for _ in range(50)) / 50
    assert blocky < scattered / 3


def test_deterministic_per_generator_seed():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([blockwise_mask(14, 14, 0.5, g) for _ in range(5)])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    torch.manual_seed(0)
    first = draw(5)
    torch.manual_seed(1)  # the global stream plays no part
    assert torch.equal(first, draw(5))


def test_bad_masking_arguments():
    g = torch.Generator()
    with pytest.raises(UserError, match="ratio must be in"):
        blockwise_mask(14, 14, 1.5, g)
    with pytest.raises(UserError, match="at least 1x1"):
        blockwise_mask(0, 14, 0.5, g)
    with pytest.raises(UserError, match="aspect range"):
        blockwise_mask(14, 14, 0.5, g, aspect=(2.0, 1.0))


class _Recorder:
    """A stand-in transform that records its calls and returns its input."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, img):
        self.calls[-1].append(self.name)
        return img


def test_random_picks_draws_two_transforms_per_image_with_replacement():
    calls = []
    picks = RandomPicks([_Recorder(n, calls) for n in "abcdef"], k=2)
    torch.manual_seed(0)
    for _ in range(600):
        calls.append([])
        picks(torch.zeros(3, 4, 4))
    assert all(len(c) == 2 for c in calls)
    repeated = sum(c[0] == c[1] for c in calls) / len(calls)
    assert 0.1 < repeated < 0.25  # with replacement: the same transform twice with probability 1/6
    firsts = {name: sum(c[0] == name for c in calls) for name in "abcdef"}
    assert min(firsts.values()) > 60  # every candidate is drawn (expected 100 each)


def test_tbps_policy_has_the_published_candidates_and_order():
    train = build_tbps_transforms((224, 224))
    resize, to_tensor, picks, normalize = train.transforms
    assert isinstance(resize, T.Resize) and resize.size == (224, 224) and isinstance(to_tensor, T.ToTensor)
    assert isinstance(picks, RandomPicks) and picks.k == 2
    jitter, rotation, crop, gray, flip, erase = picks.candidates
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.9, 1.1),) * 3 + (None,)
    assert rotation.degrees == [-15.0, 15.0]
    assert crop.size == (224, 224) and crop.scale == (0.9, 1.0)
    assert gray.p == 0.1 and flip.p == 0.5 and erase.p == 0.5 and erase.scale == (0.1, 0.2)
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD
    image = Image.new("RGB", (64, 192), (255, 128, 0))
    torch.manual_seed(0)
    assert train(image).shape == (3, 224, 224)
    test = build_tbps_transforms((224, 224), is_train=False)(image)
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(test[:, 100, 100], expected, atol=1e-2)
    with pytest.raises(UserError, match="--img_size must be two positive integers"):
        build_tbps_transforms((224,))
