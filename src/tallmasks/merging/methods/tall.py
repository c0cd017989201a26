"""TALL masks and Consensus merging (Wang et al., ICML 2024)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Percent, TaskCount
from tallmasks.masks import MaskSet, check_prun_thre_k, consensus_mask, tall_mask, tall_masks
from tallmasks.merging.grids import TALL_LAMBDAS
from tallmasks.merging.methods.ties import TiesAgg
from tallmasks.merging.ops import base_vector
from tallmasks.merging.per_task import TaskModels
from tallmasks.merging.registry import COEF_GRID, COEF_ONE, Vector, register


def tall_task_models(cs: CheckpointSet, vector: Vector, *, device: str = "cpu") -> TaskModels:
    """TALL masks m_t(lambda) over ``vector``, lambda chosen per task from TALL_LAMBDAS."""

    def describe(chosen: Mapping[str, str]) -> dict:
        return {"lambdas": {name: float(label) for name, label in chosen.items()}}

    return TaskModels(
        names=cs.names,
        choices={f"{lam:.6g}": lam for lam in TALL_LAMBDAS},
        mask=lambda task, lam: tall_mask(cs, task, vector, lam, device=device),
        masks=lambda lambdas: tall_masks(cs, vector, list(lambdas), device=device),
        describe=describe,
    )


def uses_saved_masks(params: Mapping) -> bool:
    return True


@register(
    "tall_mask",
    COEF_ONE,
    "TALL masks: per-task masks over the shared multi-task vector (TA or TIES)",
    task_models=tall_task_models,
    saves_masks=True,
)
def tall_mask_method(
    cs: CheckpointSet, *, k: Percent = 100, use_ties: bool = False, ties_agg: TiesAgg = "sum", device: str = "cpu"
) -> Vector:
    """The shared multi-task vector; the per-task masks come from masks.tall_mask / tall_masks."""
    return base_vector(cs, k=k, use_ties=use_ties, ties_agg=ties_agg, device=device)


@register(
    "consensus", COEF_GRID, "Consensus merging: keep weights that at least prun_thre_k TALL masks select", needs_masks=uses_saved_masks
)
def consensus_method(
    cs: CheckpointSet,
    *,
    masks: MaskSet | None = None,
    prun_thre_k: TaskCount = 2,
    k: Percent = 100,
    use_ties: bool = False,
    ties_agg: TiesAgg = "sum",
    base: Vector | None = None,
    device: str = "cpu",
) -> Vector:
    """m * tau_MTL with m the consensus of the TALL masks; ``base`` reuses an already merged tau_MTL."""
    prun_thre_k = check_prun_thre_k(prun_thre_k, cs.num_tasks)
    if masks is None:
        raise ConfigError("consensus needs the per-task TALL masks (build them with method tall_mask first)")
    masks = masks.subset(cs.names)
    keep = consensus_mask(masks, prun_thre_k)
    if base is None:
        vector = base_vector(cs, k=k, use_ties=use_ties, ties_agg=ties_agg, device=device)
    else:
        vector = {key: value.to(torch.float32).clone() for key, value in base.items()}
    for key, value in vector.items():
        value.mul_(keep[key])
    return vector
