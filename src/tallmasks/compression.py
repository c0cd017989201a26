"""Compress a collection of fine-tuned checkpoints to one merged vector plus one bit mask per task.

A compressed collection is a folder:

- ``merged.safetensors``: the multi-task vector tau_MTL (floating-point keys, the inputs' dtype);
- ``masks.safetensors``: one bit-packed mask per task (``MaskSet``);
- ``meta.json``: task names, how the masks were built (with the per-task scales of EMR-merging), and
  the pre-trained checkpoint it refers to (path and SHA-256): theta_0 is referenced, not copied.

Task t is rebuilt as theta_0 + scale_t * (m_t * tau_MTL), scale_t = 1 for TALL and magnitude masks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from tallmasks.checkpoints import load_state_dict, save_state_dict, sha256_file
from tallmasks.errors import CheckpointError, ConfigError
from tallmasks.masks import MaskSet
from tallmasks.merging import get_method, merge
from tallmasks.merging.per_task import mask_scales, task_models
from tallmasks.task_vectors import CheckpointSet, apply_vector

log = logging.getLogger(__name__)

FORMAT = "tallmasks-compressed-v1"
MERGED_FILE = "merged.safetensors"
MASKS_FILE = "masks.safetensors"
META_FILE = "meta.json"
DEFAULT_LAMBDA = 0.4

#: --masks kinds and the per-task methods that build them
MASK_METHODS = {"tall": "tall_mask", "magnitude": "mag_masking", "emr": "emr"}


def _is_collection(path: Path) -> bool:
    meta = path / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_collection(out_dir):
        raise CheckpointError(f"{out_dir}: folder is not empty and is not a compressed collection; choose another --out")


def compress(
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    use_ties: bool = False,
    lambdas: float | Sequence[float] = DEFAULT_LAMBDA,
    masks: str = "tall",
    k: float = 10,
    device: str = "cpu",
    progress: bool = False,
) -> dict:
    """Write a compressed collection to ``out_dir`` atomically; returns its metadata."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if masks not in MASK_METHODS:
        raise ConfigError(f"masks must be one of {', '.join(MASK_METHODS)}, got {masks!r}")
    cs = CheckpointSet(pretrained, list(finetuned), names)
    cs.progress = progress
    method = get_method(MASK_METHODS[masks])
    params = {"tall": {"use_ties": use_ties}, "magnitude": {"k": k}, "emr": {}}[masks]
    if masks == "tall":
        settings = [lambdas] * cs.num_tasks if isinstance(lambdas, (int, float)) else list(lambdas)
    else:
        settings = [None] * cs.num_tasks
    vector = merge(cs, method.name, device=device, **params)
    mask_set = task_models(method, cs, vector, {**params, "device": device}).masks(settings)
    mask_info: dict = {"kind": masks, **params}
    if masks == "tall":
        mask_info["lambdas"] = mask_set.info["lambdas"]
        mask_set.info["use_ties"] = use_ties
    elif masks == "magnitude":
        mask_info["k"] = float(k)
    else:
        mask_info["scales"] = mask_scales(mask_set)
    stored = {key: value.to(cs.dtypes[key]) for key, value in vector.items()}
    meta = {
        "format": FORMAT,
        "tasks": cs.names,
        "masks": mask_info,
        "num_params": cs.num_float_params,
        "pretrained": {"path": str(Path(pretrained).resolve()), "sha256": sha256_file(pretrained)},
        "finetuned": [str(Path(p).resolve()) for p in finetuned],
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_state_dict(stored, tmp / MERGED_FILE)
        mask_set.save(tmp / MASKS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(collection: str | Path) -> dict:
    collection = Path(collection)
    if not collection.is_dir():
        raise CheckpointError(f"{collection}: no such compressed collection (expected a folder)")
    if not _is_collection(collection):
        raise CheckpointError(f"{collection}: not a compressed collection (no valid {META_FILE})")
    return json.loads((collection / META_FILE).read_text())


def task_name(meta: dict, task: str | int) -> str:
    """Resolve a task given by name or 0-based index."""
    tasks = meta["tasks"]
    if str(task) in tasks:
        return str(task)
    try:
        index = int(task)
    except (TypeError, ValueError):
        raise CheckpointError(f"no task {task!r} in the collection (tasks: {', '.join(tasks)})") from None
    if not 0 <= index < len(tasks):
        raise CheckpointError(f"task index {index} out of range (0..{len(tasks) - 1})")
    return tasks[index]


def decompress(
    collection: str | Path, task: str | int, out: str | Path | None = None, pretrained: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Rebuild theta_0 + scale_t * (m_t * tau_MTL) for one task; saved atomically to ``out`` when given."""
    collection = Path(collection)
    meta = read_meta(collection)
    name = task_name(meta, task)
    theta0_path = Path(pretrained) if pretrained is not None else Path(meta["pretrained"]["path"])
    if not theta0_path.is_file():
        raise CheckpointError(f"{theta0_path}: pre-trained checkpoint not found (pass --pretrained)")
    if sha256_file(theta0_path) != meta["pretrained"]["sha256"]:
        raise CheckpointError(f"{theta0_path}: differs from the pre-trained checkpoint the collection was made from (SHA-256 mismatch)")
    theta0 = load_state_dict(theta0_path)
    merged = load_state_dict(collection / MERGED_FILE)
    mask = MaskSet.load(collection / MASKS_FILE).get(name)
    scale = float((meta["masks"].get("scales") or {}).get(name, 1.0))
    model = apply_vector(theta0, merged, alpha=scale, mask=mask)
    if out is not None:
        save_state_dict(model, out)
    return model


def collection_report(collection: str | Path) -> dict:
    """Sizes, mask densities and the agreement profile of a compressed collection."""
    collection = Path(collection)
    meta = read_meta(collection)
    masks = MaskSet.load(collection / MASKS_FILE)
    sizes = {p.name: p.stat().st_size for p in sorted(collection.iterdir()) if p.is_file()}
    n = meta["num_params"]
    total = sum(sizes.values())
    return {
        "tasks": meta["tasks"],
        "masks": meta["masks"],
        "num_params": n,
        "files": sizes,
        "total_bytes": total,
        "bytes_per_param": total / max(n, 1),
        "budget_bytes": 4 * n + len(meta["tasks"]) * ((n + 7) // 8) + 64 * 1024,
        "densities": {name: masks.density(name) for name in masks.names},
        "agreement": masks.agreement(),
    }
