"""Safe loading of the paper's released heads and masks: no pickle code is ever executed.

- Heads ``head_<Dataset>Val.pt``: a torch-pickled ``src.models.modeling.ClassificationHead`` module. Loaded
  with ``torch.load(weights_only=True)`` and a stand-in class allowlisted under exactly that name.
- Masks ``TALL_mask_{N}task.npy``: the paper's code writes them with ``np.save`` (a dict {dataset:
  np.packbits(bool vector)} pickled in a 0-d object array) but reads them with ``torch.load``, so either
  format may be on the hub. An ``np.save``d file is read by a restricted unpickler that allows only
  numpy's array reconstruction; a ``torch.save``d dict of numpy arrays or uint8 tensors by torch's
  weights-only unpickler with the same numpy globals allowed. The content decides, not the suffix.
Anything else is refused with a one-line CheckpointError naming the file and the forbidden global.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.io.guard import require_file

log = logging.getLogger(__name__)

RELEASED_HEAD_CLASS = "src.models.modeling.ClassificationHead"


class _ReleasedHead(torch.nn.Linear):
    """Stand-in that receives the pickled state of the paper's ClassificationHead (never its code)."""

    normalize: bool = True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _torch_reason(exc: BaseException) -> str:
    """The informative line of a torch weights-only failure."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        return match.group(1).strip().rstrip(".")
    return _first_line(exc)


def _forbidden_global(exc: BaseException) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return match.group(1) if match else None


def read_released_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Read a released ``head_<Dataset>Val.pt`` (pickled module) safely: its float32 ``(weight, bias,
    normalize)``; :func:`tallmasks.models.heads.load_released_head` builds the head from them."""
    path = require_file(path, "head")
    try:
        with torch.serialization.safe_globals([(_ReleasedHead, RELEASED_HEAD_CLASS)]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc, "a released head") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable head file ({_torch_reason(exc)})") from None
    return _head_tensors(obj, path)


def _head_tensors(obj: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    if isinstance(obj, torch.nn.Linear):
        weight, bias = obj.weight.detach(), obj.bias.detach() if obj.bias is not None else None
        normalize = bool(getattr(obj, "normalize", True))
    elif isinstance(obj, dict) and "weight" in obj:
        weight, bias, normalize = obj["weight"], obj.get("bias"), bool(obj.get("normalize", True))
    else:
        raise CheckpointError(f"{path}: expected a classification head, found {type(obj).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.dtype.is_floating_point:
        raise CheckpointError(f"{path}: head weight must be a 2-D float tensor")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise CheckpointError(f"{path}: head bias does not match its weight ({weight.shape[0]} classes)")
    return weight.float(), None if bias is None else bias.float(), normalize


def _numpy_allowlist() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = _scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("builtins", "dict")] = dict
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _scalar(dtype: np.dtype, data: bytes) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("GLOBAL numpy scalar of object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _frombuffer(buffer: Any, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("GLOBAL numpy buffer of object dtype")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order=order) if shape else array


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("GLOBAL _codecs.encode with unexpected arguments")
    return text.encode("latin1")


class _MaskUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-reconstruction globals."""

    _allowed = _numpy_allowlist()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed") from None


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
_PICKLE_PROTO = b"\x80"  # torch.save's legacy format starts with a pickle


def load_released_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Read a released ``TALL_mask_{N}task.npy`` -> {dataset: packed uint8 array}, without running pickle code."""
    path = require_file(path, "mask")
    with open(path, "rb") as handle:
        magic = handle.read(len(_NPY_MAGIC))
    if magic == _NPY_MAGIC:
        obj, shape = _load_npy_masks(path)
    elif magic.startswith((_ZIP_MAGIC, _PICKLE_PROTO)):
        obj, shape = _load_torch_masks(path), ()
    else:
        raise CheckpointError(f"{path}: neither an np.save'd nor a torch.save'd mask file")
    return _as_packed_masks(obj, shape, path)


def _load_npy_masks(path: Path) -> tuple[Any, tuple]:
    """The object pickled in an ``np.save``d file, and the array shape its header declares."""
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as handle:
            version = npy_format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = npy_format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _fortran, dtype = npy_format.read_array_header_2_0(handle)
            else:
                shape, _fortran, dtype = npy_format._read_array_header(handle, version)  # noqa: SLF001
            if not dtype.hasobject:
                raise CheckpointError(f"{path}: expected an np.save'd dict of packed masks, found a plain {dtype} array")
            payload = handle.read()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable .npy file ({_first_line(exc)})") from None
    try:
        return _MaskUnpickler(io.BytesIO(payload), encoding="latin1").load(), shape
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc, "a released mask file") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt mask file ({_first_line(exc)})") from None


def _load_torch_masks(path: Path) -> Any:
    """The object in a ``torch.save``d file, through the weights-only unpickler with numpy's arrays allowed."""
    allowed = [
        (function, f"{module}.{name}")
        for (module, name), function in _numpy_allowlist().items()
        if module.startswith("numpy") and name == "_reconstruct"
    ]
    allowed += [np.ndarray, np.dtype]
    allowed += [type(np.dtype(kind)) for kind in (np.uint8, np.bool_, np.int8, np.int32, np.int64, np.float32)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc, "a released mask file") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: neither an np.save'd nor a torch.save'd mask file ({_torch_reason(exc)})") from None


def _refusal(path: Path, exc: BaseException, what: str) -> CheckpointError:
    """The one-line refusal of a file whose unpickling was stopped."""
    name = _forbidden_global(exc)
    if name:
        return CheckpointError(f"{path}: refused, it needs the forbidden global {name}")
    return CheckpointError(f"{path}: refused, not {what} ({_torch_reason(exc)})")


def _as_packed_masks(obj: Any, shape: tuple, path: Path) -> dict[str, np.ndarray]:
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.size == 1:
        obj = obj.reshape(()).item()
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected a non-empty dict of packed masks, found {type(obj).__name__}")
    masks: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: mask key {name!r} is not a dataset name")
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
            value = value.cpu().numpy()
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8:
            raise CheckpointError(f"{path}: mask {name!r} is not a packed uint8 array")
        masks[name] = np.ascontiguousarray(value.reshape(-1))
    lengths = {value.size for value in masks.values()}
    if len(lengths) != 1:
        raise CheckpointError(f"{path}: packed masks have different lengths {sorted(lengths)}")
    return masks
