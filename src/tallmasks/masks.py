"""TALL masks, the consensus mask, magnitude masks, agreement statistics and bit-packed storage.

A mask over a model is stored as ONE bit vector per task over the floating-point entries of the
state dict in sorted key order, packed with ``np.packbits`` (big-endian bit order) exactly like the
released TALL masks, so that the paper's mask files and ours share a layout.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.algebra.topk import KthInWindows, KthMagnitudes, check_k, kth_rank, sample_window
from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.io.checkpoints import atomic_path
from tallmasks.io.guard import require_file
from tallmasks.io.integrity import checksum

log = logging.getLogger(__name__)

MASKSET_FORMAT = "tallmasks-maskset-v2"
#: written before mask files had checksums; still read, with a warning
MASKSET_FORMAT_V1 = "tallmasks-maskset-v1"
_UNPACK_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class Layout:
    """Keys (sorted) and shapes that a flat mask vector covers, in order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, cs: CheckpointSet) -> Layout:
        return cls(tuple(cs.float_keys), tuple(tuple(cs.shapes[k]) for k in cs.float_keys))

    @classmethod
    def of_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        keys = sorted(k for k, v in state.items() if v.dtype.is_floating_point or v.dtype == torch.bool)
        return cls(tuple(keys), tuple(tuple(state[k].shape) for k in keys))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def to_json(self) -> str:
        return json.dumps({"keys": list(self.keys), "shapes": ["x".join(map(str, s)) for s in self.shapes]})

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        shapes = tuple(tuple(int(d) for d in s.split("x")) if s else () for s in data["shapes"])
        return cls(tuple(data["keys"]), shapes)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            n = math.prod(shape)
            out[key] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.keys if k not in state]
        if missing:
            raise CheckpointError(f"mask lacks key {missing[0]!r}")
        return torch.cat([state[k].reshape(-1).to(torch.bool) for k in self.keys]) if self.keys else torch.zeros(0, dtype=torch.bool)


class BitPacker:
    """Packs a stream of boolean blocks into one np.packbits byte array."""

    def __init__(self, numel: int):
        self.numel = numel
        self.data = np.zeros((numel + 7) // 8, dtype=np.uint8)
        self._byte = 0
        self._pending = np.zeros(0, dtype=bool)
        self._count = 0

    def add(self, bits: torch.Tensor) -> None:
        values = bits.reshape(-1).to("cpu", torch.bool).numpy()
        self._count += values.size
        if self._pending.size:
            values = np.concatenate([self._pending, values])
        whole = values.size - values.size % 8
        packed = np.packbits(values[:whole])
        self.data[self._byte : self._byte + packed.size] = packed
        self._byte += packed.size
        self._pending = values[whole:].copy()

    def finish(self) -> np.ndarray:
        if self._count != self.numel:
            raise ValueError(f"packed {self._count} bits, expected {self.numel}")
        if self._pending.size:
            self.data[self._byte] = np.packbits(self._pending)[0]
        return self.data


def _metadata_check(metadata: Mapping[str, str]) -> str:
    """The checksum of a mask file's metadata (every field but ``check``, in a fixed order)."""
    fields = ("format", "names", "layout", "info", "checks")
    return checksum(*(part for key in fields for part in (key, "\0", str(metadata.get(key, "")), "\0")))


class MaskSet:
    """Bit-packed binary masks of several tasks over one layout."""

    def __init__(
        self,
        names: Sequence[str],
        layout: Layout,
        packed: Sequence[np.ndarray],
        info: dict | None = None,
        origin: str | Path | None = None,
    ):
        names = [str(n) for n in names]
        where = f"{origin}: " if origin is not None else ""
        if len(names) != len(packed):
            raise CheckpointError(f"{where}{len(names)} task names for {len(packed)} masks")
        nbytes = (layout.numel + 7) // 8
        for name, array in zip(names, packed):
            if array.dtype != np.uint8 or array.size != nbytes:
                raise CheckpointError(f"{where}mask for {name!r} has {array.size} bytes, expected {nbytes} for this model")
        self.names = names
        self.layout = layout
        self.packed = {n: np.ascontiguousarray(a) for n, a in zip(names, packed)}
        self.info = dict(info or {})

    @classmethod
    def from_dicts(cls, masks: Mapping[str, Mapping[str, torch.Tensor]], layout: Layout, info: dict | None = None) -> MaskSet:
        packed = [np.packbits(layout.flatten(m).numpy()) for m in masks.values()]
        return cls(list(masks.keys()), layout, packed, info)

    def __contains__(self, name: str) -> bool:
        return name in self.packed

    def __len__(self) -> int:
        return len(self.names)

    def flat(self, name: str) -> torch.Tensor:
        if name not in self.packed:
            raise CheckpointError(f"no mask for task {name!r} (masks exist for {', '.join(self.names)})")
        bits = np.unpackbits(self.packed[name], count=self.layout.numel)
        return torch.from_numpy(bits.view(np.bool_))

    def get(self, name: str) -> dict[str, torch.Tensor]:
        """The mask of one task as a state dict of boolean tensors."""
        return self.layout.split(self.flat(name))

    def density(self, name: str) -> float:
        total = int(np.unpackbits(self.packed[name], count=self.layout.numel).sum(dtype=np.int64))
        return total / max(self.layout.numel, 1)

    def check_layout(self, layout: Layout, origin: str | Path) -> None:
        """A one-line CheckpointError unless these masks cover exactly ``layout`` (the model's float keys and shapes)."""
        if self.layout == layout:
            return
        ours, theirs = dict(zip(self.layout.keys, self.layout.shapes)), dict(zip(layout.keys, layout.shapes))
        missing = [k for k in theirs if k not in ours]
        extra = [k for k in ours if k not in theirs]
        shape = [k for k in theirs if k in ours and ours[k] != theirs[k]]
        if missing:
            why = f"no mask for key {missing[0]!r}"
        elif extra:
            why = f"a mask for key {extra[0]!r}, which the model lacks"
        elif shape:
            why = f"key {shape[0]!r} has shape {list(ours[shape[0]])} in the masks, {list(theirs[shape[0]])} in the model"
        else:
            why = "keys in another order"
        raise CheckpointError(f"{origin}: masks made for another model ({why})")

    def check_settings(self, settings: Mapping[str, object], origin: str | Path) -> None:
        """A one-line CheckpointError when the masks were built under other ``settings`` than these."""
        recorded = self.info.get("settings")
        if not isinstance(recorded, dict):
            return  # released masks, or masks saved before settings were recorded
        for key, value in settings.items():
            if key in recorded and recorded[key] != value:
                raise CheckpointError(
                    f"{origin}: masks built with {key}={recorded[key]!r}, this run has {key}={value!r}; "
                    "rebuild them with method=tall_mask under the same settings"
                )

    def subset(self, names: Sequence[str]) -> MaskSet:
        for n in names:
            if n not in self.packed:
                raise CheckpointError(f"no mask for task {n!r} (masks exist for {', '.join(self.names)})")
        return MaskSet(list(names), self.layout, [self.packed[n] for n in names], self.info)

    def count_blocks(self, chunk_bytes: int = _UNPACK_CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, number of tasks switching each entry on) over the layout, in chunks."""
        nbytes = (self.layout.numel + 7) // 8
        for byte in range(0, nbytes, chunk_bytes):
            stop = min(nbytes, byte + chunk_bytes)
            count = min(self.layout.numel - byte * 8, (stop - byte) * 8)
            total = None
            for name in self.names:
                bits = np.unpackbits(self.packed[name][byte:stop], count=count)
                part = torch.from_numpy(bits).to(torch.int16)
                total = part if total is None else total + part
            yield byte * 8, total

    def agreement(self) -> list[int]:
        """How many entries are switched on by exactly 0, 1, ..., T tasks (the agreement profile)."""
        hist = torch.zeros(len(self.names) + 1, dtype=torch.int64)
        for _, counts in self.count_blocks():
            hist += torch.bincount(counts.to(torch.int64), minlength=len(self.names) + 1)
        return [int(v) for v in hist]

    def save(self, path: str | Path) -> None:
        """Atomically write the masks as a safetensors file (uint8 packed bits + layout metadata, a checksum
        of each mask and one of the metadata)."""
        from safetensors.torch import save_file

        tensors = {f"mask/{i}": torch.from_numpy(self.packed[n]) for i, n in enumerate(self.names)}
        metadata = {
            "format": MASKSET_FORMAT,
            "names": json.dumps(self.names),
            "layout": self.layout.to_json(),
            "info": json.dumps(self.info),
            "checks": json.dumps([checksum(self.packed[n]) for n in self.names]),
        }
        metadata["check"] = _metadata_check(metadata)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        from safetensors import safe_open

        path = require_file(path, "mask")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") not in (MASKSET_FORMAT, MASKSET_FORMAT_V1):
                    raise CheckpointError(f"{path}: not a tallmasks mask file")
                checked = meta["format"] == MASKSET_FORMAT
                if checked and meta.get("check") != _metadata_check(meta):
                    raise CheckpointError(f"{path}: damaged mask file (the metadata's checksum does not match)")
                if not checked:
                    log.warning("%s: written before mask files had checksums (%s): damage cannot be detected", path, meta["format"])
                names = json.loads(meta["names"])
                if not isinstance(names, list) or len(names) > 1024:
                    raise ValueError("malformed metadata")
                layout = Layout.from_json(meta["layout"])
                packed = [handle.get_tensor(f"mask/{i}").numpy() for i in range(len(names))]
                info = json.loads(meta.get("info", "{}"))
                if checked:
                    checks = json.loads(meta["checks"])
                    if not isinstance(checks, list) or len(checks) != len(names):
                        raise ValueError("malformed checksums")
                    for name, array, expected in zip(names, packed, checks):
                        if checksum(array) != expected:
                            raise CheckpointError(f"{path}: damaged mask of {name!r} (checksum mismatch)")
            if not isinstance(info, dict):
                raise ValueError("malformed metadata")
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{path}: unreadable mask file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        return cls(names, layout, packed, info, origin=path)

    @classmethod
    def from_packed(
        cls, packed: Mapping[str, np.ndarray], layout: Layout, info: dict | None = None, origin: str | Path | None = None
    ) -> MaskSet:
        """Masks given as {task: np.packbits array}, as in the released TALL-mask files."""
        arrays = [np.asarray(v, dtype=np.uint8).reshape(-1) for v in packed.values()]
        return cls(list(packed.keys()), layout, arrays, info, origin=origin)


def check_lambda(value: float) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"tall_mask_lambda must be a non-negative number, got {value!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise ConfigError(f"tall_mask_lambda must be a non-negative number, got {value!r}")
    return lam


def _tall_bits(theta0: torch.Tensor, theta_t: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |theta_0 - theta_t| > |theta_0 + tau_MTL - theta_t| * lambda (strict)."""
    return (theta0 - theta_t).abs() > ((theta0 + merged) - theta_t).abs() * lam


def _vector_block(vector: Mapping[str, torch.Tensor], key: str, start: int, stop: int, device) -> torch.Tensor:
    if key not in vector:
        raise CheckpointError(f"merged vector lacks key {key!r}")
    return vector[key].reshape(-1)[start:stop].to(device=device, dtype=torch.float32)


def tall_mask(cs: CheckpointSet, task: int, vector: Mapping[str, torch.Tensor], lam: float, device="cpu") -> dict[str, torch.Tensor]:
    """The TALL mask of one task for one lambda, as boolean tensors by key."""
    lam = check_lambda(lam)
    out = {k: torch.empty(cs.numel(k), dtype=torch.bool) for k in cs.float_keys}
    for block in cs.blocks(tasks=[task], device=device):
        merged = _vector_block(vector, block.key, block.start, block.stop, device)
        out[block.key][block.start : block.stop] = _tall_bits(block.pretrained, block.finetuned[0], merged, lam).cpu()
    return {k: v.reshape(cs.shapes[k]) for k, v in out.items()}


def tall_masks(
    cs: CheckpointSet,
    vector: Mapping[str, torch.Tensor],
    lambdas: float | Sequence[float],
    device="cpu",
    info: dict | None = None,
) -> MaskSet:
    """TALL masks of every task (one lambda for all, or one per task), bit-packed, in one pass."""
    if isinstance(lambdas, (int, float)):
        lambdas = [lambdas] * cs.num_tasks
    lambdas = [check_lambda(v) for v in lambdas]
    if len(lambdas) != cs.num_tasks:
        raise ConfigError(f"{len(lambdas)} tall_mask_lambda values given for {cs.num_tasks} tasks (give one, or one per task)")
    layout = Layout.of(cs)
    packers = [BitPacker(layout.numel) for _ in range(cs.num_tasks)]

    def bits(block) -> list[torch.Tensor]:
        merged = _vector_block(vector, block.key, block.start, block.stop, device)
        return [_tall_bits(block.pretrained, theta_t, merged, lambdas[t]) for t, theta_t in enumerate(block.finetuned)]

    for _, masks in cs.map_blocks(bits, device=device):
        for packer, mask in zip(packers, masks):
            packer.add(mask)
    meta = {"kind": "tall", "lambdas": dict(zip(cs.names, lambdas))}
    meta.update(info or {})
    return MaskSet(cs.names, layout, [p.finish() for p in packers], meta)


#: models with fewer floating-point entries than this use the two histogram passes directly
WINDOW_MIN_PARAMS = 1 << 22
#: 1 / the fraction of the model sampled to place the one-pass selection windows
WINDOW_SAMPLE_STRIDE = 32


def topk_thresholds(cs: CheckpointSet, k: float, device="cpu", window: bool | None = None) -> list[float]:
    """Per task, the magnitude threshold keeping its top-k% entries over the whole model.

    Exact (equal to ``kthvalue`` over the whole task vector). With ``window`` (default: models of
    ``WINDOW_MIN_PARAMS`` entries or more, read without a block transform) a sample of about 1/32 of
    the model places a narrow window around each threshold and ONE pass finds it
    (``selection.KthInWindows``); tasks whose window missed, and every task otherwise, take the two
    histogram passes of ``selection.KthMagnitudes``."""
    k = check_k(k)
    d = cs.num_float_params
    rank = kth_rank(d, k)
    thresholds: list[float | None] = [None] * cs.num_tasks
    if window is None:
        window = d >= WINDOW_MIN_PARAMS and cs.block_transform is None
    if window and d > 0:
        sample = cs.sample_taus(WINDOW_SAMPLE_STRIDE, device=device)
        fraction = rank / d
        slack = 0.0025 + 8 * math.sqrt(max(fraction * (1 - fraction), 1e-12) / max(sample.shape[1], 1))
        windows = [sample_window(row, fraction, slack) for row in sample]
        del sample
        selector = KthInWindows([rank] * cs.num_tasks, windows, cap=max(1 << 20, int(4 * slack * d)))
        for _ in cs.map_blocks(lambda block: block.verify(selector.add(block.taus())), device=device):
            pass
        thresholds = selector.values()
    missed = [t for t, value in enumerate(thresholds) if value is None]
    if missed:
        selector = KthMagnitudes([rank] * len(missed))
        for _ in cs.map_blocks(lambda block: block.verify(selector.add_high(block.taus())), tasks=missed, device=device):
            pass
        selector.choose_bins()
        for _ in cs.map_blocks(lambda block: selector.add_low(block.taus()), tasks=missed, device=device):
            pass
        for t, value in zip(missed, selector.values()):
            thresholds[t] = value
    return thresholds


def magnitude_masks(cs: CheckpointSet, k: float = 10, device="cpu") -> MaskSet:
    """Per task, the top-k% magnitudes of its own task vector (the magnitude-masking baseline)."""
    k = check_k(k)
    layout = Layout.of(cs)
    packers = [BitPacker(layout.numel) for _ in range(cs.num_tasks)]
    if k >= 100:
        thresholds = [0.0] * cs.num_tasks
    else:
        thresholds = topk_thresholds(cs, k, device)
    column = torch.tensor(thresholds, dtype=torch.float32, device=device).view(-1, 1)
    for _, kept in cs.map_blocks(lambda block: block.taus().abs() >= column, device=device):
        for t in range(cs.num_tasks):
            packers[t].add(kept[t])
    return MaskSet(cs.names, layout, [p.finish() for p in packers], {"kind": "magnitude", "k": k})


def consensus_mask(masks: MaskSet, k: int) -> dict[str, torch.Tensor]:
    """Entries switched on by at least ``k`` tasks (k=2 drops catastrophic and selfish weights)."""
    k = check_prun_thre_k(k)
    flat = torch.empty(masks.layout.numel, dtype=torch.bool)
    for offset, counts in masks.count_blocks():
        flat[offset : offset + counts.numel()] = counts >= k
    return masks.layout.split(flat)


def check_prun_thre_k(k, num_tasks: int | None = None) -> int:
    """``k`` as an int in [0, num_tasks]: a larger one would drop every weight."""
    from tallmasks.core.params import TaskCount, coerce

    return coerce(k, TaskCount, "prun_thre_k", {"num_tasks": num_tasks})
