"""Task Arithmetic and its fixed-coefficient relatives: zero-shot and weight averaging."""

from __future__ import annotations

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.params import Percent
from tallmasks.merging.ops import task_arithmetic
from tallmasks.merging.registry import COEF_AVERAGE, COEF_GRID, COEF_ZERO, Vector, register


@register("sum", COEF_GRID, "Task Arithmetic: sum of (top-k trimmed) task vectors, alpha chosen on validation")
def sum_method(cs: CheckpointSet, *, k: Percent = 100, device: str = "cpu") -> Vector:
    return task_arithmetic(cs, k=k, device=device)


@register("average", COEF_AVERAGE, "Weight averaging: the task-vector sum applied with alpha = 1/T")
def average_method(cs: CheckpointSet, *, k: Percent = 100, device: str = "cpu") -> Vector:
    return task_arithmetic(cs, k=k, device=device)


@register("zeroshot", COEF_ZERO, "The pre-trained model: the task-vector sum applied with alpha = 0")
def zeroshot_method(cs: CheckpointSet, *, k: Percent = 100, device: str = "cpu") -> Vector:
    return task_arithmetic(cs, k=k, device=device)
