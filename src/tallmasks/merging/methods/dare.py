"""DARE, Drop And REscale (Yu et al., ICML 2024), applied to task vectors before Task Arithmetic or TIES.

Each entry of each task vector is dropped with probability p and the kept ones are divided by 1 - p;
the dropped task vectors then go through the base method (TA: their sum; TIES: trim, elect, merge).
The drops are reproducible: one random stream per (seed, task name, key), drawn on the CPU in row
order, so they do not depend on the device, the block size or the other tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Fraction, Percent
from tallmasks.merging.methods.ties import TiesAgg
from tallmasks.merging.ops import task_arithmetic, ties_merge
from tallmasks.merging.registry import COEF_GRID, Vector, register

BASE_METHODS = ("sum", "ties")


def drop_generator(seed: int, task: str, key: str) -> torch.Generator:
    """The CPU random stream of one task's tensor."""
    digest = hashlib.sha256(f"{int(seed)}:{task}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def drop_and_rescale(tau: torch.Tensor, keep: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """tau * keep, divided by 1 - p when rescaling (nothing to rescale at p = 1)."""
    kept = tau * keep
    return kept / (1 - p) if rescale and p < 1 else kept


@dataclass
class DroppedBlock(Block):
    """A block whose task vectors are DARE's: dropped with probability p, the rest rescaled."""

    keep: Sequence[torch.Tensor] = ()
    p: float = 0.0
    rescale: bool = True

    def task_vectors(self) -> list[torch.Tensor]:
        return [drop_and_rescale(tau, keep, self.p, self.rescale) for tau, keep in zip(super().task_vectors(), self.keep)]

    def taus(self) -> torch.Tensor:
        taus = super().taus()
        for row, keep in zip(taus, self.keep):
            row.mul_(keep)
            if self.rescale and self.p < 1:
                row.div_(1 - self.p)
        return taus


class Dropper:
    """The block transform of DARE: one CPU stream per (seed, task name, key), restarted at each
    tensor's first block and drawn on in row order."""

    def __init__(self, names: Sequence[str], p: float, seed: int, rescale: bool):
        self.names, self.p, self.seed, self.rescale = list(names), float(p), int(seed), bool(rescale)
        self.streams: list[torch.Generator] = []

    def __call__(self, block: Block, tasks: Sequence[int]) -> DroppedBlock:
        if block.start == 0:
            self.streams = [drop_generator(self.seed, self.names[t], block.key) for t in tasks]
        size = block.stop - block.start
        keep = [(torch.rand(size, generator=g) >= self.p).to(block.pretrained.device) for g in self.streams]
        fields_of = {f.name: getattr(block, f.name) for f in fields(Block)}
        return DroppedBlock(**fields_of, keep=keep, p=self.p, rescale=self.rescale)


def dropped_view(cs: CheckpointSet, p: float, seed: int, rescale: bool = True) -> CheckpointSet:
    """``cs`` seen through DARE: every walk's blocks carry dropped and rescaled task vectors."""
    return cs.transformed(Dropper(cs.names, p, seed, rescale))


@register("dare", COEF_GRID, "DARE: task vectors randomly dropped (p) and rescaled, then TA or TIES; alpha chosen on validation")
def dare_method(
    cs: CheckpointSet,
    *,
    p: Fraction = 0.9,
    base_method: Literal["sum", "ties"] = "sum",
    k: Percent | None = None,
    ties_agg: TiesAgg = "mean",
    rescale: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> Vector:
    """TA (k = 100) or TIES (k = 20) over DARE's task vectors; ``rescale=False`` is the paper's DropOnly."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"p (the drop rate) must be a number in [0, 1], got {p!r}")
    if base_method not in BASE_METHODS:
        raise ConfigError(f"base_method must be one of {', '.join(BASE_METHODS)}, got {base_method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    view = dropped_view(cs, p, seed, rescale)
    if base_method == "ties":
        return ties_merge(view, k=20 if k is None else k, agg=ties_agg, device=device)
    return task_arithmetic(view, k=100 if k is None else k, device=device)
