"""Ranking for retrieval: CMC (Rank-k), mAP and mINP, exact and memory-bounded, with an optional re-ranking step.

:func:`rank` works on a precomputed ``[Q, G]`` similarity matrix, :func:`rank_features` on query and gallery
features (the matrix is then computed one chunk of queries at a time); :mod:`utils.metrics` builds IRRA's
evaluation on them.

Ranking rule
------------
Each query sorts the gallery by descending similarity; **ties are broken by gallery index, lower index
first**, which is exactly what a *stable* descending sort gives. The rank of a gallery item (1-based) is
therefore ``1 + #{i : s_i > s_j} + #{i < j : s_i == s_j}``. The top-k indices returned by :func:`rank`
follow the same rule. Similarities are compared in their own dtype (float16/bfloat16 are widened to
float32 first, which is exact); ``-0.0`` and ``0.0`` are equal, ``±inf`` are allowed, NaN is refused.

Metrics, for a query with ``n >= 1`` correct gallery items at ranks ``r_1 < ... < r_n``:

* CMC@k is 1 if ``r_1 <= k`` else 0; the curve is averaged over **all** queries, in percent.
* AP = ``(1 / n) * sum_m m / r_m``; mAP is the mean over queries with ``n >= 1``, in percent.
* INP = ``n / r_n``; mINP is the mean over queries with ``n >= 1``, in percent.

Queries without any correct gallery item (IRRA would divide by zero and report NaN) count as misses in
CMC and are left out of mAP and mINP; a warning says how many there were. If no query has a correct item
the evaluation is meaningless and :class:`~utils.errors.UserError` is raised.

Re-ranking
----------
A method may re-score each query's top ``K`` gallery items (in the order above) with a slower model, e.g. a
cross-encoder. The final ranking puts those ``K`` items first, ordered by their new score (higher is better;
ties keep their first-stage order), followed by every other item in its first-stage order. Metrics and
top-k indices are computed on the final ranking. The fast path needs only each query's first ``K`` items and the
first-stage ranks of its correct items for that (:func:`_apply_rerank`).

Two implementations, same results
---------------------------------
``method="reference"`` (:func:`_rank_chunk_by_sorting`) sorts every row: short and obviously correct, but
``O(G log G)`` per query. ``method="fast"`` (the default, :func:`_rank_chunk_fast`) never sorts a row. Rows are
taken in blocks that stay in the CPU cache, and for each block:

1. Every score gets an integer *bin*: ``(row maximum - score) * scale``, truncated, with ``bins`` bins per row.
   A higher score never gets a higher bin number, so an item in a lower-numbered bin surely precedes one in
   a higher-numbered bin (:func:`_bin_keys`).
2. A histogram of the bins gives, for each correct item, how many items lie in lower-numbered bins; and the
   bins that hold the ``k`` best items (the *top bins*).
3. Only two kinds of item need exact comparisons: those sharing a bin with a correct item (to know which of
   them precede it) and those in the top bins (to sort them). One lookup pass gathers them
   (:func:`_scan_block`); with thousands of bins per row they are a fraction of a percent of the scores.
4. A correct item's rank is ``1 +`` the items in lower-numbered bins ``+`` the items of its own bin that
   precede it (:func:`_ranks_of_correct`); the top-k are the first ``k`` gathered top-bin items sorted by
   (score desc, index asc) (:func:`_top_k_of`).

The cost is about ten passes over each block while it is in cache, plus work proportional to the gathered
items; nothing of size ``[Q, G]`` is sorted or allocated, and from features (:func:`rank_features`) the
similarity matrix is computed one chunk of queries at a time.

The fast path has two engines (:data:`FAST_ENGINES`, chosen by :func:`set_fast_engine` or ``$IRRA_RANK_ENGINE``):
the tensor operations above, which run on any device, and for similarities on the CPU the same bins in a
compiled loop (:mod:`utils.rank_kernel`, numba) that reads each score three times (row maximum, minimum, bin)
and then makes two passes over 16-bit bins, instead of a dozen tensor passes: the default where numba imports.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import operator
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "ENGINE_VARIABLE", "FAST_ENGINES", "METHODS", "Reranker", "auto_chunk_size",
           "rank", "rank_features", "set_fast_engine"]

#: Budget for one chunk of similarities (``rank_features``) or sorted rows (``method="reference"``), used to
#: choose the query chunk size when ``chunk_size`` is None.
DEFAULT_MEMORY_BUDGET_BYTES = 128 * 2**20

#: Ranking implementations: the fast one and its sort-based reference twin.
METHODS = ("fast", "reference")

#: ``rerank(query_indices [q] int64, gallery_indices [q, K] int64) -> new scores [q, K]`` (higher is better).
Reranker = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Work bytes per similarity of a chunk: fast path, the chunk's scores when they are computed (features);
# reference, the sorted row (values and indices), its ids, hit flags, running sums and their quotients.
_BYTES_PER_SCORE = {"fast": 4, "reference": 64}
# Work bytes per (query, correct item) pair: sorted scores and indices, bins, counts, ranks.
_BYTES_PER_CORRECT = 96

# Scores per block of the fast path: small enough for the block's work tensors to stay in the CPU cache.
_BLOCK_ELEMENTS = 2**19
# Gathered items above which the fast path resolves the rows scanned so far (bounds their memory).
_MAX_CANDIDATES = 2**19
# Most bins per row; a row gets about one bin per four gallery items up to this.
_MAX_BINS = 4096

PidsLike = Union[torch.Tensor, Sequence[int]]


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------
def _as_pids(pids: PidsLike, name: str, expected: int, what: str, device: torch.device) -> torch.Tensor:
    """Turn ``pids`` into a 1-D int64 tensor on ``device`` with ``expected`` entries, or raise UserError."""
    try:
        tensor = torch.as_tensor(pids)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{name} must be a 1-D sequence of integer person ids; got {type(pids).__name__} ({exc})"
        ) from exc
    if tensor.dim() != 1:
        raise UserError(f"{name} must be 1-D (one person id per {what}); got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise UserError(f"{name} must hold integer person ids; got dtype {tensor.dtype}. Convert them with .long()")
    if tensor.numel() != expected:
        raise UserError(
            f"{name} has {tensor.numel()} entries but there are {expected} {what}s "
            f"(one person id per {what} is needed); check that ids and features come from the same loader"
        )
    return tensor.to(device=device, dtype=torch.int64)


def _nonnegative_int(value, name: str, minimum: int = 1, hint: str = "") -> int:
    """``value`` as a Python int >= ``minimum`` (numpy and 0-d tensor integers accepted), or UserError."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}{hint}; got {value!r}")
    return number


def _check_chunk_size(chunk_size) -> Optional[int]:
    return None if chunk_size is None else _nonnegative_int(chunk_size, "chunk_size", hint=" (or None for automatic)")


def _check_method(method) -> str:
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _check_rerank(rerank, rerank_topk) -> int:
    """``rerank_topk`` as an int; 0 when re-ranking is off (no callable or ``rerank_topk=0``)."""
    topk = _nonnegative_int(rerank_topk, "rerank_topk", minimum=0, hint=" (0 turns re-ranking off)")
    if rerank is not None and not callable(rerank):
        raise UserError(f"rerank must be a callable (query_indices, gallery_indices) -> scores; got {type(rerank).__name__}")
    return topk if rerank is not None else 0


def auto_chunk_size(
    num_gallery: int,
    max_correct: int = 0,
    bytes_per_element: int = 4,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> int:
    """Number of query rows whose work tensors fit in ``budget_bytes`` (at least 1): ``bytes_per_element``
    per gallery item and ``_BYTES_PER_CORRECT`` per correct item (at most ``max_correct`` per query)."""
    row_bytes = bytes_per_element * max(1, num_gallery) + _BYTES_PER_CORRECT * max_correct
    return max(1, budget_bytes // row_bytes)


# ----------------------------------------------------------------------------------------------------
# Correct items of each query
# ----------------------------------------------------------------------------------------------------
class _PidGroups:
    """Gallery indices grouped by person id, to list each query's correct gallery items without a
    ``[Q, G]`` comparison.

    Args:
        g_pids: ``[G]`` int64 gallery person ids.
    """

    def __init__(self, g_pids: torch.Tensor):
        self.order = torch.argsort(g_pids, stable=True)  # [G]; ascending gallery index inside a group
        unique, counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.unique = unique  # [U] sorted distinct ids
        self.counts = counts  # [U]
        self.starts = counts.cumsum(0) - counts  # [U] offset of each group in ``order``

    def _lookup(self, pids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.unique, pids).clamp(max=self.unique.numel() - 1)
        found = self.unique[pos] == pids
        return self.starts[pos], torch.where(found, self.counts[pos], torch.zeros_like(pos))

    def count(self, pids: torch.Tensor) -> torch.Tensor:
        """``[N]`` number of gallery items sharing each of ``pids`` ``[N]`` (0 when none)."""
        return self._lookup(pids)[1]

    def positives(self, pids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Correct gallery items of each query.

        Args:
            pids: ``[c]`` query person ids.

        Returns:
            ``(pos_idx [c, P], counts [c])``: row ``r`` lists its ``counts[r]`` correct gallery indices in
            ascending order, padded with 0 up to ``P = max(counts)``.
        """
        start, counts = self._lookup(pids)
        width = int(counts.max()) if counts.numel() else 0
        slots = torch.arange(width, device=pids.device)
        at = (start[:, None] + slots).clamp(max=self.order.numel() - 1)
        pos_idx = torch.where(slots < counts[:, None], self.order[at], torch.zeros_like(at))
        return pos_idx, counts


# ----------------------------------------------------------------------------------------------------
# Reference ranking: sort every row
# ----------------------------------------------------------------------------------------------------
def _rank_chunk_by_sorting(
    scores: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, k: int,
    rescore: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, rerank_topk: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metrics of a chunk of queries by sorting each row: the reference the fast path is tested against.

    Args:
        scores: ``[c, G]`` similarities; q_pids: ``[c]``; g_pids: ``[G]``; k: top indices to return (<= G).
        rescore: ``rescore(gallery_indices [c, K]) -> [c, K]`` new scores of each row's first ``K`` items.
        rerank_topk: ``K``; 0 ranks by ``scores`` only.

    Returns:
        ``(top [c, k], first [c], ap [c], inp [c])``: best gallery indices; rank of the first correct item
        (``G + 1`` without one); AP and INP (float64, 0 without a correct item).
    """
    num_gallery = scores.shape[1]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [c, G] gallery index at each rank
    if rescore is not None and rerank_topk > 0:
        head = order[:, :rerank_topk]
        new_order = torch.sort(rescore(head), dim=1, descending=True, stable=True).indices
        order = torch.cat([head.gather(1, new_order), order[:, rerank_topk:]], dim=1)
    hits = g_pids[order] == q_pids[:, None]  # [c, G] correct item at each rank
    positions = torch.arange(1, num_gallery + 1, device=scores.device, dtype=torch.float64)
    num_hits = hits.sum(dim=1)
    found = num_hits > 0
    ap = (hits.cumsum(dim=1) / positions * hits).sum(dim=1) / num_hits.clamp(min=1)
    last = num_gallery - hits.flip(1).to(torch.int8).argmax(dim=1)  # rank of the last correct item
    first = torch.where(found, hits.to(torch.int8).argmax(dim=1) + 1, num_gallery + 1)
    return order[:, :k], first, ap * found, num_hits / last * found


# ----------------------------------------------------------------------------------------------------
# Fast ranking: bins, one lookup pass, exact work on the few gathered items
# ----------------------------------------------------------------------------------------------------
class _Workspace:
    """Buffers for the per-block work tensors, reused from block to block."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` backed by the buffer ``name``."""
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)

    def ones(self, shape: Tuple[int, int]) -> torch.Tensor:
        """An int32 tensor of ones of ``shape`` (a broadcast row, kept filled)."""
        return self._constant("ones", shape[1], torch.int32, lambda n: torch.ones(n, dtype=torch.int32)).expand(shape)

    def arange(self, length: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``torch.arange(length)`` (kept filled)."""
        return self._constant("arange", length, dtype, lambda n: torch.arange(n, dtype=dtype))

    def _constant(self, name: str, length: int, dtype: torch.dtype, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < length:
            buffer = make(length).to(self.device)
            self._buffers[(name, dtype)] = buffer
        return buffer[:length]


def _nonzero_sparse(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices ``[N]`` of the nonzero entries of a flat, mostly-zero bool or uint8 tensor whose
    length is a multiple of 8; it is scanned 8 entries at a time through an int64 view (``nonzero`` costs
    about the same per entry scanned whatever its width)."""
    word_index = mask.view(torch.int64).nonzero().squeeze(1)  # [W] words holding a nonzero entry
    hits = mask.view(-1, 8).index_select(0, word_index).nonzero()  # [N, 2]: (word, byte)
    return word_index.index_select(0, hits[:, 0]) * 8 + hits[:, 1]


def _num_bins(num_gallery: int) -> int:
    """Bins per row: about one per four gallery items, between 16 and ``_MAX_BINS``."""
    return max(16, min(_MAX_BINS, num_gallery // 4))


def _sorted_positives(
    scores: torch.Tensor, pos_idx: torch.Tensor, counts: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's correct items in ranking order, (score desc, index asc).

    Args:
        scores: ``[c, G]``; pos_idx: ``[c, P]`` ascending, padded; counts: ``[c]`` (see :class:`_PidGroups`).

    Returns:
        ``(best_scores [c, P], best_cols [c, P], valid [c, P])``, scores widened to at least float32; padding last, with score ``-inf`` and
        gallery index 0; ``P >= 1`` (one padding slot when no row has a correct item).
    """
    if pos_idx.shape[1] == 0:
        pos_idx = pos_idx.new_zeros((pos_idx.shape[0], 1))
    valid = torch.arange(pos_idx.shape[1], device=scores.device) < counts[:, None]
    pos_scores = scores.gather(1, pos_idx)
    pos_scores = pos_scores.to(torch.promote_types(pos_scores.dtype, torch.float32)).masked_fill_(~valid, float("-inf"))
    # padding sits after the real items, so the stable sort keeps it last even next to real -inf scores;
    # pos_idx is ascending, so equal scores stay in index order
    order = torch.sort(pos_scores, dim=1, descending=True, stable=True).indices
    return pos_scores.gather(1, order), pos_idx.gather(1, order), valid


def _bin_scale(block: torch.Tensor, bins: int, label: str) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Origin and scale of each row's bins: the bin of a score is ``trunc((high - score) * scale)``.

    ``scale = (bins - 1) / (high - low)`` over the row's range; rows with infinite scores (or a range that
    overflows) use the range of their finite scores, and the bins must then be clamped to ``[0, bins - 1]``.

    Args:
        block: ``[n, G]`` floating similarities.

    Returns:
        ``(high [n], scale [n], bounded)``, in the block's dtype; ``bounded``: no clamp is needed.
    """
    high, low = block.amax(dim=1), block.amin(dim=1)
    bounded = bool(torch.isfinite(high - low).all())  # then every (high - s) * scale lies in [0, bins - 1]
    if not bounded:  # use the range of the finite scores (0 if none) and clamp
        if torch.isnan(high).any():
            raise UserError(f"the similarities of {label} contain NaN; check the features or the similarity matrix")
        finite = torch.isfinite(block)
        high = torch.nan_to_num(block.masked_fill(~finite, float("-inf")).amax(dim=1), neginf=0.0)
        low = torch.nan_to_num(block.masked_fill(~finite, float("inf")).amin(dim=1), posinf=0.0)
    scale = (bins - 1) / (high - low)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)  # equal scores, or a range that overflows
    return high, scale, bounded


def _bin_keys(block: torch.Tensor, bins: int, work: _Workspace, label: str) -> torch.Tensor:
    """Bin of every score, ``trunc((row_max - score) * scale)`` (:func:`_bin_scale`).

    Each step is one correctly rounded elementwise operation, so equal scores get equal bins and, within a
    row, ``s_i > s_j`` implies ``bin_i <= bin_j``: all the ranking relies on. Rounding keeps the product
    within ``[0, bins - 1]``; rows with infinite scores are clamped: ``+inf`` lands in bin 0 and ``-inf`` in
    the last bin.

    Args:
        block: ``[n, G]`` contiguous floating similarities.

    Returns:
        ``[n, G]`` int64 bins, in a reused buffer.
    """
    high, scale, bounded = _bin_scale(block, bins, label)
    spread = torch.sub(high[:, None], block, out=work.get("spread", block.shape, block.dtype)).mul_(scale[:, None])
    if not bounded:
        spread.clamp_(0, bins - 1)
    keys = work.get("keys32", block.shape, torch.int32).copy_(spread)  # truncation = floor here
    return work.get("keys", block.shape, torch.int64).copy_(keys)  # (faster than converting to int64 at once)


class _BlockScan(NamedTuple):
    """What :func:`_scan_block` keeps of a block of ``n`` rows (``P`` correct-item slots per row)."""

    flat: torch.Tensor  # [N] row-major positions in the block of the gathered items
    keys: torch.Tensor  # [N] their bins
    scores: torch.Tensor  # [N] their scores
    slots: torch.Tensor  # [N] int32: a correct item of the row in the same bin (its sorted slot), else -1
    top_bin: torch.Tensor  # [n] last bin holding one of the row's k best items
    correct_keys: torch.Tensor  # [n, P] bins of the sorted correct items, non-decreasing (padding: ``bins``)
    before: torch.Tensor  # [n, P] items in lower-numbered bins than each sorted correct item


def _scan_block(
    block: torch.Tensor, best_cols: torch.Tensor, valid: torch.Tensor, k: int, bins: int, work: _Workspace, label: str
) -> _BlockScan:
    """Bin a block of rows, count the bins, and gather the items that need exact comparisons: those in
    bins shared with a correct item and those in the top bins (which hold the ``k`` best items).

    Args:
        block: ``[n, G]`` contiguous similarities; best_cols, valid: ``[n, P]`` from :func:`_sorted_positives`.
        k: top items wanted per row, ``1 <= k <= G``.
    """
    num_rows, num_gallery = block.shape
    keys = _bin_keys(block, bins, work, label)
    hist = work.get("hist", (num_rows, bins), torch.int32).zero_()
    hist.scatter_add_(1, keys, work.ones(block.shape))
    upto = torch.cumsum(hist, dim=1, dtype=torch.int32, out=work.get("upto", (num_rows, bins), torch.int32))
    top_bin = torch.searchsorted(upto, torch.full((num_rows, 1), k, dtype=torch.int32, device=block.device))
    correct_keys = keys.gather(1, best_cols)  # [n, P], non-decreasing along a row (garbage in the padding)
    before = (upto.gather(1, correct_keys) - hist.gather(1, correct_keys)).masked_fill_(~valid, 0)
    correct_keys.masked_fill_(~valid, bins)  # padding: an extra column of the per-bin tables below
    # per-bin tables over [n, bins + 1]: the bins to gather (top and shared), and one correct slot of each bin
    wanted = work.get("wanted", (num_rows, bins + 1), torch.bool).zero_()
    top_width = int(top_bin.max()) + 1  # the top bins are a short prefix of each row
    torch.le(work.arange(top_width), top_bin, out=wanted[:, :top_width])
    wanted.scatter_(1, correct_keys, True)
    slot_of = work.get("slot_of", (num_rows, bins + 1), torch.int32).fill_(-1)
    slot_of.scatter_(1, correct_keys, work.arange(correct_keys.shape[1], torch.int32).expand(correct_keys.shape))
    numel = num_rows * num_gallery
    mask = work.get("mask", (numel + (-numel) % 8,), torch.bool)
    mask[numel:] = False
    torch.gather(wanted, 1, keys, out=mask[:numel].view(block.shape))
    flat = _nonzero_sparse(mask)
    item_keys = keys.view(-1).index_select(0, flat)
    rows = torch.div(flat, num_gallery, rounding_mode="floor")
    item_slots = slot_of.view(-1).index_select(0, rows * (bins + 1) + item_keys)
    return _BlockScan(flat, item_keys, block.view(-1).index_select(0, flat), item_slots, top_bin.squeeze(1),
                      correct_keys, before)


def _top_k_of(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int, k: int) -> torch.Tensor:
    """The first ``k`` items of every row by (score desc, index asc).

    Args:
        rows, cols, values: ``[N]`` items, row-major with ascending ``cols`` within a row; every row has >= k.

    Returns:
        ``[num_rows, k]`` int64 gallery indices.
    """
    per_row = torch.bincount(rows, minlength=num_rows)
    width = int(per_row.max())
    slot = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row).index_select(0, rows)
    # padding after each row's items: a stable sort keeps it behind real -inf scores
    table = torch.full((num_rows, width), float("-inf"), dtype=values.dtype, device=values.device)
    table.view(-1).index_copy_(0, rows * width + slot, values)
    order = torch.sort(table, dim=1, descending=True, stable=True).indices[:, :k]
    index = torch.zeros((num_rows, width), dtype=torch.int64, device=rows.device)
    return index.view(-1).index_copy_(0, rows * width + slot, cols).view(num_rows, width).gather(1, order)


def _place(
    best_scores: torch.Tensor, best_cols: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    values: torch.Tensor, first: torch.Tensor, span: torch.Tensor,
) -> torch.Tensor:
    """For each gathered item, how many of its row's correct items precede it or are it.

    The answer lies in ``[first, first + span]``: the correct items ``first .. first + span - 1`` share the
    item's bin, all before them precede it; a binary search over those ``span`` settles it.

    Args:
        best_scores, best_cols: ``[c, P]`` from :func:`_sorted_positives`.
        rows, cols, values: ``[N]`` row, gallery index and score of each item; first, span: ``[N]`` int64.

    Returns:
        ``[N]`` int64.
    """
    width = best_scores.shape[1]
    flat_scores, flat_cols = best_scores.reshape(-1), best_cols.reshape(-1)
    base = rows * width + first - 1
    ahead = torch.zeros_like(rows)
    for step in (1 << s for s in reversed(range(int(span.max()).bit_length() if span.numel() else 0))):
        # "correct item m precedes the item or is it" holds for a prefix of the sorted correct items
        probe = ahead + step
        at = (base + probe).clamp_(min=0, max=flat_scores.numel() - 1)
        probe_scores, probe_cols = flat_scores.index_select(0, at), flat_cols.index_select(0, at)
        precedes = (probe_scores > values) | ((probe_scores == values) & (probe_cols <= cols))
        ahead = torch.where(precedes & (probe <= span), probe, ahead)
    return first + ahead


def _ranks_of_correct(
    scans: List[_BlockScan], row_starts: List[int], best_scores: torch.Tensor, best_cols: torch.Tensor,
    valid: torch.Tensor, num_gallery: int, k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k and ranks of the correct items of consecutive scanned blocks (``c`` rows in all).

    A correct item's rank is 1 + the items in lower-numbered bins (``before``) + the items of its own bin
    that precede it, all of which were gathered. Number a row's correct items 0, 1, ... in ranking order; for
    a gathered item ``x`` in a shared bin, ``ahead(x)`` correct items precede it or are it, and
    ``end(x) = first + span`` correct items lie in its bin or lower-numbered ones. For a correct item ``m`` of
    x's bin, ``x`` precedes ``m`` iff ``ahead(x) <= m``, while ``m < end(x)``; for ``m`` in another bin,
    ``ahead(x) <= m`` and ``end(x) <= m`` hold both (x's bin is lower-numbered) or neither. So
    ``#{x : ahead(x) <= m} - #{x : end(x) <= m}`` over the row's gathered items counts m's own-bin predecessors.

    Args:
        scans: block results; row_starts: first row of each block (within these ``c`` rows).
        best_scores, best_cols, valid: ``[c, P]`` for these rows; num_gallery: ``G``.

    Returns:
        ``(top [c, k] int64, ranks [c, P] int64)``: ranks increase along a row; padding is ``G + 1``.
    """
    num_rows, width = best_scores.shape
    flat = torch.cat([scan.flat + start * num_gallery for scan, start in zip(scans, row_starts)])
    keys, values, slots = (torch.cat(parts) for parts in zip(*((scan.keys, scan.scores, scan.slots) for scan in scans)))
    top_bin, correct_keys, before = (torch.cat(parts) for parts in zip(
        *((scan.top_bin, scan.correct_keys, scan.before) for scan in scans)))
    rows = torch.div(flat, num_gallery, rounding_mode="floor")
    cols = flat - rows * num_gallery
    is_top = (keys <= top_bin.index_select(0, rows)).nonzero().squeeze(1)
    top = _top_k_of(*(t.index_select(0, is_top) for t in (rows, cols, values)), num_rows, k)

    # the correct items sharing a bin are consecutive: the first of them, and how many
    first_of = torch.searchsorted(correct_keys, correct_keys)  # [c, P]
    span_of = torch.searchsorted(correct_keys, correct_keys, right=True) - first_of
    shared = (slots >= 0).nonzero().squeeze(1)
    rows, cols, values = (t.index_select(0, shared) for t in (rows, cols, values))
    at = rows * width + slots.index_select(0, shared)
    first, span = first_of.view(-1).index_select(0, at), span_of.view(-1).index_select(0, at)
    ahead = _place(best_scores, best_cols, rows, cols, values, first, span)
    slots = width + 1
    counts = torch.bincount(rows * slots + ahead, minlength=num_rows * slots)
    counts -= torch.bincount(rows * slots + first + span, minlength=num_rows * slots)
    preceding_in_bin = counts.view(num_rows, slots)[:, :width].cumsum(dim=1)
    ranks = 1 + before.to(torch.int64) + preceding_in_bin
    return top, ranks.masked_fill_(~valid, num_gallery + 1)


def _blocks(scores: torch.Tensor, rows_per_block: int, work: _Workspace) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``(start, end, block)`` for consecutive blocks of rows of ``scores``: each block contiguous and widened
    to at least float32 (exactly), copied into a reused buffer when it is not already so."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    for start in range(0, scores.shape[0], rows_per_block):
        end = min(start + rows_per_block, scores.shape[0])
        block = scores[start:end]
        if block.dtype != dtype or not block.is_contiguous():
            block = work.get("block", block.shape, dtype).copy_(block)
        yield start, end, block


def _rank_chunk_fast(
    scores: torch.Tensor, pids: torch.Tensor, groups: _PidGroups, k: int, work: _Workspace, label: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k and ranks of the correct items of a chunk of queries, block by block (see the module docstring).

    Args:
        scores: ``[c, G]`` similarities; pids: ``[c]`` query ids; k: top items to return, ``1 <= k <= G``.
        label: names the rows in errors.

    Returns:
        ``(top [c, k], ranks [c, P], counts [c])``: ``ranks[r, :counts[r]]`` are the increasing 1-based ranks
        of row ``r``'s correct items, the rest ``G + 1``.
    """
    num_rows, num_gallery = scores.shape
    best_scores, best_cols, valid = _sorted_positives(scores, *groups.positives(pids))
    counts = valid.sum(dim=1)
    bins = _num_bins(num_gallery)
    rows_per_block = max(1, _BLOCK_ELEMENTS // num_gallery)
    tops, ranks, scans, starts, gathered, done = [], [], [], [], 0, 0
    for start, end, block in _blocks(scores, rows_per_block, work):
        scans.append(_scan_block(block, best_cols[start:end], valid[start:end], k, bins, work, label))
        starts.append(start - done)
        gathered += scans[-1].flat.numel()
        if gathered > _MAX_CANDIDATES or end == num_rows:  # resolve the rows scanned so far
            rows = slice(done, end)
            top, rank_ = _ranks_of_correct(scans, starts, best_scores[rows], best_cols[rows], valid[rows],
                                           num_gallery, k)
            tops.append(top)
            ranks.append(rank_)
            scans, starts, gathered, done = [], [], 0, end
    return torch.cat(tops), torch.cat(ranks), counts


# ----------------------------------------------------------------------------------------------------
# The fast path's engines: compiled (numba, CPU) or tensor operations (any device)
# ----------------------------------------------------------------------------------------------------
#: Engines of the fast path: ``"compiled"`` (:mod:`utils.rank_kernel`, numba; similarities on the CPU),
#: ``"tensor"`` (:func:`_rank_chunk_fast`, any device); ``"auto"`` takes the compiled one for similarities on
#: the CPU when numba can be imported. Both give the same results.
FAST_ENGINES = ("auto", "compiled", "tensor")
#: Environment variable naming the engine when :func:`set_fast_engine` has not.
ENGINE_VARIABLE = "IRRA_RANK_ENGINE"

_engine_choice: Optional[str] = None
_kernel_module = None  # utils.rank_kernel once imported; the exception when it cannot be


def set_fast_engine(engine: Optional[str]) -> Optional[str]:
    """Choose the fast path's engine, one of :data:`FAST_ENGINES` (None: ``$IRRA_RANK_ENGINE``, else
    ``"auto"``). Returns the previous choice, to restore it."""
    global _engine_choice
    if engine is not None:
        _check_engine(engine, "set_fast_engine")
    previous, _engine_choice = _engine_choice, engine
    return previous


def _check_engine(engine, where: str) -> str:
    if engine not in FAST_ENGINES:
        raise UserError(f"{where}: the ranking engine must be one of {', '.join(FAST_ENGINES)}; got {engine!r}")
    return engine


def _load_kernel():
    """:mod:`utils.rank_kernel`, or None when numba cannot be imported (said once in the log)."""
    global _kernel_module
    if _kernel_module is None:
        try:
            from utils import rank_kernel  # deferred: importing numba costs ~0.5 s and 57 MiB, paid at first use
            _kernel_module = rank_kernel
        except Exception as exc:  # ImportError; numba also raises RuntimeError where it has nowhere to cache
            _kernel_module = exc
            logger.info("numba cannot be imported (%s): ranking on the CPU uses tensor operations, several times "
                        "slower; `pip install numba` to speed it up", exc)
    return None if isinstance(_kernel_module, Exception) else _kernel_module


def _uses_compiled(device: torch.device) -> bool:
    """Whether similarities on ``device`` are ranked by the compiled kernel (see :data:`FAST_ENGINES`)."""
    engine = _engine_choice or _check_engine(os.environ.get(ENGINE_VARIABLE) or "auto", ENGINE_VARIABLE)
    if engine == "tensor":
        return False
    on_cpu = device.type == "cpu"
    if engine == "auto":
        return on_cpu and _load_kernel() is not None
    if not on_cpu:
        raise UserError(f"the compiled ranking engine runs on the CPU but the similarities are on {device}; "
                        f"choose the engine auto or tensor ({ENGINE_VARIABLE})")
    if _load_kernel() is None:
        raise UserError(f"the compiled ranking engine needs numba, which cannot be imported ({_kernel_module}); "
                        f"`pip install numba`, or choose the engine auto or tensor ({ENGINE_VARIABLE})")
    return True


def _rank_chunk_compiled(
    scores: torch.Tensor, pids: torch.Tensor, groups: _PidGroups, k: int, work: _Workspace, label: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`_rank_chunk_fast` (same arguments and results), with :func:`utils.rank_kernel.rank_row_group`.

    Rows are taken in blocks that stay in the CPU cache (the scale of their bins is computed first, then the
    kernel reads the block again); each block's rows are split among ``torch.get_num_threads()`` threads.
    """
    kernel = _load_kernel()
    num_rows, num_gallery = scores.shape
    best_scores, best_cols, valid = _sorted_positives(scores, *groups.positives(pids))  # in the blocks' dtype
    counts = valid.sum(dim=1)
    bins = _num_bins(num_gallery)
    last = best_scores.numpy().dtype.type(bins - 1)  # bins - 1 in the scores' type
    top = torch.empty((num_rows, k), dtype=torch.int64)
    ranks = torch.empty(best_scores.shape, dtype=torch.int64)
    threads = max(1, torch.get_num_threads())
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None
    try:
        rows_per_block = max(threads, _BLOCK_ELEMENTS // num_gallery)
        for start, end, block in _blocks(scores, rows_per_block, work):
            high, scale, _ = _bin_scale(block, bins, label)  # (raises on NaN)
            arguments = [t.numpy() for t in (block, high, scale)] + [last] + [
                t[start:end].numpy() for t in (best_scores, best_cols, counts)] + [
                k, bins, top[start:end].numpy(), ranks[start:end].numpy()]
            size = end - start
            if pool is None or size == 1:
                kernel.rank_row_group(*arguments, 0, size)
                continue
            parts = min(threads, size)
            bounds = [size * i // parts for i in range(parts + 1)]
            for done in [pool.submit(kernel.rank_row_group, *arguments, first, stop)
                         for first, stop in zip(bounds[:-1], bounds[1:])]:
                done.result()
    finally:
        if pool is not None:
            pool.shutdown()
    return top, ranks, counts


# ----------------------------------------------------------------------------------------------------
# Re-ranking and metrics from ranks (fast path)
# ----------------------------------------------------------------------------------------------------
def _apply_rerank(top: torch.Tensor, ranks: torch.Tensor, new_scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Final ranking after re-scoring each row's first ``K`` items.

    Args:
        top: ``[c, W]`` first-stage best gallery indices, ``W >= K``; ranks: ``[c, P]`` first-stage ranks of
            the correct items (increasing, padding larger than any rank); new_scores: ``[c, K]`` for ``top[:, :K]``.

    Returns:
        ``(top [c, W], ranks [c, P])`` of the final ranking: the ``K`` items reordered by new score (ties: first-stage
        order), the rest unchanged.
    """
    head = new_scores.shape[1]
    order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices  # [c, K] old slot at each new slot
    top = torch.cat([top[:, :head].gather(1, order), top[:, head:]], dim=1)
    new_slot = torch.empty_like(order).scatter_(1, order, torch.arange(head, device=order.device).expand_as(order))
    moved = new_slot.gather(1, (ranks - 1).clamp(max=head - 1)) + 1
    return top, torch.sort(torch.where(ranks <= head, moved, ranks), dim=1).values


def _ap_inp(ranks: torch.Tensor, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AP and INP of each query from the ranks of its correct items.

    Args:
        ranks: ``[c, P]`` increasing 1-based ranks, valid in the first ``counts[r]`` slots of row ``r``.
        counts: ``[c]`` number of correct items.

    Returns:
        ``(ap [c], inp [c])`` float64; 0 for queries without correct items.
    """
    ranks = ranks.to(torch.float64)
    slots = torch.arange(ranks.shape[1], device=ranks.device)
    n = counts.clamp(min=1).to(torch.float64)
    ap = ((slots + 1) / ranks * (slots < counts[:, None])).sum(dim=1) / n  # mean of m / r_m
    last = ranks.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)
    has_any = counts > 0
    return ap * has_any, n / last * has_any  # INP = n / r_n


# ----------------------------------------------------------------------------------------------------
# Engine shared by rank() and rank_features()
# ----------------------------------------------------------------------------------------------------
def _rescorer(rerank: Reranker, start: int, end: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``rescore(gallery_indices [c, K]) -> [c, K]``: ``rerank`` for queries ``start .. end - 1``, checked."""
    queries = torch.arange(start, end, device=device)

    def rescore(gallery_indices: torch.Tensor) -> torch.Tensor:
        new_scores = rerank(queries, gallery_indices)
        if not isinstance(new_scores, torch.Tensor) or new_scores.shape != gallery_indices.shape:
            got = tuple(new_scores.shape) if isinstance(new_scores, torch.Tensor) else type(new_scores).__name__
            raise UserError(f"rerank must return a tensor of shape {tuple(gallery_indices.shape)} (one score per "
                            f"query and gallery item it was given); got {got}")
        if not new_scores.is_floating_point() or torch.isnan(new_scores).any():
            raise UserError(f"rerank must return real scores without NaN (queries {start}..{end - 1}); "
                            f"got dtype {new_scores.dtype}")
        return new_scores.to(device)

    return rescore


def _rank_rows(
    score_rows: Callable[[int, int, _Workspace], torch.Tensor],
    num_queries: int,
    num_gallery: int,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    max_rank: int,
    chunk_size: Optional[int],
    method: str,
    rerank: Optional[Reranker],
    rerank_topk: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank all queries, chunk by chunk: ``(cmc, mAP, mINP, indices)`` as :func:`rank` returns them.

    Args:
        score_rows: ``score_rows(start, end, work) -> [end - start, G]`` similarities of those queries
            (``work`` offers reusable buffers).
        q_pids, g_pids: ``[Q]`` and ``[G]`` int64 ids on the device of the scores.
        rerank, rerank_topk: the checked re-ranking arguments (``rerank_topk`` 0: none).
    """
    groups = _PidGroups(g_pids)
    num_correct = groups.count(q_pids)  # [Q]
    num_without = int((num_correct == 0).sum())
    if num_without == num_queries:
        raise UserError(
            f"none of the {num_queries} queries shares a person id with any of the {num_gallery} gallery items; "
            "check that query and gallery ids come from the same split and use the same numbering"
        )
    if num_without:
        logger.warning(
            "%d of %d queries have no correct gallery item: they count as misses in CMC and are left out of mAP/mINP",
            num_without, num_queries,
        )
    head = min(rerank_topk, num_gallery)  # items re-scored per query
    width = min(max(max_rank, head), num_gallery)  # first-stage items needed per query
    rows_per_chunk = chunk_size or auto_chunk_size(num_gallery, int(num_correct.max()), _BYTES_PER_SCORE[method])
    device = q_pids.device
    fast_chunk = (_rank_chunk_compiled if _uses_compiled(device) else _rank_chunk_fast) if method == "fast" else None
    first_hits, top_indices = [], []
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    work = _Workspace(device)
    for start in range(0, num_queries, rows_per_chunk):
        end = min(start + rows_per_chunk, num_queries)
        scores, pids, label = score_rows(start, end, work), q_pids[start:end], f"queries {start}..{end - 1}"
        rescore = _rescorer(rerank, start, end, device) if head else None
        if method == "reference":
            if torch.isnan(scores).any():
                raise UserError(f"the similarities of {label} contain NaN; check the features or the similarity matrix")
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            top, first, ap, inp = _rank_chunk_by_sorting(scores, pids, g_pids, width, rescore, head)
        else:
            top, ranks, counts = fast_chunk(scores, pids, groups, width, work, label)
            if rescore is not None:
                top, ranks = _apply_rerank(top, ranks, rescore(top[:, :head]))
            first = ranks[:, 0]  # the padding rank G + 1 for rows without a correct item
            ap, inp = _ap_inp(ranks, counts)
        first_hits.append(first)
        top_indices.append(top[:, :max_rank].contiguous().cpu())  # a copy, not a view of a chunk's tensors
        ap_sum += ap.sum()
        inp_sum += inp.sum()
    first = torch.cat(first_hits).clamp(max=max_rank + 1)
    cmc = torch.bincount(first - 1, minlength=max_rank + 1)[:max_rank].cumsum(0).to(torch.float64)
    cmc = (cmc / num_queries * 100.0).float().cpu()
    num_valid = num_queries - num_without
    mAP = (ap_sum / num_valid * 100.0).float().cpu()
    mINP = (inp_sum / num_valid * 100.0).float().cpu()
    return cmc, mAP, mINP, torch.cat(top_indices)


# ----------------------------------------------------------------------------------------------------
# Public ranking functions
# ----------------------------------------------------------------------------------------------------
def rank(
    similarity: torch.Tensor,
    q_pids: PidsLike,
    g_pids: PidsLike,
    max_rank: int = 10,
    get_mAP: bool = True,
    *,
    chunk_size: Optional[int] = None,
    method: str = "fast",
    rerank: Optional[Reranker] = None,
    rerank_topk: int = 0,
):
    """CMC, mAP, mINP and top-k indices from a precomputed similarity matrix (see the module docstring for
    the tie rule, the treatment of queries without a correct item and the re-ranking step).

    Args:
        similarity: ``[Q, G]`` floating similarities, queries x gallery, on any device; higher is better.
        q_pids: ``[Q]`` integer person id of each query.
        g_pids: ``[G]`` integer person id of each gallery item.
        max_rank: length of the CMC curve, >= 1. May exceed ``G`` (the curve is flat beyond ``G``).
        get_mAP: return mAP and mINP too.
        chunk_size: queries per chunk; None picks it from :data:`DEFAULT_MEMORY_BUDGET_BYTES`.
        method: ``"fast"``, or ``"reference"`` for the sort-based twin (same results, much slower).
        rerank: ``rerank(query_indices [q] int64, gallery_indices [q, K] int64) -> [q, K]`` new scores (higher
            is better) of each query's first ``K`` gallery items; called chunk by chunk. Indices are rows and
            columns of ``similarity``.
        rerank_topk: ``K``; 0 (or no ``rerank``) ranks by ``similarity`` alone. May exceed ``G``.

    Returns:
        With ``get_mAP``: ``(cmc, mAP, mINP, indices)``, else ``(cmc, indices)``; all on the CPU.
        ``cmc``: ``[max_rank]`` float32, percent of queries with a correct item in their top ``k``.
        ``mAP``, ``mINP``: 0-d float32 tensors, percent.
        ``indices``: ``[Q, min(max_rank, G)]`` int64 gallery indices of each query's best items, best first.
    """
    max_rank = _nonnegative_int(max_rank, "max_rank")
    chunk_size = _check_chunk_size(chunk_size)
    method = _check_method(method)
    rerank_topk = _check_rerank(rerank, rerank_topk)
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        got = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise UserError(f"similarity must be a 2-D tensor [num_queries, num_gallery]; got {got}")
    if not similarity.is_floating_point():
        raise UserError(f"similarity must be a floating-point tensor; got dtype {similarity.dtype}")
    num_queries, num_gallery = similarity.shape
    if num_queries == 0 or num_gallery == 0:
        raise UserError(f"similarity is empty ({num_queries} queries x {num_gallery} gallery items); nothing to rank")
    q = _as_pids(q_pids, "q_pids", num_queries, "similarity row (query)", similarity.device)
    g = _as_pids(g_pids, "g_pids", num_gallery, "similarity column (gallery item)", similarity.device)
    result = _rank_rows(lambda start, end, work: similarity[start:end], num_queries, num_gallery, q, g,
                        max_rank, chunk_size, method, rerank, rerank_topk)
    return result if get_mAP else (result[0], result[3])


def rank_features(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    q_pids: PidsLike,
    g_pids: PidsLike,
    max_rank: int = 10,
    get_mAP: bool = True,
    *,
    chunk_size: Optional[int] = None,
    normalize: bool = False,
    method: str = "fast",
    rerank: Optional[Reranker] = None,
    rerank_topk: int = 0,
):
    """Same as :func:`rank` on ``query_feats @ gallery_feats.T``, without ever building that ``[Q, G]``
    matrix: similarities are computed one chunk of queries at a time.

    Args:
        query_feats: ``[Q, D]`` query features; float16/bfloat16 are widened to float32.
        gallery_feats: ``[G, D]`` gallery features, on the same device.
        q_pids, g_pids, max_rank, get_mAP, chunk_size, method, rerank, rerank_topk: as in :func:`rank`
            (re-ranking indices are rows of ``query_feats`` and ``gallery_feats``).
        normalize: L2-normalise both feature sets first (cosine similarity). Leave False for features that
            are already normalised, such as those of :meth:`utils.metrics.Evaluator.compute_embeddings`.

    Returns:
        As :func:`rank`.
    """
    max_rank = _nonnegative_int(max_rank, "max_rank")
    chunk_size = _check_chunk_size(chunk_size)
    method = _check_method(method)
    rerank_topk = _check_rerank(rerank, rerank_topk)
    for name, feats in (("query_feats", query_feats), ("gallery_feats", gallery_feats)):
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or not feats.is_floating_point():
            got = f"{tuple(feats.shape)} {feats.dtype}" if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise UserError(f"{name} must be a 2-D floating-point tensor [num_items, dim]; got {got}")
        if feats.shape[0] == 0:
            raise UserError(f"{name} is empty; nothing to rank")
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise UserError(
            f"query_feats have dimension {query_feats.shape[1]} but gallery_feats {gallery_feats.shape[1]}; "
            "both must come from the same embedding space"
        )
    if query_feats.device != gallery_feats.device:
        raise UserError(f"query_feats are on {query_feats.device} but gallery_feats on {gallery_feats.device}")
    dtype = torch.promote_types(torch.promote_types(query_feats.dtype, gallery_feats.dtype), torch.float32)
    query_feats, gallery_feats = query_feats.to(dtype), gallery_feats.to(dtype)
    if normalize:
        query_feats, gallery_feats = F.normalize(query_feats, dim=1), F.normalize(gallery_feats, dim=1)
    num_queries, num_gallery = query_feats.shape[0], gallery_feats.shape[0]
    q = _as_pids(q_pids, "q_pids", num_queries, "query feature row", query_feats.device)
    g = _as_pids(g_pids, "g_pids", num_gallery, "gallery feature row", query_feats.device)
    gallery_t = gallery_feats.t()

    def score_rows(start: int, end: int, work: _Workspace) -> torch.Tensor:
        scores = work.get("scores", (end - start, num_gallery), dtype)
        return torch.matmul(query_feats[start:end], gallery_t, out=scores)

    result = _rank_rows(score_rows, num_queries, num_gallery, q, g, max_rank, chunk_size, method, rerank, rerank_topk)
    return result if get_mAP else (result[0], result[3])
