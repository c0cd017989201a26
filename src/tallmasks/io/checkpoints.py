"""Safe, lazy loading and atomic saving of state dicts (.pt and .safetensors).

Loading never executes pickle code: ``.pt`` files go through ``torch.load(weights_only=True)``
(memory-mapped when the file is in the zip format) and ``.safetensors`` files are read tensor by
tensor, as are sharded safetensors checkpoints (a folder with ``model.safetensors.index.json``, as
Hugging Face saves large models). Only regular files are opened (tallmasks.io.guard). Saving writes to a
temporary named after the output in the target folder and renames it into place, so an interrupted or
failed save leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.core.schema import Map, Obj, Str, read_json
from tallmasks.io.guard import atomic_output as atomic_path  # noqa: F401  (the one atomic writer, under its old name)
from tallmasks.io.guard import require_file, safe_name

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SHARD_INDEX_SUFFIX = ".safetensors.index.json"


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensors are read from disk on access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._eager: dict[str, torch.Tensor] | None = None
        self._handle: Any = None
        self._mapped = False  # tensors are views of a read-only file mapping (madvise is safe on them)
        if self.path.suffix == SAFETENSORS_SUFFIX:
            self._open_safetensors()
        else:
            self._eager, self._mapped = _torch_load_tensors(self.path)
            for key, value in self._eager.items():
                self._shapes[key] = tuple(value.shape)
                self._dtypes[key] = value.dtype

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            for key in self._handle.keys():
                tensor_slice = self._handle.get_slice(key)
                self._shapes[key] = tuple(tensor_slice.get_shape())
                self._dtypes[key] = _safetensors_dtype(tensor_slice.get_dtype(), self.path, key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({_first_line(exc)})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._eager is not None:
            return self._eager[key]
        if key not in self._shapes:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` without reading its data."""
        return self._dtypes[key]

    def numel(self, key: str) -> int:
        n = 1
        for size in self._shapes[key]:
            n *= size
        return n

    @property
    def files(self) -> list[Path]:
        """The files this checkpoint is read from."""
        return [self.path]

    def prefetch(self, key: str) -> None:
        """Map the pages of a memory-mapped tensor in one call, rather than one page fault per 4 KiB."""
        if self._mapped:
            advise(self._eager[key], MADV_POPULATE_READ)

    def release(self, key: str) -> None:
        """Unmap the pages of a memory-mapped tensor (they stay in the page cache)."""
        if self._mapped:
            advise(self._eager[key], MADV_DONTNEED)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} tensors)"


class _ShardHandles:
    """safetensors' ``safe_open`` interface (keys, get_slice, get_tensor) over the shards of an index."""

    def __init__(self, handles: dict[str, Any], weight_map: dict[str, str]):
        self._handles = handles
        self._weight_map = weight_map

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def get_slice(self, key: str) -> Any:
        return self._handles[self._weight_map[key]].get_slice(key)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._handles[self._weight_map[key]].get_tensor(key)


class ShardedStateDict(LazyStateDict):
    """A sharded safetensors checkpoint: an index (``weight_map``: tensor name -> shard file) and its shards,
    read tensor by tensor (memory-mapped), never loaded whole."""

    def __init__(self, index_path: str | Path):
        from safetensors import safe_open

        self.path = Path(index_path)
        self._shapes = {}
        self._dtypes = {}
        self._eager = None
        self._mapped = False  # read through safetensors' handles: nothing to madvise
        weight_map = _read_weight_map(self.path)
        handles: dict[str, Any] = {}
        self._shards = sorted(set(weight_map.values()))
        for shard in self._shards:
            shard_path = self.path.parent / shard
            if not shard_path.exists():
                raise CheckpointError(f"{self.path}: shard {shard} is missing")
            require_file(shard_path, "checkpoint shard")
            try:
                handles[shard] = safe_open(str(shard_path), framework="pt", device="cpu")
                present = set(handles[shard].keys())
            except Exception as exc:
                raise CheckpointError(f"{shard_path}: not a readable safetensors file ({_first_line(exc)})") from None
            listed = {key for key, where in weight_map.items() if where == shard}
            if listed - present:
                raise CheckpointError(f"{shard_path}: lacks tensor {sorted(listed - present)[0]!r} that the index places there")
            if present - listed:
                raise CheckpointError(f"{shard_path}: tensor {sorted(present - listed)[0]!r} is not in the index {self.path.name}")
        self._handle = _ShardHandles(handles, weight_map)
        for key in sorted(weight_map):
            tensor_slice = self._handle.get_slice(key)
            self._shapes[key] = tuple(tensor_slice.get_shape())
            self._dtypes[key] = _safetensors_dtype(tensor_slice.get_dtype(), self.path, key)

    @property
    def files(self) -> list[Path]:
        return [self.path, *(self.path.parent / shard for shard in self._shards)]


def _shard_complaint(shard: str) -> str | None:
    """Why ``shard`` cannot be a shard file beside its index (None when it can)."""
    if Path(shard).name != shard or not shard.endswith(SAFETENSORS_SUFFIX):
        return f"maps to {shard!r}, not a .safetensors file beside the index"
    try:
        safe_name(shard, "shard", CheckpointError)
    except CheckpointError as exc:
        return str(exc)
    return None


#: a sharded checkpoint's ``*.safetensors.index.json``: tensor name -> shard file beside it, optional metadata
SHARD_INDEX_SCHEMA = Obj(required={"weight_map": Map(Str(test=_shard_complaint))}, optional={"metadata": Obj()})


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        index = read_json(index_path, CheckpointError, SHARD_INDEX_SCHEMA, what="shard index")
    except CheckpointError as exc:
        detail = str(exc).removeprefix(f"{index_path}: ")
        raise CheckpointError(f"{index_path}: not a readable shard index ({detail})") from None
    weight_map = index["weight_map"]
    if not weight_map:
        raise CheckpointError(f"{index_path}: a shard index needs a non-empty 'weight_map' of tensor names to shard files")
    return dict(weight_map)


def checkpoint_file(path: str | Path) -> Path:
    """The file to open for a checkpoint path: the path itself, or inside a folder its shard index
    (``*.safetensors.index.json``) or else its single ``.safetensors`` file."""
    path = Path(path)
    if not path.is_dir():
        return path
    for pattern in ("*" + SHARD_INDEX_SUFFIX, "*" + SAFETENSORS_SUFFIX):
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(f"{path}: holds several checkpoints ({', '.join(p.name for p in found[:3])}); name the file")
    if any(path.glob("*.bin.index.json")):
        raise CheckpointError(f"{path}: sharded .bin checkpoints are not supported; save the model as safetensors")
    raise CheckpointError(f"{path}: is a folder without a safetensors checkpoint (model.safetensors or a *.safetensors.index.json)")


MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14 and later
_libc: Any = None


def advise(tensor: torch.Tensor, advice: int) -> bool:
    """madvise(2) the pages under a CPU tensor's data; False where the platform does not take the advice."""
    global _libc
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    page = mmap.PAGESIZE
    start = tensor.data_ptr() - tensor.data_ptr() % page
    return _libc.madvise(start, tensor.data_ptr() + nbytes - start, advice) == 0


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str, path: Path, key: str) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _torch_load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """torch.load a state dict with weights_only=True, memory-mapped when possible (the bool says whether)."""
    require_file(path, "checkpoint")
    obj: Any = None
    mapped = False
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        mapped = True
    except pickle.UnpicklingError as exc:
        message = _first_line(exc)
        if "mmap" in message or "zip" in message.lower():
            obj = _torch_load_unmapped(path)
        else:
            raise CheckpointError(f"{path}: refused, it is not a plain state dict ({_unsafe_reason(exc)})") from None
    except RuntimeError as exc:
        # Legacy (non-zip) files cannot be memory-mapped.
        if "mmap" in str(exc) or "zip" in str(exc).lower():
            obj = _torch_load_unmapped(path)
        else:
            raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None
    return _as_state_dict(obj, path), mapped


def _torch_load_unmapped(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, it is not a plain state dict ({_unsafe_reason(exc)})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({_first_line(exc)})") from None


def _unsafe_reason(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported" in line:
            return line.rstrip(".")
    return "weights-only loading failed"


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (mapping of names to tensors), found {type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            log.debug("%s: skipping non-tensor entry %r", path, key)
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def load_state_dict(path: str | Path) -> LazyStateDict:
    """Open a ``.pt`` or ``.safetensors`` state dict, or a sharded safetensors checkpoint (its folder or
    index), without executing pickle code."""
    path = Path(path).expanduser()
    path = require_file(checkpoint_file(path) if path.is_dir() else path, "checkpoint")
    if path.name.endswith(SHARD_INDEX_SUFFIX):
        return ShardedStateDict(path)
    return LazyStateDict(path)


def materialize(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read every tensor of a (lazy) state dict into memory."""
    return {key: state[key] for key in state}


def save_state_dict(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None, finite: bool = False
) -> None:
    """Atomically save a state dict; the format follows the suffix (.safetensors, else torch.save).
    ``finite``: refuse, before writing, a floating-point tensor holding NaN or Inf (e.g. an fp16 overflow)."""
    path = Path(path)
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    if finite:
        check_finite(tensors, path)
    with atomic_path(path) as tmp:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            save_file(_unshare(tensors), str(tmp), metadata=metadata)
        else:
            torch.save(tensors, str(tmp))


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A one-line CheckpointError naming the first floating-point tensor that holds NaN or Inf."""
    for key, value in tensors.items():
        if value.dtype.is_floating_point and not _all_finite(value):
            dtype = str(value.dtype).replace("torch.", "")
            limit = torch.finfo(value.dtype).max
            raise CheckpointError(
                f"{path}: tensor {key!r} would hold NaN or Inf in {dtype} (values beyond +-{limit:.4g} overflow); nothing written"
            )


def require_finite(state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A one-line CheckpointError naming ``path`` and the first floating-point tensor of a loaded ``state``
    that holds NaN or Inf."""
    for key in state:
        value = state[key]
        if value.dtype.is_floating_point and not _all_finite(value):
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or Inf; refused")


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every entry is finite: the extremes (NaN propagates through min and max) are, one pass without
    a mask as large as the tensor (10x faster than isfinite().all() on the CPU)."""
    if not value.numel():
        return True
    try:
        lo, hi = torch.aminmax(value.reshape(-1))
    except (RuntimeError, NotImplementedError):  # a dtype or device without aminmax
        return bool(torch.isfinite(value).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage; give each its own."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in tensors.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ident in seen:
            value = value.clone()
        seen.add(ident)
        out[key] = value
    return out


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files a checkpoint is read from (a sharded one, its folder or its index: the index and shards),
    each a regular file."""
    path = Path(path).expanduser()
    if path.is_dir() or path.name.endswith(SHARD_INDEX_SUFFIX):
        return load_state_dict(path).files
    return [require_file(path, "checkpoint")]


def require_checkpoint(path: str | Path) -> Path:
    """``path`` (``~`` expanded) if it is a checkpoint: a regular file, or a folder holding a sharded
    safetensors checkpoint (its index read, its shards checked) or a single ``.safetensors`` file; else a
    one-line CheckpointError."""
    path = Path(path).expanduser()
    checkpoint_files(path)
    return path


def checkpoint_size(path: str | Path) -> int:
    """Total bytes of a checkpoint's files (of a sharded one: its index and shards); a one-line
    CheckpointError when it is not a readable checkpoint."""
    return sum(file.stat().st_size for file in checkpoint_files(path))


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (of a sharded checkpoint: of its index and shards in turn)."""
    digest = hashlib.sha256()
    for file in checkpoint_files(path):
        with open(file, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Convert between .pt and .safetensors (the suffixes decide)."""
    save_state_dict(materialize(load_state_dict(src)), dst)
