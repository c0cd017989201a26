"""The method registry, the coefficient grids, and the streamed building blocks every method uses."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tallmasks.errors import ConfigError
from tallmasks.masks import topk_thresholds
from tallmasks.selection import check_k
from tallmasks.task_vectors import CheckpointSet

Vector = dict[str, torch.Tensor]

#: lambda grid of TALL masks, chosen per task on its validation split
TALL_LAMBDAS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)

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


def alpha_grid(n_eval_points: int = 21, top: float = 1.0) -> list[float]:
    """Scaling coefficients tried on validation: linspace(0, top, top * (n_eval_points // 2) + 1)[1:]
    (0.1 ... 1.0 by default; top = 3 gives 0.1 ... 3.0, the grid of TSV-M and Iso-C/CTS)."""
    if int(n_eval_points) < 2:
        raise ConfigError(f"n_eval_points must be at least 2, got {n_eval_points!r}")
    steps = int(round(float(top) * (int(n_eval_points) // 2)))
    return [float(a) for a in np.linspace(0.0, float(top), steps + 1)[1:]]


def alpha_candidates(
    method: str, n_eval_points: int = 21, num_tasks: int = 1, specify_lambda=None, params: Mapping[str, Any] | None = None
) -> list[float]:
    """The coefficients a method is evaluated at on validation (one value where nothing is chosen)."""
    spec = get_method(method)
    kind = spec.coefficient
    if kind == COEF_ZERO:
        return [0.0]
    if kind == COEF_AVERAGE:
        return [1.0 / num_tasks]
    if kind == COEF_ONE:
        return [1.0]
    if specify_lambda is not None and str(specify_lambda) != "None":
        try:
            return [float(specify_lambda)]
        except ValueError:
            raise ConfigError(f"specify_lambda must be a number or None, got {specify_lambda!r}") from None
    return alpha_grid(n_eval_points, spec.alpha_max({**spec.defaults, **(params or {})}))


def grid_combinations(grid: Mapping[str, Sequence[Any]] | None) -> list[dict[str, Any]]:
    """Every combination of a grid (hyperparameter -> candidate values, checked by the config schema), in
    the order given; ``[{}]`` for an empty grid."""
    if not grid:
        return [{}]
    for name, values in grid.items():
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"method.grid.{name} lists a value twice: {list(values)!r}")
    names = [str(name) for name in grid]
    return [dict(zip(names, combo)) for combo in itertools.product(*(list(v) for v in grid.values()))]


# ---------------------------------------------------------------------------------------------
# streamed building blocks


def _empty(cs: CheckpointSet) -> Vector:
    return {k: torch.empty(cs.numel(k), dtype=torch.float32) for k in cs.float_keys}


def _shaped(cs: CheckpointSet, flat: Vector) -> Vector:
    return {k: v.reshape(cs.shapes[k]) for k, v in flat.items()}


def blockwise(cs: CheckpointSet, combine: Callable[[list[torch.Tensor]], torch.Tensor], device="cpu") -> Vector:
    """A merged vector computed block by block: ``combine(task vectors of the block)``, float32 by key."""
    out = _empty(cs)
    for block in cs.blocks(device=device):
        out[block.key][block.start : block.stop] = combine(block.task_vectors()).cpu()
    return _shaped(cs, out)


def ordered_sum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over tasks in task order, starting from zero (deterministic, independent of blocking)."""
    total = torch.zeros_like(parts[0])
    for part in parts:
        total += part
    return total


def trim(taus: Sequence[torch.Tensor], thresholds: Sequence[float] | None) -> list[torch.Tensor]:
    """Keep entries with |tau_t| >= threshold_t (ties kept); None keeps everything."""
    if thresholds is None:
        return list(taus)
    return [tau * (tau.abs() >= th) for tau, th in zip(taus, thresholds)]


def trim_thresholds(cs: CheckpointSet, k: float, device="cpu") -> list[float] | None:
    """Global per-task top-k thresholds; None when k = 100 (no trimming)."""
    k = check_k(k)
    return None if k >= 100 else topk_thresholds(cs, k, device)


def task_arithmetic(cs: CheckpointSet, k: float = 100, device="cpu") -> Vector:
    """sum_t topk_k(tau_t)."""
    thresholds = trim_thresholds(cs, k, device)
    out = _empty(cs)
    for block in cs.blocks(device=device):
        out[block.key][block.start : block.stop] = ordered_sum(trim(block.task_vectors(), thresholds)).cpu()
    return _shaped(cs, out)


def ties_merge(cs: CheckpointSet, k: float = 20, agg: str = "mean", device="cpu") -> Vector:
    """TIES: trim, elect the sign of the summed trimmed vectors, keep agreeing entries, then mean or sum."""
    if agg not in ("mean", "sum"):
        raise ConfigError(f"ties_agg must be 'mean' or 'sum', got {agg!r}")
    thresholds = trim_thresholds(cs, k, device)
    # pass 1: the sign of the total sign vector resolves entries whose summed sign is zero
    sign_total = 0
    for block in cs.blocks(device=device):
        sign = torch.sign(ordered_sum(trim(block.task_vectors(), thresholds)))
        sign_total += int((sign > 0).sum()) - int((sign < 0).sum())
    majority = float(np.sign(sign_total))
    # pass 2: disjoint merge
    out = _empty(cs)
    for block in cs.blocks(device=device):
        trimmed = trim(block.task_vectors(), thresholds)
        sign = torch.sign(ordered_sum(trimmed))
        sign[sign == 0] = majority
        selected = [t * torch.where(sign > 0, t > 0, t < 0) for t in trimmed]
        total = ordered_sum(selected)
        if agg == "mean":
            count = ordered_sum([(s != 0).to(torch.float32) for s in selected])
            total = total / torch.clamp(count, min=1)
        out[block.key][block.start : block.stop] = total.cpu()
    return _shaped(cs, out)


def base_vector(cs: CheckpointSet, k: float = 100, use_ties: bool = False, ties_agg: str = "sum", device="cpu") -> Vector:
    """The multi-task vector under TALL masks and consensus: TA (top-k) or TIES (k=20)."""
    if use_ties:
        return ties_merge(cs, k=20, agg=ties_agg, device=device)
    return task_arithmetic(cs, k=k, device=device)
