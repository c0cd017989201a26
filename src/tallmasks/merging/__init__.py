"""Merging methods, registered by name (``METHODS``); ``merge(cs, name, **hyperparameters)``.

Layout: :mod:`~tallmasks.merging.registry` (the registry and ``merge``), :mod:`~tallmasks.merging.grids`
(the coefficient and lambda grids), :mod:`~tallmasks.merging.ops` (streamed building blocks shared by the
methods), :mod:`~tallmasks.merging.layers` and :mod:`~tallmasks.merging.per_task` (per-layer and per-task
helpers), and one module per method family under :mod:`tallmasks.merging.methods`.
"""

from tallmasks.algebra.task_vectors import CheckpointSet, TaskVector, apply_vector
from tallmasks.masks import MaskSet, consensus_mask, magnitude_masks, tall_mask, tall_masks
from tallmasks.merging import methods  # noqa: F401  (registers every method)
from tallmasks.merging.grids import TALL_LAMBDAS, alpha_candidates, alpha_grid, grid_combinations
from tallmasks.merging.ops import base_vector, ordered_sum, ties_merge, trim_thresholds
from tallmasks.merging.ops import task_arithmetic as task_arithmetic_vector
from tallmasks.merging.per_task import TaskModels
from tallmasks.merging.registry import METHODS, Method, get_method, merge

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
