"""TIES merging (trim, elect sign, disjoint merge)."""

from __future__ import annotations

from tallmasks.merging.base import COEF_GRID, Vector, register, ties_merge
from tallmasks.task_vectors import CheckpointSet


@register("ties", COEF_GRID, "TIES: top-k trim, sign election, disjoint mean; alpha chosen on validation")
def ties_method(cs: CheckpointSet, *, k: float = 20, ties_agg: str = "mean", device: str = "cpu") -> Vector:
    return ties_merge(cs, k=k, agg=ties_agg, device=device)
