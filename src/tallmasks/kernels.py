"""Fused CPU kernels (numba) for the passes that dominate TIES and top-k selection.

A streamed block is a (tasks x n) float32 matrix of task vectors. The torch code runs about ten
whole-block operations on it per pass (abs, compare, multiply, sum, sign, ...), each a trip through
memory; the kernels here make one trip, column by column, with the same float32 operations in the
same order, so their results are bit for bit those of the torch code (tests compare both on every
task count from 1 to 20, where the stacked sum's order changes). They are used on the CPU when numba
is installed and ``ENABLED`` is true; everything else, and every GPU run, takes the torch code.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch

#: use the kernels where they apply (set ``TALLMASKS_KERNELS=torch`` to run the torch code instead)
ENABLED = os.environ.get("TALLMASKS_KERNELS", "numba") != "torch"

_LEVELS = 4
_ROWS_PER_LEVEL_MIN = 4
_ILP = 4

_compiled = None
_compile_lock = threading.Lock()


def _build():
    """Compile (or load from numba's cache) the kernels; None when numba is missing."""
    try:
        import numba
    except ImportError:
        return None
    njit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
    f32 = np.float32

    @njit
    def chain(values, first, stop, step):
        # values[first], values[first + step], ... summed left to right from the first one
        total = values[first]
        i = first + step
        while i < stop:
            total = total + values[i]
            i += step
        return total

    @njit
    def ceil_log2(n):
        bits = 0
        while (1 << bits) < n:
            bits += 1
        return bits

    @njit
    def cascade(values, count):
        # reduction._cascade on scalars: rows in runs of 2**power, accumulated in levels
        power = max(_ROWS_PER_LEVEL_MIN, ceil_log2(count) // _LEVELS)
        step = 1 << power
        if count <= step + 1:
            return chain(values, 0, count, 1)
        mask = step - 1
        levels = np.zeros(_LEVELS, dtype=f32)
        present = np.zeros(_LEVELS, dtype=np.bool_)
        i = 0
        while i + step <= count:
            levels[0] = chain(values, i, i + step, 1)
            present[0] = True
            i += step
            for j in range(1, _LEVELS):
                if present[j]:
                    levels[j] = levels[j] + levels[j - 1]
                else:
                    levels[j] = levels[j - 1]
                    present[j] = True
                present[j - 1] = False
                if i & (mask << (j * power)):
                    break
        have = i < count
        result = chain(values, i, count, 1) if have else f32(0.0)
        for j in range(1, _LEVELS):
            if present[j]:
                if have:
                    result = result + levels[j]
                else:
                    result = levels[j]
                    have = True
        return result

    @njit
    def interleaved(values, count, scratch):
        # reduction._interleaved: four interleaved cascades, leftovers added to the first
        whole = count // _ILP
        if whole == 0:
            return chain(values, 0, count, 1)
        sums = np.empty(_ILP, dtype=f32)
        for k in range(_ILP):
            m = 0
            for i in range(k, _ILP * whole, _ILP):
                scratch[m] = values[i]
                m += 1
            sums[k] = cascade(scratch, m)
        first = sums[0]
        for i in range(_ILP * whole, count):
            first = first + values[i]
        for k in range(1, _ILP):
            first = first + sums[k]
        return first

    @njit
    def stacked(values, count, in_tail, scratch):
        total = interleaved(values, count, scratch) if in_tail else cascade(values, count)
        return total + f32(0.0)  # the kernel's output starts at +0.0: a zero sum is never -0.0

    @njit
    def ties_block(taus, thresholds, tail, mean, zero_sign, out):
        # one block of TIES: trim, elect, disjoint mean/sum; returns (sign total, fill mattered, finite)
        count, n = taus.shape
        trimmed = np.empty(count, dtype=f32)
        agreeing = np.empty(count, dtype=f32)
        scratch = np.empty(count, dtype=f32)
        sign_total = 0
        fill_mattered = False
        finite = True
        one, zero = f32(1.0), f32(0.0)
        for col in range(n):
            in_tail = col >= n - tail
            for t in range(count):
                value = taus[t, col]
                trimmed[t] = value * (one if abs(value) >= thresholds[t] else zero)
            total = stacked(trimmed, count, in_tail, scratch)
            if not np.isfinite(total):
                finite = False
            sign = 1 if total > 0 else (-1 if total < 0 else 0)
            elected = f32(sign) if sign != 0 else zero_sign
            kept = 0
            for t in range(count):
                if trimmed[t] * elected > 0:
                    agreeing[t] = trimmed[t]
                    kept += 1
                else:
                    agreeing[t] = zero
            merged = stacked(agreeing, count, in_tail, scratch)
            if mean:
                merged = merged / f32(max(kept, 1))
            out[col] = merged
            sign_total += sign
            if sign == 0 and kept > 0:
                fill_mattered = True
        return sign_total, fill_mattered, finite

    @njit
    def window_counts(taus, lows, highs, below, at_most, kept, kept_counts):
        # per row: counts of |x| < lo and |x| <= lo, the magnitudes in (lo, hi] (up to kept's width),
        # and whether every entry is finite
        count, n = taus.shape
        limit = kept.shape[1]
        finite = True
        for t in range(count):
            lo, hi = lows[t], highs[t]
            b, a, m = 0, 0, 0
            for col in range(n):
                magnitude = abs(taus[t, col])
                if not np.isfinite(magnitude):
                    finite = False
                if magnitude <= lo:
                    a += 1
                    if magnitude < lo:
                        b += 1
                elif magnitude <= hi:
                    if m < limit:
                        kept[t, m] = magnitude
                    m += 1
            below[t] += b
            at_most[t] += a
            kept_counts[t] = m
        return finite

    built = {"ties_block": ties_block, "window_counts": window_counts, "stacked": stacked}
    # compile now, on tiny inputs, so that a failure shows here rather than in the middle of a merge
    taus = np.zeros((2, 3), dtype=f32)
    ties_block(taus, np.zeros(2, dtype=f32), 1, True, f32(1.0), np.empty(3, dtype=f32))
    window_counts(taus, np.zeros(2, dtype=f32), np.ones(2, dtype=f32), np.zeros(2, dtype=np.int64),
                  np.zeros(2, dtype=np.int64), np.empty((2, 3), dtype=f32), np.zeros(2, dtype=np.int64))
    return built


def kernels():
    """The compiled kernels, or None (numba missing or failing, or ``ENABLED`` false)."""
    global _compiled
    if not ENABLED:
        return None
    if _compiled is None:
        with _compile_lock:
            if _compiled is None:
                try:
                    _compiled = _build() or {}
                except Exception as exc:  # numba present but unable to compile here: the torch code runs
                    warnings.warn(f"tallmasks: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); using torch")
                    _compiled = {}
    return _compiled or None


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels apply to this block (on the CPU, float32) and are available."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32 and kernels() is not None


def ties_block(taus: torch.Tensor, thresholds, tail: int, mean: bool, zero_sign: float, out: torch.Tensor):
    """TIES on a (tasks x n) block into ``out`` (n,): (sign total, whether a zero-sign fill mattered,
    whether the trimmed sums were all finite). Thresholds None keeps everything."""
    count = taus.shape[0]
    if thresholds is None:
        th = np.zeros(count, dtype=np.float32)
    else:
        th = np.asarray(thresholds, dtype=np.float32)
    result = kernels()["ties_block"](
        taus.numpy(), th, int(tail), bool(mean), np.float32(1.0 if zero_sign > 0 else -1.0), out.numpy()
    )
    return int(result[0]), bool(result[1]), bool(result[2])


def window_counts(taus: torch.Tensor, lows: np.ndarray, highs: np.ndarray, below: np.ndarray,
                  at_most: np.ndarray) -> tuple[list[torch.Tensor], bool]:
    """Counts of one (tasks x n) block for ``selection.KthInWindows``, added into ``below`` (|x| < lo)
    and ``at_most`` (|x| <= lo): per task the magnitudes in its window (lo, hi], and whether the block
    is finite."""
    count, n = taus.shape
    width = min(n, max(1024, n // 16))  # room for a window's share of a block, many times over
    kept = np.empty((count, width), dtype=np.float32)
    kept_counts = np.zeros(count, dtype=np.int64)
    finite = kernels()["window_counts"](taus.numpy(), lows, highs, below, at_most, kept, kept_counts)
    values = []
    for t in range(count):
        if kept_counts[t] <= width:
            values.append(torch.from_numpy(kept[t, : kept_counts[t]].copy()))
        else:  # a dense window in this block: gather its row again
            magnitudes = taus[t].abs()
            values.append(magnitudes[(magnitudes > float(lows[t])) & (magnitudes <= float(highs[t]))])
    return values, bool(finite)
