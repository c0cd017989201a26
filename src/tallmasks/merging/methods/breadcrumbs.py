"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per layer, drop each task vector's largest
(outliers) and smallest (negligible) magnitudes, then sum.

Per tensor and task, with d entries and |tau| sorted ascending, the entries ranked in
[int(d * beta), int(d * gamma)) are kept: |tau| >= the (int(d*beta)+1)-th smallest magnitude (ties
at the lower cut kept) and |tau| < the (int(d*gamma)+1)-th smallest (ties at the upper cut dropped
with the outliers; gamma = 1 drops nothing). 0-dim tensors are kept whole, as in the reference code.
The paper ranks the weights of a whole layer; its reference code ranks each row (last dimension)
of a tensor separately. We follow the paper (one ranking per tensor).
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Fraction, coerce
from tallmasks.merging.layers import TensorTasks, blockwise, running_sum
from tallmasks.merging.registry import COEF_GRID, Vector, register


def breadcrumb_mask(tau: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """Keep magnitudes ranked in [int(d*beta), int(d*gamma)) of one tensor's task vector (see module doc);
    0 <= beta < gamma <= 1."""
    if tau.dim() == 0 or tau.numel() == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    d = tau.numel()
    magnitude = tau.abs().reshape(-1)
    keep = magnitude >= magnitude.kthvalue(int(d * beta) + 1).values
    upper = int(d * gamma)
    if upper < d:
        keep &= magnitude < magnitude.kthvalue(upper + 1).values
    return keep.reshape(tau.shape)


def check_cuts(beta: float, gamma: float) -> tuple[float, float]:
    beta, gamma = coerce(beta, Fraction, "beta"), coerce(gamma, Fraction, "gamma")
    if not beta < gamma:
        raise ConfigError(f"beta must be below gamma (the kept magnitudes lie between them), got beta={beta}, gamma={gamma}")
    return beta, gamma


@register("breadcrumbs", COEF_GRID, "Model Breadcrumbs: per layer, drop outliers and negligible entries, then sum; alpha on validation")
def breadcrumbs_method(cs: CheckpointSet, *, beta: Fraction = 0.85, gamma: Fraction = 0.993, device: str = "cpu") -> Vector:
    """sum_t m_t * tau_t, with m_t keeping the magnitudes between the beta and gamma quantiles of each tensor."""
    beta, gamma = check_cuts(beta, gamma)

    def merge_tensor(tensor: TensorTasks) -> torch.Tensor:
        shape = cs.shapes[tensor.key]
        return running_sum(tau.reshape(shape) * breadcrumb_mask(tau.reshape(shape), beta, gamma) for tau in tensor.taus)

    return blockwise(cs, merge_tensor, device, whole=True)
