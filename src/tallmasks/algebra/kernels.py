"""Fused CPU kernels (numba) for the passes that dominate TIES and top-k selection.

A streamed block is a (tasks x n) float32 matrix of task vectors. The torch code runs about ten
whole-block operations on it per pass (abs, compare, multiply, sum, sign, ...), each a separate
vectorized loop with its own temporaries; the kernels here fuse them into a few loops over the rows,
with the same float32 operations in the same order, so their results are bit for bit those of the
torch code (tests compare both on every task count from 1 to 20, where the stacked sum's order
changes, and beyond). They are used on the CPU when numba
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

_compiled = None
_compile_lock = threading.Lock()


def _build():
    """Compile (or load from numba's cache) the kernels; None when numba is missing."""
    try:
        from tallmasks.algebra import numba_kernels as nk
    except ImportError:
        return None
    f32 = np.float32
    # run each once on tiny inputs, so that a failure to compile shows here rather than mid-merge
    taus = np.zeros((2, 3), dtype=f32)
    nk.ties_block(taus, np.zeros(2, dtype=f32), 1, True, f32(1.0), np.empty(3, dtype=f32))
    nk.window_counts(
        taus,
        np.zeros(2, dtype=f32),
        np.ones(2, dtype=f32),
        np.zeros(2, dtype=np.int64),
        np.zeros(2, dtype=np.int64),
        np.empty((2, 4), dtype=f32),
        np.zeros(2, dtype=np.int64),
    )
    plane, words, theta, out = np.ones(2, dtype=np.uint8), np.empty(2, dtype=np.uint32), np.zeros(2, dtype=f32), np.empty(2, dtype=f32)
    nk.join_words(plane, plane, plane, plane, 0, 511, words, np.zeros(512, dtype=np.int64))
    nk.apply_task_grouped(
        theta,
        theta.view(np.uint32),
        plane,
        words,
        words.view(f32),
        plane,
        np.zeros(512, dtype=np.int64),
        0,
        511,
        np.uint8(0),
        out,
        out.view(np.uint32),
    )
    nk.apply_bit(theta, theta.view(np.uint32), plane, words.view(f32), np.uint8(0), out, out.view(np.uint32))
    return {
        "ties_block": nk.ties_block,
        "window_counts": nk.window_counts,
        "ungroup": nk.ungroup,
        "apply_bit": nk.apply_bit,
        "join_words": nk.join_words,
        "apply_task_grouped": nk.apply_task_grouped,
    }


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
                    warnings.warn(f"tallmasks: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); using torch", stacklevel=2)
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
    result = kernels()["ties_block"](taus.numpy(), th, int(tail), bool(mean), np.float32(1.0 if zero_sign > 0 else -1.0), out.numpy())
    return int(result[0]), bool(result[1]), bool(result[2])


def window_counts(
    taus: torch.Tensor, lows: np.ndarray, highs: np.ndarray, below: np.ndarray, at_most: np.ndarray
) -> tuple[list[torch.Tensor], bool]:
    """Counts of one (tasks x n) block for ``selection.KthInWindows``, added into ``below`` (|x| < lo)
    and ``at_most`` (|x| <= lo): per task the magnitudes in its window (lo, hi], and whether the block
    is finite."""
    count, n = taus.shape
    width = min(n, max(1024, n // 16))  # room for a window's share of a block, many times over
    kept = np.empty((count, width + 1), dtype=np.float32)
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


def ungroup(contexts: np.ndarray, grouped: np.ndarray, starts: np.ndarray, kept: np.ndarray) -> np.ndarray | None:
    """A chunk's patterns (0 where not ``kept``) from the kept weights' groups by context
    (``tallmasks.storage.coded``); None without the kernels."""
    compiled = kernels()
    if compiled is None:
        return None
    out = np.empty(kept.size, dtype=grouped.dtype)
    compiled["ungroup"](contexts, grouped, starts.astype(np.int64), kept, out)
    return out


def apply_bit(theta: np.ndarray, patterns: np.ndarray, kept_values: np.ndarray, task: int, out: np.ndarray) -> None:
    """out = theta + (bit ``task`` of the patterns) * kept values on float32 arrays, in one pass (``tallmasks.storage.coded``,
    patterns coded as one stream); call only with the kernels and at least one kept value."""
    kernels()["apply_bit"](theta, theta.view(np.uint32), patterns, kept_values, patterns.dtype.type(task), out, out.view(np.uint32))


def join_words(planes: list[np.ndarray], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(32-bit words of four byte planes, count of each context in 0..511 clipped to [lo, hi]) in one pass
    (``tallmasks.storage.coded``); None without the kernels."""
    compiled = kernels()
    if compiled is None or len(planes) != 4:
        return None
    words = np.empty(planes[0].size, dtype=np.uint32)
    counts = np.zeros(512, dtype=np.int64)
    compiled["join_words"](*planes, lo, hi, words, counts)
    return words, counts


def apply_task_grouped(
    theta: np.ndarray,
    kept: np.ndarray,
    words: np.ndarray,
    grouped: np.ndarray,
    starts: np.ndarray,
    lo: int,
    hi: int,
    task: int,
    out: np.ndarray,
) -> int:
    """One task's float32 weights from patterns coded in context, written into ``out``; the number of kept
    weights with an empty pattern (damage). Call only with the kernels (``join_words`` not None) and a
    ``kept`` whose true entries number ``words.size``."""
    return int(
        kernels()["apply_task_grouped"](
            theta,
            theta.view(np.uint32),
            kept.view(np.uint8),
            words,
            words.view(np.float32),
            grouped,
            starts,
            lo,
            hi,
            grouped.dtype.type(task),
            out,
            out.view(np.uint32),
        )
    )
