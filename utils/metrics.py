"""Retrieval evaluation as IRRA reports it: R1/R5/R10, mAP and mINP of text-to-image (and image-to-text) search.

The ranking itself, its rules (ties, queries without a correct item, re-ranking) and its two implementations
live in :mod:`utils.ranking`; :func:`rank` and :func:`rank_features` are re-exported here, where IRRA had them.
Convention (as IRRA): captions are the queries, images the gallery, and the similarity of a query and a
gallery item is the dot product of their L2-normalised features. ``i2t`` swaps the two roles.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Dict, Iterable, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from prettytable import PrettyTable

from utils.errors import UserError
from utils.ranking import METHODS, PidsLike, Reranker, _check_chunk_size, _check_method, _nonnegative_int, rank, rank_features

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "RESULT_KEYS", "Evaluator", "evaluate", "format_results", "rank", "rank_features"]

# Keys of the per-direction result dictionaries, in table order.
RESULT_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def evaluate(
    text_feats: torch.Tensor,
    image_feats: torch.Tensor,
    q_pids: PidsLike,
    g_pids: PidsLike,
    i2t: bool = False,
    *,
    chunk_size: Optional[int] = None,
    normalize: bool = True,
    method: str = "fast",
    rerank: Optional[Reranker] = None,
    rerank_topk: int = 0,
    name: str = "",
) -> Dict[str, Dict[str, float]]:
    """Text-to-image (and optionally image-to-text) retrieval metrics from features.

    Args:
        text_feats: ``[Q, D]`` caption features (the t2i queries).
        image_feats: ``[G, D]`` image features (the t2i gallery).
        q_pids: ``[Q]`` person id of each caption.
        g_pids: ``[G]`` person id of each image.
        i2t: also evaluate images as queries against captions as gallery.
        chunk_size: queries per chunk (None: automatic).
        normalize: L2-normalise the features (cosine similarity); idempotent for normalised features.
        method: ranking implementation (see :func:`rank`).
        rerank, rerank_topk: re-ranking of the t2i direction (see :func:`rank`; query indices are caption
            rows, gallery indices image rows). The i2t direction is ranked by similarity alone.
        name: the query set's name (e.g. a language); the tasks become ``t2i-<name>`` and ``i2t-<name>``.

    Returns:
        ``{'t2i': {'R1', 'R5', 'R10', 'mAP', 'mINP'}}`` (plus ``'i2t'`` when asked), Python floats in percent.
    """
    suffix = f"-{name}" if name else ""
    directions = [("t2i", text_feats, image_feats, q_pids, g_pids, rerank)]
    if i2t:
        directions.append(("i2t", image_feats, text_feats, g_pids, q_pids, None))
    results = {}
    for task, queries, gallery, query_ids, gallery_ids, reranker in directions:
        cmc, mAP, mINP, _ = rank_features(
            queries, gallery, query_ids, gallery_ids, max_rank=10, chunk_size=chunk_size, normalize=normalize,
            method=method, rerank=reranker, rerank_topk=rerank_topk if reranker is not None else 0,
        )
        values = (cmc[0], cmc[4], cmc[9], mAP, mINP)
        results[task + suffix] = {key: float(value) for key, value in zip(RESULT_KEYS, values)}
    return results


def format_results(results: Dict[str, Dict[str, float]]) -> str:
    """The ``task | R1 | R5 | R10 | mAP | mINP`` table of :func:`evaluate`'s results, 3 decimals."""
    table = PrettyTable(["task", *RESULT_KEYS])
    for task, metrics in results.items():
        table.add_row([task, *(f"{metrics[key]:.3f}" for key in RESULT_KEYS)])
    return table.get_string()


# ----------------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------------
class _Encoders(NamedTuple):
    """What the Evaluator calls on a model."""

    images: Callable[[torch.Tensor], torch.Tensor]  # [B, 3, H, W] -> [B, D]
    texts: Callable[[torch.Tensor], torch.Tensor]  # [B, L] -> [B, D]
    rerank: Optional[Reranker]


def _encoders_of(model) -> _Encoders:
    """The encode functions (and re-ranker, if any) of a model or retrieval object."""
    rerank = getattr(model, "rerank", None)
    rerank = rerank if callable(rerank) else None
    for images, texts in (("encode_images", "encode_texts"), ("encode_image", "encode_text")):
        if callable(getattr(model, images, None)) and callable(getattr(model, texts, None)):
            return _Encoders(getattr(model, images), getattr(model, texts), rerank)
    raise UserError(f"cannot evaluate a {type(model).__name__}: it needs encode_image and encode_text methods "
                    "(or encode_images and encode_texts)")


def _device_of(model) -> torch.device:
    """The device of a module's first parameter or buffer, else the object's ``device`` attribute, else CPU."""
    if isinstance(model, torch.nn.Module):
        tensor = next(model.parameters(), None)
        tensor = tensor if tensor is not None else next(model.buffers(), None)
        if tensor is not None:
            return tensor.device
    return torch.device(getattr(model, "device", None) or "cpu")


class Evaluator:
    """Encodes a test split with a model and reports retrieval metrics (IRRA's ``Evaluator``).

    The model is either a module with IRRA's ``encode_image(images [B, 3, H, W]) -> [B, D]`` and
    ``encode_text(caption_ids [B, L]) -> [B, D]``, or any object with ``encode_images`` and ``encode_texts``
    of the same shapes; either may also have ``rerank(query_indices [q], gallery_indices [q, K]) -> [q, K]``
    (new scores, higher is better) that re-scores each caption's first ``K = rerank_topk`` images. Query and
    gallery indices count captions and images in loader order. The calls come in this order: ``encode_images``
    over the whole gallery, then per query set ``encode_texts`` over all its captions followed by its ``rerank``
    calls, so a re-ranker may keep what its encoders computed (e.g. image tokens).

    Args:
        img_loader: yields ``(pids [B], images [B, 3, H, W])`` — the gallery.
        txt_loader: yields ``(pids [B], caption_ids [B, L])`` — the queries; or a mapping of query set names
            (e.g. languages) to such loaders, each evaluated against the same gallery (tasks ``t2i-<name>``).
        autocast: callable returning a context manager to run the encoders in (e.g. the precision helper's
            autocast factory); None runs them as they are.
        chunk_size: queries per ranking chunk (None: automatic).
        rerank_topk: images re-scored per caption by the model's ``rerank``; 0 ranks by similarity alone.
        method: ranking implementation (see :func:`rank`).
        wrap: turns the model given to :meth:`eval` into the object it is evaluated with (a method's retrieval
            object); None evaluates the model itself.

    After :meth:`eval`, ``last_results`` holds the full metrics dictionary of :func:`evaluate`.
    """

    def __init__(
        self,
        img_loader: Iterable,
        txt_loader: Union[Iterable, Mapping[str, Iterable]],
        *,
        autocast: Optional[Callable[[], ContextManager]] = None,
        chunk_size: Optional[int] = None,
        rerank_topk: int = 0,
        method: str = "fast",
        wrap: Optional[Callable[[torch.nn.Module], object]] = None,
    ):
        self.img_loader = img_loader
        self.wrap = wrap
        self.query_sets = dict(txt_loader) if isinstance(txt_loader, Mapping) else {"": txt_loader}
        if not self.query_sets:
            raise UserError("txt_loader is an empty mapping; give at least one query set")
        self.autocast = autocast
        self.chunk_size = _check_chunk_size(chunk_size)
        self.rerank_topk = _nonnegative_int(rerank_topk, "rerank_topk", minimum=0, hint=" (0 turns re-ranking off)")
        self.method = _check_method(method)
        self.last_results: Dict[str, Dict[str, float]] = {}

    @property
    def txt_loader(self) -> Iterable:
        """The query loader (the first one when there are several query sets)."""
        return next(iter(self.query_sets.values()))

    def _running(self) -> ContextManager:
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    def _encode(
        self, loader: Iterable, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, what: str
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run ``encode`` over a loader of ``(pids, inputs)`` in inference mode: ``(feats [N, D], pids [N])``,
        features float32 L2-normalised on ``device``, ids int64 on the CPU; ordinary tensors."""
        feats, pids = [], []
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], torch.Tensor):
                shape = f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
                raise UserError(
                    f"the {what} loader must yield (pids, {what} tensor) pairs; got a {type(batch).__name__}{shape}"
                )
            batch_pids = torch.as_tensor(batch[0]).reshape(-1).cpu()
            with torch.inference_mode(), self._running():
                out = encode(batch[1].to(device, non_blocking=True))
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch_pids.numel():
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(
                    f"encoding a batch of {batch_pids.numel()} {what} gave features of shape {got}; "
                    "expected [batch, dim] with one row per id"
                )
            feats.append(out.float())
            pids.append(batch_pids)
        if not feats:
            raise UserError(f"the {what} loader is empty; check the test split")
        # concatenated outside inference mode, so that callers may modify the results in place
        return F.normalize(torch.cat(feats), dim=1), torch.cat(pids)

    @contextlib.contextmanager
    def _evaluating(self, model) -> Iterator[None]:
        """``model`` (if a module) in eval mode for the block; every submodule's mode is restored afterwards."""
        modes = [(module, module.training) for module in model.modules()] if isinstance(model, torch.nn.Module) else []
        if modes:
            model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    def _reranker(self, rerank: Optional[Reranker]) -> Optional[Reranker]:
        """``rerank`` run in inference mode and autocast, or None when re-ranking is off."""
        if not self.rerank_topk:
            return None
        if rerank is None:
            raise UserError(f"rerank_topk={self.rerank_topk} asks for re-ranking, but the model has no rerank "
                            "method; set rerank_topk to 0")

        def run(query_indices: torch.Tensor, gallery_indices: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), self._running():
                return rerank(query_indices, gallery_indices).float()

        return run

    def compute_embeddings(self, model, query_set: Optional[str] = None):
        """Encode the captions of one query set (the only one by default) and all images, the model in eval mode.

        Returns:
            ``(text_feats [Q, D], image_feats [G, D], q_pids [Q], g_pids [G])``: float32, L2-normalised
            features on the model's device; int ids on the CPU. Ordinary tensors (not inference tensors).
        """
        if query_set is None and len(self.query_sets) > 1:
            raise UserError(f"there are several query sets ({', '.join(self.query_sets)}); name one as query_set")
        loader = self.query_sets[query_set if query_set is not None else next(iter(self.query_sets))]
        encoders, device = _encoders_of(model), _device_of(model)
        with self._evaluating(model):
            image_feats, g_pids = self._encode(self.img_loader, encoders.images, device, "images")
            text_feats, q_pids = self._encode(loader, encoders.texts, device, "captions")
        return text_feats, image_feats, q_pids, g_pids

    def eval(self, model, i2t_metric: bool = False) -> float:
        """Evaluate ``model``; logs the metrics table and returns the text-to-image Rank-1 (percent), the mean
        over the query sets when there are several (the final ranking of a two-stage method).

        With ``wrap`` the model is first turned into the retrieval object the method evaluates with. An object
        with ``for_query_set(name)`` gives each query set its own text encoders and re-ranker (e.g. a language's
        projection); the images are encoded once, by the object itself. With re-ranking, the first stage is
        reported too, as ``t2i[-<name>]-stage1``.
        """
        target = self.wrap(model) if self.wrap is not None else model
        encoders, device = _encoders_of(target), _device_of(target)
        results: Dict[str, Dict[str, float]] = {}
        final_r1 = []
        with self._evaluating(model):
            image_feats, g_pids = self._encode(self.img_loader, encoders.images, device, "images")
            for name, loader in self.query_sets.items():
                per_set = target.for_query_set(name) if callable(getattr(target, "for_query_set", None)) else target
                set_encoders = _encoders_of(per_set)
                rerank = self._reranker(set_encoders.rerank)
                text_feats, q_pids = self._encode(loader, set_encoders.texts, device, "captions")
                common = dict(chunk_size=self.chunk_size, normalize=False, method=self.method)
                if rerank is not None:
                    results.update(evaluate(text_feats, image_feats, q_pids, g_pids,
                                            name=f"{name}-stage1" if name else "stage1", **common))
                found = evaluate(text_feats, image_feats, q_pids, g_pids, i2t=i2t_metric, rerank=rerank,
                                 rerank_topk=self.rerank_topk, name=name, **common)
                results.update(found)
                final_r1.append(found[f"t2i-{name}" if name else "t2i"]["R1"])
        self.last_results = results
        logger.info("\n%s", format_results(results))
        return float(sum(final_r1) / len(final_r1))
