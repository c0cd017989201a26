"""The merge of the non-local seed (Sharma, Roy, Dziugaite 2024; its code's ``compute_ties_vector`` and
``compute_tall_mask``), as its notebook ran it for the VGG16 x2 table: a TIES vector, then TALL masks
with lambda 1 and no scaling.

The seed's TIES differs from the TIES paper (``ties``) in two places, both kept here because this method
reproduces what the seed measured:

- trimming is per tensor and keeps the entries strictly above the magnitude at sorted position
  round((1 - keep) * n) (ascending; the product in float32 and jnp.round, half to even, as the seed's
  JAX code; the position is clamped to the last entry), so a tensor keeps slightly fewer than ``keep``
  of its entries, and a tensor of one or two entries keeps none;
- the mean divides the sum of the entries that agree with the elected sign by the number of tasks whose
  trimmed entry does not oppose it, zeros included (the test ``v * sign >= 0``), not by the number of
  non-zero agreeing entries.

Task t's model is theta_0 + m_t * tau_MTL with m_t = |tau_t| >= |tau_MTL - tau_t| (untrimmed tau_t).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import PositiveFraction
from tallmasks.masks import Layout, MaskSet
from tallmasks.merging.per_task import TaskModels
from tallmasks.merging.registry import COEF_ONE, Vector, register

SEED_LAMBDA = 1.0


def seed_trim(tau: torch.Tensor, keep: float) -> torch.Tensor:
    """The seed's per-tensor trimming of one task vector's tensor (see the module's docstring)."""
    flat = tau.reshape(-1)
    magnitudes = torch.sort(flat.abs()).values
    # the seed's JAX code computes percent * size in float32 (x64 off), then rounds half to even
    position = torch.tensor(1.0 - keep, dtype=torch.float32) * torch.tensor(flat.numel(), dtype=torch.float32)
    index = min(int(torch.round(position)), flat.numel() - 1)
    return torch.where(tau.abs() <= magnitudes[index], torch.zeros_like(tau), tau)


def seed_ties_vector(cs: CheckpointSet, keep: float = 0.5, device: str = "cpu") -> Vector:
    """The seed's ``compute_ties_vector(task_vectors, keep)``: per-tensor trim, sign of the summed trimmed
    vectors, then the sum of the non-opposing entries over their count (zeros counted)."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep!r}")
    out: Vector = {}
    for key in cs.float_keys:
        base = cs.tensor(key, device=device)
        trimmed = torch.stack([seed_trim(cs.tensor(key, t, device=device) - base, keep) for t in range(cs.num_tasks)])
        sign = torch.sign(trimmed.sum(dim=0))
        agree = trimmed * sign >= 0
        out[key] = ((trimmed * agree).sum(dim=0) / agree.sum(dim=0)).to("cpu", torch.float32)
    return out


def seed_tall_masks(
    cs: CheckpointSet, tasks: Sequence[int], vector: Vector, lambdas: Sequence[float], device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """The seed's ``compute_tall_mask`` for each of ``tasks`` (at its lambda): |tau_t| >= lam * |tau_MTL - tau_t| (not strict,
    on task vectors; the TALL paper's code tests |theta_0 - theta_t| > lam * |theta_0 + tau_MTL - theta_t|,
    which gives the same models, the two differing only where tau_MTL is 0 or within rounding of the
    boundary). One read of theta_0 per tensor for all the tasks."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in tasks]
    for key in cs.float_keys:
        base = cs.tensor(key, device=device)
        merged = vector[key].to(device=device, dtype=torch.float32)
        for masks, task, lam in zip(out, tasks, lambdas):
            tau = cs.tensor(key, task, device=device) - base
            masks[key] = (tau.abs() >= lam * (merged - tau).abs()).cpu()
    return out


def seed_tall_mask(cs: CheckpointSet, task: int, vector: Vector, lam: float = SEED_LAMBDA, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The seed's TALL mask of one task (:func:`seed_tall_masks`)."""
    return seed_tall_masks(cs, [task], vector, [lam], device)[0]


def seed_task_models(cs: CheckpointSet, vector: Vector, *, device: str = "cpu") -> TaskModels:
    """The seed's TALL masks at lambda 1 (nothing chosen on validation), every task's in one pass."""
    masks = seed_tall_masks(cs, range(cs.num_tasks), vector, [SEED_LAMBDA] * cs.num_tasks, device)
    return TaskModels.fixed(
        MaskSet.from_dicts(dict(zip(cs.names, masks)), Layout.of(cs)),
        f"{SEED_LAMBDA:g}",
        lambda chosen: {"lambdas": dict.fromkeys(chosen, SEED_LAMBDA)},
    )


@register(
    "seed_ties_tall",
    COEF_ONE,
    "the non-local seed's merge: its TIES vector (per-tensor top 50%, its mean), then TALL masks at lambda 1",
    task_models=seed_task_models,
)
def seed_ties_tall_method(cs: CheckpointSet, *, keep: PositiveFraction = 0.5, device: str = "cpu") -> Vector:
    return seed_ties_vector(cs, keep=keep, device=device)
