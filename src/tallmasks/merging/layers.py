"""Shared walks for methods that work entry by entry, or on one whole tensor (layer) of every task at once."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tallmasks.errors import ConfigError
from tallmasks.task_vectors import Block, CheckpointSet

Vector = dict[str, torch.Tensor]


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


def check_fraction(value: float, name: str, low_open: bool = False) -> float:
    """A number in [0, 1] (or (0, 1] with ``low_open``); ConfigError naming ``name`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= number <= 1.0) or (low_open and number == 0.0):
        raise ConfigError(f"{name} must be a fraction in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return number
