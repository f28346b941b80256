"""Rank a split's images for captions, with the image embeddings encoded once and cached beside the run.

Used by ``search.py`` (free-text queries) and ``visualize.py`` (the benchmark's own captions).

Cache
-----
Encoding a gallery is the slow part (thousands of images through the vision transformer); a caption is
cheap. :func:`load_gallery` therefore stores the gallery's L2-normalised embeddings in
``<run>/gallery_cache/<split>-<checkpoint name>.pt`` and reuses them while nothing they depend on changed.
The cache key holds the checkpoint's name, size and modification time, a SHA-256 of the gallery (every
image's person id, path, size and modification time, in order), and the options that change the embedding
(dataset, split, model, image size, precision). Any difference rebuilds the file; it is written to a
temporary name and renamed, so an interrupted run never leaves a half-written cache. A run folder that
cannot be written to still works, without a cache. Cached features are checked before use — a ``[G, D]``
tensor of finite numbers whose ``D`` is the model's (a one-word caption is encoded to know it: the two sides
share their embedding size) — and rebuilt when they are not.

Ranking follows :mod:`utils.metrics`: descending similarity of normalised features, ties broken by the lower
gallery index (a stable sort), ranks counted from 1.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datasets import ImageDataset, load_benchmark, tokenize_captions
from datasets.build import make_loader
from datasets.multilingual import language_split
from processor.run_loading import RunHandle
from processor.visualization import is_full_width
from utils.errors import UserError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_DIR = "gallery_cache"
SPLITS = ("test", "val")


@dataclass
class Gallery:
    """The images of one split and their embeddings.

    Attributes:
        pids: ``[G]`` person id of each image.
        paths: ``[G]`` image file paths.
        feats: ``[G, D]`` float32 L2-normalised image embeddings, on the CPU.
        from_cache: whether ``feats`` were read from the cache rather than encoded now.
    """

    pids: list[int]
    paths: list[str]
    feats: torch.Tensor
    from_cache: bool


def run_languages(args) -> tuple[str, ...]:
    """The caption languages of a run (empty for a single-language benchmark)."""
    return tuple(code for code in str(getattr(args, "languages", "") or "").split(",") if code)


def query_language(args, requested: str, texts: Sequence[str] = ()) -> str:
    """The language to encode queries in: ``requested``, else the run's target language for text with Chinese
    characters, else its first (source) language; '' for a single-language run.

    Raises:
        UserError: ``requested`` is not one of the run's languages.
    """
    languages = run_languages(args)
    if requested:
        if requested not in languages:
            raise UserError(f"--language {requested}: the run knows {', '.join(languages) or 'one language only'}")
        return requested
    if len(languages) > 1 and "ch" in languages and any(is_full_width(c) for text in texts for c in text):
        return "ch"
    return languages[0] if languages else ""


def load_split(args, split: str, language: str = "") -> dict[str, list]:
    """The ``image_pids``, ``img_paths``, ``caption_pids`` and ``captions`` of the run's ``split`` (the captions of
    ``language`` for a multilingual run, its first language by default).

    Raises:
        UserError: unknown split, a dataset without that split, or the dataset cannot be read.
    """
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    test_args = argparse.Namespace(**{**vars(args), "training": False})
    dataset = load_benchmark(test_args, verbose=False)
    data = dataset.val if split == "val" else dataset.test
    if data is None or not data["img_paths"]:
        raise UserError(f"{args.dataset_name} under {args.root_dir} has no '{split}' images; "
                        f"use --split {'test' if split == 'val' else 'val'}")
    if "captions_by_lang" in data:
        data = language_split(data, language or dataset.languages[0])
    return data


def retrieval_view(model: nn.Module, run: RunHandle, language: str = ""):
    """What encodes for retrieval: the method's evaluation wrapper (for ``language``, when it has one per
    language), or the model itself."""
    if run.method.evaluation is None:
        return model
    view = run.method.evaluation(model, run.args)
    return view.for_query_set(language) if language and hasattr(view, "for_query_set") else view


def _encoder(view, what: str):
    """``view.encode_images``/``encode_texts`` (retrieval objects) or ``encode_image``/``encode_text`` (models)."""
    return getattr(view, f"encode_{what}s", None) or getattr(view, f"encode_{what}")


def _gallery_digest(pids: Sequence[int], paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for pid, path in zip(pids, paths):
        try:
            stat = os.stat(path)
        except OSError:
            raise UserError(f"image file {path} of the gallery cannot be read; check --root_dir") from None
        digest.update(f"{pid}\t{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(run: RunHandle, split: str, pids: Sequence[int], paths: Sequence[str]) -> dict[str, Any]:
    """Everything the cached embeddings of ``split`` depend on (see the module docstring)."""
    stat = os.stat(run.checkpoint)
    args = run.args
    return {
        "version": CACHE_VERSION,
        "checkpoint": [os.path.basename(run.checkpoint), stat.st_size, stat.st_mtime_ns],
        "gallery": _gallery_digest(pids, paths),
        "num_images": len(paths),
        "dataset_name": str(args.dataset_name),
        "split": split,
        "model": run.method.name,
        "img_size": [int(v) for v in args.img_size],
        "precision": str(args.precision),
    }


def cache_path(run: RunHandle, split: str) -> str:
    """Where the embeddings of ``split`` computed with the run's checkpoint are cached."""
    stem = os.path.splitext(os.path.basename(run.checkpoint))[0]
    return os.path.join(run.run_dir, CACHE_DIR, f"{split}-{stem}.pt")


def _read_cache(path: str, key: dict[str, Any]) -> torch.Tensor | None:
    """The cached ``[G, D]`` features when ``path`` holds a cache made under ``key``, else None."""
    if not os.path.isfile(path):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged cache is rebuilt, whatever torch raises for it
        logger.warning("Ignoring the unreadable gallery cache %s (%s: %s)", path, type(err).__name__, err)
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        logger.info("Gallery cache %s is stale (checkpoint, images or options changed); re-encoding", path)
        return None
    feats = data.get("feats")
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != key["num_images"]:
        logger.warning("Ignoring the malformed gallery cache %s (features of shape %s for %d images); re-encoding",
                       path, tuple(feats.shape) if isinstance(feats, torch.Tensor) else None, key["num_images"])
        return None
    if not feats.is_floating_point() or not bool(torch.isfinite(feats).all()):
        logger.warning("Ignoring the gallery cache %s: its features are not all finite numbers; re-encoding", path)
        return None
    return feats.float()


def _write_cache(path: str, key: dict[str, Any], feats: torch.Tensor) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"key": key, "feats": feats}, tmp)
        os.replace(tmp, path)
        logger.info("Cached the gallery embeddings in %s", path)
    except OSError as err:
        logger.warning("Could not write the gallery cache %s (%s); the gallery will be encoded again next time",
                       path, err)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def encode_images(model: nn.Module, run: RunHandle, paths: Sequence[str], view=None) -> torch.Tensor:
    """``[G, D]`` float32 L2-normalised embeddings of the image files, on the CPU (the test transform), encoded by
    ``view`` (default :func:`retrieval_view`)."""
    encode = _encoder(view if view is not None else retrieval_view(model, run), "image")
    dataset = ImageDataset([0] * len(paths), paths, run.test_transform())
    loader = make_loader(dataset, run.args.test_batch_size, run.args.num_workers,
                         pin_memory=run.device.type == "cuda", seed=0)
    feats = []
    with torch.inference_mode():
        for _, images in loader:
            with run.precision.autocast():
                feats.append(encode(images.to(run.device)).float())
    return F.normalize(torch.cat(feats), dim=1).cpu()


def encode_captions(model: nn.Module, run: RunHandle, captions: Sequence[str], language: str = "",
                    view=None) -> torch.Tensor:
    """``[Q, D]`` float32 L2-normalised embeddings of the captions in ``language`` (a multilingual run's query
    language), on the CPU, encoded by ``view`` (default :func:`retrieval_view`).

    Captions longer than the run's ``text_length`` are cut (as in training) with a warning.
    """
    encode = _encoder(view if view is not None else retrieval_view(model, run, language), "text")
    tokenizer = run.tokenizer()
    length = run.args.text_length
    for caption in captions:
        tokens = len(tokenizer.encode(caption)) + 2
        if tokens > length:
            logger.warning("The caption %r has %d tokens; only its first %d are used (the run's text_length)",
                           caption[:60], tokens, length)
    ids = tokenize_captions(captions, tokenizer, length)
    feats = []
    with torch.inference_mode():
        for start in range(0, len(captions), run.args.test_batch_size):
            with run.precision.autocast():
                batch = ids[start:start + run.args.test_batch_size].to(run.device)
                feats.append(encode(batch).float())
    return F.normalize(torch.cat(feats), dim=1).cpu()


def load_gallery(model: nn.Module, run: RunHandle, split: str, data: dict[str, list],
                 rebuild: bool = False) -> Gallery:
    """The split's gallery with its embeddings: from the cache when it is current, else encoded (and cached).

    Args:
        model: the run's model (see :func:`processor.run_loading.load_run_model`).
        run: the opened run.
        split: ``'test'`` or ``'val'``, part of the cache's name and key.
        data: the split (see :func:`load_split`).
        rebuild: encode even when the cache is current.
    """
    pids, paths = list(data["image_pids"]), list(data["img_paths"])
    key = cache_key(run, split, pids, paths)
    path = cache_path(run, split)
    feats = None if rebuild else _read_cache(path, key)
    if feats is not None and len(paths):
        width = encode_captions(model, run, ["person"]).shape[1]
        if feats.shape[1] != width:
            logger.warning("Ignoring the gallery cache %s: its features have %d dimensions, the model's %d; "
                           "re-encoding", path, feats.shape[1], width)
            feats = None
    if feats is not None:
        logger.info("Using the cached embeddings of %d %s images from %s", len(paths), split, path)
        return Gallery(pids, paths, feats, from_cache=True)
    logger.info("Encoding %d %s images (once; the embeddings are cached)", len(paths), split)
    feats = encode_images(model, run, paths)
    _write_cache(path, key, feats)
    return Gallery(pids, paths, feats, from_cache=False)


@dataclass(frozen=True)
class Hit:
    """One ranked gallery image: 1-based rank, cosine similarity, person id, file, index in the gallery."""

    rank: int
    score: float
    pid: int
    path: str
    index: int


def hits_at(gallery: Gallery, scores: torch.Tensor, order: torch.Tensor, ranks: Iterable[int]) -> list[Hit]:
    """The gallery images at the 1-based ``ranks`` of one query (``scores`` and ``order``: ``[G]`` rows of
    :func:`rank_gallery`); ranks beyond the gallery are skipped."""
    hits = []
    for rank in ranks:
        if rank > len(order):
            break
        index = int(order[rank - 1])
        hits.append(Hit(rank, float(scores[index]), gallery.pids[index], gallery.paths[index], index))
    return hits


def rerank_order(model: nn.Module, run: RunHandle, gallery: Gallery, caption: str, order: torch.Tensor, depth: int,
                 language: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """A two-stage method's final ranking of one query: its first ``depth`` images (of the first-stage ``order``
    ``[G]``) re-scored by the method's ``rerank`` (Bi-IRRA: the ITM head), best first, then the rest in their
    first-stage order. Returns ``(order [G], scores [depth] of the re-scored images in their new order)``."""
    view = retrieval_view(model, run, language)
    top = order[:depth]
    encode_images(model, run, [gallery.paths[int(i)] for i in top], view=view)  # the view keeps their tokens
    encode_captions(model, run, [caption], language, view=view)
    with torch.inference_mode(), run.precision.autocast():
        scores = view.rerank(torch.zeros(1, dtype=torch.long), torch.arange(len(top))[None]).float()[0].cpu()
    new = torch.sort(scores, descending=True, stable=True)
    return torch.cat([top[new.indices], order[depth:]]), new.values


def rank_gallery(query_feats: torch.Tensor, gallery_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and ranking of the gallery for each query.

    Args:
        query_feats: ``[Q, D]`` L2-normalised query embeddings.
        gallery_feats: ``[G, D]`` L2-normalised gallery embeddings.

    Returns:
        ``(scores [Q, G], order [Q, G])``: cosine similarities, and gallery indices best first (ties: lower
        index first, as in :mod:`utils.metrics`).
    """
    scores = query_feats @ gallery_feats.t()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores, order
