"""The eight offline demo tasks, built from scikit-learn's handwritten digits (1,797 8x8 images, no download).

Like the paper's datasets, the tasks differ both in their inputs (each applies its own view: rotation,
inversion, flip, shift, colour, upside-down, transposition, bold strokes) and in their label spaces
(digit identity, parity, small vs large, remainder mod 3, number of closed loops, primality).

The 1,797 images are split once, with a fixed permutation, into three disjoint pools shared by all tasks:
a pre-training pool (used only by the demo's contrastive pre-training), a base training set (split into
train/val with the paper's Val rule, ``random_split`` seed 0, v = min(int(0.1 n), 5000)) and a held-out
test set. Items are (PIL RGB image of DEMO_IMAGE_SIZE pixels, int label). The data location is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tallmasks.datasets.registry import DatasetSpec, register_dataset, split_train_val
from tallmasks.errors import ConfigError

DEMO_IMAGE_SIZE = 16
"""Side of the demo images in pixels (the demo model's input resolution)."""

SPLIT_SEED = 20240507
PRETRAIN_SIZE = 597
TEST_SIZE = 300
# remaining 900 images form each task's base training set (810 train / 90 val after the Val split)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LOOPS = {0: 1, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0, 8: 2, 9: 1}
PRIMES = {2, 3, 5, 7}
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 210, 60),
    "blue": (60, 90, 255),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}


@dataclass(frozen=True)
class DigitTask:
    """One demo task: a view of the digit images and a labelling of the digit."""

    name: str
    classnames: list[str]
    label: Callable[[int], int]
    templates: list[Callable[[str], str]]
    view: str  # key of _VIEWS
    description: str


def _templates(*patterns: str) -> list[Callable[[str], str]]:
    return [(lambda c, p=p: p.format(c)) for p in patterns]


NUMBER_TEMPLATES = _templates("a photo of the number {}.", "a drawing of the digit {}.", "a handwritten {}.")


DEMO_TASKS: list[DigitTask] = [
    DigitTask("DigitsRotated", list(NUMBER_WORDS), lambda d: d, NUMBER_TEMPLATES, "rot90", "digit identity, rotated 90 degrees"),
    DigitTask(
        "DigitsParity",
        ["even", "odd"],
        lambda d: d % 2,
        _templates("a photo of an {} number.", "a drawing of an {} digit.", "a handwritten {} number."),
        "invert",
        "parity, inverted colours",
    ),
    DigitTask(
        "DigitsSize",
        ["small", "large"],
        lambda d: int(d >= 5),
        _templates("a photo of a {} number.", "a drawing of a {} digit.", "a handwritten {} number."),
        "hflip",
        "small (0-4) vs large (5-9), mirrored",
    ),
    DigitTask(
        "DigitsMod3",
        ["a multiple of three", "one more than a multiple of three", "two more than a multiple of three"],
        lambda d: d % 3,
        _templates("a photo of a number that is {}.", "a drawing of a digit that is {}.", "a handwritten number, {}."),
        "shift",
        "remainder mod 3, shifted",
    ),
    DigitTask("DigitsColored", list(NUMBER_WORDS), lambda d: d, NUMBER_TEMPLATES, "color", "digit identity, coloured"),
    DigitTask(
        "DigitsLoops",
        ["no loop", "one loop", "two loops"],
        lambda d: LOOPS[d],
        _templates("a photo of a number with {}.", "a drawing of a digit with {}.", "a handwritten digit with {}."),
        "vflip",
        "number of closed loops, upside down",
    ),
    DigitTask(
        "DigitsPrime",
        ["not prime", "prime"],
        lambda d: int(d in PRIMES),
        _templates("a photo of a {} number.", "a drawing of a {} digit.", "a handwritten {} number."),
        "transpose",
        "prime vs not prime, transposed",
    ),
    DigitTask("DigitsBold", list(NUMBER_WORDS), lambda d: d, NUMBER_TEMPLATES, "bold", "digit identity, bold strokes"),
]
TASKS_BY_NAME: dict[str, DigitTask] = {t.name: t for t in DEMO_TASKS}
DEMO_DATASETS: list[str] = [t.name for t in DEMO_TASKS]
VIEWS: tuple[str, ...] = ("plain", "rot90", "invert", "hflip", "shift", "color", "vflip", "transpose", "bold")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 (N, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def source_pools() -> dict[str, np.ndarray]:
    """Indices into the digits of the three disjoint pools: "pretrain", "train" (base train set), "test"."""
    images, _ = _digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    return {
        "pretrain": order[:PRETRAIN_SIZE],
        "train": order[PRETRAIN_SIZE : len(order) - TEST_SIZE],
        "test": order[len(order) - TEST_SIZE :],
    }


def _upsample(image8: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray((np.clip(image8, 0, 1) * 255).astype(np.uint8), mode="L")
    return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def render(image8: np.ndarray, view: str, key: int, size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """The (size, size, 3) uint8 RGB rendering of an 8x8 digit under ``view``; ``key`` seeds random choices."""
    if view not in VIEWS:
        raise ConfigError(f"unknown digit view {view!r}; expected one of {', '.join(VIEWS)}")
    rng = np.random.default_rng([SPLIT_SEED, VIEWS.index(view), int(key)])
    geometric = {
        "rot90": lambda a: np.rot90(a, 1),
        "hflip": lambda a: a[:, ::-1],
        "vflip": lambda a: a[::-1, :],
        "transpose": lambda a: a.T,
    }
    gray = _upsample(geometric.get(view, lambda a: a)(image8), size)
    if view == "shift":
        dy, dx = (int(v) for v in rng.integers(-size // 8, size // 8 + 1, size=2))
        shifted = np.zeros_like(gray)
        src = gray[max(0, -dy) : size - max(0, dy), max(0, -dx) : size - max(0, dx)]
        shifted[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
        gray = shifted
    elif view == "bold":
        padded = np.pad(gray, 1)
        gray = np.max([padded[i : i + size, j : j + size] for i in range(3) for j in range(3)], axis=0)
    elif view == "invert":
        gray = 1.0 - gray
    if view == "color":
        names = list(PALETTE)
        fg = np.array(PALETTE[names[int(rng.integers(len(names)))]], dtype=np.float32)
        bg = rng.uniform(0, 60, size=3).astype(np.float32)
        rgb = bg + gray[..., None] * (fg - bg)
    else:
        rgb = np.repeat(gray[..., None] * 255.0, 3, axis=2)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class DigitImages(Dataset):
    """Rendered digits in memory: items are (PIL RGB image, int label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: list[str]):
        self.images = images
        self.labels = labels
        self.classnames = classnames

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="RGB"), int(self.labels[index])


@lru_cache(maxsize=None)
def _task_pool(name: str, pool: str) -> DigitImages:
    task = TASKS_BY_NAME[name]
    images, digits = _digits()
    indices = source_pools()[pool]
    rendered = np.stack([render(images[i], task.view, key=int(i)) for i in indices])
    labels = np.array([task.label(int(digits[i])) for i in indices], dtype=np.int64)
    return DigitImages(rendered, labels, task.classnames)


def load_task(name: str, split: str) -> Dataset:
    """Split "train", "val" or "test" of demo task ``name``."""
    if name not in TASKS_BY_NAME:
        raise ConfigError(f"unknown demo task {name!r}")
    if split == "test":
        return _task_pool(name, "test")
    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {split!r} for {name}; expected train, val or test")
    train, val = split_train_val(_task_pool(name, "train"))
    return train if split == "train" else val


def pretraining_pool() -> tuple[np.ndarray, np.ndarray]:
    """The pre-training pool's 8x8 images (float32 in [0, 1]) and digit labels (disjoint from every task split)."""
    images, digits = _digits()
    indices = source_pools()["pretrain"]
    return images[indices], digits[indices]


def _loader(name: str) -> Callable[[str, Path], Dataset]:
    def loader(split: str, root: Path) -> Dataset:  # root is ignored: the data ships with scikit-learn
        return load_task(name, split)

    return loader


def _register() -> None:
    for task in DEMO_TASKS:
        spec = DatasetSpec(name=task.name, classnames=list(task.classnames), templates=list(task.templates))
        register_dataset(task.name, spec, _loader(task.name), demo=True)


_register()
