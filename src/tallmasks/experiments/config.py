"""main.py's config, validated once: the top-level fields, the registered config groups, and the run's checks.

:class:`MainConfig` declares the top-level fields (each field's type, range and default). A config group
(``method``, ``correction``, ``alignment``) is registered here with :func:`register_group` and validated from
its selected function's signature by :func:`tallmasks.core.params.validate_group`: a new method needs no edit.
Every error is one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from tallmasks.core.errors import ConfigError
from tallmasks.core.params import (
    Group,
    GroupSettings,
    Interval,
    NonNegative,
    NonNegativeInt,
    OneOf,
    Port,
    PositiveInt,
    is_none,
    validate_group,
    validate_section,
)


@dataclass(frozen=True)
class DeviceName:
    """auto, cpu, cuda or cuda:N, available on this machine."""

    def check(self, value: Any, where: str, context: Mapping[str, Any]) -> None:
        from tallmasks.eval.distributed import check_device

        check_device(value, where)


GROUPS: dict[str, Group] = {}


def register_group(name: str, group: Group) -> None:
    """Declare config group ``name`` (e.g. ``correction``), validated from its registered functions."""
    GROUPS[name] = group


def _method_lookup(name: str) -> Callable:
    from tallmasks.merging import get_method

    return get_method(name).fn


register_group(
    "method",
    Group(_method_lookup, run_fields={"load_mask": bool, "grid": Optional[dict[str, list]]}, grid_field="grid"),
)


def _correction_lookup(name: str) -> Callable:
    from tallmasks.non_local.experiment import correction_choice

    return correction_choice(name)


def _alignment_lookup(name: str) -> Callable:
    from tallmasks.non_local.experiment import alignment_choice

    return alignment_choice(name)


register_group("correction", Group(_correction_lookup, runtime=frozenset(), required=False))
register_group("alignment", Group(_alignment_lookup, runtime=frozenset(), required=False))


# ---------------------------------------------------------------------------------------------
# main.py's top-level fields


def _precisions() -> Sequence[str]:
    from tallmasks.eval.evaluator import PRECISIONS

    return PRECISIONS


@dataclass(frozen=True)
class WandbConfig:
    """Logging to Weights & Biases (off unless ``mode`` is online or offline)."""

    project: str = "task-vectors"
    mode: Literal["disabled", "online", "offline"] = "disabled"
    group: Optional[str] = None


@dataclass(frozen=True)
class PoolConfig:
    """A pool of transformers CLIP checkpoints (model_source=hf; tallmasks.experiments.pools): a base and one per task."""

    base: str = ""
    tasks: dict[str, str] = field(default_factory=dict)
    name: Optional[str] = None


@dataclass(frozen=True)
class MainConfig:
    """main.py's top-level fields: types, ranges and defaults (config/config.yaml sets the same defaults)."""

    model: str = "ViT-B-32"
    num_tasks: Optional[PositiveInt] = 8
    specify_lambda: Optional[float] = None
    DATASETS: Optional[list[str]] = None
    model_source: Literal["released", "hf"] = "released"
    pool: Optional[PoolConfig] = None
    n_eval_points: Annotated[int, Interval(ge=2)] = 21
    device: Annotated[str, DeviceName()] = "auto"
    world_size: PositiveInt = 1
    force_world_size: bool = False
    port: Optional[Port] = None
    batch_size: PositiveInt = 512
    precision: Annotated[str, OneOf(_precisions)] = "fp32"
    num_workers: Optional[NonNegativeInt] = None
    device_cache_gb: Optional[NonNegative] = None
    data_location: str = "~/data"
    model_location: str = "models/checkpoints"
    pretrained_weights: Optional[str] = None
    cache_dir: Optional[str] = None
    results_dir: str = "results/merging"
    single_task_dir: str = "results/single_task"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class Settings:
    """A validated main.py config: top-level fields, the groups, and the resolved task list."""

    main: MainConfig
    groups: dict[str, GroupSettings]
    datasets: list[str]
    pool: Any = None  # tallmasks.experiments.pools.Pool when model_source=hf

    @property
    def method(self) -> GroupSettings:
        return self.groups["method"]


def plain_config(cfg: Any) -> dict:
    """A Hydra/OmegaConf config (interpolations resolved) or a mapping as plain Python values."""
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"config field {key}: {message}" if key else f"config: {message}") from None
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the config must be a mapping of fields, got {type(cfg).__name__}")
    return dict(cfg)


def validate_config(cfg: Any) -> Settings:
    """Validate main.py's whole config in one pass: every field's type and range, unknown fields, the
    groups against their registered functions, and the checks that need several fields."""
    from tallmasks.datasets import resolve_datasets
    from tallmasks.eval.distributed import check_world_size, under_launcher

    raw = plain_config(cfg)
    main = validate_section(raw, MainConfig, "", {}, ignore=[*GROUPS, "hydra"])
    pool = None
    if main.model_source == "hf":
        from tallmasks.experiments.pools import Pool

        pool = Pool.from_mapping(dataclasses.asdict(main.pool) if main.pool else None, main.model)
        datasets = pool.select(main.DATASETS, main.num_tasks)
    else:
        datasets = resolve_datasets(None if main.DATASETS else main.num_tasks, main.DATASETS or None)
    context = {"num_tasks": len(datasets)}
    groups = {}
    for name, group in GROUPS.items():
        value = raw.get(name)
        off = isinstance(value, Mapping) and is_none(value.get("name")) and not group.required  # e.g. correction=none
        if off and set(value) - {"name"}:
            raise ConfigError(f"{name}={value.get('name')} takes no fields, got {name}.{sorted(set(value) - {'name'})[0]}")
        if name not in raw or is_none(value) or off:
            if group.required:
                raise ConfigError(f"{name} is missing (choose one: {name}=NAME)")
            continue
        groups[name] = validate_group(name, raw[name], group, context)
    if not under_launcher():
        check_world_size(main.world_size, main.device, force=main.force_world_size)
    return Settings(main, groups, datasets, pool)
