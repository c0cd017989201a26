"""Checksums of stored data: one function for every part a collection writes, checked on every read.

A collection's parts record a checksum of what they hold (each coded stream, each merged tensor, each mask,
each header, meta.json itself), and the readers check it before using the bytes, so one flipped bit is a
one-line error naming the part instead of a wrong model. The checksum is XXH3-64 (the ``xxhash`` package),
written as 16 hex digits: it finds accidental damage (a bit flip, a truncated or spliced file), not
deliberate forgery, at some 25 GB/s, so checking stays a small share of a read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.core.schema import Str

#: the name recorded with the checksums, so a later algorithm can be told apart
CHECKSUM = "xxh3-64"
HEX_DIGITS = 16


def checksum(*parts: bytes | bytearray | memoryview | np.ndarray | str) -> str:
    """XXH3-64 of the parts one after the other (strings as UTF-8), 16 hex digits."""
    import xxhash

    state = xxhash.xxh3_64()
    for part in parts:
        state.update(part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part)
    return state.hexdigest()


def tensor_checksum(tensor: torch.Tensor) -> str:
    """The checksum of a tensor's dtype, shape and bytes (a tensor read back with another dtype or shape
    does not match)."""
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    return checksum(str(tensor.dtype).replace("torch.", ""), json.dumps(list(tensor.shape)), raw)


def json_checksum(value: Any) -> str:
    """The checksum of a JSON value in its canonical form (sorted keys, no spaces)."""
    return checksum(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def is_checksum(value: object) -> bool:
    return isinstance(value, str) and len(value) == HEX_DIGITS and all(c in "0123456789abcdef" for c in value)


#: a checksum field of a JSON document
CHECKSUM_SCHEMA = Str(test=lambda v: None if is_checksum(v) else "not a checksum (16 hex digits)")


class CheckedStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict (``LazyStateDict``) whose tensors are checked against recorded checksums as
    they are read: a damaged tensor is a one-line CheckpointError naming the file and the key."""

    def __init__(self, inner: Mapping[str, torch.Tensor], checksums: Mapping[str, str], origin: object):
        missing = [k for k in inner if k not in checksums]
        if missing or len(checksums) != len(inner):
            which = missing[0] if missing else next(k for k in checksums if k not in inner)
            raise CheckpointError(f"{origin}: damaged file (no checksum for, or no tensor of, {which!r})")
        self._inner = inner
        self._checksums = dict(checksums)
        self._origin = origin

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._inner[key]
        if tensor_checksum(tensor) != self._checksums[key]:
            raise CheckpointError(f"{self._origin}: damaged tensor {key!r} (checksum mismatch)")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):  # shape(), dtype(), path, ... of the state dict read
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)
