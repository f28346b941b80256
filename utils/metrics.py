"""Retrieval evaluation: CMC (Rank-k), mAP and mINP, exact, fast and memory-bounded.

Convention (as IRRA): captions are the queries, images the gallery, and the similarity of a query and a
gallery item is the dot product of their L2-normalised features. ``i2t`` swaps the two roles.

Ranking rule
------------
Each query sorts the gallery by descending similarity; **ties are broken by gallery index, lower index
first**, which is exactly what a *stable* descending sort gives. The rank of a gallery item (1-based) is
therefore ``1 + #{i : s_i > s_j} + #{i < j : s_i == s_j}``. The top-k indices returned by :func:`rank`
follow the same rule. Similarities are compared in their own dtype (float16/bfloat16 are widened to
float32 first, which is exact); ``-0.0`` and ``0.0`` are equal, NaN is refused.

Metrics, for a query with ``n >= 1`` correct gallery items at ranks ``r_1 < ... < r_n``:

* CMC@k is 1 if ``r_1 <= k`` else 0; the curve is averaged over **all** queries, in percent.
* AP = ``(1 / n) * sum_m m / r_m``; mAP is the mean over queries with ``n >= 1``, in percent.
* INP = ``n / r_n``; mINP is the mean over queries with ``n >= 1``, in percent.

Queries without any correct gallery item (IRRA would divide by zero and report NaN) count as misses in
CMC and are left out of mAP and mINP; a warning says how many there were. If no query has a correct item
the evaluation is meaningless and :class:`~utils.errors.UserError` is raised.

How it stays fast and small
---------------------------
Nothing of size ``[Q, G]`` is sorted or allocated. Queries are processed in chunks of rows (sized from a
memory budget unless ``chunk_size`` is given) and per chunk, with buffers reused from chunk to chunk:

1. The maxima of blocks of consecutive gallery items give each row a threshold ``tau`` that at least
   ``max_rank + 1`` items reach (the (k+1)-th largest block maximum).
2. Every score is mapped to one of ``bins`` per-row bins by a monotone function stretched between
   ``min(worst correct item, tau)`` and the row maximum, and a histogram of the bins is counted. These
   passes over every score run on blocks of rows small enough to stay in the CPU cache.
3. An item in a higher (lower) bin than a correct item surely precedes (follows) it, so the histogram
   settles all items but those sharing a bin with a correct item. Those, and the items in bins at or
   above ``tau``'s (the top-k candidates), are gathered in one scan — a few hundred per row — and
   compared exactly: each is placed among its query's sorted correct items by a vectorised binary search,
   and the top-k candidates are sorted by (score desc, index asc).

The cost is a handful of elementwise passes over the chunk plus work proportional to the gathered items;
rows with infinite scores (or galleries too small for step 1) compare every item above their range's
low end instead, which is exact but slower.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
from typing import Callable, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from prettytable import PrettyTable

from utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Evaluator",
    "auto_chunk_size",
    "evaluate",
    "format_results",
    "rank",
    "rank_features",
]

#: Work-tensor budget used to choose the query chunk size when ``chunk_size`` is None.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# Work bytes per (query, gallery) element of a chunk: scan mask (1) and, when the scores must be widened
# or made contiguous, their copy (up to 8). The bin passes use buffers of _BLOCK_ELEMENTS items only.
_BYTES_PER_ELEMENT = 9
# Work bytes per (query, correct item) pair: sorted scores and indices, bin numbers, ranks, sums.
_BYTES_PER_CORRECT = 96
# Work bytes per item compared exactly: coordinates, score, bin, flags, search state. A chunk whose
# candidates would exceed the budget is halved.
_BYTES_PER_CANDIDATE = 128

# Scores binned per pass: rows are taken in blocks of about this many items so that the work stays in cache.
_BLOCK_ELEMENTS = 2**19

# Widest block of the block maxima that bound the top-k search (see _top_threshold).
_TOP_BLOCK = 64

# Gallery index of padding among a query's sorted correct items: after every real index.
_NO_INDEX = torch.iinfo(torch.int64).max

# Keys of the per-direction result dictionaries, in table order.
RESULT_KEYS = ("R1", "R5", "R10", "mAP", "mINP")

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


def _positive_int(value, name: str, hint: str = "") -> int:
    """``value`` as a Python int >= 1 (numpy and 0-d tensor integers accepted), or UserError."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise UserError(f"{name} must be an integer >= 1{hint}; got {value!r}")
    return number


def _check_max_rank(max_rank) -> int:
    return _positive_int(max_rank, "max_rank")


def _check_chunk_size(chunk_size) -> Optional[int]:
    return None if chunk_size is None else _positive_int(chunk_size, "chunk_size", " (or None for automatic)")


def auto_chunk_size(
    num_gallery: int,
    max_correct: int = 0,
    bytes_per_element: int = _BYTES_PER_ELEMENT,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> int:
    """Number of query rows whose work tensors fit in ``budget_bytes`` (at least 1): ``bytes_per_element``
    per gallery item and ``_BYTES_PER_CORRECT`` per correct item (at most ``max_correct`` per query)."""
    row_bytes = bytes_per_element * max(1, num_gallery) + _BYTES_PER_CORRECT * max_correct
    return max(1, budget_bytes // row_bytes)


# ----------------------------------------------------------------------------------------------------
# Ranking core
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

    def count(self, pids: torch.Tensor) -> torch.Tensor:
        """``[N]`` number of gallery items sharing each of ``pids`` ``[N]`` (0 when none)."""
        return self._lookup(pids)[1]

    def _lookup(self, pids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(self.unique, pids).clamp(max=self.unique.numel() - 1)
        found = self.unique[pos] == pids
        return self.starts[pos], torch.where(found, self.counts[pos], torch.zeros_like(pos))

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


class _Workspace:
    """Buffers for the ``[chunk, G]`` work tensors, reused from chunk to chunk."""

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

    def get_mask(self, name: str, numel: int) -> torch.Tensor:
        """A flat bool buffer of ``numel`` entries rounded up to a multiple of 8, the padding False."""
        padded = numel + (-numel) % 8
        mask = self.get(name, (padded,), torch.bool)
        mask[numel:] = False
        return mask


def _nonzero_sparse(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices ``[N]`` of the True entries of a flat, mostly-False bool tensor whose length is
    a multiple of 8; it is scanned 8 entries at a time through an int64 view."""
    word_index = mask.view(torch.int64).nonzero().squeeze(1)  # [W] words holding a True entry
    hits = mask.view(-1, 8).index_select(0, word_index).nonzero()  # [N, 2]: (word, byte)
    return word_index.index_select(0, hits[:, 0]) * 8 + hits[:, 1]


def _num_bins(rows: int, num_gallery: int) -> int:
    """Histogram bins per row: about one per 16 gallery items, between 8 and 1024, and
    ``rows * bins <= 2**21`` so that bin numbers are exact in float32 and fit int32."""
    return max(8, min(1024, num_gallery // 16, 2**21 // max(1, rows)))


def _top_threshold(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A per-row score ``tau`` that at least ``k + 1`` items reach, cheaply: the (k+1)-th largest of the
    maxima of blocks of consecutive items.

    Args:
        scores: ``[c, G]`` similarities.

    Returns:
        ``(tau [c], row_max [c])``: ``tau`` is ``-inf`` when there are too few blocks (every item counts);
        ``row_max`` is NaN for rows containing NaN.
    """
    num_gallery = scores.shape[1]
    width = max(1, min(_TOP_BLOCK, num_gallery // (4 * (k + 1))))
    full = num_gallery // width
    block_max = [scores.unfold(1, width, width).amax(dim=2)]  # [c, full]
    if num_gallery % width:
        block_max.append(scores[:, full * width :].amax(dim=1, keepdim=True))
    block_max = torch.cat(block_max, dim=1)
    row_max = block_max.amax(dim=1)
    if block_max.shape[1] <= k:
        return torch.full_like(row_max, float("-inf")), row_max
    return torch.topk(block_max, k + 1, dim=1).values[:, -1], row_max


def _sorted_positives(
    scores: torch.Tensor, pos_idx: torch.Tensor, counts: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's correct items sorted by (score desc, index asc).

    Args:
        scores: ``[c, G]``; pos_idx: ``[c, P]`` ascending, padded; counts: ``[c]`` (see :class:`_PidGroups`).

    Returns:
        ``(best_scores [c, P], best_index [c, P], valid [c, P], worst [c])``: padding last, as score
        ``-inf`` and index ``_NO_INDEX`` (so that it precedes nothing); ``worst`` is the score of the last
        correct item, ``+inf`` for rows without any.
    """
    valid = torch.arange(pos_idx.shape[1], device=scores.device) < counts[:, None]
    pos_scores = scores.gather(1, pos_idx).masked_fill(~valid, float("-inf"))
    # padding sits after the real items, so the stable sort keeps it last even next to real -inf scores;
    # pos_idx is ascending, so equal scores stay in index order
    order = torch.sort(pos_scores, dim=1, descending=True, stable=True).indices
    best_scores = pos_scores.gather(1, order)
    best_index = pos_idx.gather(1, order).masked_fill_(~valid, _NO_INDEX)
    if pos_idx.shape[1] == 0:
        return best_scores, best_index, valid, torch.full(counts.shape, float("inf"), dtype=scores.dtype,
                                                         device=scores.device)
    worst = best_scores.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)
    return best_scores, best_index, valid, worst.masked_fill(counts == 0, float("inf"))


def _bin_params(
    low: torch.Tensor, high: torch.Tensor, bins: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``scale`` and ``offset`` that stretch ``[low, high]`` over bins ``1 .. bins - 2``.

    Returns:
        ``(scale [c], offset [c], binned [c] bool)``; rows whose range is not finite get ``binned`` False
        and harmless parameters (their bins are meaningless).
    """
    span = high - low
    scale = torch.where(span > 0, (bins - 3) / span, torch.ones_like(span))
    offset = 1.5 - low * scale
    binned = torch.isfinite(scale) & (scale > 0) & torch.isfinite(offset)
    scale = torch.where(binned, scale, torch.ones_like(scale))
    return scale, torch.where(binned, offset, torch.zeros_like(offset)), binned


def _bin_of(
    values: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bins: int,
    out_float: Optional[torch.Tensor] = None,
    out_int: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bin ``clamp(floor(value * scale + offset), 0, bins - 1)`` (int32) of each value; ``scale`` and
    ``offset`` broadcast against ``values``.

    Each step is one correctly rounded elementwise operation, so a value gets the same bin whichever
    tensor it is computed in, and within a row ``s_i > s_j`` implies ``bin_i >= bin_j``: that monotony is
    all the ranking relies on.
    """
    local = torch.mul(values, scale, out=out_float)
    local.add_(offset).clamp_(min=0, max=bins - 1)
    return local.to(torch.int32) if out_int is None else out_int.copy_(local)  # truncation = floor here


def _place(
    best_scores: torch.Tensor,
    best_index: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    cand_scores: torch.Tensor,
    first: torch.Tensor,
    span: torch.Tensor,
) -> torch.Tensor:
    """For each candidate gallery item, how many of its query's correct items precede it or are it.

    The answer is known to lie in ``[first, first + span]`` (the correct items sharing the candidate's
    bin); a binary search over those ``span`` items settles it.

    Args:
        best_scores, best_index: ``[c, P]`` from :func:`_sorted_positives`.
        rows, cols, cand_scores: ``[N]`` query row, gallery index and score of each candidate.
        first, span: ``[N]`` int64: sorted correct items ``first .. first + span - 1`` of the row are the
            ones to compare with; all before them precede the candidate.

    Returns:
        ``[N]`` int64.
    """
    width = best_scores.shape[1]
    flat_scores, flat_index = best_scores.reshape(-1), best_index.reshape(-1)
    base = rows * width + first - 1
    ahead = torch.zeros_like(rows)
    steps = int(span.max()).bit_length() if span.numel() else 0
    for step in (1 << s for s in reversed(range(steps))):
        # "correct item m precedes-or-is the candidate" holds for a prefix of the sorted items
        probe = ahead + step
        at = (base + probe).clamp_(max=flat_scores.numel() - 1)
        probe_scores, probe_index = _select(at, flat_scores, flat_index)
        precedes = (probe_scores > cand_scores) | ((probe_scores == cand_scores) & (probe_index <= cols))
        ahead = torch.where(precedes & (probe <= span), probe, ahead)
    return first + ahead


def _top_k_of(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, num_rows: int, k: int) -> torch.Tensor:
    """The first ``k`` candidates of every row by (score desc, index asc).

    Args:
        rows, cols, values: ``[N]`` candidates; every row has at least ``k``, and each row's candidates
            appear with ascending ``cols``.

    Returns:
        ``[num_rows, k]`` int64 gallery indices.
    """
    order = torch.sort(values, descending=True, stable=True).indices  # ties keep ascending cols
    order = order.index_select(0, torch.sort(rows.index_select(0, order), stable=True).indices)
    rows, cols = rows.index_select(0, order), cols.index_select(0, order)
    per_row = torch.bincount(rows, minlength=num_rows)
    place = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row).index_select(0, rows)
    rows, cols, place = _select((place < k).nonzero().squeeze(1), rows, cols, place)
    indices = torch.empty(num_rows * k, dtype=torch.int64, device=rows.device)
    return indices.index_copy_(0, rows * k + place, cols).view(num_rows, k)


def _select(index: torch.Tensor, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``tensor[index]`` for each 1-D tensor (``index_select`` is much faster than ``[]`` on CPU)."""
    return tuple(tensor.index_select(0, index) for tensor in tensors)


def _rank_chunk(
    scores: torch.Tensor,
    k: int,
    pos_idx: torch.Tensor,
    counts: torch.Tensor,
    work: _Workspace,
    max_candidates: int,
    label: str,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Top-k gallery indices and ranks of the correct items for one chunk of queries (see the module
    docstring for the method).

    Args:
        scores: ``[c, G]`` similarities.
        k: top items to return, ``1 <= k <= G``.
        pos_idx, counts: as from :meth:`_PidGroups.positives` (``P`` may be 0 when ranks are not wanted).
        work: reused buffers.
        max_candidates: items to compare exactly above which the chunk is halved (memory bound).
        label: names the rows in errors.

    Returns:
        ``(top [c, k] int64, ranks [c, P] int64 or None)``: ``ranks[r, m]`` for ``m < counts[r]`` is the
        1-based rank of row ``r``'s ``(m+1)``-th best correct item (increasing along the row).
    """
    num_rows, num_gallery = scores.shape
    width = pos_idx.shape[1]
    device = scores.device
    tau, row_max = _top_threshold(scores, k)
    if torch.isnan(row_max).any():
        raise UserError(f"the similarities of {label} contain NaN; check the features or the similarity matrix")
    best_scores, best_index, valid, worst = _sorted_positives(scores, pos_idx, counts)
    bins = _num_bins(num_rows, num_gallery)
    low = torch.minimum(worst, tau)  # nothing below can precede a correct item or be in the top k
    scale, offset, binned = _bin_params(low, row_max, bins)
    row_base = torch.arange(num_rows, device=device) * bins

    # bins to compare exactly: those holding a correct item (of binned rows) and those at or above tau's.
    # Along a row the sorted correct items have non-increasing bins, so those of one bin are consecutive:
    # ``first_in_bin`` is the slot of the first of them (= how many correct items sit in higher bins).
    pos_keys = _bin_of(best_scores, scale[:, None], offset[:, None], bins).long() + row_base[:, None]  # [c, P]
    counted = valid & binned[:, None]
    dump = num_rows * bins  # an extra bin for the items not counted, dropped afterwards
    in_bin = torch.bincount(torch.where(counted, pos_keys, dump).view(-1), minlength=dump + 1)[:-1]
    run_start = counted & torch.cat([counted[:, :1], pos_keys[:, 1:] != pos_keys[:, :-1]], dim=1)
    first_in_bin = torch.zeros(dump, dtype=torch.int64, device=device)
    first_in_bin[pos_keys[run_start]] = torch.arange(width, device=device).expand_as(pos_keys)[run_start]
    shared = in_bin > 0
    top_key = torch.where(binned, _bin_of(tau, scale, offset, bins).long(), bins)  # [c], per-row bin
    wanted = (shared.view(num_rows, bins) | (torch.arange(bins, device=device) >= top_key[:, None])).view(-1)
    top_key += row_base

    # the passes over every score, in blocks of rows small enough to stay in cache: bin numbers, their
    # histogram, and the mask of items in wanted bins
    hist = []  # per block: [n * bins] item counts
    selected = work.get_mask("selected", num_rows * num_gallery)
    block = max(1, _BLOCK_ELEMENTS // num_gallery)
    local = work.get("local", (min(block, num_rows), num_gallery), scores.dtype)
    keys = work.get("keys", (min(block, num_rows), num_gallery), torch.int32)
    block_base = torch.arange(0, min(block, num_rows) * bins, bins, device=device, dtype=torch.int32)[:, None]
    for r0 in range(0, num_rows, block):
        r1 = min(r0 + block, num_rows)
        n = r1 - r0
        block_keys = _bin_of(scores[r0:r1], scale[r0:r1, None], offset[r0:r1, None], bins, local[:n], keys[:n])
        flat_keys = block_keys.add_(block_base[:n]).view(-1)
        hist.append(torch.bincount(flat_keys, minlength=n * bins))
        block_selected = selected[r0 * num_gallery : r1 * num_gallery]
        torch.index_select(wanted[r0 * bins : r1 * bins], 0, flat_keys, out=block_selected)
    hist = torch.cat(hist)  # [c * bins]
    exact = (~binned).nonzero().squeeze(1)  # rows compared exactly above ``low``
    if num_rows > 1 and int((hist * wanted).sum()) + exact.numel() * num_gallery > max_candidates:
        half = num_rows // 2
        parts = [
            _rank_chunk(scores[rows], k, pos_idx[rows], counts[rows], work, max_candidates, label)
            for rows in (slice(0, half), slice(half, num_rows))
        ]
        ranks = None if parts[0][1] is None else torch.cat([parts[0][1], parts[1][1]])
        return torch.cat([parts[0][0], parts[1][0]]), ranks

    flat = _nonzero_sparse(selected)
    rows = torch.div(flat, num_gallery, rounding_mode="floor")
    cols = flat - rows * num_gallery
    values = scores.view(-1).index_select(0, flat)
    cand_keys = _bin_of(values, *_select(rows, scale, offset), bins).long() + rows * bins
    is_top = cand_keys >= top_key.index_select(0, rows)
    is_shared = shared.index_select(0, cand_keys)
    # each candidate is compared with the correct items of its own bin only (all of them, for exact rows)
    first, span = first_in_bin.index_select(0, cand_keys), in_bin.index_select(0, cand_keys)
    if exact.numel():
        sub_rows, sub_cols = torch.nonzero(scores[exact] >= low[exact, None], as_tuple=True)
        sub_rows = exact[sub_rows]
        sub_values = scores[sub_rows, sub_cols]
        rows, cols, values = torch.cat([rows, sub_rows]), torch.cat([cols, sub_cols]), torch.cat([values, sub_values])
        is_top = torch.cat([is_top, sub_values >= tau[sub_rows]])
        is_shared = torch.cat([is_shared, counts[sub_rows] > 0])
        first, span = torch.cat([first, torch.zeros_like(sub_rows)]), torch.cat([span, counts[sub_rows]])
    top = _top_k_of(*_select(is_top.nonzero().squeeze(1), rows, cols, values), num_rows, k)

    if width == 0:
        return top, None
    rows, cols, values, first, span = _select(is_shared.nonzero().squeeze(1), rows, cols, values, first, span)
    ahead = _place(best_scores, best_index, rows, cols, values, first, span)
    # an exactly compared item precedes the (m+1)-th correct item iff ahead <= m
    inside = torch.bincount(rows * (width + 1) + ahead, minlength=num_rows * (width + 1))
    inside = inside.view(num_rows, width + 1)[:, :width].cumsum(dim=1)
    # the other items precede a correct item iff they sit in a higher bin
    up_to = hist.masked_fill_(shared, 0).view(num_rows, bins).cumsum(dim=1)  # [c, bins] items in bins <= b
    above = up_to[:, -1:] - up_to.view(-1).index_select(0, pos_keys.view(-1)).view_as(pos_keys)  # [c, P]
    return top, inside + torch.where(counted, above, 0) + 1


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
    inp = n / ranks.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)  # n / r_n
    has_any = counts > 0
    return ap * has_any, inp * has_any


def _rank_rows(
    score_rows: Callable[[int, int, _Workspace], torch.Tensor],
    num_queries: int,
    num_gallery: int,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    max_rank: int,
    get_mAP: bool,
    chunk_size: Optional[int],
    bytes_per_element: int,
) -> Tuple[torch.Tensor, ...]:
    """Shared engine of :func:`rank` and :func:`rank_features`.

    Args:
        score_rows: ``score_rows(start, end, work) -> [end - start, G]`` similarities of those queries
            (``work`` offers reusable buffers).
        q_pids, g_pids: ``[Q]`` and ``[G]`` int64 ids on the device of the scores.
        bytes_per_element: work bytes per (query, gallery) element, for the automatic chunk size.
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
    max_correct = int(num_correct.max()) if get_mAP else 0
    rows_per_chunk = chunk_size or auto_chunk_size(num_gallery, max_correct, bytes_per_element)
    max_candidates = DEFAULT_MEMORY_BUDGET_BYTES // _BYTES_PER_CANDIDATE
    k = min(max_rank, num_gallery)
    device = q_pids.device
    hits_at = torch.zeros(k + 1, dtype=torch.int64, device=device)  # queries whose first hit is at rank j+1
    ap_sum = torch.zeros((), dtype=torch.float64, device=device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=device)
    top_indices = []
    work = _Workspace(device)
    for start in range(0, num_queries, rows_per_chunk):
        end = min(start + rows_per_chunk, num_queries)
        scores = score_rows(start, end, work)
        if scores.dtype in (torch.float16, torch.bfloat16) or not scores.is_contiguous():
            wide = torch.promote_types(scores.dtype, torch.float32)
            scores = work.get("contiguous", scores.shape, wide).copy_(scores)
        pids = q_pids[start:end]
        if get_mAP:
            pos_idx, counts = groups.positives(pids)
        else:
            pos_idx = torch.zeros((end - start, 0), dtype=torch.int64, device=device)
            counts = torch.zeros(end - start, dtype=torch.int64, device=device)
        top, ranks = _rank_chunk(scores, k, pos_idx, counts, work, max_candidates, f"queries {start}..{end - 1}")
        top_indices.append(top.cpu())
        hit = g_pids[top] == pids[:, None]  # [c, k]
        first = torch.where(hit.any(dim=1), hit.to(torch.int8).argmax(dim=1), k)
        hits_at += torch.bincount(first, minlength=k + 1)
        if ranks is not None:
            ap, inp = _ap_inp(ranks, counts)
            ap_sum += ap.sum()
            inp_sum += inp.sum()
    cmc = hits_at[:k].cumsum(0).to(torch.float64) / num_queries * 100.0
    if max_rank > k:  # the whole gallery is ranked by k = G; the curve stays flat beyond
        cmc = torch.cat([cmc, cmc[-1:].expand(max_rank - k)])
    cmc = cmc.float().cpu()
    indices = torch.cat(top_indices)
    if not get_mAP:
        return cmc, indices
    num_valid = num_queries - num_without
    mAP = (ap_sum / num_valid * 100.0).float().cpu()
    mINP = (inp_sum / num_valid * 100.0).float().cpu()
    return cmc, mAP, mINP, indices


def rank(
    similarity: torch.Tensor,
    q_pids: PidsLike,
    g_pids: PidsLike,
    max_rank: int = 10,
    get_mAP: bool = True,
    *,
    chunk_size: Optional[int] = None,
):
    """CMC, mAP, mINP and top-k indices from a precomputed similarity matrix (see the module docstring for
    the tie rule and the treatment of queries without a correct item).

    Args:
        similarity: ``[Q, G]`` floating similarities, queries x gallery, on any device; higher is better.
        q_pids: ``[Q]`` integer person id of each query.
        g_pids: ``[G]`` integer person id of each gallery item.
        max_rank: length of the CMC curve, >= 1. May exceed ``G`` (the curve is flat beyond ``G``).
        get_mAP: compute mAP and mINP too.
        chunk_size: queries per chunk; None picks it from :data:`DEFAULT_MEMORY_BUDGET_BYTES`.

    Returns:
        With ``get_mAP``: ``(cmc, mAP, mINP, indices)``, else ``(cmc, indices)``; all on the CPU.
        ``cmc``: ``[max_rank]`` float32, percent of queries with a correct item in their top ``k``.
        ``mAP``, ``mINP``: 0-d float32 tensors, percent.
        ``indices``: ``[Q, min(max_rank, G)]`` int64 gallery indices of each query's best items, best first.
    """
    max_rank = _check_max_rank(max_rank)
    chunk_size = _check_chunk_size(chunk_size)
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
    return _rank_rows(
        lambda start, end, work: similarity[start:end],
        num_queries, num_gallery, q, g, max_rank, get_mAP, chunk_size, _BYTES_PER_ELEMENT,
    )


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
):
    """Same as :func:`rank` on ``query_feats @ gallery_feats.T``, without ever building that ``[Q, G]``
    matrix: similarities are computed one chunk of queries at a time.

    Args:
        query_feats: ``[Q, D]`` query features; float16/bfloat16 are widened to float32.
        gallery_feats: ``[G, D]`` gallery features, on the same device.
        q_pids, g_pids, max_rank, get_mAP, chunk_size: as in :func:`rank`.
        normalize: L2-normalise both feature sets first (cosine similarity). Leave False for features that
            are already normalised, such as those of :meth:`Evaluator.compute_embeddings`.

    Returns:
        As :func:`rank`.
    """
    max_rank = _check_max_rank(max_rank)
    chunk_size = _check_chunk_size(chunk_size)
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
    return _rank_rows(
        lambda start, end, work: torch.matmul(
            query_feats[start:end], gallery_t, out=work.get("scores", (end - start, num_gallery), dtype)
        ),
        num_queries, num_gallery, q, g, max_rank, get_mAP, chunk_size,
        _BYTES_PER_ELEMENT + dtype.itemsize,  # plus the chunk's similarity block itself
    )


# ----------------------------------------------------------------------------------------------------
# Model-free evaluation and reporting
# ----------------------------------------------------------------------------------------------------
def evaluate(
    text_feats: torch.Tensor,
    image_feats: torch.Tensor,
    q_pids: PidsLike,
    g_pids: PidsLike,
    i2t: bool = False,
    *,
    chunk_size: Optional[int] = None,
    normalize: bool = True,
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

    Returns:
        ``{'t2i': {'R1', 'R5', 'R10', 'mAP', 'mINP'}}`` (plus ``'i2t'`` when asked), Python floats in percent.
    """
    directions = [("t2i", text_feats, image_feats, q_pids, g_pids)]
    if i2t:
        directions.append(("i2t", image_feats, text_feats, g_pids, q_pids))
    results = {}
    for task, queries, gallery, query_ids, gallery_ids in directions:
        cmc, mAP, mINP, _ = rank_features(
            queries, gallery, query_ids, gallery_ids, max_rank=10, chunk_size=chunk_size, normalize=normalize
        )
        values = (cmc[0], cmc[4], cmc[9], mAP, mINP)
        results[task] = {key: float(value) for key, value in zip(RESULT_KEYS, values)}
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
class Evaluator:
    """Encodes a test split with a model and reports retrieval metrics (IRRA's ``Evaluator``).

    Args:
        img_loader: yields ``(pids [B], images [B, 3, H, W])`` — the gallery.
        txt_loader: yields ``(pids [B], caption_ids [B, L])`` — the queries.
        autocast: callable returning a context manager to run the encoders in (e.g. the precision helper's
            autocast factory); None runs them as they are.
        chunk_size: queries per ranking chunk (None: automatic).

    After :meth:`eval`, ``last_results`` holds the full metrics dictionary of :func:`evaluate`.
    """

    def __init__(
        self,
        img_loader: Iterable,
        txt_loader: Iterable,
        *,
        autocast: Optional[Callable[[], ContextManager]] = None,
        chunk_size: Optional[int] = None,
    ):
        self.img_loader = img_loader
        self.txt_loader = txt_loader
        self.autocast = autocast
        self.chunk_size = _check_chunk_size(chunk_size)
        self.last_results: Dict[str, Dict[str, float]] = {}

    def _encode(
        self, loader: Iterable, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, what: str
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Run ``encode`` over a loader of ``(pids, inputs)``: per batch ``feats [B, D]`` float32 and ``pids [B]``."""
        feats, pids = [], []
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], torch.Tensor):
                shape = f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
                raise UserError(
                    f"the {what} loader must yield (pids, {what} tensor) pairs; got a {type(batch).__name__}{shape}"
                )
            batch_pids = torch.as_tensor(batch[0]).reshape(-1).cpu()
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
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
        return feats, pids

    def compute_embeddings(self, model: torch.nn.Module):
        """Encode all captions and images with ``model`` in eval mode (its modes are restored afterwards).

        Returns:
            ``(text_feats [Q, D], image_feats [G, D], q_pids [Q], g_pids [G])``: float32, L2-normalised
            features on the model's device; int ids on the CPU. Ordinary tensors (not inference tensors).
        """
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.inference_mode():
                text = self._encode(self.txt_loader, model.encode_text, device, "captions")
                image = self._encode(self.img_loader, model.encode_image, device, "images")
        finally:
            for module, training in modes:
                module.training = training
        # concatenated outside inference mode, so that callers may modify the results in place
        text_feats, image_feats = (F.normalize(torch.cat(feats), dim=1) for feats in (text[0], image[0]))
        return text_feats, image_feats, torch.cat(text[1]), torch.cat(image[1])

    def eval(self, model: torch.nn.Module, i2t_metric: bool = False) -> float:
        """Evaluate ``model``; logs the metrics table and returns the text-to-image Rank-1 (percent)."""
        text_feats, image_feats, q_pids, g_pids = self.compute_embeddings(model)
        self.last_results = evaluate(
            text_feats, image_feats, q_pids, g_pids, i2t=i2t_metric, chunk_size=self.chunk_size, normalize=False
        )
        logger.info("\n%s", format_results(self.last_results))
        return self.last_results["t2i"]["R1"]
