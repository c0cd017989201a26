"""How a coded collection stores the merged vector's values: exactly, or quantized (``compress --values``).

Settings (``VALUE_SETTINGS``):

- ``float32``: exact, the stored dtype's bytes (today's lossless format, the default);
- ``bfloat16``: each value rounded to the nearest bfloat16 (ties to even): a relative error of at most 2^-8 (8 significant bits);
- ``int8``, ``int4``, ``int3``, ``int2``: symmetric absmax quantization, round to nearest (ties to even), with one
  float32 scale per block of ``BLOCK`` consecutive weights of a tensor (row-major; a block never spans two
  chunks). With q_max = 2^(b-1) - 1 (127, 7, 3, 1) and M the largest |value| of the block's kept weights, the
  scale is s = M / q_max, the code q = clamp(round(v / s), -q_max, q_max) and the stored value q * s (float32):
  |v - q s| <= s / 2 = M / (2 q_max) for every kept weight, up to float32 rounding (a relative 2^-23 of M).

Round to nearest is the error-minimizing rule for a fixed grid, unbiased in the mean, and keeps the bound
above; the codes then go through the same entropy coders as the masks (``tallmasks.storage.coded``), so a
grid step that most values fall near zero costs what its entropy is, not b bits. Blocks are laid over the
weights' positions, not over the kept values, so a decoder finds a value's scale from its position alone,
whichever weights the masks keep.

``prune_zeros`` (``compress --prune-zeros``) clears the mask bit of every weight whose stored value is zero
(a code 0): a rebuilt model is the same either way (theta_0 + 0 = theta_0), but the stored masks are no longer
the TALL masks (fewer weights kept), which is why it is a setting of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tallmasks.core.errors import CheckpointError, ConfigError

#: the --values settings, from exact to smallest
VALUE_SETTINGS = ("float32", "bfloat16", "int8", "int4", "int3", "int2")
#: weights per scale of the integer settings: 32 bits of scale per 256 weights, 0.125 bit per weight
BLOCK = 256
_INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}


@dataclass(frozen=True)
class ValueCodec:
    """One --values setting: how kept values become byte planes (and scales), and back to float32."""

    setting: str = "float32"
    block: int = BLOCK

    def __post_init__(self):
        if self.setting not in VALUE_SETTINGS:
            raise ConfigError(f"--values must be one of {', '.join(VALUE_SETTINGS)}, got {self.setting!r}")
        if not 1 <= self.block <= 1 << 22 or self.block & (self.block - 1):
            raise ConfigError(f"the value block must be a power of two up to 2^22, got {self.block}")

    @property
    def lossy(self) -> bool:
        return self.setting != "float32"

    @property
    def bits(self) -> int | None:
        return _INT_BITS.get(self.setting)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.bits else 0

    def payload_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the stored kept values (``dtype``, the checkpoints', for exact values); their bytes are
        the chunk's byte planes."""
        return dtype if not self.lossy else torch.bfloat16 if self.setting == "bfloat16" else torch.uint8

    def planes(self, itemsize: int) -> int:
        """Byte planes of a chunk that keeps some weight (``itemsize``: the stored dtype's, for exact values)."""
        return itemsize if not self.lossy else self.payload_dtype(torch.float32).itemsize

    def scale_planes(self) -> int:
        """Byte planes of a chunk's scales (float32, one per block), when it keeps some weight."""
        return 4 if self.bits else 0

    def blocks(self, n: int) -> int:
        return math.ceil(n / self.block) if self.bits else 0

    def spec(self) -> dict:
        """What the file records (its ``values`` metadata)."""
        return {"setting": self.setting, "block": self.block} if self.bits else {"setting": self.setting}

    def describe(self) -> str:
        if not self.lossy:
            return "float32 (exact)"
        if self.setting == "bfloat16":
            return "bfloat16 (lossy: round to nearest, relative error <= 2^-8)"
        return f"{self.setting} (lossy: absmax per block of {self.block} weights, round to nearest, |error| <= scale/2)"

    # ------------------------------------------------------------------------------------------
    def encode(self, kept_values: torch.Tensor, positions: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(payload, scales or None, the stored kept values as float32) of one chunk of ``n`` weights, given its
        kept values and their positions in the chunk; the payload (``payload_dtype``) and the scales (float32,
        one per block) are what the file holds. Lossy settings only."""
        chosen = kept_values.reshape(-1).to(torch.float32)
        if self.setting == "bfloat16":
            half = chosen.to(torch.bfloat16)
            return half, None, half.to(torch.float32)
        qmax = self.qmax
        magnitude = torch.zeros(self.blocks(n) * self.block, dtype=torch.float32)
        magnitude[torch.from_numpy(positions)] = chosen.abs()
        scales = magnitude.reshape(-1, self.block).amax(dim=1) / qmax
        step = scales[torch.from_numpy(positions // self.block)]
        quotient = torch.where(step > 0, chosen / torch.where(step > 0, step, 1.0), 0.0)
        codes = (torch.round(quotient).clamp_(-qmax, qmax) + qmax).to(torch.uint8)
        return codes, scales, self.decode(codes, scales, positions, n)

    def decode(self, payload: torch.Tensor, scales: torch.Tensor | None, positions: np.ndarray, n: int) -> torch.Tensor:
        """The stored kept values (float32) of a chunk, given its payload, scales and the kept weights' positions."""
        if self.setting == "bfloat16":
            return payload.to(torch.float32)
        scales = scales if scales is not None else torch.zeros(0)
        if scales.numel() != self.blocks(n):
            raise CheckpointError(f"{scales.numel()} value scales for {n} weights (blocks of {self.block})")
        if scales.numel() and not bool(torch.isfinite(scales).all() and (scales >= 0).all()):
            raise CheckpointError("a value scale that is negative or not finite")
        if payload.numel() != positions.size:
            raise CheckpointError(f"{payload.numel()} value codes for {positions.size} kept weights")
        if payload.numel() and int(payload.max()) > 2 * self.qmax:
            raise CheckpointError(f"a value code above {2 * self.qmax} in an {self.setting} collection")
        return (payload.to(torch.float32) - self.qmax) * scales[torch.from_numpy(positions // self.block)]


def codec_of(spec: dict | None) -> ValueCodec:
    """The codec a file's ``values`` metadata names (none: exact)."""
    if not spec:
        return ValueCodec()
    try:
        return ValueCodec(str(spec.get("setting")), int(spec.get("block", BLOCK)))
    except ConfigError as exc:
        raise CheckpointError(f"unknown value storage ({exc})") from None
