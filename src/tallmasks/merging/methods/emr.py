"""EMR-merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024).

Elect: tau_uni = sign(sum_t tau_t) * max over tasks agreeing with that sign of |tau_t| (0 where the sum
is 0). Mask: m_t = (tau_t * tau_uni > 0). Rescale: lambda_t = sum|tau_t| / sum|m_t * tau_uni| over the
whole model. Task t's model is theta_0 + lambda_t * (m_t * tau_uni): a per-task model, like TALL masks,
with no coefficient to choose.
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.masks import BitPacker, Layout, MaskSet
from tallmasks.merging.layers import blockwise
from tallmasks.merging.ops import ordered_sum
from tallmasks.merging.per_task import SCALES_INFO, TaskModels
from tallmasks.merging.registry import COEF_ONE, Vector, register


def elect(taus: list[torch.Tensor]) -> torch.Tensor:
    """sign(sum_t tau_t) * max_t |tau_t| over the tasks whose sign agrees (0 where the sum is 0)."""
    sign = torch.sign(ordered_sum(taus))
    magnitude = torch.zeros_like(sign)
    for tau in taus:
        magnitude = torch.maximum(magnitude, tau.abs() * (tau * sign > 0))
    return sign * magnitude


def emr_masks(cs: CheckpointSet, vector: Vector, device="cpu") -> MaskSet:
    """Every task's mask m_t = (tau_t * tau_uni > 0), bit-packed, with its rescaler in info["scales"]."""
    layout = Layout.of(cs)
    packers = [BitPacker(layout.numel) for _ in range(cs.num_tasks)]
    own = [0.0] * cs.num_tasks  # sum |tau_t|
    kept = [0.0] * cs.num_tasks  # sum |m_t * tau_uni|
    for block in cs.blocks(device=device):
        unified = vector[block.key].reshape(-1)[block.start : block.stop].to(device=device, dtype=torch.float32)
        magnitude = unified.abs()
        for t, tau in enumerate(block.task_vectors()):
            mask = tau * unified > 0
            packers[t].add(mask)
            own[t] += float(tau.abs().sum(dtype=torch.float64))
            kept[t] += float((magnitude * mask).sum(dtype=torch.float64))
    # a task whose mask is empty rebuilds theta_0 whatever its rescaler: 1 then
    scales = {name: (own[t] / kept[t] if kept[t] > 0 else 1.0) for t, name in enumerate(cs.names)}
    return MaskSet(cs.names, layout, [p.finish() for p in packers], {"kind": "emr", SCALES_INFO: scales})


def emr_task_models(cs: CheckpointSet, vector: Vector, *, device: str = "cpu") -> TaskModels:
    """EMR's per-task models: fixed masks and rescalers, nothing chosen on validation."""
    return TaskModels.fixed(emr_masks(cs, vector, device), "emr")


@register("emr", COEF_ONE, "EMR-merging: elected vector with per-task masks and rescalers", task_models=emr_task_models)
def emr_method(cs: CheckpointSet, *, device: str = "cpu") -> Vector:
    """The elected (unified) vector tau_uni; the masks and rescalers come from emr_masks."""
    return blockwise(cs, lambda block: elect(block.task_vectors()), device)
