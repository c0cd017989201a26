"""Datasets: the paper's 20 vision datasets (class names, prompt templates, Val splits) and the demo tasks."""

from __future__ import annotations

import importlib
import logging
import numbers
from pathlib import Path

from tallmasks.core.errors import ConfigError
from tallmasks.datasets.paper import PAPER_ORDER as _PAPER_ORDER
from tallmasks.datasets.registry import (
    SPLITS,
    DatasetSpec,
    LabeledImages,
    Loader,
    UnknownDatasetError,
    canonical_name,
    ensure_names,
    get_spec,
    load_split,
    register_dataset,
    registered_datasets,
    split_train_val,
    val_size,
    val_split_indices,
    val_split_loader,
)

logger = logging.getLogger(__name__)

try:  # the offline demo tasks register themselves when their module is present
    importlib.import_module("tallmasks.datasets.scenes")
except ModuleNotFoundError as _exc:
    if _exc.name != "tallmasks.datasets.scenes":
        raise

ALL_DATASETS: list[str] = list(_PAPER_ORDER)
DEMO_DATASETS: list[str] = registered_datasets(demo=True)


def resolve_datasets(num_tasks: int | None = None, names: list[str] | str | None = None) -> list[str]:
    """The task list of an experiment: ``names`` when given (a list, or one string of comma-separated names;
    canonicalized), else the first ``num_tasks`` of ALL_DATASETS (all 20 when neither is given).
    Like the paper, explicit names take precedence over ``num_tasks``."""
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if names is not None and len(names) > 0:
        resolved = ensure_names(list(names))
        if num_tasks is not None and num_tasks != len(resolved):
            logger.info("num_tasks=%s ignored: %d datasets were named explicitly", num_tasks, len(resolved))
        return resolved
    if num_tasks is None:
        return list(ALL_DATASETS)
    valid = isinstance(num_tasks, numbers.Integral) and not isinstance(num_tasks, bool)
    if not valid or not 1 <= int(num_tasks) <= len(ALL_DATASETS):
        raise ConfigError(f"num_tasks must be an integer from 1 to {len(ALL_DATASETS)}, got {num_tasks!r}")
    return ALL_DATASETS[: int(num_tasks)]


def prepare(name: str, root: str | Path, source: str | Path | None = None) -> Path:
    """Download or arrange dataset ``name`` under ``root``; manual-only datasets raise DatasetMissingError
    saying what to do (see tallmasks.datasets.preparation)."""
    from tallmasks.datasets.preparation import prepare as _prepare

    return _prepare(name, root, source=source)


__all__ = [
    "ALL_DATASETS",
    "DEMO_DATASETS",
    "SPLITS",
    "DatasetSpec",
    "LabeledImages",
    "Loader",
    "UnknownDatasetError",
    "canonical_name",
    "get_spec",
    "load_split",
    "prepare",
    "register_dataset",
    "registered_datasets",
    "resolve_datasets",
    "split_train_val",
    "val_size",
    "val_split_indices",
    "val_split_loader",
]
