"""Magnitude masking baseline: the plain task-vector sum with per-task top-k magnitude masks."""

from __future__ import annotations

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.algebra.topk import check_k
from tallmasks.core.params import Percent
from tallmasks.masks import magnitude_masks
from tallmasks.merging.ops import task_arithmetic
from tallmasks.merging.per_task import TaskModels
from tallmasks.merging.registry import COEF_ONE, Vector, register


def magnitude_task_models(cs: CheckpointSet, vector: Vector, *, k: Percent = 10, device: str = "cpu") -> TaskModels:
    """Per task, the top-k% magnitudes of its own task vector over the shared sum."""
    k = check_k(k)
    return TaskModels.fixed(magnitude_masks(cs, k=k, device=device), "mag_mask", lambda chosen: {"alpha": 1.0, "k": k})


@register(
    "mag_masking",
    COEF_ONE,
    "Magnitude masking: sum of task vectors, per-task top-k (k=10) magnitude masks",
    task_models=magnitude_task_models,
)
def mag_masking_method(cs: CheckpointSet, *, k: Percent = 10, device: str = "cpu") -> Vector:
    """The shared vector (untrimmed sum); the masks come from masks.magnitude_masks(cs, k)."""
    check_k(k)
    return task_arithmetic(cs, k=100, device=device)
