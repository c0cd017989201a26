"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude."""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.merging.layers import blockwise
from tallmasks.merging.registry import COEF_GRID, Vector, register


def max_magnitude(taus: list[torch.Tensor]) -> torch.Tensor:
    """Entry-wise value of largest |tau_t|; on ties the later task wins (the reference's ``>=``)."""
    best = taus[0]
    for tau in taus[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best


@register("magmax", COEF_GRID, "MagMax: per entry the task-vector value of largest magnitude; alpha chosen on validation")
def magmax_method(cs: CheckpointSet, *, device: str = "cpu") -> Vector:
    """tau[j] = tau_{t*}[j] with t* = argmax_t |tau_t[j]| (the last such t on ties)."""

    def merge_block(block: Block) -> torch.Tensor:
        return max_magnitude(block.task_vectors())

    return blockwise(cs, merge_block, device)
