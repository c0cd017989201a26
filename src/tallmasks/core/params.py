"""Typed parameters: constraints on annotations, one conversion rule, and validation of config groups.

A configurable function (a merging method, a correction, an alignment) declares its keyword-only
parameters with annotations such as ``k: Percent = 20`` or ``prun_thre_k: TaskCount = 2``; constraints attach
with ``typing.Annotated`` (the aliases below). :func:`coerce` converts and checks one value,
:func:`validate_section` a dataclass of fields, and :func:`validate_group` a config group against the
signature of the function it selects. Unknown fields are errors that name the field; every error is one
line. main.py's own fields and the registered groups live in :mod:`tallmasks.experiments.config`.
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

from tallmasks.core.errors import ConfigError

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
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(f"{where} must be {' or '.join(_describe(a) for a in candidates)}, got {value!r}")
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


def validate_section(
    values: Any, schema: type, where: str = "", context: Mapping[str, Any] | None = None, ignore: Sequence[str] = ()
) -> Any:
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
