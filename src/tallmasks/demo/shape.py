"""The shape of a demo run's task vectors: how heavy-tailed they are, how much they overlap, and what the
TALL masks keep of them (the measurements behind the demo page's profile table).

All figures are over the image tower (``model.visual.*``), the part that is fine-tuned and merged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tallmasks.core.errors import TallmasksError

PREFIX = "model.visual."
TOP_SHARE = 0.2  # the share of entries whose part of the squared norm is reported


def flat_tower(state: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """The float64 concatenation of ``keys`` of ``state`` (flattened, in that order)."""
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in keys])


def kurtosis(values: torch.Tensor) -> float:
    """Pearson's kurtosis E[(x - mean)^4] / Var(x)^2 (a Gaussian's is 3; not the excess)."""
    centred = values - values.mean()
    variance = centred.pow(2).mean()
    if float(variance) == 0.0:
        raise TallmasksError("kurtosis of a constant vector is undefined")
    return float(centred.pow(4).mean() / variance.pow(2))


def top_share(values: torch.Tensor, share: float = TOP_SHARE) -> float:
    """The part of the squared norm held by the ``share`` largest-magnitude entries."""
    squares = values.pow(2)
    k = max(1, int(round(share * squares.numel())))
    return float(torch.topk(squares, k).values.sum() / squares.sum())


def cosine_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity of the vectors (T x T, float64)."""
    stacked = torch.stack(list(vectors))
    unit = stacked / stacked.norm(dim=1, keepdim=True)
    return unit @ unit.T


def task_vector_shape(location: str | Path, model: str, tasks: Sequence[str], mask_file: str | Path | None = None) -> dict[str, Any]:
    """Shape figures of the experts at ``location`` (released layout) against their theta_0.

    Returns ``{"per_task": {task: {"kurtosis", "top20_share", "norm_ratio"[, "mask_density"]}},
    "cosine": {"mean", "min", "max"}, "mean": {...per-task means...}[, "agreement": {"catastrophic",
    "selfish", "kept_by_all"}]}``; the mask figures come from the TALL masks in ``mask_file`` if given
    (catastrophic: on in no task's mask; selfish: in exactly one; kept by all: in every one; fractions of
    the image tower's entries)."""
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import finetuned_path, zeroshot_path

    if len(tasks) < 2:
        raise TallmasksError(f"the shape of task vectors needs at least 2 tasks, got {len(tasks)}")
    theta0 = load_state_dict(zeroshot_path(Path(location), model))
    keys = [k for k in theta0 if k.startswith(PREFIX) and theta0[k].is_floating_point()]
    if not keys:
        raise TallmasksError(f"{zeroshot_path(Path(location), model)}: no {PREFIX}* weights")
    base = flat_tower(theta0, keys)
    vectors, per_task = [], {}
    for task in tasks:
        tau = flat_tower(load_state_dict(finetuned_path(Path(location), model, task)), keys) - base
        vectors.append(tau)
        per_task[task] = {
            "kurtosis": kurtosis(tau),
            "top20_share": top_share(tau),
            "norm_ratio": float(tau.norm() / base.norm()),
        }
    cos = cosine_matrix(vectors)
    off = cos[~torch.eye(len(tasks), dtype=torch.bool)]
    out: dict[str, Any] = {
        "tensors": PREFIX + "*",
        "entries": int(base.numel()),
        "per_task": per_task,
        "cosine": {"mean": float(off.mean()), "min": float(off.min()), "max": float(off.max())},
    }
    if mask_file is not None:
        out.update(_mask_figures(Path(mask_file), tasks, keys, per_task))
    out["mean"] = {name: sum(row[name] for row in per_task.values()) / len(per_task) for name in next(iter(per_task.values()))}
    return out


def _mask_figures(mask_file: Path, tasks: Sequence[str], keys: Sequence[str], per_task: dict[str, dict[str, float]]) -> dict[str, Any]:
    from tallmasks.masks import MaskSet

    masks = MaskSet.load(mask_file)
    missing = [t for t in tasks if t not in masks]
    if missing:
        raise TallmasksError(f"{mask_file}: no mask for task {missing[0]!r}")
    masked = [k for k in keys if k in masks.layout.keys]
    if not masked:
        raise TallmasksError(f"{mask_file}: no {PREFIX}* tensors")
    counts = None
    for task in tasks:
        mask = masks.get(task)
        on = torch.cat([mask[k].reshape(-1).to(torch.int64) for k in masked])
        per_task[task]["mask_density"] = float(on.double().mean())
        counts = on if counts is None else counts + on
    assert counts is not None
    total = counts.numel()
    return {
        "agreement": {
            "catastrophic": float((counts == 0).sum()) / total,
            "selfish": float((counts == 1).sum()) / total,
            "kept_by_all": float((counts == len(tasks)).sum()) / total,
        }
    }
