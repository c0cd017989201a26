"""CART (Choi et al., "Revisiting Weight Averaging for Model Merging", 2024): low rank around the average.

The task vectors are centred on their mean, tau_bar = mean_t(tau_t). Each weight matrix of an attention
or MLP layer keeps, per task, the rank-r truncated SVD of its centred task vector
(r = max(1, int(rank_ratio * min(rows, cols)))); every other tensor keeps it whole. The merged vector is
tau = tau_bar + prior * sum_t LowRank(tau_t - tau_bar), applied at alpha = 1 (the merged model is
theta_avg + prior * sum_t ...). rank_ratio = 0 gives weight averaging, as in the reference code.
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Fraction, coerce
from tallmasks.merging.layers import TensorTasks, blockwise, is_layer_matrix, running_sum, svd
from tallmasks.merging.registry import COEF_ONE, Vector, register


def low_rank(matrix: torch.Tensor, rank_ratio: float) -> torch.Tensor:
    """Truncated SVD of a 2-D tensor keeping max(1, int(rank_ratio * min(shape))) singular values."""
    u, s, vh = svd(matrix)
    rank = max(1, int(rank_ratio * s.shape[0]))
    return (u[:, :rank] * s[:rank]) @ vh[:rank, :]


@register("cart", COEF_ONE, "CART: average of the task vectors plus prior x low-rank centred task vectors, at alpha = 1")
def cart_method(cs: CheckpointSet, *, rank_ratio: Fraction = 0.12, prior: float = 2.0, device: str = "cpu") -> Vector:
    """tau_bar + prior * sum_t LowRank_k(tau_t - tau_bar) per layer matrix (whole centred vectors elsewhere)."""
    rank_ratio = coerce(rank_ratio, Fraction, "rank_ratio")
    try:
        prior = float(prior)
    except (TypeError, ValueError):
        raise ConfigError(f"prior must be a number, got {prior!r}") from None

    def merge_part(part: Block | TensorTasks) -> torch.Tensor:
        """A layer matrix whole (low rank), or a row block of any other tensor (kept whole, entry-wise)."""
        taus = part.task_vectors()
        mean = running_sum(taus) / cs.num_tasks
        if rank_ratio == 0.0:
            return mean
        shape = cs.shapes[part.key]
        if is_layer_matrix(part.key, shape):
            kept = running_sum(low_rank((tau - mean).reshape(shape), rank_ratio) for tau in taus)
        else:
            kept = running_sum(tau - mean for tau in taus)
        return mean + prior * kept.reshape(-1)

    return blockwise(cs, merge_part, device, whole=is_layer_matrix)
