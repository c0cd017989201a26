"""Numerical precision settings of evaluation and fine-tuning, and the context that applies one.

| setting | CUDA matmuls | cuDNN convolutions | autocast | attention fast path |
|---|---|---|---|---|
| ``fp32``  | float32 | float32 | none | off |
| ``paper`` | float32 | TF32 | none | off |
| ``tf32``  | TF32 | TF32 | none | on |
| ``bf16``  | float32 | float32 | bfloat16 | on |

TF32 rounds the inputs of a matmul or convolution to a 10-bit mantissa (on Ampere and newer GPUs;
CPUs ignore these switches). ``paper`` reproduces the paper's torch 1.13 defaults on the GPU: TF32 off
for matmuls, on for cuDNN convolutions (the image encoder's patch embedding). The fused inference
path of ``nn.MultiheadAttention`` (taken by batch-first attention without gradients) computes
attention in another order than the standard path, which the paper's sequence-first attention
(open_clip 2.10) always took: ``fp32`` and ``paper`` switch it off, so that attention is computed
by the standard path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tallmasks.core.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    """What one precision setting switches."""

    matmul_tf32: bool  # CUDA matmuls in TensorFloat-32
    conv_tf32: bool  # cuDNN convolutions in TensorFloat-32
    autocast: torch.dtype | None  # autocast dtype, or None
    attention_fastpath: bool  # nn.MultiheadAttention's fused inference path allowed


SETTINGS: dict[str, Precision] = {
    "fp32": Precision(matmul_tf32=False, conv_tf32=False, autocast=None, attention_fastpath=False),
    "paper": Precision(matmul_tf32=False, conv_tf32=True, autocast=None, attention_fastpath=False),
    "tf32": Precision(matmul_tf32=True, conv_tf32=True, autocast=None, attention_fastpath=True),
    "bf16": Precision(matmul_tf32=False, conv_tf32=False, autocast=torch.bfloat16, attention_fastpath=True),
}

#: the names accepted by ``precision=`` / ``--precision``
PRECISIONS: tuple[str, ...] = tuple(SETTINGS)


def check_precision(name: str) -> Precision:
    """The setting called ``name``, or a one-line ConfigError."""
    try:
        return SETTINGS[str(name)]
    except KeyError:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


def _fastpath_switch():
    """(getter, setter) of the attention fast path, or None on a torch without the switch."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        return None
    return mha.get_fastpath_enabled, mha.set_fastpath_enabled


def _backend_state() -> tuple:
    switch = _fastpath_switch()
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, switch[0]() if switch else None)


def _set_backend_state(matmul_tf32: bool, conv_tf32: bool, fastpath: bool | None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = conv_tf32
    switch = _fastpath_switch()
    if switch and fastpath is not None:
        switch[1](fastpath)


def set_backend(precision: str) -> Precision:
    """Set the TF32 and attention switches of a setting for the rest of the process (autocast is the caller's)."""
    setting = check_precision(precision)
    _set_backend_state(setting.matmul_tf32, setting.conv_tf32, setting.attention_fastpath)
    return setting


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """Apply a precision setting (see the module's table) inside the block; restore the previous one after."""
    check_precision(precision)
    device = torch.device(device)
    old = _backend_state()
    setting = set_backend(precision)
    try:
        if setting.autocast is not None:
            with torch.autocast(device_type=device.type, dtype=setting.autocast):
                yield
        else:
            yield
    finally:
        _set_backend_state(*old)
