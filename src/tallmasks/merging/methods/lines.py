"""LiNeS (Wang et al., ICLR 2025): the merged vector of TA, TIES or Consensus scaled linearly with depth.

Key k of residual block l (of L) is applied with lambda_k = alpha + beta * l / (L - 1), and every key
outside the blocks with alpha, where alpha = (1/T) * ||sum_t tau_t||_1 / ||tau_MTL||_1 and beta is the
coefficient chosen on validation (the role alpha plays for Task Arithmetic).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from tallmasks.algebra.coefficients import KeyScaling, ScaledVector
from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Percent, PositiveInt, TaskCount
from tallmasks.masks import MaskSet
from tallmasks.merging.methods.ties import TiesAgg
from tallmasks.merging.ops import ordered_sum, trim, trim_thresholds
from tallmasks.merging.registry import COEF_GRID, merge, register

BASE_METHODS = ("sum", "ties", "consensus")
_BLOCK_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.)")


def infer_num_blocks(keys: Sequence[str]) -> int:
    """Number of residual blocks: 1 + the largest index written ``.<i>.`` in a key (1 when there is none)."""
    indices = [int(match) for key in keys for match in _BLOCK_INDEX.findall(key)]
    return max(indices, default=0) + 1


def block_depth(key: str, num_blocks: int) -> int | None:
    """The block a key belongs to: the smallest i < num_blocks with ``.<i>.`` in the key (None: outside the blocks)."""
    for i in range(num_blocks):
        if f".{i}." in key:
            return i
    return None


def depth_slopes(keys: Sequence[str], num_blocks: int) -> dict[str, float]:
    """l / (L - 1) for keys of block l, 0 for keys outside the blocks."""
    slopes = {}
    for key in keys:
        depth = block_depth(key, num_blocks)
        slopes[key] = 0.0 if depth is None or num_blocks < 2 else depth / (num_blocks - 1)
    return slopes


def _base_params(base_method: str, k, ties_agg, use_ties: bool, prun_thre_k: int, masks) -> dict:
    if base_method == "sum":
        return {"k": 100 if k is None else k}
    if base_method == "ties":
        return {"k": 20 if k is None else k, "ties_agg": "mean" if ties_agg is None else ties_agg}
    return {
        "k": 100 if k is None else k,
        "ties_agg": "sum" if ties_agg is None else ties_agg,
        "use_ties": use_ties,
        "prun_thre_k": prun_thre_k,
        "masks": masks,
    }


def _l1_norms(cs: CheckpointSet, vector: Mapping[str, torch.Tensor], summed_k: float, device) -> tuple[float, float]:
    """(||sum_t topk(tau_t)||_1, ||vector||_1) in float64, both over the same blocks."""
    thresholds = trim_thresholds(cs, summed_k, device)
    summed, merged = 0.0, 0.0
    for block in cs.blocks(device=device):
        summed += float(ordered_sum(trim(block.task_vectors(), thresholds)).double().abs().sum())
        merged += float(vector[block.key].reshape(-1)[block.start : block.stop].double().abs().sum())
    return summed, merged


def _uses_masks(params: Mapping) -> bool:
    return params.get("base_method") == "consensus"


def _alpha_max(params: Mapping) -> float:
    # the reference searches 0.1 ... 1.5 for TIES (with and without LiNeS), 0.1 ... 1.0 otherwise
    return 1.5 if params.get("base_method") == "ties" else 1.0


@register(
    "lines",
    COEF_GRID,
    "LiNeS: TA/TIES/Consensus vector scaled linearly with depth; beta chosen on validation",
    needs_masks=_uses_masks,
    alpha_max=_alpha_max,
    needs_alpha=True,
)
def lines_method(
    cs: CheckpointSet,
    *,
    base_method: Literal["sum", "ties", "consensus"] = "sum",
    k: Percent | None = None,
    ties_agg: TiesAgg | None = None,
    use_ties: bool = False,
    prun_thre_k: TaskCount = 2,
    num_blocks: PositiveInt | None = None,
    masks: MaskSet | None = None,
    device: str = "cpu",
) -> ScaledVector:
    """The base method's vector with LiNeS's per-key coefficients (k: 100 for sum/consensus, 20 for ties);
    ``num_blocks`` is at most the blocks the keys index (``infer_num_blocks``, its default)."""
    if base_method not in BASE_METHODS:
        raise ConfigError(f"base_method must be one of {', '.join(BASE_METHODS)}, got {base_method!r}")
    present = infer_num_blocks(cs.float_keys)
    if num_blocks is None:
        num_blocks = present
    elif isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ConfigError(f"num_blocks must be a positive integer or None, got {num_blocks!r}")
    elif num_blocks > present:
        raise ConfigError(
            f"num_blocks={num_blocks} is more than the {present} blocks of this model (its keys index blocks 0 to {present - 1})"
        )
    params = _base_params(base_method, k, ties_agg, use_ties, prun_thre_k, masks)
    vector = merge(cs, base_method, device=device, **params)
    # the reference's ||sum_t tau_t||_1 uses the task vectors trimmed by k for TA-based vectors, untrimmed for TIES
    ta_based = base_method == "sum" or (base_method == "consensus" and not use_ties)
    summed, merged = _l1_norms(cs, vector, params["k"] if ta_based else 100, device)
    alpha = (summed / merged) * 1 / cs.num_tasks if merged > 0 else 1 / cs.num_tasks
    slopes = depth_slopes(cs.float_keys, num_blocks)
    info = {"base_method": base_method, "lines_alpha": alpha, "num_blocks": num_blocks}
    return ScaledVector(vector, KeyScaling(dict.fromkeys(cs.float_keys, alpha), slopes), info)
