"""Keyed task-vector algebra and streamed access to a collection of checkpoints.

A task vector is tau_t = theta_t - theta_0 over the floating-point entries of a state dict;
integer buffers are not part of it and pass through untouched when a vector is applied.
``CheckpointSet`` opens theta_0 and every theta_t lazily and walks them tensor by tensor, in
row blocks, so that memory grows with one block times the number of tasks, never with the model.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from tallmasks.algebra.coefficients import key_coefficient, scaling_of
from tallmasks.algebra.reduction import stacked_sum, stacked_tail
from tallmasks.core.errors import CheckpointError
from tallmasks.io.checkpoints import LazyStateDict, load_state_dict

StateDictLike = Union[str, Path, Mapping[str, torch.Tensor]]

DEFAULT_BLOCK_ELEMS = 1 << 22  # about 16 MB of float32 per task and block


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _open(source: StateDictLike) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        return load_state_dict(source)
    if isinstance(source, Mapping):
        return source
    raise CheckpointError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")


def _label(source: StateDictLike, fallback: str) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, LazyStateDict):
        return str(source.path)
    return fallback


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """Shape of ``key`` without reading its data when the mapping can tell (lazy or computed views)."""
    shape = getattr(state, "shape", None)
    if callable(shape):
        return tuple(shape(key))
    return tuple(state[key].shape)


def _dtype(state: Mapping[str, torch.Tensor], key: str) -> torch.dtype:
    dtype = getattr(state, "dtype", None)
    if callable(dtype):
        return dtype(key)
    return state[key].dtype


def _read_rows(state: Mapping[str, torch.Tensor], key: str, start: int, stop: int, whole_rows: bool) -> torch.Tensor:
    """Rows [start, stop) of ``key`` (all of it for 0-dim tensors), read lazily where possible."""
    if isinstance(state, LazyStateDict) and state._handle is not None:
        if not whole_rows:
            return state._handle.get_slice(key)[start:stop]
        return state[key]
    tensor = state[key]
    return tensor if whole_rows else tensor[start:stop]


_local = threading.local()


def _workspace(size: int, device: torch.device) -> torch.Tensor:
    """This thread's reused float32 buffer of ``size`` entries on ``device``."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[device] = torch.empty(size, dtype=torch.float32, device=device)
    return buffer[:size]


@dataclass
class Block:
    """One row block of one tensor: theta_0 and every theta_t, flattened, in float32.

    ``offset`` is the block's position in the whole flat vector (floating-point keys in sorted
    order, the paper's ``state_dict_to_vector``); ``tail`` is how many of its trailing entries fall
    in the whole vector's last ``stacked_tail(d)`` entries, which the stacked sum adds differently.
    """

    key: str
    start: int  # first element (flat index) of the block inside the tensor
    stop: int
    pretrained: torch.Tensor  # 1-D float32
    finetuned: list[torch.Tensor]  # one 1-D float32 per task
    offset: int = 0
    tail: int = 0
    labels: Sequence[str] = ()  # pretrained label, then one per task (for error messages)
    unchecked: bool = False  # inputs not yet known to be free of NaN/Inf

    def task_vectors(self) -> list[torch.Tensor]:
        """tau_t = theta_t - theta_0 for every task, as new tensors."""
        return [theta_t - self.pretrained for theta_t in self.finetuned]

    def taus(self) -> torch.Tensor:
        """(tasks x n) task vectors in this thread's buffer, which its next block overwrites."""
        n = self.pretrained.numel()
        taus = _workspace(len(self.finetuned) * n, self.pretrained.device).view(len(self.finetuned), n)
        for t, theta_t in enumerate(self.finetuned):
            torch.sub(theta_t, self.pretrained, out=taus[t])
        return taus

    def sum(self, parts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over tasks of per-task block values, bit for bit as the paper's stacked ``.sum(0)``."""
        return stacked_sum(parts, self.tail, out)

    def verify(self, evidence: torch.Tensor | bool) -> None:
        """Check the inputs for NaN/Inf through ``evidence``: values computed from every input entry
        in which a non-finite input shows up as non-finite (a sum of task vectors), or a bool saying
        whether they are all finite. Only when it is not are the inputs checked one by one."""
        if not self.unchecked:
            return
        if isinstance(evidence, torch.Tensor) and evidence.dtype.is_floating_point:
            finite = bool(torch.isfinite(evidence).all())
        else:
            finite = bool(evidence)
        if not finite:
            self.check_inputs()
        self.unchecked = False

    def check_inputs(self) -> None:
        """Raise naming the first input whose block holds NaN or Inf."""
        for label, tensor in zip(self.labels, [self.pretrained, *self.finetuned]):
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{label}: tensor {self.key!r} contains NaN or Inf")
        self.unchecked = False


@dataclass
class _Walk:
    """One pass over the checkpoints: which tasks and keys, the block size, the files to map, a progress bar."""

    tasks: list[int]
    block_elems: int
    keys: list[str]
    lazy_states: list[LazyStateDict]
    bar: Any = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CheckpointSet:
    """theta_0 and the fine-tuned theta_t of several tasks, opened lazily and validated."""

    def __init__(
        self,
        pretrained: StateDictLike,
        finetuned: Sequence[StateDictLike],
        names: Sequence[str] | None = None,
        block_elems: int = DEFAULT_BLOCK_ELEMS,
    ):
        self.block_elems = int(block_elems)
        self.progress = False  # show a progress bar for every pass over the checkpoints
        self.passes = 0
        if len(finetuned) == 0:
            raise CheckpointError("no fine-tuned checkpoints given")
        if names is None:
            names = [default_name(src, i) for i, src in enumerate(finetuned)]
        names = [str(n) for n in names]
        if len(names) != len(finetuned):
            raise CheckpointError(f"{len(names)} task names given for {len(finetuned)} fine-tuned checkpoints")
        if len(set(names)) != len(names):
            raise CheckpointError(f"task names are not unique: {names}; give each task its own name (--names)")
        self.names = names
        self.pretrained_label = _label(pretrained, "pretrained state dict")
        self.finetuned_labels = [_label(src, f"fine-tuned state dict {i}") for i, src in enumerate(finetuned)]
        self.pretrained = _open(pretrained)
        self.finetuned = [_open(src) for src in finetuned]
        self._validate()
        self.keys = list(self.pretrained.keys())
        self.float_keys = sorted(k for k in self.keys if is_float(_dtype(self.pretrained, k)))
        if not self.float_keys:
            raise CheckpointError(f"{self.pretrained_label}: no floating-point tensor, nothing to merge")
        self.shapes = {k: _shape(self.pretrained, k) for k in self.keys}
        self.dtypes = {k: _dtype(self.pretrained, k) for k in self.keys}
        self._checked: set[str] = set()
        self._offsets: dict[str, int] | None = None
        #: applied to every block of every walk, in walk order: ``transform(block, tasks) -> Block``
        self.block_transform: Callable[[Block, Sequence[int]], Block] | None = None

    def transformed(self, transform: Callable[[Block, Sequence[int]], Block]) -> CheckpointSet:
        """The same checkpoints seen through ``transform``, which every walk (``blocks``, ``map_blocks``)
        applies to its blocks in order, in the walking thread (so it may draw from sequential streams)."""
        view = copy.copy(self)
        view.block_transform = transform
        return view

    @property
    def num_tasks(self) -> int:
        return len(self.finetuned)

    def numel(self, key: str) -> int:
        return math.prod(self.shapes[key])

    @property
    def num_float_params(self) -> int:
        return sum(self.numel(k) for k in self.float_keys)

    def _validate(self) -> None:
        ref_keys = set(self.pretrained.keys())
        for label, state in zip(self.finetuned_labels, self.finetuned):
            keys = set(state.keys())
            missing = sorted(ref_keys - keys)
            extra = sorted(keys - ref_keys)
            if missing:
                raise CheckpointError(f"{label}: missing key {missing[0]!r}" + _more(missing))
            if extra:
                raise CheckpointError(f"{label}: unexpected key {extra[0]!r}" + _more(extra))
            for key in self.pretrained.keys():
                ref_shape, shape = _shape(self.pretrained, key), _shape(state, key)
                if ref_shape != shape:
                    raise CheckpointError(
                        f"{label}: shape mismatch for {key!r}: {list(shape)} vs {list(ref_shape)} in the pre-trained checkpoint"
                    )
                ref_dtype, dtype = _dtype(self.pretrained, key), _dtype(state, key)
                if ref_dtype != dtype:
                    raise CheckpointError(f"{label}: dtype mismatch for {key!r}: {dtype} vs {ref_dtype} in the pre-trained checkpoint")

    def blocks(
        self,
        tasks: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        block_elems: int | None = None,
        keys: Sequence[str] | None = None,
    ) -> Iterator[Block]:
        """Walk the floating-point tensors (or ``keys``) in sorted key order, in row blocks of about
        ``block_elems``. Inputs are checked for NaN/Inf once per tensor: through ``Block.verify``
        where the caller computes something that shows them, else after the block is used."""
        walk = self._start_walk(tasks, block_elems, keys)
        try:
            for block in self._walk(walk, device):
                yield block
                self._block_done(walk, block)
        finally:
            walk.close()

    def map_blocks(
        self,
        fn: Callable[[Block], Any],
        tasks: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        block_elems: int | None = None,
        keys: Sequence[str] | None = None,
        workers: int | None = None,
    ) -> Iterator[tuple[Block, Any]]:
        """(block, fn(block)) for the blocks of a walk, in order. On the CPU, ``workers`` threads
        (default: torch's thread count) each run ``fn`` on whole blocks with torch single-threaded,
        which keeps both cores busy without a thread barrier in every operation."""
        workers = torch.get_num_threads() if workers is None else int(workers)
        if workers <= 1 or torch.device(device).type != "cpu":
            for block in self.blocks(tasks, device, block_elems, keys):
                yield block, fn(block)
            return
        walk = self._start_walk(tasks, block_elems, keys)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        pending: deque = deque()
        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                try:
                    for block in self._walk(walk, device):
                        pending.append((block, pool.submit(fn, block)))
                        if len(pending) > 2 * workers:
                            yield self._collect(walk, pending)
                    while pending:
                        yield self._collect(walk, pending)
                finally:
                    for _, future in pending:
                        future.cancel()
        finally:
            torch.set_num_threads(threads)
            walk.close()

    def _collect(self, walk: _Walk, pending: deque) -> tuple[Block, Any]:
        block, future = pending.popleft()
        result = future.result()
        self._block_done(walk, block)
        return block, result

    def _start_walk(self, tasks, block_elems, keys) -> _Walk:
        tasks = list(range(self.num_tasks)) if tasks is None else list(tasks)
        block_elems = self.block_elems if block_elems is None else int(block_elems)
        walk_keys = self.float_keys if keys is None else [k for k in self.float_keys if k in set(keys)]
        self.passes += 1
        bar = None
        if self.progress:
            from tallmasks.core.progress import progress

            bar = progress(
                total=sum(self.numel(k) for k in walk_keys),
                unit="param",
                unit_scale=True,
                leave=False,
                desc=f"pass {self.passes} over {self.num_tasks} checkpoints",
            )
        states = [self.pretrained, *(self.finetuned[t] for t in tasks)]
        return _Walk(tasks, block_elems, walk_keys, [s for s in states if isinstance(s, LazyStateDict)], bar)

    def _block_done(self, walk: _Walk, block: Block) -> None:
        """After a block is used: check its inputs if nothing showed them, and close its tensor after its last block."""
        if block.unchecked:  # the caller computed nothing that shows NaN/Inf: look at the inputs
            block.check_inputs()
        if block.stop == self.numel(block.key):
            for state in walk.lazy_states:
                state.release(block.key)
            if len(walk.tasks) == self.num_tasks:
                self._checked.add(block.key)

    @property
    def offsets(self) -> dict[str, int]:
        """Position of every floating-point key in the whole flat vector (sorted key order)."""
        if self._offsets is None:
            self._offsets, position = {}, 0
            for key in self.float_keys:
                self._offsets[key] = position
                position += self.numel(key)
        return self._offsets

    def _walk(self, walk: _Walk, device) -> Iterator[Block]:
        total = self.num_float_params
        tail_start = total - stacked_tail(total)
        labels = [self.pretrained_label, *(self.finetuned_labels[t] for t in walk.tasks)]
        for key in walk.keys:
            shape = self.shapes[key]
            numel = self.numel(key)
            whole = len(shape) == 0 or numel == 0
            rows = 1 if whole else shape[0]
            row_elems = 1 if whole else numel // max(rows, 1)
            rows_per_block = max(1, walk.block_elems // max(row_elems, 1))
            unchecked = key not in self._checked
            for state in walk.lazy_states:
                state.prefetch(key)
            for row in range(0, rows, rows_per_block):
                row_stop = min(rows, row + rows_per_block)
                theta0 = self._read(self.pretrained, key, row, row_stop, whole, device)
                thetas = [self._read(self.finetuned[t], key, row, row_stop, whole, device) for t in walk.tasks]
                start = row * row_elems
                offset = self.offsets[key] + start
                tail = max(0, offset + theta0.numel() - max(offset, tail_start))
                if walk.bar is not None:
                    walk.bar.update(theta0.numel())
                block = Block(key, start, start + theta0.numel(), theta0, thetas, offset, tail, labels, unchecked)
                yield block if self.block_transform is None else self.block_transform(block, walk.tasks)

    def _read(self, state, key, row, row_stop, whole, device) -> torch.Tensor:
        return _read_rows(state, key, row, row_stop, whole).reshape(-1).to(device=device, dtype=torch.float32)

    def sample_taus(self, stride: int = 32, chunk_elems: int = 4096, device: torch.device | str = "cpu") -> torch.Tensor:
        """(tasks x m) task-vector entries: from every floating-point tensor (flattened), one run of
        ``chunk_elems`` entries in every ``stride`` runs, a stratified sample of about 1/stride of the
        model. Reads only those entries (whole rows where a run spans rows); checks nothing and marks
        nothing checked; the block transform, if any, is not applied."""
        step = max(1, int(chunk_elems)) * max(1, int(stride))
        parts = []
        for key in self.float_keys:
            numel = self.numel(key)
            for start in range(0, numel, step):
                stop = min(numel, start + int(chunk_elems))
                theta0 = self._read_flat(self.pretrained, key, start, stop, device)
                parts.append(torch.stack([self._read_flat(state, key, start, stop, device) - theta0 for state in self.finetuned]))
        if not parts:
            return torch.zeros(self.num_tasks, 0, device=device)
        return torch.cat(parts, 1)

    def _read_flat(self, state, key: str, start: int, stop: int, device) -> torch.Tensor:
        """Entries [start, stop) of the flattened ``key`` in float32, reading little beyond them."""
        shape = self.shapes[key]
        if isinstance(state, LazyStateDict) and state._handle is not None and len(shape) >= 1:
            row_elems = math.prod(shape[1:])
            first, last = start // row_elems, (stop - 1) // row_elems + 1
            piece = state._handle.get_slice(key)
            if last == first + 1 and len(shape) == 2:  # inside one row: its columns only
                values = piece[first:last, start - first * row_elems : stop - first * row_elems]
                return values.reshape(-1).to(device=device, dtype=torch.float32)
            values = piece[first:last].reshape(-1)
            return values[start - first * row_elems : stop - first * row_elems].to(device=device, dtype=torch.float32)
        return state[key].reshape(-1)[start:stop].to(device=device, dtype=torch.float32)

    def tensor(self, key: str, task: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """One whole floating-point tensor in float32 and its own shape: theta_0[key], or theta_task[key]."""
        if task is None:
            state, label = self.pretrained, self.pretrained_label
        else:
            state, label = self.finetuned[task], self.finetuned_labels[task]
        tensor = self._read(state, key, 0, 1, True, device)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{label}: tensor {key!r} contains NaN or Inf")
        return tensor.reshape(self.shapes[key])

    def passthrough(self) -> dict[str, torch.Tensor]:
        """The non-floating-point entries of theta_0 (integer buffers), untouched."""
        return {k: self.pretrained[k] for k in self.keys if k not in set(self.float_keys)}


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def default_name(source: StateDictLike, index: int) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        stem = path.stem
        # released layout: <Dataset>Val/nonlinear_finetuned.pt -> <Dataset>
        if stem in {"nonlinear_finetuned", "finetuned"} and path.parent.name:
            name = path.parent.name
            return name[:-3] if name.endswith("Val") else name
        return stem
    return f"task{index}"


class TaskVector:
    """A keyed task vector: float tensors by state-dict key."""

    def __init__(self, vector: Mapping[str, torch.Tensor]):
        self.vector = dict(vector)

    @classmethod
    def from_checkpoints(cls, pretrained: StateDictLike, finetuned: StateDictLike) -> TaskVector:
        """tau = theta_t - theta_0 over floating-point entries (computed in float32)."""
        cs = CheckpointSet(pretrained, [finetuned])
        pieces = ((b.key, b.start, b.stop, b.task_vectors()[0]) for b in cs.blocks())
        return cls(_assemble(cs, pieces))

    def _binary(self, other: TaskVector, op) -> TaskVector:
        if set(self.vector) != set(other.vector):
            diff = sorted(set(self.vector) ^ set(other.vector))
            raise CheckpointError(f"task vectors have different keys, e.g. {diff[0]!r}")
        return TaskVector({k: op(v, other.vector[k]) for k, v in self.vector.items()})

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._binary(other, torch.add)

    def __radd__(self, other):
        if other == 0 or other is None:
            return self
        return self.__add__(other)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._binary(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self.vector.items()})

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: v * scale for k, v in self.vector.items()})

    __rmul__ = __mul__

    def masked(self, mask: Mapping[str, torch.Tensor]) -> TaskVector:
        """Hadamard product with a boolean mask of the same keys."""
        missing = [k for k in self.vector if k not in mask]
        if missing:
            raise CheckpointError(f"mask lacks key {missing[0]!r}")
        return TaskVector({k: v * mask[k].to(torch.bool) for k, v in self.vector.items()})

    def dot(self, other: TaskVector) -> float:
        total = 0.0
        for key, value in self.vector.items():
            total += float(torch.sum(value.double() * other.vector[key].double()))
        return total

    def norm(self) -> float:
        return math.sqrt(self.dot(self))

    def apply_to(self, pretrained: Mapping[str, torch.Tensor], alpha: float = 1.0) -> dict[str, torch.Tensor]:
        return apply_vector(pretrained, self.vector, alpha)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.vector[key]

    def __len__(self) -> int:
        return len(self.vector)


def _assemble(cs: CheckpointSet, pieces) -> dict[str, torch.Tensor]:
    """Build full tensors (float32, by key) from (key, start, stop, values) block results."""
    out = {k: torch.empty(cs.numel(k), dtype=torch.float32) for k in cs.float_keys}
    for key, start, stop, values in pieces:
        out[key][start:stop] = values.to("cpu")
    return {k: v.reshape(cs.shapes[k]) for k, v in out.items()}


def apply_vector(
    pretrained: Mapping[str, torch.Tensor],
    vector: Mapping[str, torch.Tensor],
    alpha: float = 1.0,
    mask: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """theta_0 + alpha * (mask * tau), in float32, cast back to theta_0's dtypes; other keys untouched
    (a ScaledVector applies each key with its own coefficient at alpha)."""
    out: dict[str, torch.Tensor] = {}
    scaling = scaling_of(vector)
    for key in pretrained.keys():
        theta0 = pretrained[key]
        if key not in vector:
            if theta0.dtype.is_floating_point:
                raise CheckpointError(f"task vector lacks floating-point key {key!r}")
            out[key] = theta0
            continue
        tau = vector[key].to(torch.float32)
        if tuple(tau.shape) != tuple(theta0.shape):
            raise CheckpointError(f"shape mismatch for {key!r}: {list(tau.shape)} vs {list(theta0.shape)}")
        if mask is not None:
            tau = tau * mask[key].to(torch.bool)
        out[key] = (theta0.to(torch.float32) + key_coefficient(scaling, key, alpha) * tau).to(theta0.dtype)
    extra = [k for k in vector if k not in pretrained]
    if extra:
        raise CheckpointError(f"task vector has key {extra[0]!r} that the pre-trained model lacks")
    return out
