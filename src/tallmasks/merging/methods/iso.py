"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., ICML 2025).

Iso-C: per layer matrix, the Task Arithmetic sum M = U S V^T becomes U (mean(S) I) V^T: a flat spectrum.
Iso-CTS: the top singular vectors of the sum (a ``common_space_fraction`` of the rank) are completed
with each task's top singular vectors orthogonal to that common space, the stacked bases are
orthogonalized (Procrustes), and the spectrum is flattened to the mean of the kept singular values.
Non-matrix keys (and ``text_projection``) are averaged. Alpha is chosen on validation from 0.1 ... 3.0.
"""

from __future__ import annotations

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.core.params import Fraction, coerce
from tallmasks.merging.layers import is_matrix, layer_keys, merge_layers, orthogonalize, svd, task_tensors
from tallmasks.merging.ops import task_arithmetic
from tallmasks.merging.registry import COEF_GRID, Vector, register


def flat_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """U (mean(S) I) V^T of the thin SVD U S V^T."""
    u, s, vh = svd(matrix)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))


@register("iso_c", COEF_GRID, "Iso-C: Task Arithmetic with a flat (isotropic) spectrum per layer; alpha in 0.1..3.0", alpha_max=3.0)
def iso_c_method(cs: CheckpointSet, *, device: str = "cpu") -> Vector:
    """Iso-C merged vector: the task-vector sum, then each layer matrix's spectrum flattened."""
    out = task_arithmetic(cs, k=100, device=device)
    tasks = cs.num_tasks
    for key in layer_keys(cs, "Iso-C layers"):
        mean = out[key] / tasks  # the reference averages, then multiplies matrices back by T
        if not is_matrix(key, cs.shapes[key]):
            out[key] = mean
            continue
        total = (mean * tasks).to(device)
        out[key] = flat_spectrum(total).cpu() if bool(total.any()) else torch.zeros_like(mean)
    return out


def split_rank(rank: int, num_tasks: int, common_space_fraction: float, key: str) -> tuple[int, int]:
    """(common dimensions, dimensions per task), the task-specific part divisible by the number of tasks."""
    common = int(rank * common_space_fraction)
    task_total = round((rank - common) / num_tasks) * num_tasks
    common = rank - task_total
    if common < 0:
        raise ConfigError(
            f"iso_cts: {key!r} has rank {rank}, too small for {num_tasks} task-specific subspaces with "
            f"common_space_fraction={common_space_fraction}; raise common_space_fraction"
        )
    return common, int((rank - common) / num_tasks)


def iso_cts_layer(cs: CheckpointSet, key: str, total: torch.Tensor, common_space_fraction: float, device="cpu") -> torch.Tensor:
    """Iso-CTS of one layer matrix from the task-vector sum ``total`` and the tasks, read one at a time."""
    rows, cols = cs.shapes[key]
    rank = min(rows, cols)
    num_tasks = cs.num_tasks
    common, per_task = split_rank(rank, num_tasks, common_space_fraction, key)
    u, s, vh = svd(total.to(device))
    common_u, common_s, common_v = u[:, :common], s[:common], vh[:common, :]
    basis_u = torch.zeros(rows, rank, device=device)
    values = torch.zeros(rank, device=device)
    basis_v = torch.zeros(rank, cols, device=device)
    for t, tau in enumerate(task_tensors(cs, key, device)):
        # the part of tau_t outside the common space; (U U^T) tau as U (U^T tau), never a rows x rows matrix
        specific = tau - common_u @ (common_u.T @ tau)
        u_t, s_t, vh_t = svd(specific)
        basis_u[:, t * per_task : (t + 1) * per_task] = u_t[:, :per_task]
        values[t * per_task : (t + 1) * per_task] = s_t[:per_task]
        basis_v[t * per_task : (t + 1) * per_task, :] = vh_t[:per_task, :]
    start = num_tasks * per_task
    basis_u[:, start : start + common] = common_u
    values[start : start + common] = common_s
    basis_v[start : start + common, :] = common_v
    basis_u = orthogonalize(basis_u)
    basis_v = orthogonalize(basis_v)
    return torch.linalg.multi_dot((basis_u, torch.diag(torch.ones_like(values) * values.mean()), basis_v))


@register(
    "iso_cts",
    COEF_GRID,
    "Iso-CTS: common and task-specific subspaces with a flat spectrum per layer; alpha in 0.1..3.0",
    alpha_max=3.0,
)
def iso_cts_method(cs: CheckpointSet, *, common_space_fraction: Fraction = 0.8, device: str = "cpu") -> Vector:
    """Iso-CTS merged vector, layer by layer."""
    fraction = coerce(common_space_fraction, Fraction, "common_space_fraction")
    total = task_arithmetic(cs, k=100, device=device)
    return merge_layers(cs, lambda key: iso_cts_layer(cs, key, total.pop(key), fraction, device), "Iso-CTS layers", device)
