"""WUDI-merging (Cheng et al., ICML 2025): data-free optimisation of the merged vector from the task vectors.

For every weight matrix of an attention or MLP layer, starting from the sum of the task vectors, Adam
(lr 1e-5, no weight decay, 300 steps) minimises
    L(M) = sum_t ||(M - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2 .
Its gradient is 2 (M A - B) with A = sum_t tau_t^T tau_t / ||tau_t||^2 and B = sum_t tau_t tau_t^T tau_t /
||tau_t||^2, computed once per matrix, so a step costs one (rows x cols x cols) product instead of two
per task (the reference differentiates L with autograd: the same steps up to float rounding). A task
whose vector is zero on a matrix does not constrain it (the reference would divide 0 by 0). Every other
entry keeps its pre-trained value (task vector 0), as in the authors' ViT code; the merged vector is
applied at alpha = 1. Runs on the chosen device (a GPU makes it fast; the CPU works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import NonNegativeInt, Positive
from tallmasks.merging.layers import TensorTasks, blockwise, is_layer_matrix, running_sum
from tallmasks.merging.registry import COEF_ONE, Vector, register


def wudi_matrix(taus: Sequence[torch.Tensor], iterations: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """The merged matrix of one layer: Adam on sum_t ||(M - tau_t) tau_t^T||^2 / ||tau_t||^2 from M = sum_t tau_t."""
    merged = torch.nn.Parameter(running_sum(taus))
    a = b = None
    for tau in taus:  # A = sum_t A_t, A_t = tau_t^T tau_t / ||tau_t||^2;  B = sum_t tau_t A_t
        norm = torch.sum(tau * tau)
        if float(norm) == 0.0:
            continue
        weighted = (tau.T @ tau) / norm
        a = weighted if a is None else a.add_(weighted)
        b = tau @ weighted if b is None else b.add_(tau @ weighted)
    if a is None or iterations == 0:
        return merged.detach()
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = 2 * (merged @ a - b)
            optimizer.step()
    return merged.detach()


@register("wudi", COEF_ONE, "WUDI-merging: per layer matrix, Adam on the task vectors' interference loss; alpha = 1")
def wudi_method(cs: CheckpointSet, *, iterations: NonNegativeInt = 300, lr: Positive = 1e-5, device: str = "cpu") -> Vector:
    """Optimised merged matrices for attention/MLP weights; zero task vector elsewhere."""
    if isinstance(iterations, bool) or int(iterations) != iterations or int(iterations) < 0:
        raise ConfigError(f"iterations must be a non-negative integer, got {iterations!r}")
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        lr = float("nan")
    if not lr > 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    iterations = int(iterations)

    def merge_part(part: Block | TensorTasks) -> torch.Tensor:
        """A layer matrix whole (optimised), or a row block of any other tensor (zero task vector)."""
        shape = cs.shapes[part.key]
        if not is_layer_matrix(part.key, shape):
            return torch.zeros_like(part.pretrained)
        return wudi_matrix([tau.reshape(shape) for tau in part.taus], iterations, lr)

    return blockwise(cs, merge_part, device, whole=is_layer_matrix)
