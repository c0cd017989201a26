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

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from tallmasks.algebra import kernels
from tallmasks.core.errors import ConfigError

_HIGH_BINS = 1 << 15  # sign bit is 0 for magnitudes, so the high half-word is < 2**15
_LOW_BINS = 1 << 16
_SIGNED_HIGH_BINS = 1 << 16  # signed values: ordered keys span the whole high half-word
_SIGN_OFFSET = 1 << 15  # the high half-word of an ordered key lies in [-2**15, 2**15)
_NONFINITE_BITS = 0x7F800000  # |x| bit patterns from here on have an all-ones exponent: Inf, NaN
_BATCH_KEYS = 1 << 22  # bin indices counted together (16 MB)


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


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.contiguous().view(torch.int32)


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


def _offsets(count: int, bins: int, device) -> torch.Tensor:
    return (torch.arange(count, dtype=torch.int32, device=device) * bins).view(-1, 1)


class _Counter:
    """One thread's bin indices awaiting a count, and its counts so far."""

    def __init__(self, owner: list):
        self.owner = owner  # the pass it belongs to
        self.pending: list[torch.Tensor] = []
        self.size = 0
        self.hist: torch.Tensor | None = None

    def flush(self, length: int) -> None:
        if not self.pending:
            return
        keys = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.pending, self.size = [], 0
        counts = torch.bincount(keys, minlength=length)
        self.hist = counts if self.hist is None else self.hist.add_(counts)


class KthMagnitudes:
    """Exact kth smallest |x| of several streams, fed block by block in two passes.

    Pass 1 (``add_high`` for every block, then ``choose_bins``) counts the high half-words of the
    magnitudes; pass 2 (``add_low`` for the same blocks) counts the low half-words inside each
    stream's chosen bin; ``values()`` then gives one float per stream. A block is a (streams x n)
    tensor or a sequence with one tensor per stream. ``ranks[i]`` is 1-based; ranks <= 0 give 0.0.
    Blocks may be fed from several threads; bin indices are gathered and counted in batches.
    """

    def __init__(self, ranks: Sequence[int], batch: int = _BATCH_KEYS):
        self.ranks = [int(r) for r in ranks]
        self.batch = int(batch)
        self._high: torch.Tensor | None = None
        self._bins: torch.Tensor | None = None
        self._inner: list[int] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._counters: list[_Counter] = []  # one per thread that fed the current pass

    def _counter(self) -> _Counter:
        counter = getattr(self._local, "counter", None)
        if counter is None or counter.owner is not self._counters:
            counter = self._local.counter = _Counter(self._counters)
            with self._lock:
                self._counters.append(counter)
        return counter

    def _add_keys(self, keys: torch.Tensor, bins: int) -> None:
        """Count bin indices (already offset by stream * bins), in batches, per thread."""
        counter = self._counter()
        counter.pending.append(keys.reshape(-1))
        counter.size += keys.numel()
        if counter.size >= self.batch:
            counter.flush(len(self.ranks) * bins)

    def _end_pass(self, bins: int) -> torch.Tensor | None:
        """The (streams x bins) counts of the pass that ends, summed over threads."""
        total = None
        for counter in self._counters:
            counter.flush(len(self.ranks) * bins)
            if counter.hist is not None:
                total = counter.hist if total is None else total.add_(counter.hist.to(total.device))
        self._counters = []
        return None if total is None else total.view(len(self.ranks), bins)

    def _bit_rows(self, parts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """int32 bit patterns of |parts|: one (streams x n) tensor, or one 1-D tensor per stream."""
        if isinstance(parts, torch.Tensor) and parts.dim() == 2:
            rows = _bits(parts.abs())
        else:
            rows = [_bits(part.reshape(-1).abs()) for part in parts]
        if len(rows) != len(self.ranks):
            raise ValueError(f"{len(rows)} parts for {len(self.ranks)} streams")
        return rows

    def add_high(self, parts: torch.Tensor | Sequence[torch.Tensor]) -> bool:
        """Count one block in pass 1; returns whether all its entries are finite."""
        if self._bins is not None:
            raise RuntimeError("add_high after choose_bins")
        rows = self._bit_rows(parts)
        if isinstance(rows, torch.Tensor):
            if rows.numel() == 0:
                return True
            finite = int(rows.max()) < _NONFINITE_BITS
            keys = torch.bitwise_right_shift(rows, 16).add_(_offsets(len(rows), _HIGH_BINS, rows.device))
        else:
            finite = all(int(r.max()) < _NONFINITE_BITS for r in rows if r.numel())
            keys = torch.cat([torch.bitwise_right_shift(r, 16).add_(i * _HIGH_BINS) for i, r in enumerate(rows)])
        self._add_keys(keys, _HIGH_BINS)
        return finite

    def choose_bins(self) -> None:
        """End pass 1: find, per stream, the high half-word bin holding its ranked element."""
        self._high = self._end_pass(_HIGH_BINS)
        high = self._high.cpu() if self._high is not None else torch.zeros(len(self.ranks), _HIGH_BINS, dtype=torch.int64)
        bins, self._inner = [], []
        for i, rank in enumerate(self.ranks):
            if rank <= 0:
                bins.append(-1)  # no element is selected for this stream
                self._inner.append(0)
                continue
            if int(high[i].sum()) < rank:
                raise ValueError(f"rank {rank} exceeds the number of elements of stream {i}")
            index, inner = _pick_bin(high[i], rank)
            bins.append(index)
            self._inner.append(inner)
        self._bins = torch.tensor(bins, dtype=torch.int32)

    def add_low(self, parts: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Count one block in pass 2 (the same blocks as pass 1)."""
        if self._bins is None:
            raise RuntimeError("add_low before choose_bins")
        rows = self._bit_rows(parts)
        if isinstance(rows, torch.Tensor):
            bins = self._bins.to(rows.device).view(-1, 1)
            inside = torch.bitwise_right_shift(rows, 16) == bins
            keys = torch.bitwise_and(rows, 0xFFFF).add_(_offsets(len(rows), _LOW_BINS, rows.device))[inside]
        else:
            keys = torch.cat(
                [
                    torch.bitwise_and(r, 0xFFFF).add_(i * _LOW_BINS)[torch.bitwise_right_shift(r, 16) == int(self._bins[i])]
                    for i, r in enumerate(rows)
                ]
            )
        if keys.numel():
            self._add_keys(keys, _LOW_BINS)

    def values(self) -> list[float]:
        """The kth smallest magnitude of every stream (0.0 where its rank is <= 0)."""
        if self._bins is None:
            raise RuntimeError("values before choose_bins")
        low = self._end_pass(_LOW_BINS)
        low = low.cpu() if low is not None else None
        out = []
        for i, rank in enumerate(self.ranks):
            if rank <= 0:
                out.append(0.0)
                continue
            low_bin, _ = _pick_bin(low[i], self._inner[i])
            pattern = torch.tensor([(int(self._bins[i]) << 16) | low_bin], dtype=torch.int32)
            out.append(float(pattern.view(torch.float32).item()))
        return out


def kth_smallest_magnitudes(chunks: Callable[[], Iterator[list[torch.Tensor]]], ranks: list[int]) -> list[float]:
    """Exact kth smallest |x| for several streams at once.

    ``chunks()`` must return a fresh iterator (it is called twice) whose items are lists with one
    1-D float32 tensor per stream; ``ranks[i]`` is the 1-based rank wanted for stream ``i``.
    """
    selector = KthMagnitudes(ranks)
    for parts in chunks():
        selector.add_high(parts)
    selector.choose_bins()
    for parts in chunks():
        selector.add_low(parts)
    return selector.values()


def kth_smallest_values(chunks: Callable[[], Iterator[list[torch.Tensor]]], ranks: list[int]) -> list[float]:
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
            high_hist[i] = _count_into(high_hist[i], high, _SIGNED_HIGH_BINS)

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


def kth_smallest_magnitude(tensors: Iterable[torch.Tensor], rank: int) -> float:
    """Exact kth smallest |x| over a re-iterable collection of tensors (single stream)."""
    tensors = list(tensors)

    def chunks() -> Iterator[list[torch.Tensor]]:
        for tensor in tensors:
            yield [tensor.reshape(-1).float()]

    return kth_smallest_magnitudes(chunks, [rank])[0]


class KthInWindows:
    """Exact kth smallest |x| of several streams in ONE pass, given per stream a window (lo, hi] that
    probably holds it (chosen from a sample, see ``sample_window``).

    Per stream the pass counts the entries with |x| < lo and |x| <= lo, and keeps the magnitudes in
    (lo, hi]. The kth smallest is then lo itself, or the right one of the kept magnitudes, whenever
    the counts show that it lies in [lo, hi]; ``values()`` gives None for a stream whose window missed
    (or that kept more than ``cap`` entries), and the caller falls back to ``KthMagnitudes``. The
    answer is exact either way: the window only decides how much is kept. Blocks may be fed from
    several threads.
    """

    def __init__(self, ranks: Sequence[int], windows: Sequence[tuple[float, float]], cap: int):
        if len(windows) != len(ranks):
            raise ValueError(f"{len(windows)} windows for {len(ranks)} streams")
        self.ranks = [int(r) for r in ranks]
        self.cap = int(cap)
        self._lo = torch.tensor([w[0] for w in windows], dtype=torch.float32).view(-1, 1)
        self._hi = torch.tensor([w[1] for w in windows], dtype=torch.float32).view(-1, 1)
        self._below = torch.zeros(len(ranks), dtype=torch.int64)  # |x| < lo
        self._at_most = torch.zeros(len(ranks), dtype=torch.int64)  # |x| <= lo
        self._kept: list[list[torch.Tensor]] = [[] for _ in ranks]
        self._count = [0] * len(ranks)
        self._lock = threading.Lock()

    def add(self, parts: torch.Tensor) -> bool:
        """Count one (streams x n) block; returns whether all its entries are finite. ``parts`` is
        overwritten (with its magnitudes)."""
        if parts.dim() != 2 or len(parts) != len(self.ranks):
            raise ValueError(f"expected a ({len(self.ranks)} x n) block, got shape {tuple(parts.shape)}")
        if parts.numel() == 0:
            return True
        if kernels.usable(parts):
            below, at_most = np.zeros(len(self.ranks), dtype=np.int64), np.zeros(len(self.ranks), dtype=np.int64)
            kept, finite = kernels.window_counts(parts, self._lo.view(-1).numpy(), self._hi.view(-1).numpy(), below, at_most)
            below, at_most = torch.from_numpy(below), torch.from_numpy(at_most)
        else:
            magnitudes = parts.abs_()
            lo, hi = self._lo.to(parts.device), self._hi.to(parts.device)
            finite = bool(int(_bits(magnitudes).max()) < _NONFINITE_BITS)
            below = (magnitudes < lo).sum(1)
            at_most = (magnitudes <= lo).sum(1)
            inside = (magnitudes > lo) & (magnitudes <= hi)
            kept = [magnitudes[i][inside[i]].cpu() for i in range(len(self.ranks))]
        with self._lock:
            self._below += below.cpu()
            self._at_most += at_most.cpu()
            for i, values in enumerate(kept):
                if values.numel() == 0:
                    continue
                self._count[i] += values.numel()
                if self._count[i] > self.cap:
                    self._kept[i] = []  # too many: this stream falls back to the two-pass selection
                else:
                    self._kept[i].append(values)
        return finite

    def values(self) -> list[float | None]:
        """Per stream: its kth smallest magnitude, or None where the window did not show it."""
        out: list[float | None] = []
        for i, rank in enumerate(self.ranks):
            below, at_most, count = int(self._below[i]), int(self._at_most[i]), self._count[i]
            if rank <= 0:
                out.append(0.0)
            elif below < rank <= at_most:
                out.append(float(self._lo[i, 0]))
            elif at_most < rank <= at_most + count and count <= self.cap:
                kept = torch.cat(self._kept[i]).numpy()
                out.append(float(np.partition(kept, rank - at_most - 1)[rank - at_most - 1]))
            else:
                out.append(None)
        return out


def sample_window(sample: torch.Tensor, fraction: float, slack: float) -> tuple[float, float]:
    """A magnitude window (lo, hi] around the ``fraction`` quantile of |sample| that holds the whole
    population's quantile with high probability: the sample's quantiles at fraction -+ slack (lo = -1
    and hi = the largest float32 where those fall outside the sample)."""
    magnitudes = sample.reshape(-1).abs()
    magnitudes = magnitudes[torch.isfinite(magnitudes)]
    n = magnitudes.numel()
    top = float(torch.finfo(torch.float32).max)
    if n == 0:
        return -1.0, top
    low_rank = int(math.floor((fraction - slack) * n))  # 1-based ranks in the sample
    high_rank = int(math.ceil((fraction + slack) * n)) + 1
    wanted = [r - 1 for r in (low_rank, high_rank) if 1 <= r <= n]
    picked = np.partition(magnitudes.cpu().numpy(), wanted) if wanted else None
    lo = float(picked[low_rank - 1]) if low_rank >= 1 else -1.0
    hi = float(picked[high_rank - 1]) if high_rank <= n else top
    return lo, hi
