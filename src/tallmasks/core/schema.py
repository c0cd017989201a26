"""One validation schema per JSON file type, and one bounded JSON reader.

Every JSON document the package reads from a file it did not just write (a collection's meta.json, a coded
file's index and metadata, a sharded checkpoint's index, a results or summary JSON) is parsed by
``parse_json`` and checked against its schema here, once, where it is read. A document that is not JSON, is
nested deeper than the parser allows, is larger than its reader allows, or does not have the structure its schema
describes is one line naming the file and the place inside it (``tasks[3]``, ``masks.scales.dtd``), raised as
the caller's error type; the code after the check may rely on the structure.

A schema is built from a few parts: ``Str``, ``Int``, ``Num``, ``Bool``, ``Null``, ``Enum``, ``List``,
``Map`` (any keys, one value schema), ``Obj`` (named fields, required or optional, others kept or refused)
and ``Any_`` (one of several). ``check(value, schema)`` returns the value unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tallmasks.core.errors import TallmasksError


class SchemaError(ValueError):
    """A value that does not match its schema; ``where`` is its place in the document."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


class Schema:
    """The structure a JSON value must have."""

    def validate(self, value: Any, where: str) -> None:  # pragma: no cover - every part overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Schema):
    max_len: int | None = None
    test: Callable[[str], str | None] | None = None  # returns a complaint or None

    def validate(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise SchemaError(where, f"expected a string, found {_kind(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(where, f"a string of {len(value)} characters, at most {self.max_len} allowed")
        if self.test is not None and (complaint := self.test(value)):
            raise SchemaError(where, complaint)


@dataclass(frozen=True)
class Int(Schema):
    min: int | None = None
    max: int | None = None

    def validate(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(where, f"expected an integer, found {_kind(value)}")
        if self.min is not None and value < self.min:
            raise SchemaError(where, f"{value} is below its minimum {self.min}")
        if self.max is not None and value > self.max:
            raise SchemaError(where, f"{value} is above its maximum {self.max}")


@dataclass(frozen=True)
class Num(Schema):
    """A finite number (integers included), optionally within [min, max] or (min, max] with ``open_min``."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False

    def validate(self, value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(where, f"expected a number, found {_kind(value)}")
        if not math.isfinite(value):
            raise SchemaError(where, f"expected a finite number, found {value}")
        if self.min is not None and (value <= self.min if self.open_min else value < self.min):
            raise SchemaError(where, f"{value} is {'not above' if self.open_min else 'below'} its minimum {self.min}")
        if self.max is not None and value > self.max:
            raise SchemaError(where, f"{value} is above its maximum {self.max}")


@dataclass(frozen=True)
class Bool(Schema):
    def validate(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            raise SchemaError(where, f"expected true or false, found {_kind(value)}")


@dataclass(frozen=True)
class Null(Schema):
    def validate(self, value: Any, where: str) -> None:
        if value is not None:
            raise SchemaError(where, f"expected null, found {_kind(value)}")


@dataclass(frozen=True)
class Enum(Schema):
    values: tuple

    def validate(self, value: Any, where: str) -> None:
        if not any(value == v and type(value) is type(v) for v in self.values):
            shown = repr(value) if isinstance(value, (str, int, float)) and len(repr(value)) <= 60 else _kind(value)
            raise SchemaError(where, f"{shown} is not one of {', '.join(map(repr, self.values))}")


@dataclass(frozen=True)
class List(Schema):
    item: Schema
    min_len: int = 0
    max_len: int | None = None
    unique: bool = False

    def validate(self, value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(where, f"expected a list, found {_kind(value)}")
        if len(value) < self.min_len:
            raise SchemaError(where, f"a list of {len(value)} items, at least {self.min_len} needed")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(where, f"a list of {len(value)} items, at most {self.max_len} allowed")
        for i, item in enumerate(value):
            self.item.validate(item, _join(where, i))
        if self.unique:
            seen: set = set()
            for i, item in enumerate(value):
                marker = json.dumps(item, sort_keys=True)
                if marker in seen:
                    raise SchemaError(_join(where, i), f"{item!r} appears twice" if isinstance(item, str) else "a duplicate item")
                seen.add(marker)


@dataclass(frozen=True)
class Map(Schema):
    """An object with any keys (each checked by ``key`` when given) and values of one schema."""

    value: Schema
    key: Str | None = None
    max_len: int | None = None

    def validate(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"expected an object, found {_kind(value)}")
        if self.max_len is not None and len(value) > self.max_len:
            raise SchemaError(where, f"an object of {len(value)} entries, at most {self.max_len} allowed")
        for k, v in value.items():
            if self.key is not None:
                self.key.validate(k, _join(where, k))
            self.value.validate(v, _join(where, k))


@dataclass(frozen=True)
class Obj(Schema):
    """An object with ``required`` and ``optional`` fields; others are kept unless ``closed``."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)
    closed: bool = False

    def validate(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(where, f"expected an object, found {_kind(value)}")
        for name, schema in self.required.items():
            if name not in value:
                raise SchemaError(_join(where, name), "missing")
            schema.validate(value[name], _join(where, name))
        for name, schema in self.optional.items():
            if name in value:
                schema.validate(value[name], _join(where, name))
        if self.closed:
            extra = [k for k in value if k not in self.required and k not in self.optional]
            if extra:
                raise SchemaError(_join(where, extra[0]), "unknown field")


@dataclass(frozen=True)
class Any_(Schema):
    """One of several schemas (the first that matches); the error is the last one's."""

    options: tuple[Schema, ...]

    def validate(self, value: Any, where: str) -> None:
        errors = []
        for option in self.options:
            try:
                option.validate(value, where)
                return
            except SchemaError as exc:
                errors.append(exc)
        raise errors[-1]


def optional(schema: Schema) -> Schema:
    """``schema`` or null."""
    return Any_((Null(), schema))


def check(value: Any, schema: Schema, source: object, error: type[TallmasksError]) -> Any:
    """``value`` if it matches ``schema``; else one ``error`` line naming ``source`` and the place."""
    try:
        schema.validate(value, "")
    except SchemaError as exc:
        raise error(f"{source}: {exc}") from None
    return value


def parse_json(
    text: str | bytes,
    source: object,
    error: type[TallmasksError],
    schema: Schema | None = None,
    max_bytes: int | None = None,
) -> Any:
    """The JSON value of ``text`` checked against ``schema``: a one-line ``error`` naming ``source`` when it is
    larger than ``max_bytes``, not JSON, nested deeper than the parser's recursion limit, or does not match. NaN and infinities are refused (not JSON)."""
    if max_bytes is not None and len(text) > max_bytes:
        raise error(f"{source}: {len(text)} bytes of JSON, at most {max_bytes} expected")

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, RecursionError):
            first = "nested too deeply"
        raise error(f"{source}: not valid JSON ({first})") from None
    if schema is not None:
        check(value, schema, source, error)
    return value


def read_json(
    path: Any, error: type[TallmasksError], schema: Schema | None = None, max_bytes: int = 64 << 20, what: str = "JSON file"
) -> Any:
    """``parse_json`` of a file, which must be a regular file of at most ``max_bytes`` bytes."""
    from pathlib import Path

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, larger than any {what} ({max_bytes} bytes at most)")
        with open(path, "rb") as handle:
            text = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    return parse_json(text, path, error, schema, max_bytes)


def names(max_len: int = 200, min_count: int = 0, max_count: int | None = None) -> List:
    """A list of ``min_count`` to ``max_count`` distinct non-empty strings of at most ``max_len`` characters."""
    return List(Str(max_len=max_len, test=lambda s: None if s else "an empty name"), min_len=min_count, max_len=max_count, unique=True)


__all__: Sequence[str] = (
    "Any_",
    "Bool",
    "Enum",
    "Int",
    "List",
    "Map",
    "Null",
    "Num",
    "Obj",
    "Schema",
    "SchemaError",
    "Str",
    "check",
    "names",
    "optional",
    "parse_json",
    "read_json",
)
