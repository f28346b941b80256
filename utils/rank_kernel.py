"""The fast ranking path as one compiled pass per row (numba), for similarities on the CPU.

It computes what :func:`utils.ranking._rank_chunk_fast` computes with tensor operations, with the same bins
(see the module docstring of :mod:`utils.ranking`), but visits each score once after its bin is known instead
of running a dozen tensor passes over it. For every row:

1. The bin of every score, written to a row-sized buffer (:func:`_fill_bins`, a loop the compiler vectorises).
2. One pass over the bins (:func:`_count_and_visit`): a histogram, and exact work for the few items whose
   bin holds a correct item (known before the pass, from the correct items' scores): which of those correct
   items each of them precedes.
3. The top bin (the last bin holding one of the ``k`` best items) from the histogram, a second pass that
   gathers the items of bins ``0 .. top bin`` (:func:`_gather_top`), and their first ``k`` by (score desc,
   index asc) (:func:`_top_k`).
4. Each correct item's rank: ``1 +`` the items in lower-numbered bins ``+`` the items of its own bin that
   precede it (:func:`_write_ranks`).

:func:`utils.ranking._rank_chunk_compiled` runs contiguous groups of rows in threads (the functions release the
GIL). Everything is exact: the bins only decide which items need exact comparisons.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _bin_of(score, high, scale, last):
    """``trunc(clamp((high - score) * scale, 0, last))`` in the scores' type (``last`` is ``bins - 1`` in that
    type): ``+inf`` goes to bin 0 and ``-inf`` to the last one, as in :func:`utils.ranking._bin_keys`."""
    zero = last - last
    x = (high - score) * scale
    x = x if x > zero else zero
    x = x if x < last else last
    return np.uint32(x)


@njit(cache=True, nogil=True)
def _fill_bins(row, high, scale, last, bins_out):
    for j in range(row.shape[0]):
        bins_out[j] = _bin_of(row[j], high, scale, last)


@njit(cache=True, nogil=True)
def _visit(j, score, b, first_slot, correct_bins, correct_scores, correct_cols, num_correct, within):
    """Item ``j`` (score ``score``) lies in bin ``b``, which holds correct items: count it for each of them it
    precedes."""
    q = first_slot[b]
    while q < num_correct and correct_bins[q] == b:
        t = correct_scores[q]
        if score > t or (score == t and j < correct_cols[q]):
            within[q] += 1
        q += 1


@njit(cache=True, nogil=True)
def _count_and_visit(row, row_bins, hist, first_slot, correct_bins, correct_scores, correct_cols, num_correct,
                     within):
    """Histogram of the row's bins (two interleaved tables, summed into ``hist[0]``), and the own-bin
    predecessors of each correct item (``within``). ``first_slot[b]`` is the first correct item of bin ``b``,
    -1 for a bin without one."""
    hist[:] = 0
    size = row.shape[0]
    even = size - size % 2
    for j in range(0, even, 2):
        b0 = np.uintp(row_bins[j])  # (unsigned machine-word indices: no wrap-around check, a tighter loop)
        b1 = np.uintp(row_bins[j + 1])
        hist[0, b0] += 1
        hist[1, b1] += 1
        if (first_slot[b0] & first_slot[b1]) >= 0:  # not both -1: a bin holds correct items
            if first_slot[b0] >= 0:
                _visit(j, row[j], b0, first_slot, correct_bins, correct_scores, correct_cols, num_correct, within)
            if first_slot[b1] >= 0:
                _visit(j + 1, row[j + 1], b1, first_slot, correct_bins, correct_scores, correct_cols, num_correct,
                       within)
    if even < size:
        b = np.uintp(row_bins[even])
        hist[0, b] += 1
        if first_slot[b] >= 0:
            _visit(even, row[even], b, first_slot, correct_bins, correct_scores, correct_cols, num_correct, within)
    hist[0] += hist[1]


@njit(cache=True, nogil=True)
def _gather_top(row, row_bins, top_bin, top_s, top_j):
    """Every item of bins ``0 .. top_bin``, in index order; returns how many."""
    count = 0
    for j in range(row.shape[0]):
        if row_bins[j] <= top_bin:
            top_s[count] = row[j]
            top_j[count] = j
            count += 1
    return count


@njit(cache=True, nogil=True)
def _top_k(top_s, top_j, count, k, out):
    """The first ``k`` candidates by (score desc, index asc): a stable sort of candidates in index order."""
    order = np.argsort(-top_s[:count], kind="mergesort")
    for i in range(k):
        out[i] = top_j[order[i]]


@njit(cache=True, nogil=True)
def _write_ranks(hist, correct_bins, within, num_correct, num_gallery, out):
    """``1 +`` items in lower-numbered bins ``+`` own-bin predecessors; padding slots get ``G + 1``."""
    below = 0
    b = 0
    for q in range(num_correct):
        while b < correct_bins[q]:
            below += hist[0, b]
            b += 1
        out[q] = 1 + below + within[q]
    for q in range(num_correct, out.shape[0]):
        out[q] = num_gallery + 1


@njit(cache=True, nogil=True)
def rank_row_group(scores, high, scale, last, best_scores, best_cols, counts, k, bins, top, ranks, start, end):
    """Top-k and ranks of the correct items of rows ``start .. end - 1`` (see the module docstring), one row
    after the other with buffers kept from row to row. Releases the GIL: groups of rows can run in threads.

    Args:
        scores: ``[c, G]`` C-contiguous float32 or float64 similarities without NaN.
        high, scale: ``[c]`` each row's bin origin and scale (:func:`utils.ranking._bin_scale`), scores' dtype.
        last: ``bins - 1`` as a scalar of the scores' dtype.
        best_scores, best_cols: ``[c, P]`` each row's correct items in ranking order (score desc, index asc),
            scores' dtype and int64; counts: ``[c]`` int64, how many of the ``P`` slots are real.
        k: top items per row, ``1 <= k <= G``; bins: bins per row.
        top: ``[c, k]`` int64 output; ranks: ``[c, P]`` int64 output (padding: ``G + 1``).
    """
    num_gallery = scores.shape[1]
    width = best_scores.shape[1]
    row_bins = np.empty(num_gallery, np.uint16)
    hist = np.zeros((2, bins), np.int32)
    first_slot = np.full(bins, -1, np.int64)
    top_s = np.empty(num_gallery, scores.dtype)
    top_j = np.empty(num_gallery, np.int64)
    correct_bins = np.empty(width, np.int64)
    within = np.zeros(width, np.int64)
    for r in range(start, end):
        row = scores[r]
        num_correct = counts[r]
        for q in range(num_correct):  # correct items are in ranking order, so their bins do not decrease
            b = _bin_of(best_scores[r, q], high[r], scale[r], last)
            correct_bins[q] = b
            within[q] = 0
            if first_slot[b] < 0:
                first_slot[b] = q
        _fill_bins(row, high[r], scale[r], last, row_bins)
        _count_and_visit(row, row_bins, hist, first_slot, correct_bins, best_scores[r], best_cols[r], num_correct,
                         within)
        top_bin = 0
        total = hist[0, 0]
        while total < k:
            top_bin += 1
            total += hist[0, top_bin]
        _top_k(top_s, top_j, _gather_top(row, row_bins, top_bin, top_s, top_j), k, top[r])
        _write_ranks(hist, correct_bins, within, num_correct, num_gallery, ranks[r])
        for q in range(num_correct):
            first_slot[correct_bins[q]] = -1
