"""Dataset registry: specs (class names, prompt templates), split loading, and the paper's Val split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from tallmasks.core.errors import ConfigError, DatasetMissingError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
MAX_VAL_SAMPLES = 5000
VAL_SEED = 0

Loader = Callable[[str, Path], Dataset]
"""``loader(split, root) -> Dataset``; split is one of SPLITS, root the expanded data location."""


class UnknownDatasetError(ConfigError, DatasetMissingError):
    """A dataset name that no registration matches."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a zero-shot head needs: the dataset's name, class names in label order, prompt templates."""

    name: str
    classnames: list[str]
    templates: list[Callable[[str], str]] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class _Entry:
    spec: DatasetSpec
    loader: Loader
    demo: bool


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, spec: DatasetSpec, loader: Loader, *, demo: bool = False) -> None:
    """Register a dataset under ``name``; ``loader(split, root)`` returns the split as (RGB PIL image, int) items.

    ``demo=True`` marks an offline demo task (listed in DEMO_DATASETS). Registering a name twice is an error.
    """
    if spec.name != name:
        raise ConfigError(f"dataset registration: name {name!r} differs from its spec's name {spec.name!r}")
    if not name or name.endswith("Val"):
        raise ConfigError(f"dataset registration: invalid name {name!r} (must be non-empty, without 'Val' suffix)")
    if not spec.classnames or not spec.templates:
        raise ConfigError(f"dataset registration: {name} needs class names and prompt templates")
    if name in _REGISTRY:
        raise ConfigError(f"dataset registration: {name} is already registered")
    _REGISTRY[name] = _Entry(spec=spec, loader=loader, demo=demo)


def registered_datasets(demo: bool | None = None) -> list[str]:
    """Names in registration order; ``demo`` filters demo (True) or non-demo (False) tasks."""
    return [n for n, e in _REGISTRY.items() if demo is None or e.demo == demo]


def canonical_name(name: str) -> str:
    """The registered name for ``name`` (trailing "Val" dropped, case-insensitive); unknown names raise."""
    if not isinstance(name, str) or not name:
        raise UnknownDatasetError(f"unknown dataset {name!r}")
    base = name[:-3] if name.endswith("Val") else name
    if base in _REGISTRY:
        return base
    lowered = {n.lower(): n for n in _REGISTRY}
    if base.lower() in lowered:
        return lowered[base.lower()]
    known = ", ".join(_REGISTRY)
    raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {known}")


def get_spec(name: str) -> DatasetSpec:
    """Spec of a registered dataset; ``name`` may end in "Val"."""
    return _REGISTRY[canonical_name(name)].spec


def load_split(name: str, split: str, root: str | Path) -> Dataset:
    """The ``split`` ("train", "val" or "test") of dataset ``name`` stored under ``root``.

    "train" is the part of the Val split used for fine-tuning, "val" the held-out part, "test" the test set.
    Items are (PIL RGB image, int label). Missing data raises DatasetMissingError naming the expected path.
    """
    entry = _REGISTRY[canonical_name(name)]
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for {entry.spec.name}; expected one of {', '.join(SPLITS)}")
    return entry.loader(split, Path(root).expanduser())


def val_size(n: int) -> int:
    """Size of the validation part carved out of a base training set of ``n`` items."""
    return min(int(n * VAL_FRACTION), MAX_VAL_SAMPLES)


def val_split_indices(n: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices) of the paper's Val split of a base training set of ``n`` items.

    Same as ``random_split(base, [n - v, v], generator=torch.Generator().manual_seed(0))``,
    v = min(int(0.1 n), 5000).
    """
    v = val_size(n)
    if v <= 0 or n - v <= 0:
        raise DatasetMissingError(f"a training set of {n} items is too small for a validation split")
    train, val = torch.utils.data.random_split(
        range(n),
        [n - v, v],
        generator=torch.Generator().manual_seed(VAL_SEED),  # type: ignore[arg-type]
    )
    return list(train.indices), list(val.indices)


def split_train_val(base_train: Dataset) -> tuple[Subset, Subset]:
    """The paper's Val split of ``base_train``: (train part, val part) as subsets."""
    train_idx, val_idx = val_split_indices(len(base_train))  # type: ignore[arg-type]
    return Subset(base_train, train_idx), Subset(base_train, val_idx)


class LabeledImages(Dataset):
    """Wraps a dataset so each item is (PIL image in RGB, int label)."""

    def __init__(self, base: Any, num_classes: int | None = None) -> None:
        self.base = base
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, int(label)


def val_split_loader(load_base: Callable[[str, Path], Dataset]) -> Loader:
    """A Loader whose train/val splits are the paper's Val split of ``load_base("train", root)``.

    ``load_base(part, root)`` returns the base training set ("train") or the test set ("test").
    """

    def loader(split: str, root: Path) -> Dataset:
        if split == "test":
            return load_base("test", root)
        train, val = split_train_val(load_base("train", root))
        return train if split == "train" else val

    return loader


def ensure_names(names: Sequence[str]) -> list[str]:
    """Canonical names for ``names``; duplicates and unknown names raise."""
    resolved = [canonical_name(n) for n in names]
    seen: set[str] = set()
    for original, name in zip(names, resolved):
        if name in seen:
            raise ConfigError(f"dataset {original!r} is listed twice")
        seen.add(name)
    return resolved
