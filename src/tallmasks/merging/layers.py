"""Layer-wise building blocks of the spectral methods (TSV-M, Iso-C, Iso-CTS): one key at a time, one task
at a time, so memory grows with the largest tensor, not with the model or the number of tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


def merge_layers(cs: CheckpointSet, layer: Callable[[str], torch.Tensor], desc: str, device="cpu") -> dict[str, torch.Tensor]:
    """A merged vector built layer by layer: ``layer(key)`` for layer matrices that some task changes,
    zero for those no task changes, the running mean of the task vectors for every other key."""
    out: dict[str, torch.Tensor] = {}
    for key in layer_keys(cs, desc):
        shape = cs.shapes[key]
        if not is_matrix(key, shape):
            out[key] = running_mean(cs, key, device).cpu()
        elif all_zero(cs, key, device):  # exactly zero, no SVD needed
            out[key] = torch.zeros(shape)
        else:
            out[key] = layer(key).cpu()
    return out
