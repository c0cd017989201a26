"""Merged vectors whose keys are applied with their own coefficient (layer-wise scaling such as LiNeS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class ScaledVector(dict):
    """A merged task vector (float32 tensors by key) applied key by key as
    theta_0 + (offset_k + alpha * slope_k) * tau_k, alpha being the coefficient chosen on validation.
    Plain vectors are the case offset 0, slope 1; ``info`` records how the scaling was derived."""

    def __init__(
        self,
        vector: Mapping[str, torch.Tensor],
        offset: Mapping[str, float],
        slope: Mapping[str, float],
        info: Mapping[str, Any] | None = None,
    ):
        super().__init__(vector)
        self.offset = {key: float(value) for key, value in offset.items()}
        self.slope = {key: float(value) for key, value in slope.items()}
        self.info = dict(info or {})

    def coefficient(self, key: str, alpha: float) -> float:
        return self.offset.get(key, 0.0) + float(alpha) * self.slope.get(key, 1.0)


def key_coefficient(vector: Mapping[str, torch.Tensor], key: str, alpha: float) -> float:
    """The coefficient of ``key`` at alpha: alpha itself unless ``vector`` scales its keys."""
    if isinstance(vector, ScaledVector):
        return vector.coefficient(key, alpha)
    return float(alpha)
