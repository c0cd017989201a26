"""Streamed building blocks shared by the methods: trimming, ordered sums, Task Arithmetic and TIES vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tallmasks.algebra import kernels
from tallmasks.algebra.reduction import stacked_sum
from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.algebra.topk import check_k
from tallmasks.core.errors import ConfigError
from tallmasks.masks import topk_thresholds
from tallmasks.merging.registry import Vector


def _empty(cs: CheckpointSet) -> Vector:
    return {k: torch.empty(cs.numel(k), dtype=torch.float32) for k in cs.float_keys}


def _shaped(cs: CheckpointSet, flat: Vector) -> Vector:
    return {k: v.reshape(cs.shapes[k]) for k, v in flat.items()}


def ordered_sum(parts: Sequence[torch.Tensor], tail: int = 0) -> torch.Tensor:
    """Sum over tasks, bit for bit as the paper's stacked ``.sum(0)`` (see ``tallmasks.algebra.reduction``);
    inside a walk, pass ``tail=block.tail`` (or call ``block.sum``)."""
    return stacked_sum(parts, tail)


def trim(taus: torch.Tensor | Sequence[torch.Tensor], thresholds: Sequence[float] | None):
    """Keep entries with |tau_t| >= threshold_t (ties kept); None keeps everything.

    A (tasks x n) tensor gives a (tasks x n) tensor, a sequence of tensors a list."""
    if thresholds is None:
        return taus if isinstance(taus, torch.Tensor) else list(taus)
    if isinstance(taus, torch.Tensor):
        return _trim_(taus.clone(), _column(thresholds, taus))
    return [tau * (tau.abs() >= th) for tau, th in zip(taus, thresholds)]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def _trim_(taus: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """trim() in place on a (tasks x n) tensor, thresholds given as a (tasks x 1) column (None: none)."""
    return taus if column is None else taus.mul_(taus.abs() >= column)


def trim_thresholds(cs: CheckpointSet, k: float, device="cpu") -> list[float] | None:
    """Global per-task top-k thresholds; None when k = 100 (no trimming)."""
    k = check_k(k)
    return None if k >= 100 else topk_thresholds(cs, k, device)


def _trimmed_taus(taus: torch.Tensor, thresholds: list[float] | None) -> torch.Tensor:
    """A block's (tasks x n) task vectors trimmed in place (the walk's reused buffer)."""
    return _trim_(taus, None if thresholds is None else _column(thresholds, taus))


def _destination(out: Vector, block: Block) -> torch.Tensor:
    return out[block.key][block.start : block.stop]


def _store(out: Vector, block: Block, values: torch.Tensor) -> None:
    destination = _destination(out, block)
    if values.data_ptr() != destination.data_ptr():
        destination.copy_(values)


def task_arithmetic(cs: CheckpointSet, k: float = 100, device="cpu") -> Vector:
    """sum_t topk_k(tau_t)."""
    thresholds = trim_thresholds(cs, k, device)
    out = _empty(cs)
    on_cpu = torch.device(device).type == "cpu"

    def work(block: Block) -> None:
        total = block.sum(_trimmed_taus(block.taus(), thresholds), out=_destination(out, block) if on_cpu else None)
        block.verify(total)
        _store(out, block, total)

    for _ in cs.map_blocks(work, device=device):
        pass
    return _shaped(cs, out)


def _ties_block(block: Block, taus: torch.Tensor, thresholds: list[float] | None, agg: str, zero_sign: float):
    """One block of TIES (``taus``: its task vectors, overwritten): merged values, the summed sign
    (zero signs unresolved), and where anything was kept.

    Entries agreeing with the elected sign e (+1 or -1) are those with t * e > 0; the paper's tie
    sign 0 keeps negative entries (its torch.where), as -1 does."""
    trimmed = _trimmed_taus(taus, thresholds)
    total = block.sum(trimmed)
    block.verify(total)
    sign = torch.sign(total)
    elected = torch.where(sign == 0, 1.0 if zero_sign > 0 else -1.0, sign)
    agreeing = trimmed.mul_(elected).clamp_(min=0)  # |t| where t agrees, else 0 (exact: e is +-1)
    count = torch.sign(agreeing).sum(0) if agg == "mean" else None  # kept entries per column, exactly
    merged = block.sum(agreeing.mul_(elected))  # the kept entries with their signs back
    if count is not None:
        return merged / torch.clamp(count, min=1), sign, count > 0
    return merged, sign, merged != 0  # a sum of same-signed values is zero only if they all are


def ties_merge(cs: CheckpointSet, k: float = 20, agg: str = "mean", device="cpu") -> Vector:
    """TIES: trim, elect the sign of the summed trimmed vectors, keep agreeing entries, then mean or sum.

    Entries whose summed sign is zero take the sign of the total sign vector, known only after a
    whole pass: they are merged as if it were positive, and the few tensors where that mattered
    (some trimmed entry non-zero) are merged again when it is not."""
    if agg not in ("mean", "sum"):
        raise ConfigError(f"ties_agg must be 'mean' or 'sum', got {agg!r}")
    thresholds = trim_thresholds(cs, k, device)
    out = _empty(cs)

    def work(block: Block, zero_sign: float = 1.0) -> tuple[int, bool]:
        taus = block.taus()
        if kernels.usable(taus):  # the same operations, fused (tallmasks.algebra.kernels)
            signs, fill_mattered, finite = kernels.ties_block(
                taus, thresholds, block.tail, agg == "mean", zero_sign, _destination(out, block)
            )
            block.verify(finite)
            return signs, fill_mattered
        merged, sign, kept = _ties_block(block, taus, thresholds, agg, zero_sign)
        _store(out, block, merged)
        # the sign total is exact (signs are -1, 0, 1); a zero sum with non-zero entries: the fill mattered
        return int(sign.sum(dtype=torch.float64)), bool(((sign == 0) & kept).any())

    sign_total = 0
    undecided: set[str] = set()
    for block, (signs, fill_mattered) in cs.map_blocks(work, device=device):
        sign_total += signs
        if fill_mattered:
            undecided.add(block.key)
    majority = float(np.sign(sign_total))
    if majority <= 0 and undecided:
        for _ in cs.map_blocks(lambda block: work(block, majority), device=device, keys=sorted(undecided)):
            pass
    return _shaped(cs, out)


def base_vector(cs: CheckpointSet, k: float = 100, use_ties: bool = False, ties_agg: str = "sum", device="cpu") -> Vector:
    """The multi-task vector under TALL masks and consensus: TA (top-k) or TIES (k=20)."""
    if use_ties:
        return ties_merge(cs, k=20, agg=ties_agg, device=device)
    return task_arithmetic(cs, k=k, device=device)
