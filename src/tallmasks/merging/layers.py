"""Layer-wise building blocks of the spectral methods (TSV-M, Iso-C, Iso-CTS): one key at a time, one task
at a time, so memory grows with the largest tensor, not with the model or the number of tasks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from tallmasks.task_vectors import CheckpointSet


def is_matrix(key: str, shape: tuple[int, ...]) -> bool:
    """Layer matrices that the spectral methods decompose: 2-D tensors other than ``text_projection``
    (as in the references; everything else is averaged)."""
    return len(shape) == 2 and "text_projection" not in key


def task_tensors(cs: CheckpointSet, key: str, device="cpu") -> Iterator[torch.Tensor]:
    """tau_t[key] for every task in order, whole and in its shape, one at a time (float32)."""
    theta0 = cs.tensor(key, device=device)
    for task in range(cs.num_tasks):
        yield cs.tensor(key, task, device=device) - theta0


def running_mean(cs: CheckpointSet, key: str, device="cpu") -> torch.Tensor:
    """mean_t tau_t[key] accumulated as m += (tau_t - m) / (t + 1), as the references average non-matrix keys."""
    mean = None
    for t, tau in enumerate(task_tensors(cs, key, device)):
        if mean is None:
            mean = tau.clone()
        else:
            mean += (tau - mean) / (t + 1)
    return mean


def all_zero(cs: CheckpointSet, key: str, device="cpu") -> bool:
    """Whether no task changes ``key`` (then every spectral merge of it is exactly zero)."""
    return not any(bool(tau.any()) for tau in task_tensors(cs, key, device))


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): U V^T of the thin SVD U S V^T (Procrustes)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def layer_keys(cs: CheckpointSet, desc: str) -> Iterator[str]:
    """The floating-point keys in order, with a progress bar when ``cs.progress`` is on."""
    yield from tqdm(cs.float_keys, desc=desc, unit="tensor", leave=False, disable=not cs.progress)
