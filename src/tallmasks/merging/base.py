"""The method registry, the coefficient grids, and the streamed building blocks every method uses."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tallmasks import kernels
from tallmasks.errors import ConfigError
from tallmasks.masks import topk_thresholds
from tallmasks.selection import check_k
from tallmasks.reduction import stacked_sum
from tallmasks.task_vectors import Block, CheckpointSet

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


def ordered_sum(parts: Sequence[torch.Tensor], tail: int = 0) -> torch.Tensor:
    """Sum over tasks, bit for bit as the paper's stacked ``.sum(0)`` (see ``tallmasks.reduction``);
    inside a walk, pass ``tail=block.tail`` (or call ``block.sum``)."""
    return stacked_sum(parts, tail)


def trim(taus: torch.Tensor | Sequence[torch.Tensor], thresholds: Sequence[float] | None):
    """Keep entries with |tau_t| >= threshold_t (ties kept); None keeps everything.

    A (tasks x n) tensor gives a (tasks x n) tensor, a sequence of tensors a list."""
    if thresholds is None:
        return taus if isinstance(taus, torch.Tensor) else list(taus)
    if isinstance(taus, torch.Tensor):
        return _trim_(taus.clone(), _column(thresholds, taus))
    return [tau * (tau.abs() >= th) for tau, th in zip(taus, thresholds)]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def _trim_(taus: torch.Tensor, column: torch.Tensor | None) -> torch.Tensor:
    """trim() in place on a (tasks x n) tensor, thresholds given as a (tasks x 1) column (None: none)."""
    return taus if column is None else taus.mul_(taus.abs() >= column)


def trim_thresholds(cs: CheckpointSet, k: float, device="cpu") -> list[float] | None:
    """Global per-task top-k thresholds; None when k = 100 (no trimming)."""
    k = check_k(k)
    return None if k >= 100 else topk_thresholds(cs, k, device)


def _trimmed_taus(taus: torch.Tensor, thresholds: list[float] | None) -> torch.Tensor:
    """A block's (tasks x n) task vectors trimmed in place (the walk's reused buffer)."""
    return _trim_(taus, None if thresholds is None else _column(thresholds, taus))


def _destination(out: Vector, block: Block) -> torch.Tensor:
    return out[block.key][block.start : block.stop]


def _store(out: Vector, block: Block, values: torch.Tensor) -> None:
    destination = _destination(out, block)
    if values.data_ptr() != destination.data_ptr():
        destination.copy_(values)


def task_arithmetic(cs: CheckpointSet, k: float = 100, device="cpu") -> Vector:
    """sum_t topk_k(tau_t)."""
    thresholds = trim_thresholds(cs, k, device)
    out = _empty(cs)
    on_cpu = torch.device(device).type == "cpu"

    def work(block: Block) -> None:
        total = block.sum(_trimmed_taus(block.taus(), thresholds), out=_destination(out, block) if on_cpu else None)
        block.verify(total)
        _store(out, block, total)

    for _ in cs.map_blocks(work, device=device):
        pass
    return _shaped(cs, out)


def _ties_block(block: Block, taus: torch.Tensor, thresholds: list[float] | None, agg: str, zero_sign: float):
    """One block of TIES (``taus``: its task vectors, overwritten): merged values, the summed sign
    (zero signs unresolved), and where anything was kept.

    Entries agreeing with the elected sign e (+1 or -1) are those with t * e > 0; the paper's tie
    sign 0 keeps negative entries (its torch.where), as -1 does."""
    trimmed = _trimmed_taus(taus, thresholds)
    total = block.sum(trimmed)
    block.verify(total)
    sign = torch.sign(total)
    elected = torch.where(sign == 0, 1.0 if zero_sign > 0 else -1.0, sign)
    agreeing = trimmed.mul_(elected).clamp_(min=0)  # |t| where t agrees, else 0 (exact: e is +-1)
    count = torch.sign(agreeing).sum(0) if agg == "mean" else None  # kept entries per column, exactly
    merged = block.sum(agreeing.mul_(elected))  # the kept entries with their signs back
    if count is not None:
        return merged / torch.clamp(count, min=1), sign, count > 0
    return merged, sign, merged != 0  # a sum of same-signed values is zero only if they all are


def ties_merge(cs: CheckpointSet, k: float = 20, agg: str = "mean", device="cpu") -> Vector:
    """TIES: trim, elect the sign of the summed trimmed vectors, keep agreeing entries, then mean or sum.

    Entries whose summed sign is zero take the sign of the total sign vector, known only after a
    whole pass: they are merged as if it were positive, and the few tensors where that mattered
    (some trimmed entry non-zero) are merged again when it is not."""
    if agg not in ("mean", "sum"):
        raise ConfigError(f"ties_agg must be 'mean' or 'sum', got {agg!r}")
    thresholds = trim_thresholds(cs, k, device)
    out = _empty(cs)

    def work(block: Block, zero_sign: float = 1.0) -> tuple[int, bool]:
        taus = block.taus()
        if kernels.usable(taus):  # the same operations, fused (tallmasks.kernels)
            signs, fill_mattered, finite = kernels.ties_block(
                taus, thresholds, block.tail, agg == "mean", zero_sign, _destination(out, block))
            block.verify(finite)
            return signs, fill_mattered
        merged, sign, kept = _ties_block(block, taus, thresholds, agg, zero_sign)
        _store(out, block, merged)
        # the sign total is exact (signs are -1, 0, 1); a zero sum with non-zero entries: the fill mattered
        return int(sign.sum(dtype=torch.float64)), bool(((sign == 0) & kept).any())

    sign_total = 0
    undecided: set[str] = set()
    for block, (signs, fill_mattered) in cs.map_blocks(work, device=device):
        sign_total += signs
        if fill_mattered:
            undecided.add(block.key)
    majority = float(np.sign(sign_total))
    if majority <= 0 and undecided:
        for _ in cs.map_blocks(lambda block: work(block, majority), device=device, keys=sorted(undecided)):
            pass
    return _shaped(cs, out)


def base_vector(cs: CheckpointSet, k: float = 100, use_ties: bool = False, ties_agg: str = "sum", device="cpu") -> Vector:
    """The multi-task vector under TALL masks and consensus: TA (top-k) or TIES (k=20)."""
    if use_ties:
        return ties_merge(cs, k=20, agg=ties_agg, device=device)
    return task_arithmetic(cs, k=k, device=device)
