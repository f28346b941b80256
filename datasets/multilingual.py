"""Parallel multilingual captions in the annotation layout of Bi-IRRA's release (after TBPS-CLIP).

Layout under ``root`` (the annotation and image folder names are arguments)::

    <dataset>/annos/train_reid_en.json   train_reid_ch.json   (train_reid_fr.json ...)
    <dataset>/annos/test_reid_en.json    test_reid_ch.json    (test_reid_fr.json ...)
    <dataset>/imgs/...                   images, named by each entry's file_path

Each file is a JSON list of entries ``{"file_path": str, "id": int, "captions": [str, ...]}``. Language codes are
the release's: ``en`` English, ``ch`` Chinese (not ``zh``), ``fr``, ``de``; any code with both files present can
be read. The files of one split are parallel entry by entry: the same length, and at every index the same
``file_path``, the same ``id`` and the same number of captions; caption ``k`` of an entry in one language is the
translation of caption ``k`` in another. There is no validation split in the layout.

Ids: TBPS-CLIP's and Bi-IRRA's loaders number training identities in order of first appearance. This parser
instead requires training ids to be contiguous (as :mod:`datasets.pedes` does), so a class index is the file id
minus an offset: the smallest training id unless ``train_id_offset`` is given. Test ids are kept as in the file.

A hold-out of training identities is applied to the joined entries, so it is the same in every language: the
held-out identities form the ``val`` split and the remaining training identities are renumbered 0..N-1 in the
order of their file ids.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from prettytable import PrettyTable

from datasets.bases import TrainSample
from datasets.pedes import check_entry, check_repeats, check_train_ids, holdout_identities, read_annotations
from utils.errors import UserError

logger = logging.getLogger(__name__)

ANNOTATION_FOLDER = "annos"
IMAGE_FOLDER = "imgs"
SPLITS = ("train", "test")
ENTRY_KEYS = ("file_path", "id", "captions")
_FILE_NAME = re.compile(r"^(train|test)_reid_([A-Za-z][A-Za-z0-9_-]*)\.json$")
_LANGUAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")

#: ``(pid, image_id, img_path, {language: caption})``: one training sample per caption index of an image.
MultilingualSample = tuple[int, int, str, dict[str, str]]


def annotation_file_name(split: str, language: str) -> str:
    """``'<split>_reid_<language>.json'``, the release's file name."""
    return f"{split}_reid_{language}.json"


def parse_languages(text: str) -> tuple[str, ...]:
    """``'en,ch'`` -> ``('en', 'ch')`` (order kept: the source language first).

    Raises:
        UserError: empty list, an empty or malformed code, or a repeated code.
    """
    codes = tuple(part.strip() for part in str(text).split(","))
    bad = [code for code in codes if not _LANGUAGE.match(code)]
    if not codes or bad:
        raise UserError(f"--languages must be comma-separated language codes such as 'en,ch', got {text!r}.")
    repeated = sorted({code for code in codes if codes.count(code) > 1})
    if repeated:
        raise UserError(f"--languages names {', '.join(repeated)} more than once ({text!r}); give each language once.")
    return codes


def available_languages(anno_dir: str) -> tuple[str, ...]:
    """Language codes that have at least one ``{train,test}_reid_<code>.json`` file in ``anno_dir`` (sorted)."""
    if not os.path.isdir(anno_dir):
        return ()
    found = {m.group(2) for m in map(_FILE_NAME.match, os.listdir(anno_dir)) if m}
    return tuple(sorted(found))


@dataclass(frozen=True)
class ParallelEntry:
    """One image with its captions in every language.

    Attributes:
        file_path: image path relative to the image folder.
        id: identity id as in the files.
        captions: language -> captions of the image (the same number in every language, index-aligned).
    """

    file_path: str
    id: int
    captions: dict[str, tuple[str, ...]]


def read_parallel(paths: dict[str, str]) -> list[ParallelEntry]:
    """Read the annotation files of one split and join them entry by entry.

    Args:
        paths: language -> annotation file; the first language is the reference the others are compared with.

    Raises:
        UserError: a malformed file or entry, or files that are not parallel (naming both files, the first
            index that differs and how: length, file_path, id or caption count).
    """
    languages = list(paths)
    files = {}
    for language, path in paths.items():
        entries = read_annotations(path)
        for index, entry in enumerate(entries):
            check_entry(entry, f"Annotation file '{path}', entry {index}", ENTRY_KEYS, "file_path",
                        "multilingual annotation")
        check_repeats(entries, "file_path", f"Annotation file '{path}'")
        files[language] = entries
    reference = languages[0]
    for language in languages[1:]:
        _check_parallel(paths[reference], files[reference], paths[language], files[language])
    return [
        ParallelEntry(
            file_path=entry["file_path"],
            id=int(entry["id"]),
            captions={language: tuple(files[language][index]["captions"]) for language in languages},
        )
        for index, entry in enumerate(files[reference])
    ]


def _check_parallel(path_a: str, entries_a: list[dict[str, Any]], path_b: str, entries_b: list[dict[str, Any]]) -> None:
    """Raise one UserError at the first index where two annotation files differ."""
    problem = None
    for index, (a, b) in enumerate(zip(entries_a, entries_b)):
        if a["file_path"] != b["file_path"]:
            problem = (f"entry {index} has file_path '{a['file_path']}' in the first and '{b['file_path']}' "
                       "in the second")
        elif int(a["id"]) != int(b["id"]):
            problem = f"entry {index} has id {a['id']} in the first and {b['id']} in the second"
        elif len(a["captions"]) != len(b["captions"]):
            problem = (f"entry {index} has {len(a['captions'])} captions in the first and "
                       f"{len(b['captions'])} in the second")
        if problem:
            break
    if problem is None and len(entries_a) != len(entries_b):
        problem = (f"the first has {len(entries_a)} entries and the second {len(entries_b)}, so entry "
                   f"{min(len(entries_a), len(entries_b))} exists in only one of them")
    if problem:
        raise UserError(
            f"Annotation files '{path_a}' and '{path_b}' are not parallel: {problem}. Each language's file must list "
            "the same images with the same ids and caption counts in the same order; use files of one release."
        )


def split_off_identities(
    entries: Sequence[ParallelEntry], held_out_ids: Collection[int]
) -> tuple[list[ParallelEntry], list[ParallelEntry]]:
    """``(kept, held_out)``: the entries whose id is not / is in ``held_out_ids`` (file ids), order kept."""
    held = set(held_out_ids)
    return [e for e in entries if e.id not in held], [e for e in entries if e.id in held]


def train_samples(
    entries: Sequence[ParallelEntry], img_dir: str, class_of: dict[int, int]
) -> list[MultilingualSample]:
    """One sample per caption index of every image: ``(class, image_id, img_path, {language: caption})``.

    Args:
        class_of: file id -> class index.
    """
    samples: list[MultilingualSample] = []
    for image_id, entry in enumerate(entries):
        path = os.path.join(img_dir, entry.file_path)
        by_language = entry.captions
        count = len(next(iter(by_language.values())))
        for k in range(count):
            samples.append((class_of[entry.id], image_id, path, {lang: caps[k] for lang, caps in by_language.items()}))
    return samples


def eval_split(entries: Sequence[ParallelEntry], img_dir: str, languages: Sequence[str]) -> dict[str, Any]:
    """Evaluation split dict: ``image_pids``, ``img_paths`` (one per image), ``caption_pids`` (one per caption
    index) and ``captions_by_lang`` (language -> captions, aligned with ``caption_pids``); ids as in the file."""
    data: dict[str, Any] = {"image_pids": [], "img_paths": [], "caption_pids": [],
                            "captions_by_lang": {lang: [] for lang in languages}}
    for entry in entries:
        data["image_pids"].append(entry.id)
        data["img_paths"].append(os.path.join(img_dir, entry.file_path))
        data["caption_pids"].extend(entry.id for _ in entry.captions[languages[0]])
        for lang in languages:
            data["captions_by_lang"][lang].extend(entry.captions[lang])
    return data


def language_split(data: dict[str, Any], language: str) -> dict[str, list]:
    """One language of a split from :func:`eval_split`, in :class:`datasets.pedes.PedesDataset`'s shape
    (``image_pids``, ``img_paths``, ``caption_pids``, ``captions``).

    Raises:
        UserError: ``language`` is not in the split.
    """
    if language not in data["captions_by_lang"]:
        raise UserError(f"No '{language}' captions were loaded; loaded languages: "
                        f"{', '.join(data['captions_by_lang'])} (fix --languages).")
    return {"image_pids": data["image_pids"], "img_paths": data["img_paths"],
            "caption_pids": data["caption_pids"], "captions": data["captions_by_lang"][language]}


class MultilingualDataset:
    """A dataset in the multilingual layout, every sample carrying its caption in each language.

    Attributes:
        languages: the loaded language codes, source first.
        train: :data:`MultilingualSample` per caption index of each training image, in file order; classes are
            0..N-1 and ``image_id`` numbers the training images from 0.
        test, val: dicts with ``image_pids``, ``img_paths``, ``caption_pids`` and ``captions_by_lang``
            (see :func:`eval_split`); ids as in the file. ``val`` holds the held-out training identities, or is
            ``None`` without a hold-out.
        train_entries, val_entries, test_entries: the joined :class:`ParallelEntry` lists behind them.
        anno_paths: split -> language -> annotation file.

    Args:
        root: folder holding ``<name>/``.
        name: dataset folder name (``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``, ``UFine6926``, ...).
        languages: language codes to load, source first.
        anno_folder, image_folder: folders under ``root/name`` (or absolute paths).
        train_id_offset: subtracted from training ids to get classes; ``None``: the smallest training id.
        held_out_ids: training identities (file ids) moved to the ``val`` split in every language.
        holdout_share: without ``held_out_ids``, hold out this share of the training identities
            (:func:`datasets.pedes.holdout_identities`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        name: str,
        languages: Sequence[str],
        anno_folder: str = ANNOTATION_FOLDER,
        image_folder: str = IMAGE_FOLDER,
        train_id_offset: Optional[int] = None,
        held_out_ids: Collection[int] = (),
        holdout_share: float = 0.0,
        verbose: bool = True,
    ):
        self.name = name
        self.languages = tuple(languages)
        self.dataset_dir = os.path.join(os.fspath(root), name)
        self.anno_dir = os.path.join(self.dataset_dir, anno_folder)
        self.img_dir = os.path.join(self.dataset_dir, image_folder)
        self.anno_paths = self._check_files(os.fspath(root))

        all_train = read_parallel(self.anno_paths["train"])
        self.test_entries = read_parallel(self.anno_paths["test"])
        file_ids = {e.id for e in all_train}
        offset = min(file_ids, default=0) if train_id_offset is None else train_id_offset
        check_train_ids({i - offset for i in file_ids}, offset, f"Annotation files {self._names('train')}")
        if holdout_share > 0 and not held_out_ids:
            held_out_ids = holdout_identities(file_ids, holdout_share)
        unknown = sorted(set(held_out_ids) - file_ids)
        if unknown:
            raise UserError(f"Held-out identities {unknown[:5]} are not training ids of {self._names('train')}.")
        self.train_entries, self.val_entries = split_off_identities(all_train, held_out_ids)
        kept = sorted({e.id for e in self.train_entries})
        self.train_id_container = set(range(len(kept)))
        self.train = train_samples(self.train_entries, self.img_dir, {fid: i for i, fid in enumerate(kept)})
        self.test = eval_split(self.test_entries, self.img_dir, self.languages)
        self.test_id_container = set(self.test["image_pids"])
        self.val: Optional[dict[str, Any]] = None
        self.val_id_container: set[int] = set()
        if self.val_entries:
            self.val = eval_split(self.val_entries, self.img_dir, self.languages)
            self.val_id_container = set(self.val["image_pids"])
        if verbose:
            logger.info("%s (%s) loaded from %s", name, ", ".join(self.languages), self.anno_dir)
            logger.info("%s statistics:\n%s", name, self.statistics_table())

    @property
    def num_classes(self) -> int:
        return len(self.train_id_container)

    def train_in(self, language: str) -> list[TrainSample]:
        """The training samples with the caption of one language: ``(pid, image_id, img_path, caption)``."""
        self._check_language(language)
        return [(pid, image_id, path, captions[language]) for pid, image_id, path, captions in self.train]

    def split(self, name: str, language: Optional[str] = None) -> dict[str, Any]:
        """The ``'test'`` or ``'val'`` split dict: all languages (``captions_by_lang``), or with ``language`` the
        single-language shape of :class:`datasets.pedes.PedesDataset` (``captions``).

        Raises:
            UserError: unknown split, a ``val`` split without a hold-out, or a language that was not loaded.
        """
        if name not in ("val", "test"):
            raise UserError(f"Unknown evaluation split '{name}'; use 'test' or 'val' (fix --val_dataset).")
        data = self.test if name == "test" else self.val
        if data is None:
            raise UserError(f"The multilingual layout of {self.name} has no validation split and no training "
                            "identities were held out; use --val_dataset test.")
        if language is None:
            return data
        self._check_language(language)
        return language_split(data, language)

    def statistics_table(self) -> str:
        """ids / images / captions per language, per split, as a prettytable string."""
        table = PrettyTable(["subset", "ids", "images", "captions per language"])
        table.add_row(["train", self.num_classes, len(self.train_entries), len(self.train)])
        for name, data, ids in (("val", self.val, self.val_id_container), ("test", self.test, self.test_id_container)):
            table.add_row([name, len(ids), len(data["image_pids"]) if data else 0,
                           len(data["caption_pids"]) if data else 0])
        return str(table)

    def _check_language(self, language: str) -> None:
        if language not in self.languages:
            raise UserError(f"No '{language}' captions were loaded; loaded languages: {', '.join(self.languages)} "
                            "(fix --languages).")

    def _names(self, split: str) -> str:
        return ", ".join(f"'{p}'" for p in self.anno_paths[split].values())

    def _check_files(self, root: str) -> dict[str, dict[str, str]]:
        if not self.languages:
            raise UserError("No language given; pass --languages, e.g. en,ch (source language first).")
        if not os.path.isdir(root):
            raise UserError(f"Dataset root '{root}' does not exist; fix --root_dir.")
        if not os.path.isdir(self.dataset_dir):
            raise UserError(f"Dataset folder '{self.dataset_dir}' not found: --root_dir must contain a "
                            f"'{self.name}' folder.")
        if not os.path.isdir(self.img_dir):
            raise UserError(f"Image folder '{self.img_dir}' not found; put the {self.name} images under it.")
        paths = {split: {lang: os.path.join(self.anno_dir, annotation_file_name(split, lang))
                         for lang in self.languages} for split in SPLITS}
        missing = [p for split in SPLITS for p in paths[split].values() if not os.path.isfile(p)]
        if missing:
            found = available_languages(self.anno_dir)
            have = f"languages with files there: {', '.join(found)}" if found else "that folder has no such files"
            raise UserError(
                f"Missing annotation file(s) {', '.join(repr(p) for p in missing)} ({have}); put every language's "
                "train_reid_<lang>.json and test_reid_<lang>.json there (Chinese is 'ch') or fix --languages."
            )
        return paths


def build_multilingual_dataset(
    name: str, root: str | os.PathLike, languages: Sequence[str], **options: Any
) -> MultilingualDataset:
    """Parse ``root/name`` in the multilingual layout for ``languages`` (source first).

    ``options`` are :class:`MultilingualDataset`'s keyword arguments: ``anno_folder``, ``image_folder``,
    ``train_id_offset``, ``held_out_ids``, ``holdout_share``, ``verbose``.
    """
    return MultilingualDataset(root, name, languages, **options)
