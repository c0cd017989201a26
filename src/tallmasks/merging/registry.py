"""The method registry: a method is a function of a CheckpointSet registered by name; ``merge`` runs one."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError

Vector = dict[str, torch.Tensor]


#: how a method's merged vector is scaled before evaluation
COEF_GRID = "grid"  # alpha chosen on validation from alpha_grid()
COEF_ZERO = "zero"  # alpha = 0 (the pre-trained model)
COEF_AVERAGE = "average"  # alpha = 1 / T
COEF_ONE = "one"  # alpha = 1 with per-task masks

#: Hydra config fields that describe a run rather than the merge itself
CONFIG_ONLY_FIELDS = frozenset({"name", "full_name", "load_mask", "grid"})


def _never(params: Mapping[str, Any]) -> bool:
    return False


def _one(params: Mapping[str, Any]) -> float:
    return 1.0


@dataclass(frozen=True)
class Method:
    """A registered merging method: a function of a CheckpointSet and its hyperparameters.

    ``task_models(cs, vector, **params)``, when set, makes it a per-task method (one model per task,
    theta_0 + scale_t * (m_t * tau)); ``needs_masks(params)`` says whether it reads the saved TALL
    masks; ``alpha_max(params)`` is the top of its coefficient grid.
    """

    name: str
    fn: Callable[..., Vector]
    coefficient: str
    description: str
    defaults: dict = field(default_factory=dict)
    task_models: Callable[..., Any] | None = None
    needs_masks: Callable[[Mapping[str, Any]], bool] = _never
    alpha_max: Callable[[Mapping[str, Any]], float] = _one
    needs_alpha: bool = False  # its vector is only meaningful at a coefficient (per-key scales)
    saves_masks: bool = False  # its chosen per-task masks are the TALL masks that consensus and load_mask read

    def __call__(self, cs: CheckpointSet, **params) -> Vector:
        return self.fn(cs, **params)


METHODS: dict[str, Method] = {}


def register(
    name: str,
    coefficient: str,
    description: str,
    *,
    task_models: Callable[..., Any] | None = None,
    needs_masks: Callable[[Mapping[str, Any]], bool] = _never,
    alpha_max: float | Callable[[Mapping[str, Any]], float] = 1.0,
    needs_alpha: bool = False,
    saves_masks: bool = False,
) -> Callable:
    """Register ``fn(cs, **hyperparameters) -> merged vector`` under ``name``."""

    def wrap(fn: Callable[..., Vector]) -> Callable[..., Vector]:
        signature = inspect.signature(fn)
        defaults = {
            p.name: p.default
            for p in list(signature.parameters.values())[1:]
            if p.default is not inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY
        }
        top = alpha_max if callable(alpha_max) else (lambda params, value=float(alpha_max): value)
        METHODS[name] = Method(name, fn, coefficient, description, defaults, task_models, needs_masks, top, needs_alpha, saves_masks)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(sorted(METHODS))}") from None


def merge(cs: CheckpointSet, method: str, **params) -> Vector:
    """Merged task vector (float32, by key over cs.float_keys) of a registered method."""
    spec = get_method(method)
    accepted = set(inspect.signature(spec.fn).parameters) - {"cs"}
    kwargs = {}
    for key, value in params.items():
        if key in CONFIG_ONLY_FIELDS:
            continue
        if key not in accepted:
            raise ConfigError(f"method {method!r} has no hyperparameter {key!r} (it takes {', '.join(sorted(accepted)) or 'none'})")
        kwargs[key] = value
    return spec.fn(cs, **kwargs)
