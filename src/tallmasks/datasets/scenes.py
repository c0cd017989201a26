"""The offline demo's task suite: procedurally generated 16x16 scenes (no download).

Shapes, colours, textures, counts, positions, sizes, bars and scikit-learn's handwritten digits are drawn
into scenes. Like the paper's datasets, the tasks differ both in their inputs (each task has its own kind of
scene: background, objects, clutter) and in their label spaces (shape, colour, texture, count, position, digit,
parity, ...). ``SCENE_TASKS`` is one ordered list; the demo's 8 / 14 / 20-task settings are its first 8 / 14 / 20.

Every image is a pure function of (task, pool, index): pools are "train" (the base training set, split into
train/val with the paper's Val rule), "test" and "pretrain" (only for the demo's contrastive pre-training).
Handwritten digits come from three disjoint parts of scikit-learn's 1,797 digits, one per pool, so no test
glyph is ever trained on. Each scene also yields its *facts* (what is in it), from which pre-training
captions are written (:func:`caption`): partially and noisily, so that zero-shot accuracy stays modest
while the visual features exist. Items are (PIL RGB image of IMAGE_SIZE pixels, int label).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tallmasks.core.errors import ConfigError
from tallmasks.datasets.registry import DatasetSpec, register_dataset, split_train_val

IMAGE_SIZE = 16
"""Side of the demo images in pixels (the demo model's input resolution)."""

SEED = 20240507
TRAIN_SIZE = 1500  # base training set per task: 1,350 train + 150 val after the paper's Val split
TEST_SIZE = 1000
POOLS: tuple[str, ...] = ("train", "test", "pretrain")
GLYPH_POOL_SIZES = {"pretrain": 600, "test": 300}  # the rest (897) draws the train pool's digits

_SS = 2  # supersampling factor of the renderer
_N = IMAGE_SIZE * _SS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 245),
    "yellow": (240, 220, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 215, 225),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "noisy", "gradient")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SIZES: tuple[str, ...] = ("small", "medium", "large")
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal", "antidiagonal")

Facts = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# drawing


_YY, _XX = np.mgrid[0:_N, 0:_N].astype(np.float32) / _SS + 0.5 / _SS  # pixel centres in output pixels


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 25.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _dark(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 70, 3).astype(np.float32)


def _light(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(185, 255, 3).astype(np.float32)


def shape_mask(kind: str, cx: float, cy: float, r: float, angle: float = 0.0) -> np.ndarray:
    """Coverage (0/1 on the supersampled grid) of a shape of radius ``r`` pixels centred at (cx, cy)."""
    dx, dy = _XX - cx, _YY - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if kind == "hollow square":
        inside = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        return inside & ~((np.abs(dx) <= 0.45 * r) & (np.abs(dy) <= 0.45 * r))
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if kind == "hollow diamond":
        s = np.abs(dx) + np.abs(dy)
        return (s <= 1.15 * r) & (s >= 0.6 * r)
    if kind == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        return (_YY >= top) & (_YY <= bottom) & (np.abs(dx) <= 0.6 * (_YY - top))
    if kind == "cross":
        arm = max(0.34 * r, 0.75)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if kind == "bar":
        ux, uy = np.cos(angle), np.sin(angle)
        along, across = dx * ux + dy * uy, -dx * uy + dy * ux
        return (np.abs(along) <= r) & (np.abs(across) <= 0.9)
    raise ConfigError(f"unknown shape {kind!r}")


class Canvas:
    """A supersampled RGB canvas; :meth:`image` averages it down to IMAGE_SIZE pixels (uint8)."""

    def __init__(self, color: np.ndarray):
        self.pixels = np.empty((_N, _N, 3), np.float32)
        self.pixels[:] = color

    def texture(self, kind: str, c1: np.ndarray, c2: np.ndarray, rng: np.random.Generator, direction: int | None = None) -> None:
        """Fill the background with one of TEXTURES in colours c1 (base) and c2 (stripes: ``direction`` 0
        horizontal, 1 vertical, 2 diagonal; random when None)."""
        if kind == "plain":
            self.pixels[:] = c1
            return
        if kind == "noisy":
            noise = rng.uniform(0, 1, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
            noise = np.kron(noise, np.ones((_SS, _SS, 1), np.float32))
            self.pixels[:] = c1 + noise * (c2 - c1)
            return
        if kind == "gradient":
            angle = rng.uniform(0, 2 * np.pi)
            t = (np.cos(angle) * (_XX - 8) + np.sin(angle) * (_YY - 8)) / 16 + 0.5
            t = np.clip(t, 0, 1)[..., None]
            self.pixels[:] = c1 + t * (c2 - c1)
            return
        period = int(rng.integers(3, 5))
        phase = int(rng.integers(period))
        xi, yi = np.floor(_XX).astype(int) + phase, np.floor(_YY).astype(int) + phase
        if kind == "striped":
            direction = int(rng.integers(3)) if direction is None else int(direction)
            coord = (yi, xi, xi + yi)[direction]
            on = (coord % period) < period / 2
        elif kind == "checkered":
            on = ((xi // 2 + yi // 2) % 2) == 0
        elif kind == "dotted":
            on = ((xi % period) == 0) & ((yi % period) == 0)
        else:
            raise ConfigError(f"unknown texture {kind!r}")
        self.pixels[:] = np.where(on[..., None], c2, c1)

    def paint(self, mask: np.ndarray, color: np.ndarray, alpha: float | np.ndarray = 1.0) -> None:
        a = mask.astype(np.float32) * alpha
        if a.ndim == 2:
            a = a[..., None]
        self.pixels += a * (np.asarray(color, np.float32) - self.pixels)

    def image(self) -> np.ndarray:
        small = self.pixels.reshape(IMAGE_SIZE, _SS, IMAGE_SIZE, _SS, 3).mean(axis=(1, 3))
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: float32 (N, 8, 8) in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def glyph_pools() -> dict[str, dict[int, np.ndarray]]:
    """Indices into the digits, per pool and digit value; the three pools are disjoint."""
    _, labels = _digits()
    order = np.random.default_rng(SEED).permutation(len(labels))
    n_pre, n_test = GLYPH_POOL_SIZES["pretrain"], GLYPH_POOL_SIZES["test"]
    parts = {"pretrain": order[:n_pre], "test": order[n_pre : n_pre + n_test], "train": order[n_pre + n_test :]}
    return {pool: {d: idx[labels[idx] == d] for d in range(10)} for pool, idx in parts.items()}


def glyph_mask(digit: int, pool: str, rng: np.random.Generator, cx: float, cy: float, height: float) -> np.ndarray:
    """Coverage in [0, 1] of a handwritten ``digit`` (drawn from ``pool``'s glyphs) of ``height`` pixels at (cx, cy)."""
    images, _ = _digits()
    choices = glyph_pools()[pool][int(digit)]
    glyph = images[int(choices[rng.integers(len(choices))])]
    side = max(2, int(round(height * _SS)))
    pil = Image.fromarray((glyph * 255).astype(np.uint8), mode="L").resize((side, side), Image.BILINEAR)
    patch = np.asarray(pil, np.float32) / 255.0
    out = np.zeros((_N, _N), np.float32)
    x0, y0 = int(round((cx - height / 2) * _SS)), int(round((cy - height / 2) * _SS))
    xs, ys = slice(max(x0, 0), min(x0 + side, _N)), slice(max(y0, 0), min(y0 + side, _N))
    out[ys, xs] = patch[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out


def _color_name(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    names = [c for c in COLORS if c not in exclude]
    return names[int(rng.integers(len(names)))]


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _spots(rng: np.random.Generator, count: int, radius: float, margin: float = 1.5, gap: float = 0.6) -> list[tuple[float, float]]:
    """``count`` non-overlapping centres of discs of ``radius`` inside the canvas."""
    centres: list[tuple[float, float]] = []
    while len(centres) < count:
        for _ in range(200):
            x, y = rng.uniform(margin + radius, IMAGE_SIZE - margin - radius, 2)
            if all((x - a) ** 2 + (y - b) ** 2 >= (2 * radius + gap) ** 2 for a, b in centres):
                centres.append((float(x), float(y)))
                break
        else:  # crowded: start again
            centres.clear()
    return centres


# ---------------------------------------------------------------------------------------------
# the tasks: each draws a scene of its own kind for a given label and returns (image, facts)


def _shapes(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("noisy", _dark(rng), _dark(rng) + 30, rng)
    color = _color_name(rng)
    cx, cy = rng.uniform(6, 10, 2)
    canvas.paint(shape_mask(SHAPES[label], cx, cy, rng.uniform(4.0, 6.0)), _jitter(COLORS[color], rng))
    return canvas, {"shape": SHAPES[label], "color": color, "texture": "noisy"}


def _textures(rng, label, pool):
    canvas = Canvas(0)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    c2 = np.clip(255 - c1 + rng.uniform(-40, 40, 3), 0, 255).astype(np.float32)
    canvas.texture(TEXTURES[label], c1, c2, rng)
    shape, color = _pick(rng, SHAPES), _color_name(rng)
    x, y = rng.uniform(3, 13, 2)
    canvas.paint(shape_mask(shape, x, y, rng.uniform(1.5, 2.5)), _jitter(COLORS[color], rng))
    return canvas, {"texture": TEXTURES[label], "shape": shape, "color": color, "size": "small"}


COLOR_NAMES: tuple[str, ...] = tuple(COLORS)


def _colors(rng, label, pool):
    canvas = Canvas(rng.uniform(90, 150) * np.ones(3, np.float32))
    shape = _pick(rng, SHAPES)
    x, y = rng.uniform(5, 11, 2)
    canvas.paint(shape_mask(shape, x, y, rng.uniform(3.0, 5.5)), _jitter(COLORS[COLOR_NAMES[label]], rng, 35))
    return canvas, {"color": COLOR_NAMES[label], "shape": shape, "texture": "plain", "bg_color": "gray"}


SIGNS: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "circle"),
    ("red", "triangle"),
    ("yellow", "diamond"),
    ("blue", "square"),
    ("white", "square"),
    ("green", "cross"),
    ("orange", "ring"),
    ("red", "square"),
    ("yellow", "triangle"),
)


def _signs(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("gradient", np.array([120, 150, 200], np.float32) + rng.uniform(-30, 30, 3), rng.uniform(60, 110, 3), rng)
    color, shape = SIGNS[label]
    cx, cy = rng.uniform(5.5, 10.5), rng.uniform(5, 8)
    r = rng.uniform(3.0, 4.5)
    canvas.paint((np.abs(_XX - cx) <= 0.6) & (_YY >= cy), np.array([70, 70, 70], np.float32))  # the pole
    canvas.paint(shape_mask(shape, cx, cy, r), _jitter(COLORS[color], rng, 20))
    return canvas, {"color": color, "shape": shape, "texture": "gradient"}


def _digits_plain(rng, label, pool):
    canvas = Canvas(rng.uniform(0, 25) * np.ones(3, np.float32))
    cx, cy = 8 + rng.uniform(-1, 1, 2)
    canvas.paint(glyph_mask(label, pool, rng, cx, cy, rng.uniform(11, 14)), rng.uniform(220, 255) * np.ones(3, np.float32))
    return canvas, {"digit": label, "color": "white", "texture": "plain", "bg_color": "black"}


def _positions(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("plain", np.array([20, 30, 90], np.float32) + rng.uniform(-20, 20, 3), 0, rng)
    col, row = label % 3, label // 3
    x = 2.5 + 5.5 * col + rng.uniform(-1.2, 1.2)
    y = 2.5 + 5.5 * row + rng.uniform(-1.2, 1.2)
    shape, color = _pick(rng, SHAPES), _color_name(rng, exclude=("blue",))
    canvas.paint(shape_mask(shape, x, y, rng.uniform(1.8, 2.4)), _jitter(COLORS[color], rng))
    return canvas, {"position": POSITIONS[label], "shape": shape, "color": color, "size": "small", "bg_color": "blue"}


def _street_digits(rng, label, pool):
    canvas = Canvas(0)
    light = rng.uniform() < 0.5  # a light plate with dark numbers, or the reverse: always readable
    c1 = _light(rng) if light else _dark(rng)
    canvas.texture(_pick(rng, ("plain", "striped", "gradient")), c1, np.clip(c1 + rng.uniform(-40, 40, 3), 0, 255), rng)
    ink = _dark(rng) if light else _light(rng)
    for side in (-1, 1):  # neighbouring house-number digits, cut by the image border
        if rng.uniform() < 0.7:
            canvas.paint(glyph_mask(int(rng.integers(10)), pool, rng, 8 + side * rng.uniform(8.5, 10), 8, 11), ink)
    canvas.paint(glyph_mask(label, pool, rng, 8 + rng.uniform(-0.8, 0.8), 8 + rng.uniform(-0.8, 0.8), rng.uniform(10, 12)), ink)
    return canvas, {"digit": label}


def _counts(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("plain", _dark(rng), 0, rng)
    count = label + 1
    color = _color_name(rng)
    shape = _pick(rng, ("circle", "square", "diamond"))
    for x, y in _spots(rng, count, 1.4):
        canvas.paint(shape_mask(shape, x, y, 1.4), _jitter(COLORS[color], rng))
    return canvas, {"count": count, "shape": shape, "color": color, "size": "small"}


def _sizes(rng, label, pool):
    canvas = Canvas(_light(rng))
    radius = (rng.uniform(1.5, 2.3), rng.uniform(3.3, 4.2), rng.uniform(5.5, 7.0))[label]
    shape, color = _pick(rng, SHAPES), _color_name(rng, exclude=("white", "yellow"))
    x, y = (rng.uniform(radius + 0.5, IMAGE_SIZE - radius - 0.5) for _ in range(2))
    canvas.paint(shape_mask(shape, x, y, radius), _jitter(COLORS[color], rng))
    return canvas, {"size": SIZES[label], "shape": shape, "color": color, "bg_color": "white"}


def _bars(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("dotted", _dark(rng), np.array([90, 90, 90], np.float32), rng)
    angle = (0.0, np.pi / 2, -np.pi / 4, np.pi / 4)[label] + rng.uniform(-0.15, 0.15)
    color = _color_name(rng)
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.uniform(5, 11, 2)
        canvas.paint(shape_mask("bar", x, y, rng.uniform(3.5, 5.5), angle), _jitter(COLORS[color], rng))
    return canvas, {"orientation": ORIENTATIONS[label], "color": color, "texture": "dotted"}


def _parity(rng, label, pool):
    canvas = Canvas(_jitter(COLORS[_color_name(rng, exclude=("white",))], rng, 40) * 0.8)
    digit = int(rng.choice([0, 2, 4, 6, 8] if label == 0 else [1, 3, 5, 7, 9]))
    canvas.paint(glyph_mask(digit, pool, rng, 8 + rng.uniform(-1, 1), 8 + rng.uniform(-1, 1), rng.uniform(10, 13)), _dark(rng))
    return canvas, {"digit": digit}


BG_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange")


def _bg_colors(rng, label, pool):
    canvas = Canvas(_jitter(COLORS[BG_COLORS[label]], rng, 30) * rng.uniform(0.55, 0.9))
    shape = _pick(rng, SHAPES)
    x, y = rng.uniform(5, 11, 2)
    canvas.paint(shape_mask(shape, x, y, rng.uniform(2.0, 4.0)), _light(rng))
    return canvas, {"bg_color": BG_COLORS[label], "shape": shape, "color": "white", "texture": "plain"}


FILLS: tuple[str, ...] = ("filled", "hollow")


def _fill(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("striped", _dark(rng), _dark(rng) + 40, rng)
    base = _pick(rng, ("circle", "square", "diamond"))
    kind = base if label == 0 else {"circle": "ring", "square": "hollow square", "diamond": "hollow diamond"}[base]
    color = _color_name(rng)
    x, y = rng.uniform(6, 10, 2)
    canvas.paint(shape_mask(kind, x, y, rng.uniform(4.0, 6.0)), _jitter(COLORS[color], rng))
    return canvas, {"fill": FILLS[label], "shape": "ring" if kind == "ring" else base, "color": color, "texture": "striped"}


def _pairs(rng, label, pool):
    canvas = Canvas(np.array([60, 40, 30], np.float32) + rng.uniform(-20, 20, 3))
    first = _color_name(rng)
    second = first if label == 0 else _color_name(rng, exclude=(first,))
    for color, (x, y) in zip((first, second), _spots(rng, 2, 2.8)):
        canvas.paint(shape_mask(_pick(rng, SHAPES), x, y, 2.8), _jitter(COLORS[color], rng))
    return canvas, {"count": 2, "color": first}


def _largest(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("gradient", _dark(rng), _dark(rng) + 60, rng)
    others = [s for s in SHAPES if s != SHAPES[label]]
    kinds = [SHAPES[label], *(others[int(i)] for i in rng.choice(len(others), 2, replace=False))]
    radii = [rng.uniform(3.6, 4.4), rng.uniform(1.6, 2.2), rng.uniform(1.6, 2.2)]
    for kind, r, (x, y) in zip(kinds, radii, _spots(rng, 3, 3.0, margin=0.8, gap=0.2)):
        canvas.paint(shape_mask(kind, x, y, r), _jitter(COLORS[_color_name(rng)], rng))
    return canvas, {"shape": SHAPES[label], "count": 3}


DOMINANT: tuple[str, ...] = ("red", "green", "blue", "yellow")


def _dominant(rng, label, pool):
    canvas = Canvas(_dark(rng) * 0.5)
    centres = _spots(rng, 7, 1.0, margin=0.8, gap=0.5)
    majority = int(rng.integers(4, 6))
    colors = [DOMINANT[label]] * majority + [_pick(rng, [c for c in DOMINANT if c != DOMINANT[label]]) for _ in range(7 - majority)]
    for color, (x, y) in zip(colors, centres):
        canvas.paint(shape_mask("square", x, y, 1.0), _jitter(COLORS[color], rng))
    return canvas, {"color": DOMINANT[label], "count": 7, "size": "small"}


SIDES: tuple[str, ...] = ("left", "right")


def _sides(rng, label, pool):
    canvas = Canvas(_light(rng) * 0.8)
    few, many = int(rng.integers(0, 2)), int(rng.integers(3, 5))
    counts = (many, few) if label == 0 else (few, many)
    color = _color_name(rng, exclude=("white", "yellow"))
    for half, count in enumerate(counts):
        for x, y in _spots(rng, count, 1.0, margin=0.5, gap=0.4):
            canvas.paint(shape_mask("circle", x / 2 + 8 * half, y, 0.9), _jitter(COLORS[color], rng))
    return canvas, {"position": SIDES[label], "color": color, "count": sum(counts), "size": "small"}


STRIPES: tuple[str, ...] = ("horizontal stripes", "vertical stripes", "diagonal stripes")


def _stripes(rng, label, pool):
    canvas = Canvas(0)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    canvas.texture("striped", c1, np.clip(c1 + rng.choice([-1, 1]) * rng.uniform(60, 120, 3), 0, 255), rng, direction=label)
    shape, color = _pick(rng, SHAPES), _color_name(rng)
    x, y = rng.uniform(4, 12, 2)
    canvas.paint(shape_mask(shape, x, y, rng.uniform(2.0, 3.0)), _jitter(COLORS[color], rng))
    return canvas, {"texture": "striped", "shape": shape, "color": color, "size": "small"}


MAGNITUDES: tuple[str, ...] = ("small", "large")


def _magnitude(rng, label, pool):
    canvas = Canvas(0)
    canvas.texture("checkered", _dark(rng), _dark(rng) + 30, rng)
    digit = int(rng.integers(0, 5)) + 5 * label
    color = _color_name(rng)
    canvas.paint(
        glyph_mask(digit, pool, rng, 8 + rng.uniform(-1, 1), 8 + rng.uniform(-1, 1), rng.uniform(10, 13)), _jitter(COLORS[color], rng)
    )
    return canvas, {"digit": digit, "color": color, "texture": "checkered"}


COLOR_COUNTS: tuple[str, ...] = ("one color", "two colors", "three colors")


def _color_count(rng, label, pool):
    canvas = Canvas(rng.uniform(20, 60) * np.ones(3, np.float32))
    distinct = [COLOR_NAMES[int(i)] for i in rng.choice(len(COLOR_NAMES), label + 1, replace=False)]
    colors = distinct + [_pick(rng, distinct) for _ in range(4 - len(distinct))]
    for color, (x, y) in zip(colors, _spots(rng, 4, 1.8, margin=0.8, gap=0.4)):
        canvas.paint(shape_mask(_pick(rng, SHAPES), x, y, 1.8), _jitter(COLORS[color], rng, 15))
    return canvas, {"count": 4, "size": "small"}


# ---------------------------------------------------------------------------------------------
# the suite


def _templates(*patterns: str) -> list[Callable[[str], str]]:
    return [(lambda c, p=p: p.format(c)) for p in patterns]


@dataclass(frozen=True)
class SceneTask:
    """One demo task: its class names, prompt templates and scene generator ``draw(rng, label, pool)``."""

    name: str
    classnames: list[str]
    templates: list[Callable[[str], str]]
    draw: Callable[[np.random.Generator, int, str], tuple[Canvas, Facts]]
    description: str


SCENE_TASKS: list[SceneTask] = [
    SceneTask(
        "Shapes",
        list(SHAPES),
        _templates("a photo of a {}.", "a {} shape.", "a drawing of a {}."),
        _shapes,
        "the shape of one object on a noisy dark background",
    ),
    SceneTask(
        "Textures",
        list(TEXTURES),
        _templates("a {} background.", "a {} texture.", "a {} pattern."),
        _textures,
        "the background's texture, with a small distractor object",
    ),
    SceneTask(
        "Colors",
        list(COLOR_NAMES),
        _templates("a {} object.", "a photo of something {}.", "a {} shape."),
        _colors,
        "the colour of one object on grey",
    ),
    SceneTask(
        "Signs",
        [f"{c} {s}" for c, s in SIGNS],
        _templates("a sign with a {}.", "a photo of a {} sign.", "a {}."),
        _signs,
        "the colour and shape of a sign on a pole",
    ),
    SceneTask(
        "Digits",
        list(NUMBER_WORDS),
        _templates("the digit {}.", "a handwritten {}.", "a photo of the number {}."),
        _digits_plain,
        "a handwritten digit, white on black",
    ),
    SceneTask(
        "Positions",
        list(POSITIONS),
        _templates("an object at the {}.", "something in the {}.", "a small shape at the {}."),
        _positions,
        "where a small object sits, on dark blue",
    ),
    SceneTask(
        "StreetDigits",
        [str(d) for d in range(10)],
        _templates("the house number {}.", "the number {}.", "a photo of the number {}."),
        _street_digits,
        "the centre digit of a house number, with its neighbours cut",
    ),
    SceneTask(
        "Counts",
        list(NUMBER_WORDS[1:7]),
        _templates("{} objects.", "a photo of {} things.", "there are {} shapes."),
        _counts,
        "how many small objects (1-6)",
    ),
    SceneTask(
        "Sizes", list(SIZES), _templates("a {} object.", "a {} shape.", "a photo of a {} thing."), _sizes, "the size of one object on white"
    ),
    SceneTask(
        "Bars",
        list(ORIENTATIONS),
        _templates("a {} bar.", "a {} line.", "a photo of {} stripes."),
        _bars,
        "the orientation of bars on a dotted background",
    ),
    SceneTask(
        "Parity",
        ["even", "odd"],
        _templates("an {} number.", "an {} digit.", "a photo of an {} number."),
        _parity,
        "whether a dark digit on a coloured background is even or odd",
    ),
    SceneTask(
        "Backgrounds",
        list(BG_COLORS),
        _templates("a {} background.", "something on {}.", "a photo with a {} background."),
        _bg_colors,
        "the background's colour, with a light object",
    ),
    SceneTask(
        "Fills",
        list(FILLS),
        _templates("a {} shape.", "a {} object.", "a photo of a {} shape."),
        _fill,
        "whether a shape is filled or hollow, on stripes",
    ),
    SceneTask(
        "Pairs",
        ["the same color", "different colors"],
        _templates("two objects of {}.", "a photo of two shapes of {}.", "two things with {}."),
        _pairs,
        "whether two objects share their colour",
    ),
    SceneTask(
        "Largest",
        [f"big {s}" for s in SHAPES],
        _templates("a {} and small shapes.", "the biggest shape is a {}.", "a photo of a {}."),
        _largest,
        "the shape of the largest of three objects",
    ),
    SceneTask(
        "Majority",
        list(DOMINANT),
        _templates("mostly {} dots.", "a photo of many {} squares.", "{} is the main color."),
        _dominant,
        "the colour of most of seven small squares",
    ),
    SceneTask(
        "Sides",
        list(SIDES),
        _templates("more dots on the {}.", "a crowd on the {}.", "most circles are on the {}."),
        _sides,
        "which half has more dots",
    ),
    SceneTask(
        "Stripes",
        list(STRIPES),
        _templates("a background of {}.", "{}.", "a photo of {} behind a shape."),
        _stripes,
        "the direction of the background's stripes, with a small object",
    ),
    SceneTask(
        "Magnitudes",
        list(MAGNITUDES),
        _templates("a {} number.", "a {} digit.", "a photo of a {} number."),
        _magnitude,
        "whether a coloured digit on a checkerboard is small (0-4) or large (5-9)",
    ),
    SceneTask(
        "ColorCounts",
        list(COLOR_COUNTS),
        _templates("shapes in {}.", "a photo of {}.", "four objects with {}."),
        _color_count,
        "how many colours four objects have",
    ),
]
TASKS_BY_NAME: dict[str, SceneTask] = {t.name: t for t in SCENE_TASKS}
DEMO_DATASETS: list[str] = [t.name for t in SCENE_TASKS]


def draw(task: str, pool: str, index: int) -> tuple[np.ndarray, int, Facts]:
    """(uint8 (IMAGE_SIZE, IMAGE_SIZE, 3) image, label, facts) of item ``index`` of ``task``'s ``pool``."""
    if pool not in POOLS:
        raise ConfigError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    position = DEMO_DATASETS.index(task)
    spec = SCENE_TASKS[position]
    rng = np.random.default_rng([SEED, position, POOLS.index(pool), int(index)])
    label = int(rng.integers(len(spec.classnames)))
    canvas, facts = spec.draw(rng, label, pool)
    return canvas.image(), label, facts


def suite_fingerprint(samples: int = 2) -> str:
    """Short hash of the suite: task names, class names, image size and the first scenes of every pool."""
    import hashlib

    digest = hashlib.sha256(f"{IMAGE_SIZE}".encode())
    for task in SCENE_TASKS:
        digest.update(repr((task.name, task.classnames, [t("x") for t in task.templates])).encode())
        for pool in POOLS:
            for index in range(samples):
                image, label, facts = draw(task.name, pool, index)
                digest.update(image.tobytes() + repr((label, sorted(facts.items()))).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# captions for contrastive pre-training


@dataclass(frozen=True)
class CaptionStyle:
    """How pre-training captions describe a scene: each fact is mentioned with probability ``mention`` and,
    when mentioned, replaced by a wrong value with probability ``noise``; counts are named exactly with
    probability ``exact_count`` (else "a few" / "many"); positions are only ever named along one axis;
    what a fact implies (parity, magnitude, equal colours, ...) is never said."""

    mention: float = 0.6
    noise: float = 0.2
    exact_count: float = 0.3


_VALUES: dict[str, tuple] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "bg_color": (*BG_COLORS, "gray", "black", "white"),
    "texture": TEXTURES,
    "size": SIZES,
    "orientation": ORIENTATIONS,
    "fill": FILLS,
    "digit": tuple(range(10)),
    "count": tuple(range(1, 8)),
    "position": (*POSITIONS, *SIDES),
}


def caption(facts: Facts, rng: np.random.Generator, style: CaptionStyle) -> str:
    """A partial, noisy English description of a scene's facts."""
    said: dict[str, Any] = {}
    for key, value in facts.items():
        if rng.uniform() >= style.mention:
            continue
        if rng.uniform() < style.noise:
            value = _VALUES[key][int(rng.integers(len(_VALUES[key])))]
        said[key] = value
    if not said:  # always say something
        key = list(facts)[int(rng.integers(len(facts)))]
        said[key] = facts[key]
    words: list[str] = []
    if "count" in said:
        n = int(said["count"])
        if rng.uniform() < style.exact_count:
            words.append(NUMBER_WORDS[n] if n < 10 else "many")
        else:
            words.append("one" if n == 1 else "a few" if n <= 3 else "many")
    for key in ("size", "fill", "color", "orientation"):
        if key in said:
            words.append(str(said[key]))
    if "digit" in said:
        digit = int(said["digit"])
        words.append(_pick(rng, ("the digit " + NUMBER_WORDS[digit], "a handwritten " + NUMBER_WORDS[digit], f"the number {digit}")))
    elif "shape" in said:
        words.append(str(said["shape"]) + ("s" if "count" in said and int(said["count"]) > 1 else ""))
    elif "orientation" in said:
        words.append("bar")
    elif words:
        words.append("objects" if "count" in said and int(said["count"]) > 1 else "object")
    if "position" in said:
        parts = str(said["position"]).split()
        words.append(("on the " if parts[-1] in ("left", "right") else "at the ") + _pick(rng, tuple(parts)))
    background = [str(said[k]) for k in ("bg_color", "texture") if k in said]
    if background:
        words.append(("on a " if words else "a ") + " ".join(background) + " background")
    return " ".join(words)


_CAPTION_WORDS = (
    "the digit",
    "a handwritten",
    "the number",
    "a few",
    "many",
    "object",
    "objects",
    "bar",
    "on the",
    "at the",
    "on a",
    "background",
)


def corpus() -> list[str]:
    """Every phrase the demo's text tower reads: prompts of every class of every task, and caption words."""
    texts = [template(name) for task in SCENE_TASKS for name in task.classnames for template in task.templates]
    texts += list(_CAPTION_WORDS) + list(NUMBER_WORDS) + [s + "s" for s in SHAPES]
    texts += [str(v) for values in _VALUES.values() for v in values]
    return texts


# ---------------------------------------------------------------------------------------------
# datasets


class SceneImages(Dataset):
    """Rendered scenes in memory: items are (PIL RGB image, int label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: list[str]):
        self.images = images
        self.labels = labels
        self.classnames = classnames

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="RGB"), int(self.labels[index])


POOL_SIZES = {"train": TRAIN_SIZE, "test": TEST_SIZE}


@cache
def task_pool(name: str, pool: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[Facts, ...]]:
    """(images, labels, facts) of the first ``size`` items (default: the pool's size) of ``name``'s ``pool``."""
    if name not in TASKS_BY_NAME:
        raise ConfigError(f"unknown demo task {name!r}")
    count = POOL_SIZES[pool] if size is None else int(size)
    drawn = [draw(name, pool, i) for i in range(count)]
    images = np.stack([d[0] for d in drawn])
    labels = np.array([d[1] for d in drawn], dtype=np.int64)
    return images, labels, tuple(d[2] for d in drawn)


def load_task(name: str, split: str) -> Dataset:
    """Split "train", "val" or "test" of demo task ``name``."""
    if name not in TASKS_BY_NAME:
        raise ConfigError(f"unknown demo task {name!r}")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r} for {name}; expected train, val or test")
    images, labels, _ = task_pool(name, "test" if split == "test" else "train")
    data = SceneImages(images, labels, TASKS_BY_NAME[name].classnames)
    if split == "test":
        return data
    train, val = split_train_val(data)
    return train if split == "train" else val


def _loader(name: str) -> Callable[[str, Path], Dataset]:
    def loader(split: str, root: Path) -> Dataset:  # root is ignored: the scenes are drawn on demand
        return load_task(name, split)

    return loader


def _register() -> None:
    for task in SCENE_TASKS:
        spec = DatasetSpec(name=task.name, classnames=list(task.classnames), templates=list(task.templates))
        register_dataset(task.name, spec, _loader(task.name), demo=True)


_register()
