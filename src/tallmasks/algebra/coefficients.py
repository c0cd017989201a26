"""Merged vectors whose keys are applied with their own coefficient (layer-wise scaling such as LiNeS)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class KeyScaling:
    """Per-key coefficients offset_k + alpha * slope_k (keys not listed: offset 0, slope 1)."""

    offset: Mapping[str, float] = field(default_factory=dict)
    slope: Mapping[str, float] = field(default_factory=dict)

    def coefficient(self, key: str, alpha: float) -> float:
        return self.offset.get(key, 0.0) + float(alpha) * self.slope.get(key, 1.0)


class ScaledVector(dict):
    """A merged task vector (float32 tensors by key) applied key by key as
    theta_0 + (offset_k + alpha * slope_k) * tau_k, alpha being the coefficient chosen on validation;
    ``info`` records how the scaling was derived."""

    def __init__(self, vector: Mapping[str, torch.Tensor], scaling: KeyScaling, info: Mapping[str, Any] | None = None):
        super().__init__(vector)
        self.scaling = scaling
        self.info = dict(info or {})

    def coefficient(self, key: str, alpha: float) -> float:
        return self.scaling.coefficient(key, alpha)


def scaling_of(vector: Mapping[str, torch.Tensor]) -> KeyScaling | None:
    """The per-key scaling of a ScaledVector (None for a plain vector: every key at alpha)."""
    return vector.scaling if isinstance(vector, ScaledVector) else None


def key_coefficient(scaling: KeyScaling | None, key: str, alpha: float) -> float:
    """The coefficient of ``key`` at alpha: alpha itself without a per-key scaling."""
    return float(alpha) if scaling is None else scaling.coefficient(key, alpha)
