"""Shared walks of the methods that work layer by layer or entry by entry: whole tensors one task at a
time (the spectral methods TSV-M, Iso-C, Iso-CTS: memory grows with the largest tensor, not with the
model or the number of tasks), whole tensors of every task at once, or streamed row blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.core.progress import progress

Vector = dict[str, torch.Tensor]


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


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``torch.linalg.svd(matrix, full_matrices=False)``. Where LAPACK's divide-and-conquer
    driver (torch's on the CPU) fails to converge, as it does on some rank-deficient matrices with many
    repeated singular values, it is retried in float64 and then with the QR-iteration driver (gesvd,
    through scipy), and the factors returned in the input's dtype and device."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    except torch.linalg.LinAlgError:
        import scipy.linalg

        factors = scipy.linalg.svd(matrix.detach().cpu().double().numpy(), full_matrices=False, lapack_driver="gesvd")
        u, s, vh = (torch.from_numpy(f) for f in factors)
    return tuple(f.to(device=matrix.device, dtype=matrix.dtype) for f in (u, s, vh))


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): U V^T of the thin SVD U S V^T (Procrustes)."""
    u, _, vh = svd(matrix)
    return u @ vh


def layer_keys(cs: CheckpointSet, desc: str) -> Iterator[str]:
    """The floating-point keys in order, with a progress bar when ``cs.progress`` is on."""
    yield from progress(cs.float_keys, desc=desc, unit="tensor", leave=False, disable=not cs.progress)


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


@dataclass
class TensorTasks:
    """One whole floating-point tensor: theta_0 and the task vector of every task, flattened."""

    key: str
    pretrained: torch.Tensor  # 1-D float32
    taus: torch.Tensor  # (tasks, numel) float32
    start: int = 0

    @property
    def stop(self) -> int:
        return self.pretrained.numel()

    def task_vectors(self) -> list[torch.Tensor]:
        return list(self.taus)


def whole_tensors(
    cs: CheckpointSet, device: torch.device | str = "cpu", whole: Callable[[str, tuple[int, ...]], bool] | None = None
) -> Iterator[Block | TensorTasks]:
    """The streamed row blocks, except that each tensor for which ``whole(key, shape)`` holds (every tensor
    by default) comes whole, its task vectors gathered from its blocks (memory: tasks x that tensor)."""
    current: TensorTasks | None = None
    for block in cs.blocks(device=device):
        if whole is not None and not whole(block.key, cs.shapes[block.key]):
            yield block
            continue
        if current is None or current.key != block.key:
            if current is not None:
                yield current
            numel = cs.numel(block.key)
            current = TensorTasks(
                block.key,
                torch.empty(numel, dtype=torch.float32, device=block.pretrained.device),
                torch.empty(cs.num_tasks, numel, dtype=torch.float32, device=block.pretrained.device),
            )
        current.pretrained[block.start : block.stop] = block.pretrained
        for t, theta_t in enumerate(block.finetuned):
            torch.sub(theta_t, block.pretrained, out=current.taus[t, block.start : block.stop])
        if block.stop == cs.numel(block.key):
            yield current
            current = None


def running_sum(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum in task order, one term at a time (for terms too large to hold all at once)."""
    total = None
    for part in parts:
        total = part.clone() if total is None else total.add_(part)
    return total


def blockwise(
    cs: CheckpointSet,
    merge_block: Callable[[Block | TensorTasks], torch.Tensor],
    device: torch.device | str = "cpu",
    whole: bool | Callable[[str, tuple[int, ...]], bool] = False,
) -> Vector:
    """The merged vector (float32, by key) from ``merge_block(block)``, over row blocks, or over whole
    tensors (every one with ``whole=True``, those where ``whole(key, shape)`` holds otherwise)."""
    out = {key: torch.empty(cs.numel(key), dtype=torch.float32) for key in cs.float_keys}
    if whole is False:
        blocks = cs.blocks(device=device)
    else:
        blocks = whole_tensors(cs, device, None if whole is True else whole)
    for block in blocks:
        out[block.key][block.start : block.stop] = merge_block(block).reshape(-1).to("cpu", torch.float32)
    return {key: value.reshape(cs.shapes[key]) for key, value in out.items()}


def is_layer_matrix(key: str, shape: Sequence[int]) -> bool:
    """A weight matrix of an attention or MLP layer (open_clip: attn.in_proj_weight, attn.out_proj.weight,
    mlp.c_fc.weight, mlp.c_proj.weight), the matrices that CART and WUDI-merging treat as such."""
    return len(shape) == 2 and ("attn" in key or "mlp" in key)
