"""PCB-merging (Du et al., NeurIPS 2024): parameter competition balancing.

As the authors' ``PCB_merge`` (pcb-merging.py, the implementation their README points to), over the
whole model (d entries per task, sorted ascending, 0-based indices):
  1. clamp |tau_t| to [its value at int(d * 1e-4), its value at int(d * (1 - 1e-4) - 1)] = [lo_t, hi_t];
  2. intra_t = exp(T * ((clamped |tau_t| - lo_t) / (hi_t - lo_t))^2)            (intra-balancing)
     inter_t = tanh(tau_t * sum_s tau_s)                                         (inter-balancing)
     b_t = intra_t * inter_t
  3. drop and rescale: scale_t = (clamp(b_t, q_t, max b_t) - q_t) / (max b_t - q_t), with q_t the value
     of b_t at int(d * (1 - pcb_ratio)), so only the top pcb_ratio of each task's scores survive (that
     index is at most d - 1: a ratio so small that d * (1 - pcb_ratio) rounds to d cuts at the largest
     score, as a slightly larger one does, where the reference would index past the end);
  4. tau = sum_t sign(tau_t) clamped|tau_t| * scale_t / max(sum_t scale_t, 1e-12).
The paper writes steps 2-3 with softmax normalisations; the released code (used for the paper's
numbers) applies exp and tanh without them, and we follow the code. Its coefficient (1.2 in the vision
script) is alpha here, chosen on validation. A zero denominator in a min-max normalisation (all
magnitudes equal) gives 0 rather than the reference's NaN. Quantiles are exact over streamed blocks.
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.algebra.topk import kth_smallest_magnitudes, kth_smallest_values
from tallmasks.core.params import PositiveFraction, coerce
from tallmasks.merging.layers import blockwise
from tallmasks.merging.ops import ordered_sum
from tallmasks.merging.registry import COEF_GRID, Vector, register

CLAMP_RATIO = 1e-4  # magnitudes clamped at both ends before balancing (the reference's default)


def _normalized(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(clamp(x, low, high) - low) / (high - low); 0 where high == low."""
    span = high - low
    if float(span) == 0.0:
        return torch.zeros_like(values)
    return (torch.clamp(values, low, high) - low) / span


def _scalars(values: list[float], device) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float32, device=device) for v in values]


def cut_rank(d: int, pcb_ratio: float) -> int:
    """1-based rank (ascending) of the score cut among ``d`` scores: the reference's 0-based index
    int(d * (1 - pcb_ratio)), at most d - 1 (the largest score) for any ratio in (0, 1]."""
    return min(int(d * (1 - pcb_ratio)), d - 1) + 1


@register("pcb", COEF_GRID, "PCB-merging: intra/inter balancing scores, drop the low ones, score-weighted mean; alpha on validation")
def pcb_method(cs: CheckpointSet, *, pcb_ratio: PositiveFraction = 0.1, device: str = "cpu") -> Vector:
    """Score-weighted mean of the clamped task vectors, keeping each task's top pcb_ratio scores."""
    pcb_ratio = coerce(pcb_ratio, PositiveFraction, "pcb_ratio")
    d, count = cs.num_float_params, cs.num_tasks

    def taus_twice():
        for block in cs.blocks(device=device):
            taus = block.task_vectors()
            yield taus + taus

    low_high = kth_smallest_magnitudes(taus_twice, [int(d * CLAMP_RATIO) + 1] * count + [int(d * (1 - CLAMP_RATIO) - 1) + 1] * count)
    lows, highs = _scalars(low_high[:count], device), _scalars(low_high[count:], device)

    def clamped_and_scores(block: Block) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        taus = block.task_vectors()
        total = ordered_sum(taus)
        clamped, scores = [], []
        for tau, low, high in zip(taus, lows, highs):
            intra = torch.exp(count * _normalized(tau.abs(), low, high) ** 2)
            clamped.append(torch.sign(tau) * torch.clamp(tau.abs(), low, high))
            scores.append(intra * torch.tanh(tau * total))
        return clamped, scores

    def scores_twice():
        for block in cs.blocks(device=device):
            scores = clamped_and_scores(block)[1]
            yield scores + scores

    cut_max = kth_smallest_values(scores_twice, [cut_rank(d, pcb_ratio)] * count + [d] * count)
    cuts, maxima = _scalars(cut_max[:count], device), _scalars(cut_max[count:], device)

    def merge_block(block: Block) -> torch.Tensor:
        clamped, scores = clamped_and_scores(block)
        scales = [_normalized(score, cut, top) for score, cut, top in zip(scores, cuts, maxima)]
        weighted = ordered_sum([tau * scale for tau, scale in zip(clamped, scales)])
        return weighted / torch.clamp(ordered_sum(scales), min=1e-12)

    return blockwise(cs, merge_block, device)
