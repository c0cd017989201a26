"""The numba kernels of ``tallmasks.algebra.kernels`` (imported only when numba is installed; compiled once and
cached beside this file)."""

from __future__ import annotations

import numba
import numpy as np

njit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
f32 = np.float32

_LEVELS = 4
_ROWS_PER_LEVEL_MIN = 4
_ILP = 4
_FLOAT_MAX = f32(np.finfo(np.float32).max)


@njit
def ceil_log2(n):
    bits = 0
    while (1 << bits) < n:
        bits += 1
    return bits


@njit
def _copy_row(source, lo, hi, out):
    for col in range(lo, hi):
        out[col] = source[col]


@njit
def _add_row(source, lo, hi, out):
    for col in range(lo, hi):
        out[col] = out[col] + source[col]


@njit
def _chain_rows(matrix, first, stop, lo, hi, out):
    # rows first .. stop-1 summed left to right from the first one, columns lo .. hi-1
    _copy_row(matrix[first], lo, hi, out)
    for i in range(first + 1, stop):
        _add_row(matrix[i], lo, hi, out)


@njit
def cascade_rows(matrix, count, lo, hi, out, levels):
    # reduction._cascade over whole rows (columns lo .. hi-1); levels: a (4, n) scratch
    power = max(_ROWS_PER_LEVEL_MIN, ceil_log2(count) // _LEVELS)
    step = 1 << power
    if count <= step + 1:
        _chain_rows(matrix, 0, count, lo, hi, out)
        return
    mask = step - 1
    present = np.zeros(_LEVELS, dtype=np.bool_)
    i = 0
    while i + step <= count:
        _chain_rows(matrix, i, i + step, lo, hi, levels[0])
        present[0] = True
        i += step
        for j in range(1, _LEVELS):
            if present[j]:
                _add_row(levels[j - 1], lo, hi, levels[j])
            else:
                _copy_row(levels[j - 1], lo, hi, levels[j])
                present[j] = True
            present[j - 1] = False
            if i & (mask << (j * power)):
                break
    have = i < count
    if have:
        _chain_rows(matrix, i, count, lo, hi, out)
    for j in range(1, _LEVELS):
        if present[j]:
            if have:
                _add_row(levels[j], lo, hi, out)
            else:
                _copy_row(levels[j], lo, hi, out)
                have = True


@njit
def _interleaved_rows(matrix, count, lo, hi, out, levels):
    # reduction._interleaved over whole rows (columns lo .. hi-1): four interleaved cascades of rows
    # k, k + 4, ..., the leftover rows added to the first, then the other three in order
    whole = count // _ILP
    if whole == 0:
        _chain_rows(matrix, 0, count, lo, hi, out)
        return
    width = hi - lo
    subset = np.empty((whole, width), dtype=f32)
    sums = np.empty((_ILP, width), dtype=f32)
    for k in range(_ILP):
        for m in range(whole):
            _copy_row(matrix[k + _ILP * m, lo:hi], 0, width, subset[m])
        cascade_rows(subset, whole, 0, width, sums[k], levels)
    for i in range(_ILP * whole, count):
        _add_row(matrix[i, lo:hi], 0, width, sums[0])
    for k in range(1, _ILP):
        _add_row(sums[k], 0, width, sums[0])
    _copy_row(sums[0], 0, width, out[lo:hi])


@njit
def _stacked_rows(matrix, tail, out, levels):
    # the stacked sum of every column of ``matrix`` into out: the main columns in the cascade's
    # order, the last ``tail`` in the kernel's interleaved order
    count, n = matrix.shape
    main = n - tail
    if main > 0:
        cascade_rows(matrix, count, 0, main, out, levels)
    if tail > 0:
        _interleaved_rows(matrix, count, main, n, out, levels)
    for col in range(n):
        out[col] = out[col] + f32(0.0)  # the kernel's output starts at +0.0: a zero sum is never -0.0


@njit
def ties_block(taus, thresholds, tail, mean, zero_sign, out):
    # One block of TIES, in place on taus (tasks x n): trim, elect, disjoint mean or sum into out.
    # Returns (sign total, whether a zero-sign fill mattered, whether the trimmed sums are finite).
    count, n = taus.shape
    one, zero = f32(1.0), f32(0.0)
    for t in range(count):
        row, threshold = taus[t], thresholds[t]
        for col in range(n):
            value = row[col]
            row[col] = value * (one if abs(value) >= threshold else zero)
    levels = np.empty((_LEVELS, n), dtype=f32)
    total = np.empty(n, dtype=f32)
    _stacked_rows(taus, tail, total, levels)
    elected = np.empty(n, dtype=f32)
    sign_total = 0
    finite = True
    for col in range(n):
        value = total[col]
        sign = 1 if value > 0 else (-1 if value < 0 else 0)
        sign_total += sign
        elected[col] = f32(sign) if sign != 0 else zero_sign
        if not (abs(value) <= _FLOAT_MAX):
            finite = False
    kept = np.zeros(n, dtype=np.int32)
    for t in range(count):
        row = taus[t]
        for col in range(n):
            value = row[col]
            agrees = value * elected[col] > 0
            row[col] = value if agrees else zero
            kept[col] += 1 if agrees else 0
    _stacked_rows(taus, tail, out, levels)
    fill_mattered = False
    for col in range(n):
        if mean:
            out[col] = out[col] / f32(max(kept[col], 1))
        value = total[col]
        if not (value > 0 or value < 0) and kept[col] > 0:  # sign 0, which torch.sign also gives NaN
            fill_mattered = True
    return sign_total, fill_mattered, finite


@njit
def _count_at_most(row, value):
    count = 0
    for col in range(row.shape[0]):
        count += 1 if abs(row[col]) <= value else 0
    return count


@njit
def _count_below(row, value):
    count = 0
    for col in range(row.shape[0]):
        count += 1 if abs(row[col]) < value else 0
    return count


@njit
def window_counts(taus, lows, highs, below, at_most, kept, kept_counts):
    # per row: counts of |x| < lo and |x| <= lo, the magnitudes in (lo, hi] (the first of them, up to
    # kept's width less one, a slot that takes the others), and whether every entry is finite
    count, n = taus.shape
    limit = kept.shape[1] - 1
    finite = True
    for t in range(count):
        row, lo, hi = taus[t], lows[t], highs[t]
        if _count_at_most(row, _FLOAT_MAX) != n:
            finite = False
        below[t] += _count_below(row, lo)
        at_most[t] += _count_at_most(row, lo)
        m = 0  # branch-free: every magnitude is written at the next free slot, kept if inside
        for col in range(n):
            magnitude = abs(row[col])
            kept[t, min(m, limit)] = magnitude
            m += 1 if (magnitude > lo) & (magnitude <= hi) else 0
        kept_counts[t] = m
    return finite


# ---------------------------------------------------------------------------------------------
# the coded collection format (tallmasks.storage.coded)


@njit
def _context(word, lo, hi):
    """Half-octave of a float32 |value| from its word (bits 22-30), clipped to [lo, hi]: the context of
    ``tallmasks.storage.coded.value_contexts``."""
    return min(max(np.int64((word & np.uint32(0x7FFFFFFF)) >> np.uint32(22)), lo), hi)


@njit
def _select(bit, if_one, if_zero):
    """``if_one`` where bit (0/1) is 1, else ``if_zero``, on uint32 words without a branch (a task's bits are
    close to random, and a mispredicted branch per weight tripled the time of the passes below)."""
    m = np.uint32(0) - np.uint32(bit)
    return (if_one & m) | (if_zero & ~m)


@njit
def ungroup(contexts, grouped, starts, kept, out):
    """Patterns of a chunk from their context groups: out[i] = 0 where ``kept[i]`` is false, else the next
    symbol of the group of the next kept weight's context (groups laid one after the other in ``grouped``,
    group c from starts[c]): the inverse of the encoder's stable sort by context, in one pass."""
    cursor = starts.copy()
    k = 0
    for i in range(kept.size):
        if kept[i]:
            c = contexts[k]
            out[i] = grouped[cursor[c]]
            cursor[c] += 1
            k += 1
        else:
            out[i] = 0


@njit
def apply_bit(theta, theta_words, patterns, kept_values, task, out, out_words):
    """out = theta where bit ``task`` of the pattern is 0, theta + the weight's kept value (float32)
    where it is 1; kept values are those of the non-zero patterns, in order. Branch-free, as
    ``apply_task_grouped``; ``*_words`` are uint32 views of ``theta`` and ``out``."""
    last = kept_values.size - 1
    k = 0
    for i in range(patterns.size):
        p = patterns[i]
        out[i] = theta[i] + kept_values[min(k, last)]
        out_words[i] = _select((p >> task) & 1, out_words[i], theta_words[i])
        k += p != 0


@njit
def join_words(p0, p1, p2, p3, lo, hi, words, counts):
    """words[j] = the little-endian 32-bit word of byte j of the four planes, and counts[c] += 1 for its
    context c (half-octave of |value|: bits 22-30, clipped to [lo, hi]; ``tallmasks.storage.coded.value_contexts``)."""
    for j in range(words.size):
        w = (
            np.uint32(p0[j])
            | (np.uint32(p1[j]) << np.uint32(8))
            | (np.uint32(p2[j]) << np.uint32(16))
            | (np.uint32(p3[j]) << np.uint32(24))
        )
        words[j] = w
        counts[_context(w, lo, hi)] += 1


@njit
def apply_task_grouped(theta, theta_words, kept, words, values, grouped, starts, lo, hi, task, out, out_words):
    """One task's weights from patterns coded in context, in one pass: out = theta, plus the next kept value
    (float32) where the weight is kept (``kept``, 0/1) and bit ``task`` of its pattern (the next symbol of its
    context's group, ``ungroup``) is 1. Returns how many kept weights had an empty pattern (0 unless damaged).

    Branch-free (``_select``): every weight reads a value and a pattern (indices clamped in bounds), stores
    theta + value, then keeps that word or theta's under the bit; ``*_words`` are uint32 views of ``theta``
    and ``out``."""
    cursor = starts.copy()
    last, last_group = words.size - 1, grouped.size - 1
    k = 0
    empty = 0
    for i in range(theta.size):
        j = min(k, last)
        q = np.uint32(kept[i])
        c = _context(words[j], lo, hi)
        position = cursor[c]
        p = grouped[min(position, last_group)]
        cursor[c] = position + q
        empty += q & np.uint32(p == 0)
        out[i] = theta[i] + values[j]
        # the shift in the pattern's own width (up to 64 tasks), then to 0/1
        out_words[i] = _select(np.uint32((p >> task) & 1) & q, out_words[i], theta_words[i])
        k += q
    return empty
