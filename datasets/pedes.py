"""One parser for the text-to-image person retrieval benchmarks.

The benchmarks differ only in the annotation file name, the JSON key of the image path, the number
subtracted from training identity ids, the image folder and whether a validation split exists. Each is a
:class:`PedesSpec` in :data:`DATASETS`; :class:`PedesDataset` reads any of them.

Layout under ``root``::

    CUHK-PEDES/imgs/...   CUHK-PEDES/reid_raw.json                (file_path; train ids from 1)
    ICFG-PEDES/imgs/...   ICFG-PEDES/ICFG-PEDES.json              (file_path; no val split)
    RSTPReid/imgs/...     RSTPReid/data_captions.json             (img_path)
    UFine6926/images/...  UFine6926/UFine6926_Annotations.json    (file_path 'images/...'; train ids from 1)

Each annotation file is a JSON list of entries ``{"split", "captions", "id", <path key>, ...}``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from collections.abc import Collection, Sequence
from typing import Any, Optional

import numpy as np

from prettytable import PrettyTable

from datasets.bases import TrainSample
from utils.errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PedesSpec:
    """What distinguishes one benchmark's files.

    Attributes:
        name: folder name under the root, also the ``--dataset_name`` value.
        annotation_files: accepted annotation file names, tried in order.
        path_key: JSON key holding the image path relative to ``imgs/``.
        train_id_offset: subtracted from training ids so that classes are 0..N-1.
        has_val: whether the benchmark defines a validation split.
        reference: where the benchmark comes from.
        image_folder: folder under the dataset folder that image paths are relative to ("" for the dataset
            folder itself).
    """

    name: str
    annotation_files: tuple[str, ...]
    path_key: str
    train_id_offset: int
    has_val: bool
    reference: str
    image_folder: str = "imgs"


DATASETS: dict[str, PedesSpec] = {
    spec.name: spec
    for spec in (
        PedesSpec(
            name="CUHK-PEDES",
            annotation_files=("reid_raw.json",),
            path_key="file_path",
            train_id_offset=1,
            has_val=True,
            reference="Li et al., Person Search With Natural Language Description, CVPR 2017",
        ),
        PedesSpec(
            name="ICFG-PEDES",
            annotation_files=("ICFG-PEDES.json", "ICFG_PEDES.json"),
            path_key="file_path",
            train_id_offset=0,
            has_val=False,
            reference="Ding et al., Semantically Self-Aligned Network for Text-to-Image Part-aware "
            "Person Re-identification, arXiv 2107.12666",
        ),
        PedesSpec(
            name="RSTPReid",
            annotation_files=("data_captions.json",),
            path_key="img_path",
            train_id_offset=0,
            has_val=True,
            reference="Zhu et al., DSSL: Deep Surroundings-person Separation Learning for Text-based "
            "Person Retrieval, ACM MM 2021",
        ),
        PedesSpec(
            name="UFine6926",
            annotation_files=("UFine6926_Annotations.json",),
            path_key="file_path",
            train_id_offset=1,
            has_val=True,
            reference="Zuo et al., UFineBench: Towards Text-based Person Retrieval with Ultra-fine Granularity, "
            "CVPR 2024",
            image_folder="",
        ),
    )
}


def get_spec(name: str) -> PedesSpec:
    """The description of benchmark ``name``; UserError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(
            f"Unknown dataset name '{name}'. Known datasets: {', '.join(DATASETS)} (fix --dataset_name)."
        ) from None


def read_annotations(path: str) -> list[dict[str, Any]]:
    """Load an annotation file: a JSON list of objects.

    Raises:
        UserError: unreadable file, malformed JSON (with line and column), or not a list of objects.
    """
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(
            f"Annotation file '{path}' is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
            "Re-download or regenerate the file."
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"Cannot read annotation file '{path}' ({err}).") from err
    if not isinstance(data, list):
        raise UserError(
            f"Annotation file '{path}' must hold a JSON list of entries, found a {type(data).__name__}."
        )
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise UserError(
                f"Annotation file '{path}': entry {index} must be a JSON object, found {type(entry).__name__}."
            )
    return data


def _override_path(anno_file: str, dataset_dir: str) -> str:
    """``anno_file`` as given when that file exists, else the file of that name in ``dataset_dir``."""
    for path in (anno_file, os.path.join(dataset_dir, anno_file)):
        if os.path.isfile(path):
            return path
    raise UserError(f"Annotation file '{anno_file}' not found (also looked in '{dataset_dir}'); fix --anno_file.")


def _first_gap(pids: set[int]) -> int:
    """Smallest integer >= 0 missing from ``pids`` (a set of non-negative integers)."""
    expected = 0
    for pid in sorted(pids):
        if pid != expected:
            return expected
        expected += 1
    return expected


def check_entry(entry: dict[str, Any], where: str, keys: Sequence[str], path_key: str, owner: str) -> None:
    """Check that an annotation entry has ``keys``, a list of string captions, a string image path under
    ``path_key`` and an integer id.

    Args:
        where: names the entry in messages (file and index).
        owner: names the dataset or layout in messages.

    Raises:
        UserError: the first problem found.
    """
    for key in keys:
        if key not in entry:
            listed = ", ".join(f"'{k}'" for k in keys[:-1]) + f" and '{keys[-1]}'"
            raise UserError(f"{where} has no '{key}' key; every {owner} entry needs {listed}.")
    captions = entry["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: 'captions' must be a list of strings, found {captions!r:.80}.")
    if not isinstance(entry[path_key], str):
        raise UserError(f"{where}: '{path_key}' must be a string path.")
    value = entry["id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise UserError(f"{where}: 'id' must be an integer, found {value!r}.")


def check_train_ids(pids: set[int], offset: int, source: str) -> None:
    """Check that training ids minus ``offset`` (``pids``) are exactly 0..N-1.

    Args:
        source: names the annotation file(s) in messages.

    Raises:
        UserError: an id below ``offset`` or a gap, naming the first missing id.
    """
    if not pids:
        return
    rule = (
        f"{source}: training ids must run from {offset} to {offset + len(pids) - 1} without gaps "
        f"(they become class indices 0..{len(pids) - 1})"
    )
    if min(pids) < 0:
        raise UserError(f"{rule}, but id {min(pids) + offset} is below {offset}. Renumber the training identities.")
    gap = _first_gap(pids)
    if gap != len(pids):
        raise UserError(
            f"{rule}, but id {gap + offset} is missing (ids found: {offset}..{max(pids) + offset}). "
            "Renumber the training identities."
        )


def check_repeats(entries: Sequence[dict[str, Any]], path_key: str, source: str) -> None:
    """Refuse entries that repeat an earlier entry exactly; warn about images that several entries name.

    A repeated test entry adds its image to the gallery twice and its captions to the queries twice, which
    changes every score; it is never intended.

    Raises:
        UserError: naming the number of repeated entries, the first one and the fix.
    """
    first_of: dict[str, int] = {}
    image_of: dict[str, int] = {}
    repeated: list[tuple[int, int]] = []
    shared: list[tuple[int, int]] = []
    for index, entry in enumerate(entries):
        text = json.dumps(entry, sort_keys=True, ensure_ascii=False)
        if text in first_of:
            repeated.append((index, first_of[text]))
            continue
        first_of[text] = index
        path = str(entry.get(path_key))
        if path in image_of:
            shared.append((index, image_of[path]))
        else:
            image_of[path] = index
    if repeated:
        index, earlier = repeated[0]
        raise UserError(f"{source}: {len(repeated)} entr{'y repeats' if len(repeated) == 1 else 'ies repeat'} an "
                        f"earlier entry exactly (first: entry {index} = entry {earlier}, "
                        f"'{entries[index].get(path_key)}'); repeated entries change the scores, remove them.")
    if shared:
        index, earlier = shared[0]
        logger.warning("%s: %d entries name an image that an earlier entry names too (first: entry %d and entry %d, "
                       "'%s'); each is used as a separate image.", source, len(shared), index, earlier,
                       entries[index].get(path_key))


def drop_empty_captions(entries: Sequence[dict[str, Any]], path_key: str, source: str) -> list[dict[str, Any]]:
    """The entries with their blank captions removed; a warning counts the blank captions and the entries left
    without any caption (their images are not trained on; in an evaluation split they are gallery images that
    no query describes)."""
    blank = 0
    first_blank = None
    captionless: list[int] = []
    cleaned = []
    for index, entry in enumerate(entries):
        captions = [caption for caption in entry["captions"] if caption.strip()]
        if len(captions) != len(entry["captions"]):
            blank += len(entry["captions"]) - len(captions)
            first_blank = index if first_blank is None else first_blank
        if not captions:
            captionless.append(index)
        cleaned.append({**entry, "captions": captions} if len(captions) != len(entry["captions"]) else entry)
    if blank:
        logger.warning("%s: %d blank caption(s) ignored (first in entry %d).", source, blank, first_blank)
    if captionless:
        logger.warning("%s: %d entr%s no caption (first: entry %d, '%s'); %s not trained on and no query "
                       "describes %s.", source, len(captionless), "y has" if len(captionless) == 1 else "ies have",
                       captionless[0], entries[captionless[0]].get(path_key),
                       "its image is" if len(captionless) == 1 else "their images are",
                       "it" if len(captionless) == 1 else "them")
    return cleaned


def check_image_files(paths: Sequence[str], folder: str, source: str, shown: int = 3) -> None:
    """Check that every image file exists (one ``stat`` each).

    Raises:
        UserError: how many of the images named by ``source`` are missing under ``folder``, and the first few.
    """
    unique = list(dict.fromkeys(paths))
    missing = [path for path in unique if not os.path.isfile(path)]
    if missing:
        names = ", ".join(repr(os.path.relpath(path, folder)) for path in missing[:shown])
        more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
        raise UserError(f"{len(missing)} of the {len(unique)} images named by {source} are missing under "
                        f"'{folder}': {names}{more}. Check --root_dir, or restore the files from the dataset archive.")


class PedesDataset:
    """A parsed benchmark.

    Args (beyond the root and the benchmark's description): ``anno_file`` replaces the benchmark's annotation
    file; ``held_out_ids`` (file ids) or ``holdout_share`` (see :func:`holdout_identities`; only where the file has
    no val split) move training identities to the val split, the remaining ones renumbered 0..N-1.

    Attributes:
        train: ``(pid, image_id, img_path, caption)`` per caption, in file order; pids are 0..N-1 and
            ``image_id`` numbers the training images from 0.
        val, test: dicts with ``image_pids``, ``img_paths`` (one per image) and ``caption_pids``,
            ``captions`` (one per caption), ids as in the file; ``val`` is ``None`` when the file has no
            validation entries.
        train_id_container: the set of training pids; ``num_classes`` is its size.
    """

    def __init__(
        self, root: str | os.PathLike, spec: PedesSpec, verbose: bool = True, anno_file: Optional[str] = None,
        held_out_ids: Collection[int] = (), holdout_share: float = 0.0,
    ):
        self.spec = spec
        self.root = os.fspath(root)
        self.dataset_dir = os.path.join(self.root, spec.name)
        self.img_dir = os.path.join(self.dataset_dir, spec.image_folder) if spec.image_folder else self.dataset_dir
        self.anno_path = self._check_files(anno_file)

        source = f"Annotation file '{self.anno_path}'"
        entries = read_annotations(self.anno_path)
        for index, entry in enumerate(entries):
            self._check_entry(index, entry)
        check_repeats(entries, spec.path_key, source)
        by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
        for entry in drop_empty_captions(entries, spec.path_key, source):
            by_split[entry["split"]].append(entry)
        file_ids = {int(entry["id"]) for entry in by_split["train"]}
        check_train_ids({i - spec.train_id_offset for i in file_ids}, spec.train_id_offset,
                        f"Annotation file '{self.anno_path}'")
        if holdout_share > 0 and not by_split["val"] and not held_out_ids:
            held_out_ids = holdout_identities(file_ids, holdout_share)
        self.held_out_ids = set(held_out_ids)
        if self.held_out_ids:
            self._hold_out(by_split)
        self.num_images = {split: len(entries) for split, entries in by_split.items()}

        self.train, self.train_id_container = self._train_samples(by_split["train"])
        self.test, self.test_id_container = self._eval_split(by_split["test"])
        self.val: Optional[dict[str, list]] = None
        self.val_id_container: set[int] = set()
        if by_split["val"]:
            self.val, self.val_id_container = self._eval_split(by_split["val"])
        if verbose:
            logger.info("%s loaded from %s", spec.name, self.anno_path)
            logger.info("%s statistics:\n%s", spec.name, self.statistics_table())

    @property
    def num_classes(self) -> int:
        return len(self.train_id_container)

    def split(self, name: str) -> dict[str, list]:
        """The ``'val'`` or ``'test'`` split dict.

        Raises:
            UserError: unknown split name, or the split has no entries.
        """
        if name not in ("val", "test"):
            raise UserError(f"Unknown evaluation split '{name}'; use 'test' or 'val' (fix --val_dataset).")
        data = self.val if name == "val" else self.test
        if data is None or not data["captions"]:
            why = (
                f"{self.spec.name} defines no validation split"
                if name == "val" and not self.spec.has_val
                else f"'{self.anno_path}' has no entries with split '{name}'"
            )
            other = "test" if name == "val" else "val"
            raise UserError(f"Cannot evaluate on the '{name}' split: {why}. Use --val_dataset {other}.")
        return data

    def statistics_table(self) -> str:
        """ids / images / captions per split, as a prettytable string."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", len(self.train_id_container), self.num_images["train"], len(self.train)])
        for name, data, ids in (("val", self.val, self.val_id_container), ("test", self.test, self.test_id_container)):
            captions = len(data["captions"]) if data else 0
            table.add_row([name, len(ids), self.num_images[name], captions])
        return str(table)

    def _check_files(self, anno_file: Optional[str]) -> str:
        if not os.path.isdir(self.root):
            raise UserError(f"Dataset root '{self.root}' does not exist; fix --root_dir.")
        if not os.path.isdir(self.dataset_dir):
            raise UserError(
                f"Dataset folder '{self.dataset_dir}' not found: --root_dir must contain a '{self.spec.name}' "
                "folder (or generate a synthetic one with `python -m datasets.synthetic --root DIR`)."
            )
        if not os.path.isdir(self.img_dir):
            raise UserError(f"Image folder '{self.img_dir}' not found; put the {self.spec.name} images under it.")
        if anno_file is not None:
            return _override_path(anno_file, self.dataset_dir)
        for name in self.spec.annotation_files:
            path = os.path.join(self.dataset_dir, name)
            if os.path.isfile(path):
                return path
        raise UserError(
            f"No annotation file in '{self.dataset_dir}': looked for "
            f"{' or '.join(repr(n) for n in self.spec.annotation_files)}. Place the {self.spec.name} "
            "annotation file there."
        )

    def _check_entry(self, index: int, entry: dict[str, Any]) -> None:
        where = f"Annotation file '{self.anno_path}', entry {index}"
        check_entry(entry, where, ("id", "split", "captions", self.spec.path_key), self.spec.path_key, self.spec.name)
        if entry["split"] not in SPLITS:
            raise UserError(f"{where}: split is {entry['split']!r}, expected one of {', '.join(SPLITS)}.")

    def _hold_out(self, by_split: dict[str, list[dict[str, Any]]]) -> None:
        """Move the training entries of ``held_out_ids`` (file ids) to the val split."""
        if by_split["val"]:
            raise UserError(f"'{self.anno_path}' has a val split already; identities are held out only where a "
                            "benchmark has none.")
        unknown = sorted(self.held_out_ids - {int(entry["id"]) for entry in by_split["train"]})
        if unknown:
            raise UserError(f"Held-out identities {unknown[:5]} are not training ids of '{self.anno_path}'.")
        by_split["val"] = [entry for entry in by_split["train"] if int(entry["id"]) in self.held_out_ids]
        by_split["train"] = [entry for entry in by_split["train"] if int(entry["id"]) not in self.held_out_ids]

    def _train_samples(self, entries: list[dict[str, Any]]) -> tuple[list[TrainSample], set[int]]:
        """Samples with class indices: file id minus the offset (0..N-1), or, after a hold-out, the rank of the
        file id among the remaining training ids."""
        classes = {fid: fid - self.spec.train_id_offset for fid in {int(entry["id"]) for entry in entries}}
        if self.held_out_ids:
            classes = {fid: index for index, fid in enumerate(sorted(classes))}
        samples: list[TrainSample] = []
        for image_id, entry in enumerate(entries):
            pid = classes[int(entry["id"])]
            img_path = os.path.join(self.img_dir, entry[self.spec.path_key])
            samples.extend((pid, image_id, img_path, caption) for caption in entry["captions"])
        return samples, set(classes.values())

    def _eval_split(self, entries: list[dict[str, Any]]) -> tuple[dict[str, list], set[int]]:
        data: dict[str, list] = {"image_pids": [], "img_paths": [], "caption_pids": [], "captions": []}
        for entry in entries:
            pid = int(entry["id"])
            data["image_pids"].append(pid)
            data["img_paths"].append(os.path.join(self.img_dir, entry[self.spec.path_key]))
            data["caption_pids"].extend(pid for _ in entry["captions"])
            data["captions"].extend(entry["captions"])
        return data, set(data["image_pids"])


def build_dataset(
    name: str, root: str | os.PathLike, verbose: bool = True, anno_file: Optional[str] = None,
    held_out_ids: Collection[int] = (), holdout_share: float = 0.0,
) -> PedesDataset:
    """Parse benchmark ``name`` (a key of :data:`DATASETS`) under ``root``.

    Args:
        anno_file: read this annotation file instead of the benchmark's own (a path, or a file name in the
            dataset folder).
        held_out_ids: training identities (file ids) that form the val split instead (benchmarks without one).
        holdout_share: when the file has no val split (and no ``held_out_ids`` are given), hold out this share
            of the training identities (:func:`holdout_identities`) as the val split.
    """
    return PedesDataset(root, get_spec(name), verbose=verbose, anno_file=anno_file, held_out_ids=held_out_ids,
                        holdout_share=holdout_share)


#: Seed of the fixed permutation that picks held-out identities (never the run's --seed: every run of a
#: benchmark holds out the same identities).
HOLDOUT_SEED = 20230607


def holdout_identities(train_ids: Collection[int], share: float) -> list[int]:
    """The training identities held out for validation: ``max(1, round(share * N))`` of the ``N`` ids, chosen by
    a fixed random permutation of the sorted ids (seed :data:`HOLDOUT_SEED`), returned sorted. Deterministic: the
    same ids give the same choice, whatever the run's seed or the language of the captions."""
    ids = sorted(set(train_ids))
    if share <= 0 or not ids:
        return []
    count = min(len(ids) - 1, max(1, round(share * len(ids))))
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(ids))[:count]
    return sorted(ids[i] for i in order)
