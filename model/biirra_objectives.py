"""Bi-IRRA's training objectives as small functions.

Bi-IRRA (arXiv 2510.17685) trains with ``L = L_itc + 4 L_aitm + L_mlm + 4 L_dmim``; the weighting happens in
:class:`model.biirra_net.BiIrraCriterion`. Each function here takes its hyper-parameters as arguments and knows
nothing about processes: for a global batch, pass gathered tensors.

Shapes: ``B`` samples, ``E`` the retrieval embedding width, ``T`` tokens per sequence, ``D`` the token width,
``V`` the vocabulary size. ``pids`` are person ids ``[B]`` (int64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.errors import UserError

#: Added to every softmax probability before same-identity entries are zeroed, as X-VLM's hard-negative
#: mining does: no candidate of another identity has probability exactly 0 after underflow.
HARD_NEGATIVE_FLOOR = 1e-5


def same_identity(query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> torch.Tensor:
    """``[B]``, ``[G]`` person ids -> BoolTensor ``[B, G]``, true where the two ids are equal."""
    return query_pids.reshape(-1, 1) == gallery_pids.reshape(1, -1)


def compute_itc_pid(
    image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """Image-text contrastive loss with soft identity targets (X-VLM's ``get_contrastive_loss`` with ``idx``).

    image_feats, text_feats: ``[B, E]`` (L2-normalised here); row i of each is a matching pair.
    pids: ``[B]``. temperature: ``tau`` > 0. The logits are ``cos(v_i, t_j) / tau``; the target of row i is
    uniform over the columns j with ``pids[j] == pids[i]``. Returns the mean over rows of the cross entropy
    image -> text and text -> image, averaged over the two directions (a scalar).
    """
    image_feats = F.normalize(image_feats.float(), dim=-1)
    text_feats = F.normalize(text_feats.float(), dim=-1)
    logits = image_feats @ text_feats.t() / temperature
    positives = same_identity(pids, pids).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    # The identity matrix is symmetric, so the same targets serve both directions.
    image_to_text = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    text_to_image = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def hard_negative_weights(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    temperature: float | torch.Tensor,
    floor: float = HARD_NEGATIVE_FLOOR,
) -> torch.Tensor:
    """Unnormalised sampling weights of hard negatives: ``softmax(cos / tau) + floor``, zero for the same identity.

    query_feats ``[B, E]``, gallery_feats ``[G, E]`` (L2-normalised here); query_pids ``[B]``, gallery_pids
    ``[G]``. Returns float32 ``[B, G]`` without gradient. The softmax runs over all gallery entries (same
    identity included), as in X-VLM; only then are same-identity entries set to 0.
    """
    with torch.no_grad():
        query = F.normalize(query_feats.detach().float(), dim=-1)
        gallery = F.normalize(gallery_feats.detach().float(), dim=-1)
        tau = temperature.detach().float() if isinstance(temperature, torch.Tensor) else float(temperature)
        weights = F.softmax(query @ gallery.t() / tau, dim=1) + floor
        return weights.masked_fill(same_identity(query_pids, gallery_pids), 0.0)


def sample_hard_negatives(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    temperature: float | torch.Tensor,
    generator: torch.Generator | None = None,
    floor: float = HARD_NEGATIVE_FLOOR,
) -> torch.Tensor:
    """One hard negative per query: gallery index drawn with probability proportional to
    :func:`hard_negative_weights` (never an entry of the query's own identity).

    Arguments as :func:`hard_negative_weights`; ``generator`` makes the draw reproducible (``None``: torch's
    global generator, seeded per run). Returns LongTensor ``[B]`` of gallery indices.

    Raises:
        UserError: a query has no gallery entry of another identity (the global batch holds one person only).
    """
    weights = hard_negative_weights(query_feats, gallery_feats, query_pids, gallery_pids, temperature, floor)
    lonely = weights.sum(dim=1) <= 0
    if bool(lonely.any()):
        raise UserError(
            f"hard-negative mining found no sample of another identity for {int(lonely.sum())} sample(s): the "
            f"global batch must hold at least two identities; raise --batch_size or lower --num_instance"
        )
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_labels(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Matching labels of the ``3B`` fused pairs: ``B`` positives (1) then ``2B`` hard negatives (0)."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def compute_itm(logits: torch.Tensor) -> torch.Tensor:
    """Asymmetric image-text matching loss of one language branch.

    logits: ``[3B, 2]`` matching logits of the pairs (text_i, image_i), (text_i, hard negative image of
    text_i), (hard negative text of image_i, image_i), in that order of blocks (see :func:`itm_labels`).
    Returns the mean cross entropy (a scalar).
    """
    if logits.shape[0] % 3:
        raise ValueError(f"matching logits must hold 3B rows (B positives, 2B negatives), got {logits.shape[0]}")
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


def compute_masked_lm(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the masked tokens of one language.

    logits: ``[M, V]`` scores at the ``M`` masked positions; targets: ``[M]`` their original ids. With no
    masked token the loss is an exact 0 that belongs to the graph.
    """
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def compute_dmim(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-lingual distillation-based masked image modelling loss: ``mean(1 - cos(student, teacher))``.

    student: ``[B, T, D]`` D-MIM head outputs at every image-token position (class position included);
    teacher: ``[B, T, D]`` fused tokens of the unmasked image with the source text (no gradient flows into
    it). The mean runs over all ``B * T`` positions. Returns a scalar.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have one shape")
    cosine = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)
    return (1.0 - cosine).mean()
