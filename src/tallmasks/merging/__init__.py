"""Merging methods, registered by name (``METHODS``); ``merge(cs, name, **hyperparameters)``."""

from tallmasks.merging import dare, emr, iso, lines, magnitude, tall, task_arithmetic, ties, tsv  # noqa: F401  (registration)
from tallmasks.merging import breadcrumbs, cart, magmax, model_stock, pcb, wudi  # noqa: F401  (registration)
from tallmasks.merging.base import (
    METHODS,
    TALL_LAMBDAS,
    Method,
    alpha_candidates,
    alpha_grid,
    base_vector,
    get_method,
    grid_combinations,
    merge,
    ordered_sum,
    task_arithmetic as task_arithmetic_vector,
    ties_merge,
    trim_thresholds,
)
from tallmasks.merging.per_task import TaskModels
from tallmasks.masks import MaskSet, consensus_mask, magnitude_masks, tall_mask, tall_masks
from tallmasks.task_vectors import CheckpointSet, TaskVector, apply_vector

__all__ = [
    "METHODS",
    "TALL_LAMBDAS",
    "CheckpointSet",
    "MaskSet",
    "Method",
    "TaskModels",
    "TaskVector",
    "alpha_candidates",
    "alpha_grid",
    "apply_vector",
    "base_vector",
    "consensus_mask",
    "get_method",
    "grid_combinations",
    "magnitude_masks",
    "merge",
    "ordered_sum",
    "tall_mask",
    "tall_masks",
    "task_arithmetic_vector",
    "ties_merge",
    "trim_thresholds",
]
