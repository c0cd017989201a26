"""Magnitude masking baseline: the plain task-vector sum with per-task top-k magnitude masks."""

from __future__ import annotations

from tallmasks.merging.base import COEF_ONE, Vector, register, task_arithmetic
from tallmasks.schema import Percent
from tallmasks.selection import check_k
from tallmasks.task_vectors import CheckpointSet


@register("mag_masking", COEF_ONE, "Magnitude masking: sum of task vectors, per-task top-k (k=10) magnitude masks")
def mag_masking_method(cs: CheckpointSet, *, k: Percent = 10, device: str = "cpu") -> Vector:
    """The shared vector (untrimmed sum); the masks come from masks.magnitude_masks(cs, k)."""
    check_k(k)
    return task_arithmetic(cs, k=100, device=device)
