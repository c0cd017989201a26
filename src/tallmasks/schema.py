"""One validation layer for main.py's Hydra config: a typed schema, checked once, up front.

Top-level fields are declared in :class:`MainConfig` (a dataclass: each field's type, range and default).
A config group whose fields belong to a registered function, such as ``method`` (the merging method named
by ``method.name``), is validated from that function's signature: its keyword-only parameters, their
annotations (with the constraints below) and their defaults. A new method is therefore validated with no
edit here; a new group (``correction``, ``alignment``) registers itself with :func:`register_group`.
Unknown fields are errors that name the field; every error is one line.

Constraints attach to annotations with ``typing.Annotated``, e.g. ``k: Percent = 20`` or
``prun_thre_k: TaskCount = 2``; the aliases below are meant for methods' keyword-only parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from tallmasks.errors import ConfigError

_NONE_STRINGS = ("", "none", "null")


# ---------------------------------------------------------------------------------------------
# constraints


@dataclass(frozen=True)
class Interval:
    """A number within bounds (``ge``/``gt`` below, ``le``/``lt`` above)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: Any, where: str, context: Mapping[str, Any]) -> None:
        bad = (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )
        if bad:
            raise ConfigError(f"{where} must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        low = f">= {self.ge:g}" if self.ge is not None else (f"> {self.gt:g}" if self.gt is not None else "")
        high = f"<= {self.le:g}" if self.le is not None else (f"< {self.lt:g}" if self.lt is not None else "")
        return " and ".join(part for part in (low, high) if part) or "a number"


@dataclass(frozen=True)
class AtMostTasks:
    """An integer no larger than the number of tasks of the run (when known)."""

    def check(self, value: Any, where: str, context: Mapping[str, Any]) -> None:
        tasks = context.get("num_tasks")
        if tasks is not None and value > tasks:
            raise ConfigError(f"{where}={value} is more than the {tasks} tasks of this run (every weight would be dropped)")


@dataclass(frozen=True)
class OneOf:
    """A string among the values that ``choices()`` returns (a list kept elsewhere, read when checking)."""

    choices: Callable[[], Sequence[str]]

    def check(self, value: Any, where: str, context: Mapping[str, Any]) -> None:
        allowed = list(self.choices())
        if value not in allowed:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class DeviceName:
    """auto, cpu, cuda or cuda:N, available on this machine."""

    def check(self, value: Any, where: str, context: Mapping[str, Any]) -> None:
        from tallmasks.eval.distributed import check_device

        check_device(value, where)


Percent = Annotated[float, Interval(gt=0, le=100)]
Fraction = Annotated[float, Interval(ge=0, le=1)]
NonNegative = Annotated[float, Interval(ge=0)]
PositiveInt = Annotated[int, Interval(ge=1)]
NonNegativeInt = Annotated[int, Interval(ge=0)]
TaskCount = Annotated[int, Interval(ge=0), AtMostTasks()]
Port = Annotated[int, Interval(ge=1, le=65535)]
PositiveFraction = Annotated[float, Interval(gt=0, le=1)]
Positive = Annotated[float, Interval(gt=0)]


# ---------------------------------------------------------------------------------------------
# one conversion rule for every field


def is_none(value: Any) -> bool:
    """None, or a string that configs use for it ("None", "null", "")."""
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS)


def _union_args(annotation: Any) -> tuple | None:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def configurable(annotation: Any) -> bool:
    """Whether values of ``annotation`` can come from a config file (scalars, literals, lists, mappings)."""
    if annotation in (bool, int, float, str, type(None), Any):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return configurable(typing.get_args(annotation)[0])
    if origin is Literal:
        return True
    if origin in (Union, types.UnionType, list, tuple, dict, Sequence, Mapping):
        return all(configurable(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return dataclasses.is_dataclass(annotation)


def _describe(annotation: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def coerce(value: Any, annotation: Any, where: str, context: Mapping[str, Any] | None = None) -> Any:
    """``value`` converted to ``annotation`` strictly (no truncation, no NaN, no guessing), with its
    constraints checked; a one-line ConfigError naming ``where`` otherwise."""
    context = context or {}
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *constraints = typing.get_args(annotation)
        result = coerce(value, base, where, context)
        if result is not None:
            for constraint in constraints:
                if hasattr(constraint, "check"):
                    constraint.check(result, where, context)
        return result
    options = _union_args(annotation)
    if options is not None:
        if is_none(value) and type(None) in options:
            return None
        candidates = [a for a in options if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return coerce(value, candidate, where, context)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where} must be {' or '.join(_describe(a) for a in candidates)}, got {value!r}"
        )
    if origin is Literal:
        choices = typing.get_args(annotation)
        if not any(c == value and isinstance(c, bool) == isinstance(value, bool) for c in choices):
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence):
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [coerce(v, item, f"{where}[{i}]", context) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        args = typing.get_args(annotation)
        item = args[1] if len(args) == 2 else Any
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): coerce(v, item, f"{where}.{k}", context) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return validate_section(value, annotation, where, context)
    return _scalar(value, annotation, where)


def _scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is type(None):
        if is_none(value):
            return None
        raise ConfigError(f"{where} must be null, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: values of type {annotation!r} cannot come from a config")


def _hints(obj: Any) -> dict[str, Any]:
    """Resolved annotations of a function or dataclass; one that cannot be resolved is left out (its
    default's type stands in for it)."""
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:
        pass
    namespace = dict(getattr(obj, "__globals__", None) or vars(sys.modules.get(obj.__module__, object())))
    out = {}
    for name, annotation in getattr(obj, "__annotations__", {}).items():
        try:
            out[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
        except Exception:
            continue
    return out


def validate_section(values: Any, schema: type, where: str = "", context: Mapping[str, Any] | None = None,
                     ignore: Sequence[str] = ()) -> Any:
    """An instance of the dataclass ``schema`` from a mapping; unknown keys (other than ``ignore``) are errors."""
    prefix = f"{where}." if where else ""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a mapping of fields, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = [k for k in values if k not in known and k not in ignore]
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    hints = _hints(schema)
    out = {}
    for name in known:
        if name in values:
            out[name] = coerce(values[name], hints.get(name, Any), prefix + name, context)
    return schema(**out)


# ---------------------------------------------------------------------------------------------
# groups validated from a registered function's signature


@dataclass(frozen=True)
class Parameter:
    """One configurable keyword-only parameter of a registered function."""

    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when required


def parameters(fn: Callable, runtime: Sequence[str] = ()) -> dict[str, Parameter]:
    """The configurable keyword-only parameters of ``fn``: those with a config-able annotation (or, when
    unannotated, a default of a plain type), minus ``runtime`` ones that the run supplies."""
    hints = _hints(fn)
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind != p.KEYWORD_ONLY or p.name in runtime:
            continue
        annotation = hints.get(p.name)
        if annotation is None:
            default = p.default
            annotation = Any if default is p.empty or default is None else type(default)
        if configurable(annotation):
            out[p.name] = Parameter(p.name, annotation, p.default)
    return out


@dataclass(frozen=True)
class Group:
    """A config group whose ``name`` field selects a registered function; its other fields are that
    function's keyword-only parameters, plus ``run_fields`` (about the run, not the function)."""

    lookup: Callable[[str], Callable]  # name -> the registered function (a one-line error for unknown names)
    run_fields: Mapping[str, Any] = field(default_factory=dict)  # field -> annotation
    runtime: frozenset[str] = frozenset({"device"})  # parameters the run supplies
    required: bool = True
    grid_field: str | None = None  # a mapping parameter -> candidate values, each checked like the parameter


@dataclass(frozen=True)
class GroupSettings:
    """A validated group: the selected name, the function's parameters, and the run fields."""

    name: str
    params: dict[str, Any]
    run: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.run, **self.params}


GROUPS: dict[str, Group] = {}


def register_group(name: str, group: Group) -> None:
    """Declare config group ``name`` (e.g. ``correction``), validated from its registered functions."""
    GROUPS[name] = group


def validate_group(name: str, values: Any, group: Group, context: Mapping[str, Any] | None = None) -> GroupSettings:
    """Check a group's fields against the selected function's signature; defaults fill what is absent."""
    context = context or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name} must be a mapping of fields, got {values!r}")
    if is_none(values.get("name")):
        raise ConfigError(f"{name}.name is missing (choose one: {name}=NAME)")
    selected = str(values["name"])
    fn = group.lookup(selected)
    params = parameters(fn, tuple(group.runtime))
    run_fields = {"name": str, "full_name": Optional[str], **group.run_fields}
    for key in values:
        if key in params or key in run_fields:
            continue
        if key in group.runtime:
            raise ConfigError(f"{name}.{key} is set by the run, not by the {name} config")
        known = ", ".join(sorted([*params, *run_fields])) or "none"
        raise ConfigError(f"unknown config field {name}.{key} for {name} {selected!r} (its fields: {known})")
    out: dict[str, Any] = {}
    for key, p in params.items():
        if key in values:
            out[key] = coerce(values[key], p.annotation, f"{name}.{key}", context)
        elif p.default is inspect.Parameter.empty:
            raise ConfigError(f"{name}.{key} is required for {name} {selected!r}")
        else:
            out[key] = p.default
    run: dict[str, Any] = {}
    for key, annotation in run_fields.items():
        if key == "name" or key not in values:
            continue
        if key == group.grid_field:
            run[key] = _validate_grid(values[key], params, f"{name}.{key}", context)
        else:
            run[key] = coerce(values[key], annotation, f"{name}.{key}", context)
    return GroupSettings(selected, out, run)


def _validate_grid(value: Any, params: Mapping[str, Parameter], where: str, context: Mapping[str, Any]) -> dict:
    if is_none(value):
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must map hyperparameter names to lists of candidate values, got {value!r}")
    grid = {}
    for key, candidates in value.items():
        if key not in params:
            raise ConfigError(f"{where}.{key}: not a hyperparameter of this method (its hyperparameters: {', '.join(params) or 'none'})")
        if not isinstance(candidates, (list, tuple)) or not candidates:
            raise ConfigError(f"{where}.{key} must be a non-empty list of candidate values, got {candidates!r}")
        grid[str(key)] = [coerce(c, params[key].annotation, f"{where}.{key}[{i}]", context) for i, c in enumerate(candidates)]
    return grid


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
    """A pool of transformers CLIP checkpoints (model_source=hf; tallmasks.pools): a base and one per task."""

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
    pool: Any = None  # tallmasks.pools.Pool when model_source=hf

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
        from tallmasks.pools import Pool

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
