"""The coefficient grids in one place: TALL masks' lambdas, the alpha grid, a method's candidates, hyperparameter grids."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tallmasks.core.errors import ConfigError
from tallmasks.merging.registry import COEF_AVERAGE, COEF_ONE, COEF_ZERO, get_method

#: lambda grid of TALL masks, chosen per task on its validation split
TALL_LAMBDAS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)


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
