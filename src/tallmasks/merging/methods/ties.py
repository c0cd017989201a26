"""TIES merging (trim, elect sign, disjoint merge)."""

from __future__ import annotations

from typing import Literal

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.params import Percent
from tallmasks.merging.ops import ties_merge
from tallmasks.merging.registry import COEF_GRID, Vector, register

#: how TIES combines the entries that agree with the elected sign
TiesAgg = Literal["mean", "sum"]


@register("ties", COEF_GRID, "TIES: top-k trim, sign election, disjoint mean; alpha chosen on validation")
def ties_method(cs: CheckpointSet, *, k: Percent = 20, ties_agg: TiesAgg = "mean", device: str = "cpu") -> Vector:
    return ties_merge(cs, k=k, agg=ties_agg, device=device)
