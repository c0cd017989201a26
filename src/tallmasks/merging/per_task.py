"""Per-task methods: one model per task, theta_0 + scale_t * (m_t * tau), over one shared merged vector.

TALL masks, magnitude masking and EMR-merging are such methods. Each registers a ``task_models`` hook
that returns a ``TaskModels``: the candidate settings tried per task on validation (TALL's lambdas;
one entry where nothing is chosen), the mask of one task at one setting, every task's masks at the
chosen settings (bit-packed, what ``compress`` stores), and the per-task scales.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tallmasks.masks import MaskSet

SCALES_INFO = "scales"  # MaskSet.info key holding {task: scale} where the scales are not all 1


def _nothing(chosen: Mapping[str, str]) -> dict:
    return {}


@dataclass
class TaskModels:
    """Task t's model is theta_0 + scale_t * (m_t * tau); ``choices`` (label -> setting) are tried per task."""

    names: Sequence[str]
    choices: Mapping[str, Any]
    mask: Callable[[int, Any], Mapping[str, torch.Tensor]]  # (task index, setting) -> boolean mask by key
    masks: Callable[[Sequence[Any]], MaskSet]  # one setting per task -> every task's mask, bit-packed
    scales: Sequence[float] | None = None  # per task; None means 1
    describe: Callable[[Mapping[str, str]], dict] = field(default=_nothing)  # chosen labels by task -> selection record

    def scale(self, task: int) -> float:
        return 1.0 if self.scales is None else float(self.scales[task])

    @classmethod
    def fixed(cls, masks: MaskSet, label: str, describe: Callable[[Mapping[str, str]], dict] = _nothing) -> TaskModels:
        """Masks (and scales, from ``masks.info["scales"]``) fixed in advance: one setting, nothing to choose."""
        scales = (masks.info or {}).get(SCALES_INFO)
        return cls(
            names=list(masks.names),
            choices={label: None},
            mask=lambda task, _setting: masks.get(masks.names[task]),
            masks=lambda _settings: masks,
            scales=None if scales is None else [float(scales[n]) for n in masks.names],
            describe=describe,
        )


def mask_scales(masks: MaskSet) -> dict[str, float]:
    """{task: scale} of a MaskSet (1 for every task unless its info records scales)."""
    scales = (masks.info or {}).get(SCALES_INFO) or {}
    return {name: float(scales.get(name, 1.0)) for name in masks.names}


def task_models(method: Any, cs: Any, vector: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> TaskModels:
    """A per-task method's TaskModels for ``vector``, given the method's hyperparameters (those its hook takes)."""
    hook = method.task_models
    accepted = inspect.signature(hook).parameters
    return hook(cs, vector, **{key: value for key, value in params.items() if key in accepted})
