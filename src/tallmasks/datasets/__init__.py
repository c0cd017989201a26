"""Datasets: the paper's 20 vision datasets (class names, prompt templates, Val splits) and the demo tasks."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

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
from tallmasks.datasets.paper import PAPER_ORDER as _PAPER_ORDER
from tallmasks.errors import ConfigError

logger = logging.getLogger(__name__)

try:  # the offline demo tasks register themselves when their module is present
    importlib.import_module("tallmasks.datasets.digits")
except ModuleNotFoundError as _exc:
    if _exc.name != "tallmasks.datasets.digits":
        raise

ALL_DATASETS: list[str] = list(_PAPER_ORDER)
DEMO_DATASETS: list[str] = registered_datasets(demo=True)


def resolve_datasets(num_tasks: int | None = None, names: list[str] | None = None) -> list[str]:
    """The task list of an experiment: ``names`` when given (canonicalized), else the first ``num_tasks``
    of ALL_DATASETS (all 20 when neither is given). Like the paper, explicit names take precedence."""
    if names is not None and not isinstance(names, str) and len(names) > 0:
        resolved = ensure_names(list(names))
        if num_tasks is not None and num_tasks != len(resolved):
            logger.info("num_tasks=%s ignored: %d datasets were named explicitly", num_tasks, len(resolved))
        return resolved
    if isinstance(names, str) and names:
        raise ConfigError(f"datasets must be a list of names, got the string {names!r}")
    if num_tasks is None:
        return list(ALL_DATASETS)
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= len(ALL_DATASETS):
        raise ConfigError(f"num_tasks must be an integer from 1 to {len(ALL_DATASETS)}, got {num_tasks!r}")
    return ALL_DATASETS[:num_tasks]


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
