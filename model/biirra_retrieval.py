"""Bi-IRRA's two-stage retrieval: rank by ITC cosine, then re-score each query's top k by the ITM match logit.

Stage 1 ranks the whole gallery by the cosine of the global features. Stage 2 fuses each query's caption with
each of its top ``k`` gallery images (the text attends to the image) and scores the pair by the ITM head's
match logit (column 1 of its two logits, as Bi-IRRA's released evaluation does). The re-scored items come first,
in the order of their match logits; every item outside the top ``k`` keeps its stage-1 order below them.

The released code instead writes -100 for every item outside the top k: they tie, so their order (and with it
the rank of a true match outside the top k, i.e. mAP and R@n for n > k) depends on how the sort breaks ties.
Here the order below the top k is the stage-1 order, which is deterministic and never worse.

:class:`BiIrraRetrieval` encodes images and captions once (global features and tokens) and re-scores pairs in
chunks of a bounded number of pairs; :func:`make_rerank_callback` turns it and the cached tokens into the
evaluator's re-ranking callback ``rerank(query_indices [q], gallery_indices [q, K]) -> scores [q, K]``;
:func:`two_stage_scores` is the short dense reference of the whole procedure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.biirra_net import BiIRRA
from utils.errors import UserError

#: ``rerank(query_indices LongTensor[q], gallery_indices LongTensor[q, K]) -> FloatTensor[q, K]``
RerankFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BiIrraRetrieval:
    """Evaluation-time encoders and the stage-2 scorer of one query language.

    Args:
        model: a trained :class:`BiIRRA` (put in eval mode here).
        language: the query language (a code of ``model.languages``; None = the source language); it chooses
            the text projection.
        pairs_per_batch: how many (caption, image) pairs the fusion encoder scores at once — this bounds the
            memory of stage 2 (about ``pairs_per_batch * (L + T) * D`` activations per layer).
    """

    def __init__(self, model: BiIRRA, language: str | None = None, pairs_per_batch: int = 256) -> None:
        if pairs_per_batch < 1:
            raise UserError(f"--biirra_rerank_batch must be at least 1, got {pairs_per_batch}")
        self.model = model.eval()
        self.role = model.role_of(language)
        self.pairs_per_batch = pairs_per_batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (global features [B, E] float32 L2-normalised, image tokens [B, 1 + N, D])."""
        tokens = self.model.image_tokens(images.to(self.device))
        return self.model.project_image(tokens[:, 0]), tokens

    @torch.no_grad()
    def encode_texts(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, L] (mask [B, L]; None = ``ids != pad``) -> (global features [B, E] float32 L2-normalised,
        text tokens [B, L, D], attention mask [B, L] bool)."""
        ids = ids.to(self.device)
        mask = (ids != self.model.pad_id) if attention_mask is None else attention_mask.to(self.device).bool()
        tokens = self.model.text_tokens(ids, mask)
        return self.model.project_text(tokens[:, 0], self.role), tokens, mask

    @torch.no_grad()
    def rerank(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, gallery_tokens: torch.Tensor,
               gallery_indices: torch.Tensor) -> torch.Tensor:
        """ITM match logits of each query with its candidate gallery items.

        text_tokens [q, L, D] and text_mask [q, L] of ``q`` queries; gallery_tokens [G, 1 + N, D] (the image
        tokens of the gallery, on any device); gallery_indices LongTensor [q, k] into the gallery.
        Returns float32 [q, k] on ``gallery_indices``' device; pairs are scored ``pairs_per_batch`` at a time.
        """
        if gallery_indices.dim() != 2 or gallery_indices.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"gallery_indices must be [q, k] with q = {text_tokens.shape[0]} queries, "
                             f"got {tuple(gallery_indices.shape)}")
        q, k = gallery_indices.shape
        scores = torch.empty(q * k, dtype=torch.float32)
        rows = torch.arange(q).repeat_interleave(k)
        cols = gallery_indices.reshape(-1).cpu()
        for start in range(0, q * k, self.pairs_per_batch):
            part = slice(start, start + self.pairs_per_batch)
            r, c = rows[part], cols[part]
            logits = self.model.match_logits(text_tokens[r.to(text_tokens.device)].to(self.device),
                                             text_mask[r.to(text_mask.device)].to(self.device),
                                             gallery_tokens[c.to(gallery_tokens.device)].to(self.device))
            scores[part] = logits[:, 1].cpu()
        return scores.view(q, k).to(gallery_indices.device)


def make_rerank_callback(retrieval: BiIrraRetrieval, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                         image_tokens: torch.Tensor) -> RerankFn:
    """The evaluator's re-ranking callback over cached tokens.

    text_tokens [Q, L, D], text_mask [Q, L] of every query and image_tokens [G, 1 + N, D] of every gallery
    item, from :meth:`BiIrraRetrieval.encode_texts` / :meth:`~BiIrraRetrieval.encode_images` (keep them on
    the CPU to spare accelerator memory). The callback maps query_indices LongTensor [q] and gallery_indices
    LongTensor [q, K] to match logits FloatTensor [q, K].
    """
    if text_tokens.shape[0] != text_mask.shape[0]:
        raise ValueError(f"{text_tokens.shape[0]} text token rows but {text_mask.shape[0]} mask rows")

    def rerank(query_indices: torch.Tensor, gallery_indices: torch.Tensor) -> torch.Tensor:
        return retrieval.rerank(text_tokens[query_indices.to(text_tokens.device)],
                                text_mask[query_indices.to(text_mask.device)], image_tokens, gallery_indices)

    return rerank


def top_k_indices(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """similarity [q, G] -> LongTensor [q, min(k, G)]: each row's k highest entries, ties broken by the lower
    gallery index (a stable sort, so the selection is deterministic)."""
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    return order[:, : min(k, similarity.shape[1])]


def two_stage_scores(similarity: torch.Tensor, rerank: RerankFn, topk: int) -> torch.Tensor:
    """Dense reference of Bi-IRRA's evaluation: final scores [q, G] float64 from stage-1 similarity [q, G].

    Each row's top ``topk`` items (:func:`top_k_indices`) get their re-ranking scores; every other item gets a
    score below the row's lowest re-ranking score that keeps its stage-1 order (and stage-1 ties). With
    ``topk == 0`` the result is the stage-1 similarity. Memory is ``q * G``: meant for tests and small galleries.
    """
    final = similarity.double().clone()
    if topk <= 0:
        return final
    top = top_k_indices(similarity, topk)
    stage2 = rerank(torch.arange(similarity.shape[0], device=similarity.device), top).double().to(final.device)
    rest = torch.ones_like(final, dtype=torch.bool).scatter_(1, top, False)
    if bool(rest.any()):
        # Shift the rest so that its best item sits 1 below the lowest re-scored item; differences are kept.
        best_rest = final.masked_fill(~rest, float("-inf")).amax(dim=1, keepdim=True)
        shifted = final - best_rest + stage2.amin(dim=1, keepdim=True) - 1.0
        final = torch.where(rest, shifted, final)
    return final.scatter(1, top, stage2)


class BiIrraEvaluation:
    """What :class:`utils.metrics.Evaluator` needs of a Bi-IRRA model (its ``wrap``): global features to rank by,
    and per query language the language's text projection and the ITM re-ranker.

    The gallery's image tokens are kept on the CPU (stage 2 fuses every query with its top-k images); the
    captions' tokens are not: each re-ranking chunk encodes its queries' captions again, so memory grows with the
    gallery only.

    Args:
        model: a trained :class:`BiIRRA`.
        pairs_per_batch: (caption, image) pairs the fusion encoder scores at once.
        language: the query language of this object's texts (None: the source language).
    """

    def __init__(self, model: BiIRRA, pairs_per_batch: int = 256, language: str | None = None,
                 _image_tokens: list | None = None) -> None:
        self.retrieval = BiIrraRetrieval(model, language, pairs_per_batch)
        self._image_tokens = _image_tokens if _image_tokens is not None else []
        self._gallery: torch.Tensor | None = None
        self._caption_ids: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.retrieval.device

    def for_query_set(self, name: str) -> "BiIrraEvaluation":
        """The encoders and re-ranker of query language ``name`` ('' = the source language), sharing the gallery."""
        return BiIrraEvaluation(self.retrieval.model, self.retrieval.pairs_per_batch, name or None,
                                self._image_tokens)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> global features [B, E]; the image tokens are kept for re-ranking."""
        feats, tokens = self.retrieval.encode_images(images)
        self._image_tokens.append(tokens.cpu())
        return feats

    def encode_texts(self, ids: torch.Tensor) -> torch.Tensor:
        """caption ids [B, L] -> global features [B, E] with this language's projection."""
        self._caption_ids.append(ids.cpu())
        return self.retrieval.encode_texts(ids)[0]

    def rerank(self, query_indices: torch.Tensor, gallery_indices: torch.Tensor) -> torch.Tensor:
        """ITM match logits [q, K] of queries ``query_indices`` [q] with their candidates ``gallery_indices`` [q, K]."""
        if self._gallery is None:
            self._gallery = torch.cat(self._image_tokens)
        ids = torch.cat(self._caption_ids)[query_indices.cpu()]
        _, tokens, mask = self.retrieval.encode_texts(ids)
        return self.retrieval.rerank(tokens, mask, self._gallery, gallery_indices)
