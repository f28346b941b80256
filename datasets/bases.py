"""Image reading, caption tokenisation, MLM masking and the three torch datasets.

* :func:`read_image` opens one image as RGB, or raises :class:`UserError` naming the file.
* :func:`tokenize` / :func:`tokenize_captions` turn captions into ``LongTensor[text_length]`` rows
  (start + ids + end, padded) with any :class:`~utils.tokenizers.Tokenizer` (IRRA's CLIP BPE by default).
* :class:`MaskingConfig` and :func:`mask_tokens` implement IRRA's MLM corruption for any tokenizer's special
  ids, with the ``masked_token_rate`` / ``masked_token_unchanged_rate`` knobs actually doing what they say.
* :class:`ImageDataset`, :class:`TextDataset`, :class:`ImageTextDataset` are the map-style datasets
  the loaders wrap. Captions are tokenised once, when a dataset is built, never per item.

Randomness: the MLM masking draws from torch's global generator, like the image transforms. The training
loader makes that stream a function of ``(seed, epoch, index)`` for every item (:mod:`datasets.resumable`), so
a sample is masked and augmented the same whichever process or worker reads it, and a resumed run reads what
the uninterrupted run would have read.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from utils.errors import UserError
from utils.simple_tokenizer import SimpleTokenizer
from utils.tokenizers import ClipBpeTokenizer, Tokenizer, caption_row, caption_tokens, encode_caption

logger = logging.getLogger(__name__)

# CLIP's special ids as IRRA uses them (see utils.tokenizers.ClipBpeTokenizer).
MASK_TOKEN_ID = 49405
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407

# (pid, image_id, img_path, caption): one training sample per caption.
TrainSample = tuple[int, int, str, str]


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open the image at ``path`` and return it as an RGB PIL image.

    Raises:
        UserError: the file does not exist or is not a readable image (one attempt, no retry loop).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(
            f"Image file not found: '{path}'. Check --root_dir and that the dataset's 'imgs' folder "
            "holds every file named in the annotation file."
        )
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(
            f"Cannot read image '{path}' ({err}). The file is damaged or not an image; "
            "replace it with a good copy from the dataset archive."
        ) from err


def load_image(path: str | os.PathLike, transform: Optional[Callable] = None):
    """:func:`read_image`, then ``transform`` (when given): what every dataset does with an image file."""
    img = read_image(path)
    return transform(img) if transform is not None else img


def _as_tokenizer(tokenizer) -> Tokenizer:
    """A :class:`~utils.tokenizers.Tokenizer`: ``None`` gives IRRA's CLIP BPE, a bare SimpleTokenizer is wrapped."""
    if tokenizer is None:
        return ClipBpeTokenizer()
    if isinstance(tokenizer, SimpleTokenizer):
        return ClipBpeTokenizer(bpe=tokenizer)
    return tokenizer


def tokenize(caption: str, tokenizer, text_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Encode one caption as ``LongTensor[text_length]``: start, ids, end, then padding (0 for CLIP).

    A caption longer than ``text_length`` tokens (start and end included) is cut to ``text_length`` with the
    end token last when ``truncate`` is true. ``tokenizer``: a :class:`~utils.tokenizers.Tokenizer` (or IRRA's
    SimpleTokenizer).

    Raises:
        UserError: the caption is too long and ``truncate`` is false, or ``text_length < 2``.
    """
    return encode_caption(caption, _as_tokenizer(tokenizer), text_length, truncate)


def tokenize_captions(
    captions: Sequence[str], tokenizer=None, text_length: int = 77, truncate: bool = True,
    cache_dir: Optional[str] = None, label: str = "captions",
) -> torch.Tensor:
    """Tokenise many captions at once; identical captions are encoded only once.

    With ``cache_dir`` the table is kept on disk (:func:`caption_cache_path`): a later call with the same captions,
    tokenizer and length reads it instead of tokenising (a CUHK-PEDES-sized set takes tens of seconds to
    tokenise). The file is written atomically; a damaged or foreign file is rebuilt.

    How many captions were cut at ``text_length`` is logged, naming them by ``label`` (e.g. "training
    captions"): a warning when it is 1% or more (UFine6926's ~81-word captions), else an info line.

    Returns:
        ``LongTensor[len(captions), text_length]``.
    """
    tokenizer = _as_tokenizer(tokenizer)
    path = caption_cache_path(cache_dir, captions, tokenizer, text_length, truncate) if cache_dir else None
    if path is not None:
        cached = _read_caption_cache(path, len(captions), text_length)
        if cached is not None:
            logger.info("Read %d tokenised captions from the cache %s", len(captions), path)
            _report_cut(cached[1], len(captions), text_length, label)
            return cached[0]
    rows: dict[str, tuple[torch.Tensor, bool]] = {}  # distinct caption -> (its row, whether it was cut)
    out = torch.empty(len(captions), text_length, dtype=torch.long)
    cut = 0
    for i, caption in enumerate(captions):
        known = rows.get(caption)
        if known is None:
            tokens = caption_tokens(caption, tokenizer)
            known = rows[caption] = (caption_row(tokens, tokenizer, text_length, truncate, caption),
                                     len(tokens) > text_length)
        out[i] = known[0]
        cut += known[1]
    logger.debug("Tokenised %d captions (%d distinct)", len(captions), len(rows))
    _report_cut(cut, len(captions), text_length, label)
    if path is not None:
        _write_caption_cache(path, out, cut)
    return out


def _report_cut(cut: int, total: int, text_length: int, label: str) -> None:
    if not cut:
        return
    share = cut / max(total, 1)
    log = logger.warning if share >= 0.01 else logger.info
    log("%d of %d %s (%.1f%%) are longer than %d tokens (--text_length, start and end tokens included) and are "
        "cut to their first %d tokens", cut, total, label, 100 * share, text_length, text_length - 2)


CAPTION_CACHE_VERSION = 2  # 2: the file holds the number of cut captions beside the id table


def caption_cache_path(cache_dir: str, captions: Sequence[str], tokenizer: Tokenizer, text_length: int,
                       truncate: bool = True) -> str:
    """Where the token table of ``captions`` lives: ``cache_dir/captions/<hash>.pt``, the hash covering the
    captions themselves (so a changed annotation file, another split or language is another file), the tokenizer's
    kind, files and caption cleaning (:meth:`~utils.tokenizers.Tokenizer.fingerprint`), the length and truncation."""
    digest = hashlib.sha256(f"v{CAPTION_CACHE_VERSION}/{tokenizer.name}/{tokenizer.fingerprint()}/"
                            f"{getattr(getattr(tokenizer, 'clean', None), '__qualname__', '')}/"
                            f"{text_length}/{truncate}/{len(captions)}\n".encode())
    for caption in captions:
        digest.update(caption.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return os.path.join(cache_dir, "captions", f"{digest.hexdigest()[:32]}.pt")


def _read_caption_cache(path: str, rows: int, text_length: int) -> Optional[tuple[torch.Tensor, int]]:
    """``(id table, number of cut captions)`` from the cache file, or None when it is missing or unusable."""
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch raises for a damaged file: rebuild it
        logger.warning("Rebuilding the damaged caption cache %s (%s)", path, type(err).__name__)
        return None
    table = data.get("ids") if isinstance(data, dict) else None
    cut = data.get("cut") if isinstance(data, dict) else None
    if (not isinstance(table, torch.Tensor) or tuple(table.shape) != (rows, text_length)
            or table.is_floating_point() or not isinstance(cut, int) or not 0 <= cut <= rows):
        logger.warning("Rebuilding the caption cache %s: it does not hold a [%d, %d] id table and its count of cut "
                       "captions", path, rows, text_length)
        return None
    return table.long(), cut


def _write_caption_cache(path: str, table: torch.Tensor, cut: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        small = table.to(torch.int32)  # ids of every vocabulary here fit; half the size of int64
        torch.save({"ids": small, "cut": int(cut)}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("Could not write the caption cache %s (%s); captions will be tokenised again next time",
                       path, err.strerror)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass(frozen=True)
class MaskingConfig:
    """MLM corruption (BERT style, as IRRA does it) for any tokenizer.

    Every token that is not one of ``special_ids`` (padding, start, end, mask, unknown) is selected with
    probability ``mlm_probability``. A selected token becomes ``mask_token_id`` with probability
    ``masked_token_rate``, stays unchanged with probability ``masked_token_unchanged_rate``, and otherwise becomes
    a random id drawn uniformly from ``random_range`` (``[low, high)``). Labels hold the original id at
    selected positions and ``pad_id`` elsewhere. With ``max_masks`` at most that many positions stay selected
    per caption (a uniformly drawn subset), as X2-VLM caps its text masking. The defaults are IRRA's CLIP values
    (no cap); :meth:`for_tokenizer` fills the ids from a tokenizer.
    """

    mlm_probability: float = 0.15
    masked_token_rate: float = 0.8
    masked_token_unchanged_rate: float = 0.1
    mask_token_id: int = MASK_TOKEN_ID
    special_ids: tuple[int, ...] = (0, MASK_TOKEN_ID, SOT_TOKEN_ID, EOT_TOKEN_ID)
    random_range: tuple[int, int] = (1, MASK_TOKEN_ID)
    pad_id: int = 0
    max_masks: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("mlm_probability", "masked_token_rate", "masked_token_unchanged_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{name} must be in [0, 1], got {value}.")
        total = self.masked_token_rate + self.masked_token_unchanged_rate
        if total > 1.0 + 1e-9:
            raise UserError(
                f"--masked_token_rate ({self.masked_token_rate}) + --masked_token_unchanged_rate "
                f"({self.masked_token_unchanged_rate}) = {total} exceeds 1; the rest is the share of random "
                "replacements, so lower one of them."
            )
        low, high = self.random_range
        if not 0 <= low < high:
            raise UserError(f"the random replacement range [{low}, {high}) of the MLM masking is empty.")
        if self.max_masks is not None and self.max_masks < 1:
            raise UserError(f"the cap on masked tokens per caption must be at least 1, got {self.max_masks}.")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, mlm_probability: float = 0.15, masked_token_rate: float = 0.8,
                      masked_token_unchanged_rate: float = 0.1, max_masks: Optional[int] = None) -> "MaskingConfig":
        """The rates given, with ``tokenizer``'s mask, special and padding ids and replacement range."""
        specials = tokenizer.specials
        return cls(mlm_probability, masked_token_rate, masked_token_unchanged_rate, mask_token_id=specials.mask,
                   special_ids=tuple(sorted(tokenizer.special_ids)), random_range=tokenizer.random_token_range,
                   pad_id=specials.pad, max_masks=max_masks)


def mask_tokens(
    tokens: torch.Tensor, config: MaskingConfig, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt one tokenised caption for masked language modelling.

    Args:
        tokens: ``LongTensor[L]`` caption ids (start, ids, end, padding). Not modified.
        config: selection and replacement rates and the tokenizer's ids.
        generator: random stream to draw from (``None``: torch's global generator).

    Returns:
        ``(mlm_ids, mlm_labels)``, both ``LongTensor[L]``: the corrupted caption, and the original id at
        every selected position with ``config.pad_id`` elsewhere. When no token is selected, position 1 is
        replaced by the mask token and labelled with its original id (as IRRA does).
    """
    length = tokens.shape[0]
    special = torch.tensor(config.special_ids, dtype=tokens.dtype)
    eligible = ~torch.isin(tokens, special)
    selected = eligible & (torch.rand(length, generator=generator) < config.mlm_probability)
    if config.max_masks is not None and int(selected.sum()) > config.max_masks:
        chosen = selected.nonzero().squeeze(1)
        keep = chosen[torch.randperm(len(chosen), generator=generator)[: config.max_masks]]
        selected = torch.zeros_like(selected)
        selected[keep] = True
    choice = torch.rand(length, generator=generator)
    random_ids = torch.randint(*config.random_range, (length,), generator=generator)

    to_mask = selected & (choice < config.masked_token_rate)
    keep_until = config.masked_token_rate + config.masked_token_unchanged_rate
    to_random = selected & (choice >= keep_until)

    mlm_ids = torch.where(to_mask, torch.full_like(tokens, config.mask_token_id), tokens)
    mlm_ids = torch.where(to_random, random_ids, mlm_ids)
    labels = torch.where(selected, tokens, torch.full_like(tokens, config.pad_id))
    if not bool(selected.any()) and length > 1:
        labels[1] = tokens[1]
        mlm_ids[1] = config.mask_token_id
    return mlm_ids, labels


class ImageDataset(Dataset):
    """Images of an evaluation split; item ``i`` is ``(pid: int, image: Tensor[3, H, W])``."""

    def __init__(self, image_pids: Sequence[int], img_paths: Sequence[str], transform: Optional[Callable] = None):
        if len(image_pids) != len(img_paths):
            raise ValueError(f"{len(image_pids)} image pids but {len(img_paths)} image paths")
        self.image_pids = list(image_pids)
        self.img_paths = list(img_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_pids)

    def __getitem__(self, index: int):
        img = load_image(self.img_paths[index], self.transform)
        return self.image_pids[index], img


class TextDataset(Dataset):
    """Captions of an evaluation split; item ``i`` is ``(pid: int, caption_ids: LongTensor[text_length])``.

    All captions are tokenised in the constructor.
    """

    def __init__(
        self,
        caption_pids: Sequence[int],
        captions: Sequence[str],
        text_length: int = 77,
        truncate: bool = True,
        tokenizer=None,
        cache_dir: Optional[str] = None,
    ):
        if len(caption_pids) != len(captions):
            raise ValueError(f"{len(caption_pids)} caption pids but {len(captions)} captions")
        self.caption_pids = list(caption_pids)
        self.caption_ids = tokenize_captions(captions, tokenizer, text_length, truncate, cache_dir,
                                             label="evaluation captions")

    def __len__(self) -> int:
        return len(self.caption_pids)

    def __getitem__(self, index: int):
        return self.caption_pids[index], self.caption_ids[index]


class ImageTextDataset(Dataset):
    """Training pairs: one item per caption.

    Item ``i`` is a dict with ``pids`` (int), ``image_ids`` (int), ``images`` (``Tensor[3, H, W]`` after
    ``transform``) and ``caption_ids`` (``LongTensor[text_length]``). With ``masking`` set it also has
    ``mlm_ids`` and ``mlm_labels`` (``LongTensor[text_length]``, see :func:`mask_tokens`). Faithful to
    IRRA's released code, ``caption_ids`` then equals ``mlm_ids`` (IRRA masks the caption in place, so
    the global losses see the masked caption); ``keep_caption_unmasked=True`` gives the clean caption.

    Args:
        samples: ``(pid, image_id, img_path, caption)`` tuples, e.g. ``build_dataset(...).train``.
        transform: image transform (PIL image -> tensor).
        text_length, truncate, tokenizer: see :func:`tokenize`; ``tokenizer=None`` uses CLIP's BPE.
        masking: MLM corruption settings, or ``None`` for no MLM fields (drawn from torch's global generator,
            see the module docstring).
        keep_caption_unmasked: return the clean caption as ``caption_ids`` even with masking.
        cache_dir: where the tokenised captions are cached (see :func:`tokenize_captions`); None: not cached.
    """

    def __init__(
        self,
        samples: Sequence[TrainSample],
        transform: Optional[Callable] = None,
        text_length: int = 77,
        truncate: bool = True,
        tokenizer=None,
        masking: Optional[MaskingConfig] = None,
        keep_caption_unmasked: bool = False,
        cache_dir: Optional[str] = None,
    ):
        self.samples = list(samples)
        self.pids = [s[0] for s in self.samples]
        self.transform = transform
        self.masking = masking
        self.keep_caption_unmasked = keep_caption_unmasked
        self.caption_ids = tokenize_captions([s[3] for s in self.samples], tokenizer, text_length, truncate, cache_dir,
                                             label="training captions")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        pid, image_id, img_path, _ = self.samples[index]
        img = load_image(img_path, self.transform)
        caption = self.caption_ids[index].clone()
        item = {"pids": pid, "image_ids": image_id, "images": img, "caption_ids": caption}
        if self.masking is not None:
            mlm_ids, mlm_labels = mask_tokens(caption, self.masking)
            item["mlm_ids"] = mlm_ids
            item["mlm_labels"] = mlm_labels
            if not self.keep_caption_unmasked:
                item["caption_ids"] = mlm_ids.clone()
        return item
