"""Exact global top-k thresholds over streamed tensors.

The paper trims each task vector to its top-k% magnitudes with ONE threshold over all entries of
the model: the kth smallest |tau_t| with kth = d - int(d * k / 100). Stacking every task vector to
call ``kthvalue`` needs (tasks x parameters) memory. Here the kth value is found exactly from two
histograms over the bit patterns of float32 magnitudes (non-negative float32 values order like
their int32 bit patterns): the high 16 bits first, then the low 16 bits inside the chosen bin.
The result equals ``torch.kthvalue`` on the concatenated vector bit for bit. Signed values are
selected the same way after an order-preserving map of their bit patterns (``kth_smallest_values``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from tallmasks.errors import ConfigError

_HIGH_BINS = 1 << 16
_LOW_BINS = 1 << 16
_SIGN_OFFSET = 1 << 15  # the high half-word of an ordered key lies in [-2**15, 2**15)


def check_k(k: float, name: str = "k") -> float:
    """Validate a top-k percentage: 0 < k <= 100."""
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 100], got {k!r}") from None
    if not (0.0 < value <= 100.0):
        raise ConfigError(f"{name} must be a percentage in (0, 100], got {k!r}")
    return value


def kth_rank(numel: int, k: float) -> int:
    """1-based rank (ascending) of the threshold that keeps the top-k% entries: d - int(d*k/100)."""
    kept = int(numel * (k / 100.0))
    return numel - kept


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys that order like the float32 values (negative floats get their 31 low bits flipped)."""
    bits = values.contiguous().view(torch.int32)
    return torch.bitwise_xor(bits, torch.bitwise_and(torch.bitwise_right_shift(bits, 31), 0x7FFFFFFF))


def _count_into(hist: torch.Tensor | None, bins: torch.Tensor, size: int) -> torch.Tensor:
    """Add the counts of ``bins`` (integers in [0, size)) to ``hist`` (allocated on first use)."""
    if bins.numel() >= size:
        counts = torch.bincount(bins, minlength=size)
        return counts if hist is None else hist + counts
    if hist is None:
        hist = torch.zeros(size, dtype=torch.int64, device=bins.device)
    first = int(bins.min())  # small blocks: count only the range they cover
    counts = torch.bincount(bins - first)
    hist[first : first + counts.numel()] += counts
    return hist


def _pick_bin(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the rank-th smallest element (1-based) and the rank inside that bin."""
    cumulative = torch.cumsum(hist, dim=0)
    index = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype)).item())
    before = int(cumulative[index - 1].item()) if index > 0 else 0
    return index, rank - before


def kth_smallest_values(
    chunks: Callable[[], Iterator[list[torch.Tensor]]], ranks: list[int]
) -> list[float]:
    """Exact kth smallest float32 value (signed) for several streams at once.

    ``chunks()`` must return a fresh iterator (it is called twice) whose items are lists with one
    1-D float32 tensor per stream; ``ranks[i]`` is the 1-based rank wanted for stream ``i`` (0 or less
    gives 0.0 without looking at the stream).
    """
    n = len(ranks)
    high_hist = [None] * n
    for parts in chunks():
        for i, part in enumerate(parts):
            if ranks[i] <= 0 or part.numel() == 0:
                continue
            high = torch.bitwise_right_shift(_ordered_keys(part), 16) + _SIGN_OFFSET
            high_hist[i] = _count_into(high_hist[i], high, _HIGH_BINS)

    high_bin = [0] * n
    inner_rank = [0] * n
    for i in range(n):
        if ranks[i] <= 0:
            continue
        if high_hist[i] is None or int(high_hist[i].sum().item()) < ranks[i]:
            raise ValueError(f"rank {ranks[i]} exceeds the number of elements of stream {i}")
        high_bin[i], inner_rank[i] = _pick_bin(high_hist[i].cpu(), ranks[i])

    low_hist = [None] * n
    for parts in chunks():
        for i, part in enumerate(parts):
            if ranks[i] <= 0 or part.numel() == 0:
                continue
            keys = _ordered_keys(part)
            selected = keys[torch.bitwise_right_shift(keys, 16) + _SIGN_OFFSET == high_bin[i]]
            if selected.numel() == 0:
                continue
            low_hist[i] = _count_into(low_hist[i], torch.bitwise_and(selected, 0xFFFF), _LOW_BINS)

    values = []
    for i in range(n):
        if ranks[i] <= 0:
            values.append(0.0)
            continue
        low_bin, _ = _pick_bin(low_hist[i].cpu(), inner_rank[i])
        key = torch.tensor([((high_bin[i] - _SIGN_OFFSET) << 16) | low_bin], dtype=torch.int64).to(torch.int32)
        values.append(float(_ordered_keys(key.view(torch.float32)).view(torch.float32).item()))
    return values


def kth_smallest_magnitudes(
    chunks: Callable[[], Iterator[list[torch.Tensor]]], ranks: list[int]
) -> list[float]:
    """Exact kth smallest |x| for several streams at once (``chunks`` and ``ranks`` as in kth_smallest_values)."""

    def magnitudes() -> Iterator[list[torch.Tensor]]:
        for parts in chunks():
            yield [part.abs() for part in parts]

    return kth_smallest_values(magnitudes, ranks)


def kth_smallest_magnitude(tensors: Iterable[torch.Tensor], rank: int) -> float:
    """Exact kth smallest |x| over a re-iterable collection of tensors (single stream)."""
    tensors = list(tensors)

    def chunks() -> Iterator[list[torch.Tensor]]:
        for tensor in tensors:
            yield [tensor.reshape(-1).float()]

    return kth_smallest_magnitudes(chunks, [rank])[0]
