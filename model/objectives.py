"""IRRA's training objectives as small functions.

Feature arguments are float tensors ``[B, D]`` (unnormalised; they are L2-normalised inside where the
loss is defined on cosine similarity). ``pids`` are person ids ``[B]`` (int64). For losses over a
global batch, pass the gathered features and ids: nothing here assumes the rows come from one process.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _same_pid(pids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B] ids -> [B, B] matrix of ``dtype``, 1 where pid_i == pid_j."""
    pids = pids.reshape(-1)
    return (pids.unsqueeze(1) == pids.unsqueeze(0)).to(dtype)


def _matching_kl(logits: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Mean over rows of KL(softmax(logits_i) || target_i): sum_j p_ij (log p_ij - log(target_ij + eps)).

    logits, target: [B, B] -> scalar.
    """
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(target + epsilon))).sum(dim=1).mean()


def compute_sdm(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: float | torch.Tensor,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Similarity Distribution Matching.

    image_feats, text_feats: [B, D]; pids: [B]; logit_scale: s = 1 / temperature.
    The target distribution of row i is uniform over the columns with the same pid. With
    logits s * cos(image_i, text_j), the loss is KL(image -> text) + KL(text -> image). Returns a scalar.
    """
    labels = _same_pid(pids, image_feats.dtype)
    target = labels / labels.sum(dim=1, keepdim=True)
    logits = logit_scale * F.normalize(image_feats, dim=1) @ F.normalize(text_feats, dim=1).t()
    return _matching_kl(logits, target, epsilon) + _matching_kl(logits.t(), target, epsilon)


def compute_itc(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """InfoNCE over the batch: (CE(image -> text, diagonal) + CE(text -> image, diagonal)) / 2.

    image_feats, text_feats: [B, D]; row i of each is a matching pair. Returns a scalar.
    """
    logits = logit_scale * F.normalize(image_feats, dim=1) @ F.normalize(text_feats, dim=1).t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def compute_id(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Identity classification: (CE(image_logits, labels) + CE(text_logits, labels)) / 2.

    image_logits, text_logits: [B, num_classes]; labels: [B]. Returns a scalar.
    """
    return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2


def compute_mlm(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-token prediction: cross entropy over positions whose label is not 0.

    scores: [N, V] logits; labels: [N] token ids, 0 = not masked. With no masked position the loss is
    an exact 0 that still belongs to the graph (instead of NaN).
    """
    if not bool((labels != 0).any()):
        return scores.sum() * 0.0
    return F.cross_entropy(scores, labels, ignore_index=0)


def compute_cmpm(
    image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, epsilon: float = 1e-8
) -> torch.Tensor:
    """Cross-Modal Projection Matching, as IRRA computes it.

    image_feats, text_feats: [B, D]; pids: [B]. Logits are projections of the unnormalised features of
    one modality on the normalised features of the other; the target row is the same-pid mask divided
    by its L2 norm. Returns KL(image -> text) + KL(text -> image), a scalar.
    """
    labels = _same_pid(pids, image_feats.dtype)
    target = labels / labels.norm(dim=1, keepdim=True)
    image_proj_text = image_feats @ F.normalize(text_feats, dim=1).t()
    text_proj_image = text_feats @ F.normalize(image_feats, dim=1).t()
    return _matching_kl(image_proj_text, target, epsilon) + _matching_kl(text_proj_image, target, epsilon)
