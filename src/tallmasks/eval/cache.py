"""Each split preprocessed once into a uint8 tensor cache on disk (resize + center crop, before
float conversion and normalization), memory-mapped on use. Normalization happens on the device."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tallmasks.checkpoints import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class SplitData:
    """A preprocessed split: images (N, 3, H, W) uint8 (a memory map or a device tensor), labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> SplitData:
        return SplitData(self.images.to(device), self.labels.to(device))


def pil_steps(val_preprocess: Any) -> list[Callable]:
    """The steps of ``val_preprocess`` that act on PIL images (everything before ToTensor)."""
    from torchvision import transforms as T

    steps = list(getattr(val_preprocess, "transforms", []))
    out = []
    for step in steps:
        if isinstance(step, (T.ToTensor, T.Normalize)) or type(step).__name__ in ("ToTensor", "PILToTensor", "Normalize"):
            break
        out.append(step)
    return out


def default_pil_steps(image_size: int) -> list[Callable]:
    """Resize (bicubic) + center crop to ``image_size``: CLIP's evaluation geometry."""
    from torchvision import transforms as T

    return [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]


def to_uint8_chw(image: Image.Image, steps: list[Callable]) -> np.ndarray:
    """Apply the PIL steps, then convert to an RGB (3, H, W) uint8 array (what ToTensor divides by 255)."""
    for step in steps:
        image = step(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def steps_fingerprint(steps: list[Callable], image_size: int) -> str:
    text = json.dumps({"v": CACHE_VERSION, "size": int(image_size), "steps": [repr(s) for s in steps]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: str | Path, image_size: int, dataset: str, split: str) -> Path:
    """Folder prefix of one cached split: <cache_dir>/<image_size>/<Dataset>/<split>."""
    return Path(cache_dir) / str(int(image_size)) / dataset / split


class _Preprocessed(Dataset):
    def __init__(self, base: Dataset, steps: list[Callable]):
        self.base, self.steps = base, steps

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.base[index]
        return to_uint8_chw(image, self.steps), int(label)


def _collate(items):
    images = np.stack([i[0] for i in items])
    labels = np.array([i[1] for i in items], dtype=np.int64)
    return images, labels


def build_split(
    base: Dataset, steps: list[Callable], prefix: Path, fingerprint: str, num_workers: int = 0, batch_size: int = 256
) -> None:
    """Preprocess ``base`` into <prefix>.images.npy / .labels.npy / .json (atomic; the .json comes last)."""
    n = len(base)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{prefix}: empty split")
    loader = DataLoader(
        _Preprocessed(base, steps), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )
    images_path, labels_path, meta_path = _files(prefix)
    images_mm = None
    labels = np.empty(n, dtype=np.int64)
    with atomic_path(images_path) as tmp_images:
        offset = 0
        for batch_images, batch_labels in tqdm(loader, desc=f"caching {prefix.parent.name}/{prefix.name}", leave=False, unit="batch"):
            if images_mm is None:
                images_mm = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=(n, *batch_images.shape[1:]))
            if tuple(batch_images.shape[1:]) != tuple(images_mm.shape[1:]):
                raise ValueError(f"{prefix}: images of different sizes after preprocessing")
            images_mm[offset : offset + len(batch_images)] = batch_images
            labels[offset : offset + len(batch_labels)] = batch_labels
            offset += len(batch_images)
        images_mm.flush()
        del images_mm
    with atomic_path(labels_path) as tmp_labels:
        with open(tmp_labels, "wb") as handle:
            np.save(handle, labels)
    meta = {"fingerprint": fingerprint, "count": n}
    with atomic_path(meta_path) as tmp_meta:
        Path(tmp_meta).write_text(json.dumps(meta))


def _files(prefix: Path) -> tuple[Path, Path, Path]:
    return prefix.with_name(prefix.name + ".images.npy"), prefix.with_name(prefix.name + ".labels.npy"), prefix.with_name(prefix.name + ".json")


def is_cached(prefix: Path, fingerprint: str) -> bool:
    images_path, labels_path, meta_path = _files(prefix)
    if not (images_path.is_file() and labels_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return meta.get("fingerprint") == fingerprint


def open_split(prefix: Path) -> SplitData:
    """Memory-map a cached split (no copy)."""
    images_path, labels_path, _ = _files(prefix)
    images = np.load(images_path, mmap_mode="r")
    labels = np.load(labels_path)
    return SplitData(torch.from_numpy(images) if images.flags.writeable else _readonly_tensor(images), torch.from_numpy(labels))


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: never written through
        return torch.from_numpy(array)


def load_or_build_split(
    load_base: Callable[[], Dataset],
    dataset: str,
    split: str,
    cache_dir: str | Path,
    image_size: int,
    val_preprocess: Any = None,
    num_workers: int = 0,
    build: bool = True,
) -> SplitData:
    """The cached split, built first when missing or stale (``build=False`` only waits for / opens it)."""
    steps = pil_steps(val_preprocess) if val_preprocess is not None else []
    if not steps:
        steps = default_pil_steps(image_size)
    fingerprint = steps_fingerprint(steps, image_size)
    prefix = cache_path(cache_dir, image_size, dataset, split)
    if not is_cached(prefix, fingerprint):
        if not build:
            raise FileNotFoundError(f"{prefix}: cache missing")
        log.info("preprocessing %s/%s once into %s", dataset, split, prefix.parent)
        build_split(load_base(), steps, prefix, fingerprint, num_workers=num_workers)
    return open_split(prefix)


def default_num_workers() -> int:
    return max(0, min(16, (os.cpu_count() or 1) - 1))
