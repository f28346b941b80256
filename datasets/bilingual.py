"""Training items with a caption in two languages, MLM inputs per language and a blockwise image mask
(Bi-IRRA's training pipeline).

An item of :class:`BilingualImageTextDataset` is a dict with, for each language code ``<lang>``:

======================  ==================  ========================================================
key                     shape / dtype       meaning
======================  ==================  ========================================================
``images``              [3, H, W] float     the (augmented) image
``image_mask``          [N] bool            true = patch masked (blockwise, see datasets.image_masking)
``pids``                int                 person id (class index)
``image_ids``           int                 training image index
``caption_ids_<lang>``  [L] int64           start, ids, end, padding
``attention_mask_<lang>`` [L] int64         1 at real tokens
``mlm_ids_<lang>``      [L] int64           the caption after MLM corruption
``mlm_labels_<lang>``   [L] int64           original id where masked, the pad id elsewhere
======================  ==================  ========================================================

The default collate stacks them into a batch. Every random draw (augmentation, masks) comes from torch's global
generator, which the training loader seeds per sample (:mod:`datasets.resumable`): an item depends only on the run
seed, the epoch and its index.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional


from torch.utils.data import Dataset

from datasets.bases import MaskingConfig, load_image, mask_tokens, tokenize_captions
from datasets.image_masking import blockwise_mask
from datasets.multilingual import MultilingualSample
from datasets.resumable import item_generator
from utils.errors import UserError
from utils.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

IMAGES = "images"
IMAGE_MASK = "image_mask"
PIDS = "pids"
CAPTION_IDS = "caption_ids"
ATTENTION_MASK = "attention_mask"
MLM_IDS = "mlm_ids"
MLM_LABELS = "mlm_labels"
LANGUAGE_ENTRIES = (CAPTION_IDS, ATTENTION_MASK, MLM_IDS, MLM_LABELS)


def keyed(name: str, language: str) -> str:
    """``<name>_<language>``: the batch key of one language's entry, e.g. ``caption_ids_en``."""
    return f"{name}_{language}"


def batch_keys(languages: Sequence[str]) -> tuple[str, ...]:
    """The keys a bilingual training batch holds for ``languages`` (besides ``image_ids``)."""
    return (IMAGES, IMAGE_MASK, PIDS, *(keyed(name, lang) for lang in languages for name in LANGUAGE_ENTRIES))


class BilingualImageTextDataset(Dataset):
    """One item per training caption index: the image, its caption in each of ``languages``, MLM corruption of
    each caption, and a blockwise mask over the image's patch grid.

    Args:
        samples: ``(pid, image_id, img_path, {language: caption})`` (see :mod:`datasets.multilingual`).
        languages: the codes to read from each sample, source first.
        transform: image transform (PIL image -> tensor).
        tokenizer: the method's tokenizer (its cleaning applies); captions are tokenised once, here.
        text_length: tokens per caption, start and end included (longer captions are cut at token level).
        masking: MLM settings (rate, cap, the tokenizer's ids).
        mask_grid: ``(rows, columns)`` of image patches the mask covers.
        mask_ratio: share of patches masked.
        cache_dir: where the tokenised captions are cached (see :func:`datasets.bases.tokenize_captions`).
    """

    def __init__(self, samples: Sequence[MultilingualSample], languages: Sequence[str],
                 transform: Optional[Callable], tokenizer: Tokenizer, text_length: int, masking: MaskingConfig,
                 mask_grid: tuple[int, int], mask_ratio: float, cache_dir: Optional[str] = None) -> None:
        self.samples = list(samples)
        self.languages = tuple(languages)
        missing = sorted({lang for *_, captions in self.samples[:1] for lang in self.languages if lang not in captions})
        if missing:
            raise UserError(f"the training captions have no {', '.join(missing)} text; load those languages with "
                            f"--languages")
        self.pids = [s[0] for s in self.samples]
        self.transform = transform
        self.masking = masking
        self.mask_grid = tuple(mask_grid)
        self.mask_ratio = float(mask_ratio)
        self.pad_id = tokenizer.specials.pad
        self.caption_ids = {lang: tokenize_captions([s[3][lang] for s in self.samples], tokenizer, text_length,
                                                    cache_dir=cache_dir, label=f"'{lang}' training captions")
                            for lang in self.languages}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        pid, image_id, img_path, _ = self.samples[index]
        img = load_image(img_path, self.transform)
        generator = item_generator()
        item = {PIDS: pid, "image_ids": image_id, IMAGES: img,
                IMAGE_MASK: blockwise_mask(*self.mask_grid, self.mask_ratio, generator)}
        for lang in self.languages:
            ids = self.caption_ids[lang][index].clone()
            mlm_ids, mlm_labels = mask_tokens(ids, self.masking, generator)
            item[keyed(CAPTION_IDS, lang)] = ids
            item[keyed(ATTENTION_MASK, lang)] = (ids != self.pad_id).long()
            item[keyed(MLM_IDS, lang)] = mlm_ids
            item[keyed(MLM_LABELS, lang)] = mlm_labels
        return item
