"""Compress a collection of fine-tuned checkpoints to one merged vector plus one bit mask per task.

A compressed collection is a folder:

- ``merged.safetensors``: the multi-task vector tau_MTL (floating-point keys, the inputs' dtype);
- ``masks.safetensors``: one bit-packed mask per task (``MaskSet``);
- ``meta.json``: task names, how the masks were built, and the pre-trained checkpoint it refers to
  (path and SHA-256): theta_0 is referenced, not copied.

That is the paper's scheme (``storage="packbits"``). The default, ``storage="coded"``, replaces the two
data files with ``coded.safetensors`` (``tallmasks.coded``: masks entropy-coded jointly, the merged
vector only where some mask keeps a weight), losslessly.

Task t is rebuilt as theta_0 + m_t * tau_MTL.
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
from tallmasks.coded import CODED_FORMAT, CodedFile, decode_task, write_coded
from tallmasks.errors import CheckpointError, ConfigError
from tallmasks.masks import MaskSet, magnitude_masks, tall_masks
from tallmasks.merging import base_vector
from tallmasks.task_vectors import CheckpointSet, apply_vector

log = logging.getLogger(__name__)

FORMAT = "tallmasks-compressed-v1"
STORAGES = {"packbits": FORMAT, "coded": CODED_FORMAT}
MERGED_FILE = "merged.safetensors"
CODED_FILE = "coded.safetensors"
MASKS_FILE = "masks.safetensors"
META_FILE = "meta.json"
DEFAULT_LAMBDA = 0.4


def _is_collection(path: Path) -> bool:
    meta = path / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") in STORAGES.values()
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
    storage: str = "coded",
    masks_file: str | Path | None = None,
    model: str | None = None,
) -> dict:
    """Write a compressed collection to ``out_dir`` atomically; returns its metadata. ``masks_file``: existing
    TALL masks (ours or a released ``.npy``) instead of building them; ``model``: a name recorded in meta.json."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if masks not in ("tall", "magnitude"):
        raise ConfigError(f"masks must be 'tall' or 'magnitude', got {masks!r}")
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    cs = CheckpointSet(pretrained, list(finetuned), names)
    cs.progress = progress
    if masks_file is not None:
        vector = base_vector(cs, use_ties=use_ties, device=device)
        mask_set = load_mask_file(masks_file, cs)
        mask_info = {"kind": "tall", "use_ties": use_ties, "lambdas": mask_set.info.get("lambdas"), "source": str(masks_file)}
    elif masks == "tall":
        vector = base_vector(cs, use_ties=use_ties, device=device)
        mask_set = tall_masks(cs, vector, lambdas, device=device, info={"use_ties": use_ties})
        mask_info = {"kind": "tall", "use_ties": use_ties, "lambdas": mask_set.info["lambdas"]}
    else:
        vector = base_vector(cs, device=device)
        mask_set = magnitude_masks(cs, k=k, device=device)
        mask_info = {"kind": "magnitude", "k": float(k)}
    stored = {key: value.to(cs.dtypes[key]) for key, value in vector.items()}
    meta = {
        "format": STORAGES[storage],
        "model": model,
        "tasks": cs.names,
        "masks": mask_info,
        "num_params": cs.num_float_params,
        "pretrained": {"path": str(Path(pretrained).resolve()), "sha256": sha256_file(pretrained)},
        "finetuned": [str(Path(p).resolve()) for p in finetuned],
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if storage == "coded":
            write_coded(tmp / CODED_FILE, mask_set, stored, progress=progress)
        else:
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
    """Rebuild theta_0 + m_t * tau_MTL for one task; saved atomically to ``out`` when given."""
    collection = Path(collection)
    meta = read_meta(collection)
    name = task_name(meta, task)
    theta0_path = Path(pretrained) if pretrained is not None else Path(meta["pretrained"]["path"])
    if not theta0_path.is_file():
        raise CheckpointError(f"{theta0_path}: pre-trained checkpoint not found (pass --pretrained)")
    if sha256_file(theta0_path) != meta["pretrained"]["sha256"]:
        raise CheckpointError(f"{theta0_path}: differs from the pre-trained checkpoint the collection was made from (SHA-256 mismatch)")
    theta0 = load_state_dict(theta0_path)
    if meta["format"] == CODED_FORMAT:
        model = decode_task(CodedFile(collection / CODED_FILE), theta0, name)
    else:
        merged = load_state_dict(collection / MERGED_FILE)
        mask = MaskSet.load(collection / MASKS_FILE).get(name)
        model = apply_vector(theta0, merged, alpha=1.0, mask=mask)
    if out is not None:
        save_state_dict(model, out)
    return model


def collection_masks(collection: str | Path) -> MaskSet:
    """Every task's mask of a compressed collection, whatever its storage."""
    collection = Path(collection)
    if read_meta(collection)["format"] == CODED_FORMAT:
        return CodedFile(collection / CODED_FILE).masks()
    return MaskSet.load(collection / MASKS_FILE)


def collection_report(collection: str | Path) -> dict:
    """Sizes, mask densities, the agreement profile, bits per weight per task of the masks, and the
    bytes beyond theta_0 beside the paper's scheme (float32 merged vector + 1 bit per weight per task)."""
    collection = Path(collection)
    meta = read_meta(collection)
    masks = collection_masks(collection)
    sizes = {p.name: p.stat().st_size for p in sorted(collection.iterdir()) if p.is_file()}
    n = meta["num_params"]
    tasks = len(meta["tasks"])
    total = sum(sizes.values())
    paper = 4 * n + tasks * ((n + 7) // 8)
    if meta["format"] == CODED_FORMAT:
        stats = CodedFile(collection / CODED_FILE).stats()
        mask_bytes, kept = stats["mask_bytes"], stats["kept"]
    else:
        mask_bytes, kept = sizes.get(MASKS_FILE, 0), None
    return {
        "format": meta["format"],
        "storage": next(k for k, v in STORAGES.items() if v == meta["format"]),
        "model": meta.get("model"),
        "tasks": meta["tasks"],
        "masks": meta["masks"],
        "num_params": n,
        "files": sizes,
        "total_bytes": total,
        "bytes_per_param": total / max(n, 1),
        "mask_bytes": mask_bytes,
        "mask_bits_per_weight_per_task": 8 * mask_bytes / max(n * tasks, 1),
        "kept_weights": kept,
        "paper_bytes": paper,
        "ratio_to_paper": total / max(paper, 1),
        "budget_bytes": 4 * n + tasks * ((n + 7) // 8) + 64 * 1024,
        "densities": {name: masks.density(name) for name in masks.names},
        "agreement": masks.agreement(),
    }


def load_mask_file(path: str | Path, cs: CheckpointSet) -> MaskSet:
    """TALL masks from a file for the tasks of ``cs``: a MaskSet (.safetensors) or a released ``.npy`` dict."""
    from tallmasks.masks import Layout

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such mask file")
    if path.suffix == ".npy":
        from tallmasks.released import load_released_masks

        masks = MaskSet.from_packed(load_released_masks(path), Layout.of(cs), {"kind": "tall", "source": str(path)})
    else:
        masks = MaskSet.load(path)
        if masks.layout != Layout.of(cs):
            raise CheckpointError(f"{path}: masks cover another model than the checkpoints (keys or shapes differ)")
    return masks.subset(cs.names)
