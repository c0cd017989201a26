"""Model Stock (Jang, Yun, Han, ECCV 2024): per layer, interpolate between the average of the fine-tuned
models and the pre-trained model with a ratio set by the angle between the task vectors.

Per tensor: cos_ij = <tau_i, tau_j> / (sqrt(|tau_i|^2 |tau_j|^2) + 1e-8), clipped to [-1, 1]; theta is the
mean of the pairwise angles arccos(cos_ij); t = T cos(theta) / ((T - 1) cos(theta) + 1 + 1e-8); the merged
model is t * mean_t(theta_t) + (1 - t) * theta_0, i.e. the task vector t * mean_t(tau_t), applied at
alpha = 1. The paper gives t for T models with one common angle; with several angles we average them,
as FusionBench does (the authors' code covers two models). A zero task vector has cos 0 with every other.
"""

from __future__ import annotations

import math

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.merging.layers import blockwise
from tallmasks.merging.ops import ordered_sum
from tallmasks.merging.registry import COEF_ONE, Vector, register

EPS = 1e-8


def stock_ratio(gram: torch.Tensor) -> float:
    """The interpolation ratio t of one tensor from the Gram matrix of its task vectors (float64)."""
    count = gram.shape[0]
    angles = []
    for i in range(count):
        for j in range(i + 1, count):
            cos = float(gram[i, j]) / (math.sqrt(float(gram[i, i]) * float(gram[j, j])) + EPS)
            angles.append(math.acos(min(1.0, max(-1.0, cos))))
    cos_mean = math.cos(sum(angles) / len(angles))
    return count * cos_mean / ((count - 1) * cos_mean + 1 + EPS)


@register("model_stock", COEF_ONE, "Model Stock: per layer, t * mean task vector with t from the angle between task vectors")
def model_stock_method(cs: CheckpointSet, *, device: str = "cpu") -> Vector:
    """t_key * mean_t(tau_t) per tensor (applied at alpha = 1), streamed by row blocks."""
    if cs.num_tasks < 2:
        raise ConfigError(f"model_stock needs at least 2 fine-tuned models, got {cs.num_tasks}")
    grams: dict[str, torch.Tensor] = {}

    def merge_block(block: Block) -> torch.Tensor:
        taus = block.task_vectors()
        stacked = torch.stack(taus).double()
        gram = (stacked @ stacked.T).cpu()
        grams[block.key] = gram if block.key not in grams else grams[block.key] + gram
        return ordered_sum(taus) / cs.num_tasks

    vector = blockwise(cs, merge_block, device)
    for key, value in vector.items():
        value.mul_(stock_ratio(grams[key]))
    return vector
