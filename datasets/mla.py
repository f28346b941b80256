"""IVT's multi-level alignment (MLA): each training image as three augmented views, paired with its caption at
three levels — the sentence (the whole caption), a phrase and words — following the released cutting rules.

* phrase (:func:`phrase_candidates`): the caption is cut into sentences at ``.``; each sentence at ``,``; its
  longest part and the remaining parts re-joined are candidates when longer than 5 characters; one candidate is
  drawn;
* words, ICFG-PEDES and RSTPReid (:func:`comma_fragments`): one comma fragment longer than 5 characters;
* words, CUHK-PEDES: a random non-empty subset, in random order and joined by ``,``, of the caption's attribute
  phrases from an attribute file (:func:`read_attribute_file`) — published only on a file host that needs an
  account. Without the file, CUHK-PEDES words are comma fragments as for the other datasets (a documented
  deviation, docs/ivt.md); with the file, a caption without attributes uses the phrase candidates, as released.

Where the released code would fail (a caption with no candidate longer than 5 characters), the whole caption is
used. Captions are lower-cased first, as released. All draws use the ``generator`` handed to the item function.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.bases import TrainSample, read_image
from datasets.resumable import item_generator
from datasets.build import Benchmark, single_language_samples
from datasets.transforms import build_ivt_transforms
from utils.errors import UserError
from utils.tokenizers import Tokenizer, encode_caption

logger = logging.getLogger(__name__)

LEVELS = ("sentence", "phrase", "words")
MIN_CHARS = 5  # a fragment must be longer than this


def _sentences(caption: str) -> list[str]:
    return caption.strip(".").strip("[").strip("]").split(".")


def _stripped(fragments: Sequence[str]) -> list[str]:
    """Fragments longer than :data:`MIN_CHARS`, without surrounding spaces (empty ones dropped)."""
    return [text.strip(" ") for text in fragments if len(text) > MIN_CHARS and text.strip(" ")]


def phrase_candidates(caption: str) -> list[str]:
    """Per sentence of ``caption``: its longest comma part and the other parts re-joined by commas, each kept
    when longer than 5 characters (before the surrounding spaces are stripped)."""
    found: list[str] = []
    for sentence in _sentences(caption):
        parts = sentence.split(",")
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))  # the first of equally long parts
        rest = (",".join(parts[:longest]) + "," + ",".join(parts[longest + 1:])).strip(",")
        found += _stripped([parts[longest], rest])
    return found


def comma_fragments(caption: str) -> list[str]:
    """Every comma part of every sentence of ``caption`` longer than 5 characters."""
    found: list[str] = []
    for sentence in _sentences(caption):
        found += _stripped(sentence.split(","))
    return found


def _draw(options: Sequence[str], generator: torch.Generator) -> str:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def attribute_words(attributes: Sequence[str], generator: torch.Generator) -> str:
    """A random number (1..n) of the n attribute phrases, in random order, joined by ``,``."""
    count = int(torch.randint(1, len(attributes) + 1, (1,), generator=generator))
    order = torch.randperm(len(attributes), generator=generator)[:count].tolist()
    return ",".join(attributes[i] for i in order)


def caption_key(caption: str) -> str:
    """How a caption is looked up in the attribute table: lower case, single spaces."""
    return " ".join(caption.lower().split())


def caption_levels(caption: str, generator: torch.Generator,
                   attributes: Mapping[str, Sequence[str]] | None = None) -> tuple[str, str, str]:
    """The caption at the three levels: ``(sentence, phrase, words)``.

    Args:
        caption: one training caption.
        generator: source of every random choice.
        attributes: the attribute table (:func:`read_attribute_file`) or None for comma-fragment words.
    """
    sentence = caption.lower()
    whole = [sentence.strip()]
    phrases = phrase_candidates(sentence) or whole
    phrase = _draw(phrases, generator)
    if attributes is None:
        words = _draw(comma_fragments(sentence) or whole, generator)
    else:
        found = attributes.get(caption_key(caption), ())
        words = attribute_words(found, generator) if found else _draw(phrases, generator)
    return sentence, phrase, words or sentence


def _entry_attributes(entry: Any, path: str, index: int) -> list[tuple[str, list[str]]]:
    """``(caption, attribute phrases)`` pairs of one annotation entry."""
    if not isinstance(entry, Mapping) or "captions" not in entry or "att" not in entry:
        raise UserError(f"attribute file {path}: entry {index} is not an object with 'captions' and 'att'; "
                        f"it must follow the released cuhk_pedes_att.json (see docs/ivt.md)")
    captions, att = entry["captions"], entry["att"]
    captions = [captions] if isinstance(captions, str) else list(captions)
    groups = list(att) if isinstance(att, list) and all(isinstance(a, Mapping) for a in att) and att else [att]
    if len(groups) == 1:
        groups = groups * len(captions)
    if len(groups) != len(captions):
        raise UserError(f"attribute file {path}: entry {index} has {len(captions)} captions but {len(groups)} "
                        f"attribute groups; give one 'att' per caption or one for all")
    pairs = []
    for caption, group in zip(captions, groups):
        values = list(group.values()) if isinstance(group, Mapping) else group
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f"attribute file {path}: entry {index} has an 'att' that is neither an object of "
                            f"strings nor a list of strings")
        pairs.append((caption, [v for v in values if v]))
    return pairs


def read_attribute_file(path: str) -> dict[str, tuple[str, ...]]:
    """The CUHK-PEDES attribute table: normalised caption (:func:`caption_key`) -> attribute phrases.

    The file is the released ``cuhk_pedes_att.json`` (its layout inferred from the released reader, the file is
    not public): an object whose ``train`` list (or a plain list) holds entries with ``captions`` (a string or a
    list) and ``att`` (an object mapping attribute names to phrases, a list of phrases, or one such object per
    caption). Only the training entries are read.

    Raises:
        UserError: missing, unreadable or malformed file.
    """
    if not os.path.isfile(path):
        raise UserError(f"--attribute_file {path}: no such file; pass the CUHK-PEDES attribute JSON or leave the "
                        f"flag empty (see docs/ivt.md)")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"attribute file {path} is not readable JSON ({err})") from None
    entries = data.get("train") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise UserError(f"attribute file {path} has no list of entries (a 'train' list or a top-level list)")
    table: dict[str, tuple[str, ...]] = {}
    for index, entry in enumerate(entries):
        for caption, values in _entry_attributes(entry, path, index):
            if values:
                table.setdefault(caption_key(caption), tuple(values))
    logger.info("Read attributes of %d captions from %s", len(table), path)
    return table


class MultiLevelItem:
    """The IVT training item: ``make_item(image, caption, pid, image_id, generator) -> dict``.

    Returns ``images`` ``[3, 3, H, W]`` (three independent augmentations of ``image``), ``caption_ids``
    ``[3, L]`` (the sentence, phrase and words of ``caption``, encoded by :func:`encode_caption`: start, ids,
    end, padding), ``pids`` and ``image_ids`` (ints). View v is paired with level v.

    Args:
        transform: PIL image -> ``Tensor[3, H, W]`` (random: called once per view).
        tokenizer, text_length: how captions become ids (too long ones are truncated, ending with the end id).
        attributes: the CUHK-PEDES attribute table, or None (words are comma fragments).
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], tokenizer: Tokenizer, text_length: int,
                 attributes: Mapping[str, Sequence[str]] | None = None) -> None:
        self.transform = transform
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.attributes = attributes

    def __call__(self, image: Image.Image, caption: str, pid: int, image_id: int,
                 generator: torch.Generator) -> dict[str, torch.Tensor | int]:
        images = torch.stack([self.transform(image) for _ in LEVELS])
        texts = caption_levels(caption, generator, self.attributes)
        ids = torch.stack([encode_caption(text, self.tokenizer, self.text_length) for text in texts])
        return {"images": images, "caption_ids": ids, "pids": pid, "image_ids": image_id}


class MultiLevelDataset(Dataset):
    """IVT's training set: one item per caption, built by ``make_item`` (a :class:`MultiLevelItem`).

    The caption levels are drawn from a generator seeded from torch's global generator
    (:func:`datasets.resumable.item_generator`), which the training loader seeds per sample: an item depends
    only on the run seed, the epoch and its index, so a resumed run reads the same items.

    Args:
        samples: ``(pid, image_id, img_path, caption)`` tuples (``build_dataset(...).train``).
        make_item: ``(image, caption, pid, image_id, generator) -> dict``.
    """

    def __init__(self, samples: Sequence[TrainSample], make_item: Callable[..., dict]) -> None:
        self.samples = list(samples)
        self.pids = [sample[0] for sample in self.samples]
        self.make_item = make_item

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        pid, image_id, path, caption = self.samples[index]
        return self.make_item(read_image(path), caption, pid, image_id, item_generator())


def build_mla_item(args, tokenizer: Tokenizer) -> MultiLevelItem:
    """IVT's training item function from the options (``--img_size``, ``--text_length``, ``--attribute_file``)."""
    attributes = read_attribute_file(args.attribute_file) if args.attribute_file else None
    return MultiLevelItem(build_ivt_transforms(tuple(args.img_size), is_train=True), tokenizer, args.text_length,
                          attributes)


def build_ivt_train_set(args, dataset: Benchmark, tokenizer: Tokenizer, seed: int) -> MultiLevelDataset:
    """IVT's training pipeline (the registry's ``build_train_set``): :class:`MultiLevelDataset` of
    :func:`build_mla_item` over the training samples of ``dataset`` (its first language when multilingual)."""
    return MultiLevelDataset(single_language_samples(dataset), build_mla_item(args, tokenizer))


def build_ivt_test_transform(args):
    """IVT's evaluation transform (the registry's ``build_test_transform``): resize, normalise with 0.5/0.5."""
    return build_ivt_transforms(tuple(args.img_size), is_train=False)
