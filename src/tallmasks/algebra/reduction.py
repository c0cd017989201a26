"""Sums over tasks in the order of the paper's stacked ``.sum(0)``, one streamed block at a time.

The paper's code sums task vectors as a (tasks x parameters) float32 matrix with ``.sum(0)`` on the
CPU (torch 1.13; the same kernel today). That kernel does not add the rows one by one:

- columns it processes in whole groups of ``4 * SUM_LANES`` (all but the vector's last few) are summed
  in a cascade: rows in runs of 16 from zero, the run sums accumulated in a second level, any
  remaining rows summed from zero and added to that level last (a third and fourth level only from
  256 and 4,096 rows on). Up to 17 tasks this is the plain row-by-row sum; from 18 on it is not;
- the vector's last ``stacked_tail(d)`` columns are summed in four interleaved partial sums (rows
  k, k+4, k+8, ... in the same cascade), the rows left over from the fourth-multiple added to the
  first, then the four added in order.

Every column is an independent chain of float32 additions, so repeating the same additions
element-wise reproduces the stacked sum bit for bit, for any block size and any device, without
ever holding the matrix. The output starts from +0.0 as the kernel's does (no entry is ever -0.0).

The grouping assumes 8 float32 lanes per vector register (AVX2, or CPUs without it); on an AVX-512
build the kernel groups 64 columns and the columns summed the second way depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: float32 lanes of the vector unit whose grouping is reproduced (AVX2)
SUM_LANES = 8
_ROWS_PER_LEVEL_MIN = 4  # log2 of the shortest run of rows summed at one level (16)
_LEVELS = 4
_ILP = 4  # interleaved partial sums in the kernel's per-column fallback


def stacked_tail(numel: int, lanes: int = SUM_LANES) -> int:
    """How many trailing entries of a ``numel``-long vector the stacked sum adds in interleaved order."""
    if numel >= lanes:
        return numel % (_ILP * lanes)
    return numel % _ILP  # fewer columns than lanes: groups of four columns, the rest interleaved


def _ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def _chain(parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = ((p0 + p1) + p2) + ... (a run summed from zero, the sign of a zero result aside)."""
    if len(parts) == 1:
        return out.copy_(parts[0])
    torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out.add_(part)
    return out


def _cascade(parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The kernel's multi-level sum over rows, written to ``out``."""
    count = len(parts)
    power = max(_ROWS_PER_LEVEL_MIN, _ceil_log2(count) // _LEVELS)
    step = 1 << power
    if count <= step + 1:  # one run (plus one row added to it last): the plain chain
        return _chain(parts, out)
    mask = step - 1
    levels: list[torch.Tensor | None] = [None] * _LEVELS
    i = 0
    while i + step <= count:
        levels[0] = _chain(parts[i : i + step], torch.empty_like(out))
        i += step
        for j in range(1, _LEVELS):
            below = levels[j - 1]
            levels[j] = below if levels[j] is None else levels[j].add_(below)
            levels[j - 1] = None
            if i & (mask << (j * power)):
                break
    result = _chain(parts[i:], out) if i < count else None
    for level in levels[1:]:
        if level is not None:
            result = out.copy_(level) if result is None else result.add_(level)
    return result


def _interleaved(parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The kernel's per-column fallback: four interleaved partial sums, leftovers to the first."""
    count = len(parts)
    whole = count // _ILP
    if whole == 0:
        return _chain(parts, out)
    first = _cascade(parts[0 : _ILP * whole : _ILP], out)
    others = [_cascade(parts[k : _ILP * whole : _ILP], torch.empty_like(out)) for k in range(1, _ILP)]
    for part in parts[_ILP * whole :]:
        first.add_(part)
    for other in others:
        first.add_(other)
    return first


def stacked_sum(parts: Sequence[torch.Tensor], tail: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of equally shaped float tensors (one per task), bit for bit as their stacked ``.sum(0)``.

    ``tail`` is how many trailing entries (of the flattened parts) lie in the last
    ``stacked_tail(d)`` entries of the whole d-entry vector; ``out`` may be given to receive the sum.
    """
    if len(parts) == 0:
        raise ValueError("stacked_sum needs at least one part")
    flat = [part.reshape(-1) for part in parts]
    n = flat[0].numel()
    if not 0 <= tail <= n:
        raise ValueError(f"tail {tail} outside [0, {n}]")
    if out is None:
        out = torch.empty_like(flat[0])
    target = out.reshape(-1)
    main = n - tail
    if main:
        _cascade([f[:main] for f in flat], target[:main])
    if tail:
        _interleaved([f[main:] for f in flat], target[main:])
    return out.add_(0.0)  # the kernel's output starts at +0.0, so a zero sum is never -0.0
