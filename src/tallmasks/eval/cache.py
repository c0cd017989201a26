"""Each split preprocessed once into a uint8 tensor cache on disk (resize + center crop, before
float conversion and normalization), memory-mapped on use. Normalization happens on the device.

A cached split is keyed on the preprocessing and on the split's identity (:func:`split_identity`: its
length, the Val-split indices, the files behind it with sizes and modification times where the dataset
lists them, and a sample of its items), so a re-prepared dataset is cached again rather than read stale;
a truncated or inconsistent cache (counts, shapes, unreadable arrays) is rebuilt, not read."""

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

from tallmasks.core.errors import TallmasksError
from tallmasks.core.progress import progress
from tallmasks.io.checkpoints import atomic_path
from tallmasks.io.guard import check_output, preallocate

log = logging.getLogger(__name__)

CACHE_VERSION = 2
IDENTITY_SAMPLES = 16


@dataclass
class SplitData:
    """A preprocessed split: images (N, 3, H, W) uint8 (a memory map or a device tensor), labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    identity: str = ""  # split_identity() of the data it was built from

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> SplitData:
        return SplitData(self.images.to(device), self.labels.to(device), self.identity)


def _listed_files(node: Any) -> list[str]:
    """File paths a dataset object lists (ImageFolder's samples, torchvision's _image_files), else []."""
    for attr in ("samples", "imgs", "_image_files", "_samples"):
        items = getattr(node, attr, None)
        if isinstance(items, (list, tuple)) and items:
            first = items[0]
            if isinstance(first, (str, os.PathLike)):
                return [str(p) for p in items]
            if isinstance(first, (list, tuple)) and first and isinstance(first[0], (str, os.PathLike)):
                return [str(p[0]) for p in items]
    return []


def split_identity(base: Dataset, samples: int = IDENTITY_SAMPLES) -> str:
    """Identity of a split's content: its length, the Val-split (Subset) indices, the files behind it
    (sizes, modification times) where the dataset lists them, and ``samples`` evenly spaced items."""
    digest = hashlib.sha256()
    n = len(base)  # type: ignore[arg-type]
    digest.update(f"n={n};".encode())
    node, depth = base, 0
    while node is not None and depth < 8:
        indices = getattr(node, "indices", None)
        if indices is not None:
            digest.update(np.asarray(list(indices), dtype=np.int64).tobytes())
        for path in _listed_files(node):
            try:
                info = os.stat(path)
                digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns};".encode())
            except OSError:
                digest.update(f"{path}:missing;".encode())
        child = getattr(node, "dataset", None)
        node, depth = (child if child is not None else getattr(node, "base", None)), depth + 1
    for index in sorted({int(i) for i in np.linspace(0, n - 1, min(samples, n))} if n else set()):
        image, label = base[index]
        digest.update(f"{index}:{int(label)};".encode())
        if isinstance(image, Image.Image):
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
        else:
            digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()[:24]


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
    base: Dataset,
    steps: list[Callable],
    prefix: Path,
    fingerprint: str,
    num_workers: int = 0,
    batch_size: int = 256,
    identity: str = "",
    image_size: int | None = None,
) -> None:
    """Preprocess ``base`` into <prefix>.images.npy / .labels.npy / .json (atomic; the .json comes last).
    The room it needs is checked first and reserved, so a full disk is one error line, not a crash."""
    n = len(base)  # type: ignore[arg-type]
    if n == 0:
        raise TallmasksError(f"{prefix}: empty split")
    loader = DataLoader(_Preprocessed(base, steps), batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    images_path, labels_path, meta_path = _files(prefix)
    if image_size:
        check_output(images_path, expected_bytes=n * 3 * int(image_size) ** 2 + 9 * n, label="split cache")
    images_mm = None
    labels = np.empty(n, dtype=np.int64)
    with atomic_path(images_path) as tmp_images:
        offset = 0
        for batch_images, batch_labels in progress(loader, desc=f"caching {prefix.parent.name}/{prefix.name}", leave=False, unit="batch"):
            if images_mm is None:
                shape = (n, *batch_images.shape[1:])
                images_mm = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8, shape=shape)
                preallocate(tmp_images, images_mm.offset + images_mm.nbytes)
            if tuple(batch_images.shape[1:]) != tuple(images_mm.shape[1:]):
                raise ValueError(f"{prefix}: images of different sizes after preprocessing")
            images_mm[offset : offset + len(batch_images)] = batch_images
            labels[offset : offset + len(batch_labels)] = batch_labels
            offset += len(batch_images)
        images_mm.flush()
        images_mm_shape = images_mm.shape
        del images_mm
    with atomic_path(labels_path) as tmp_labels:
        with open(tmp_labels, "wb") as handle:
            np.save(handle, labels)
    meta = {"fingerprint": fingerprint, "identity": identity, "count": n, "shape": list(images_mm_shape)}
    with atomic_path(meta_path) as tmp_meta:
        Path(tmp_meta).write_text(json.dumps(meta))


def _files(prefix: Path) -> tuple[Path, Path, Path]:
    return (
        prefix.with_name(prefix.name + ".images.npy"),
        prefix.with_name(prefix.name + ".labels.npy"),
        prefix.with_name(prefix.name + ".json"),
    )


def _read_meta(prefix: Path) -> dict:
    try:
        meta = json.loads(_files(prefix)[2].read_text())
    except (ValueError, OSError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_cached(prefix: Path, fingerprint: str, identity: str | None = None) -> bool:
    """Whether a cache for this preprocessing (and, when given, this split identity) is recorded."""
    images_path, labels_path, meta_path = _files(prefix)
    if not (images_path.is_file() and labels_path.is_file() and meta_path.is_file()):
        return False
    meta = _read_meta(prefix)
    return meta.get("fingerprint") == fingerprint and (identity is None or meta.get("identity") == identity)


def open_split(prefix: Path) -> SplitData:
    """Memory-map a cached split (no copy); a truncated or inconsistent cache raises ValueError."""
    images_path, labels_path, _ = _files(prefix)
    meta = _read_meta(prefix)
    images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    labels = np.load(labels_path, allow_pickle=False)
    count = meta.get("count")
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] != 3:
        raise ValueError(f"{images_path}: images of shape {images.shape} and dtype {images.dtype}, expected (N, 3, H, W) uint8")
    if labels.ndim != 1 or labels.dtype != np.int64 or len(labels) != len(images) or count != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images ({count} recorded)")
    if "shape" in meta and list(images.shape) != list(meta["shape"]):
        raise ValueError(f"{images_path}: shape {list(images.shape)}, recorded {meta['shape']}")
    data = torch.from_numpy(images) if images.flags.writeable else _readonly_tensor(images)
    return SplitData(data, torch.from_numpy(labels), str(meta.get("identity", "")))


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
    """The cached split, built first when missing, stale (another preprocessing or another identity of
    the data) or damaged; ``build=False`` only opens it (ranks that wait for rank 0 to build it)."""
    steps = pil_steps(val_preprocess) if val_preprocess is not None else []
    if not steps:
        steps = default_pil_steps(image_size)
    fingerprint = steps_fingerprint(steps, image_size)
    prefix = cache_path(cache_dir, image_size, dataset, split)
    base = load_base()
    identity = split_identity(base)
    data = _open_if_current(prefix, fingerprint, identity)
    if data is None:
        if not build:
            raise TallmasksError(f"{prefix}: preprocessed {dataset}/{split} is missing or stale after rank 0 built it")
        stale = _files(prefix)[2].is_file()
        log.info(
            "%s %s/%s once into %s",
            "re-preprocessing (data changed or cache damaged)" if stale else "preprocessing",
            dataset,
            split,
            prefix.parent,
        )
        build_split(base, steps, prefix, fingerprint, num_workers=num_workers, identity=identity, image_size=image_size)
        data = _open_if_current(prefix, fingerprint, identity)
        if data is None:
            raise TallmasksError(f"{prefix}: the split cache just written cannot be read back")
    return data


def _open_if_current(prefix: Path, fingerprint: str, identity: str) -> SplitData | None:
    """The cached split if it matches ``fingerprint`` and ``identity`` and reads back consistently."""
    if not is_cached(prefix, fingerprint, identity):
        return None
    try:
        return open_split(prefix)
    except (ValueError, OSError, EOFError) as exc:
        log.warning("%s: damaged split cache, rebuilding (%s)", prefix, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def default_num_workers() -> int:
    return max(0, min(16, (os.cpu_count() or 1) - 1))
