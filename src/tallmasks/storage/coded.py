"""The coded collection format: every task's TALL mask entropy-coded jointly, and the merged vector
stored only where some mask keeps a weight. Lossless, unless its values are quantized (``--values``:
``tallmasks.storage.values``; such a file has its own format name, ``CODED_LOSSY_FORMAT``).

For each floating-point tensor (sorted key order, as the bit-packed masks), weight i gets a T-bit
pattern whose bit t is task t's mask. The merged vector tau_MTL is kept only where the pattern is not
zero (a weight that no task keeps is never used by any task) and split into byte planes. Every
stream (patterns, value planes) is cut into chunks of at most ``CHUNK`` weights, and each chunk is
stored with whichever coder makes it smallest:

- ``ans``: rANS (the ``constriction`` library) with the chunk's own categorical model: the distinct
  symbols and their counts, stored beside the words. This is the order-0 entropy of the joint pattern
  distribution of the chunk, plus a small table;
- ``zstd``: Zstandard (the ``zstandard`` library) on the symbols' bytes, which also catches runs and
  repeated rows that an order-0 model cannot see;
- ``raw``: the bytes as they are; ``const``: a chunk whose symbols are all equal stores that symbol;
- ``bits``, for 0/1 symbols (kept or not): 8 to a byte, then Zstandard (decodes far faster than rANS);
- ``bytes``, for symbols wider than a byte (patterns of more than 8 tasks): each byte of the symbols
  coded on its own as above (8 tasks at a time), when the joint table of the wide patterns would cost
  more than it saves.

A slower coder is kept only when it saves more than ``SLOWER`` of the bytes (rANS decodes slowest).

A chunk's patterns may instead be coded in context (``context``), when that is smaller: first one bit per
weight (kept by some task or by none), then, after the kept values, the patterns of the kept weights split
by the magnitude of their merged value (its float32 exponent and first mantissa bit: half-octaves, the
extremes pooled), each group coded as above. A large |tau_MTL| tends to be one task's weight, which that
task alone keeps; a small one is kept by most tasks, so each group has its own, narrower distribution.

Task t is rebuilt as theta_0 where its bit is 0 and theta_0 + tau_MTL (float32 arithmetic, cast back
to theta_0's dtype, as ``apply_vector``) where it is 1, one tensor at a time. For float32 tensors with the
kernels (``CodedFile.apply_task``), a chunk whose patterns are coded in context never forms the patterns of
every weight: one pass joins the value planes and counts the contexts, the groups are decoded, and one
branch-free pass ungroups the patterns and adds the task's kept values; ``decode_task`` runs tensors on a
few threads, largest first.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.core.schema import Enum, Int, List, Map, Obj, Str, check, names, parse_json
from tallmasks.io.checkpoints import atomic_path
from tallmasks.io.integrity import CHECKSUM_SCHEMA, checksum
from tallmasks.masks import Layout, MaskSet
from tallmasks.storage.values import VALUE_SETTINGS, ValueCodec, codec_of

log = logging.getLogger(__name__)

#: v2 adds a checksum (XXH3-64) to every stream and one over the index and metadata; v1 files are still read, unchecked
CODED_FORMAT = "tallmasks-coded-v2"
#: a file whose values are quantized (``tallmasks.storage.values``): its own format name, so that no reader
#: of the lossless format takes it for one; otherwise v2 with a ``values`` field in its header and ``scales``
CODED_LOSSY_FORMAT = "tallmasks-coded-lossy-v1"
CODED_FORMATS = ("tallmasks-coded-v1", CODED_FORMAT, CODED_LOSSY_FORMAT)
CHUNK = 1 << 22
#: the largest index (JSON bytes) a reader decompresses: about 400 bytes per chunk, so room for 600,000
#: chunks (2.5e12 weights); a frame declaring more is refused before anything is allocated
INDEX_MAX_BYTES = 1 << 28
ZSTD_LEVEL = 6
#: a slower coder is chosen only when it saves more than this share of the faster one's bytes
#: (measured: rANS decodes at 3 to 45 ns per symbol, zstd at about 1 ns per byte, raw is a copy; on a
#: ViT-B-32 x 8 collection, rANS's margin of 0.1 -> 0.6 took one task's decompression from 8.9 to 4.9 s
#: for 2% more bytes)
SLOWER = {"raw": 0.0, "zstd": 0.01, "bits": 0.01, "ans": 0.60, "bytes": 0.0}
MAX_TASKS = 64
#: chunks with fewer kept weights code their patterns as one stream (context groups' tables would not pay)
CONTEXT_MIN = 4096
_CODERS = ("const", "raw", "zstd", "bits", "ans", "bytes")


def pattern_dtype(num_tasks: int) -> np.dtype:
    """The smallest unsigned integer type that holds one bit per task."""
    if not 1 <= num_tasks <= MAX_TASKS:
        raise CheckpointError(f"the coded format holds 1 to {MAX_TASKS} tasks, got {num_tasks}")
    for bits, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
        if num_tasks <= bits:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


# ---------------------------------------------------------------------------------------------
# one stream of unsigned integer symbols


def _distinct(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values in increasing order, their counts)."""
    if symbols.dtype.itemsize <= 2:
        counts = np.bincount(symbols, minlength=1 << (8 * symbols.dtype.itemsize))
        values = np.flatnonzero(counts).astype(symbols.dtype)
        return values, counts[values]
    return np.unique(symbols, return_counts=True)


def _value_index(symbols: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each symbol's value in the sorted distinct ``values``."""
    if symbols.dtype.itemsize <= 2:
        lookup = np.zeros(1 << (8 * symbols.dtype.itemsize), dtype=np.int32)
        lookup[values] = np.arange(values.size, dtype=np.int32)
        return lookup[symbols]
    return np.searchsorted(values, symbols).astype(np.int32)


def _ans_lower_bound(values: np.ndarray, counts: np.ndarray) -> float:
    """Bytes that ``_encode_ans`` cannot go below: its table, and the symbols at the empirical entropy of the
    chunk (rANS with a model of the chunk's own frequencies spends their cross-entropy, never less, give
    or take the coder's final state, allowed for with 8 bytes)."""
    n = float(counts.sum())
    p = counts / n
    bits = -float((counts * np.log2(p)).sum())
    return values.size * (values.dtype.itemsize + 4) + max(0.0, bits / 8 - 8)


def _ans_model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64) / float(counts.sum()), perfect=False)


def _encode_ans(values: np.ndarray, counts: np.ndarray, index: np.ndarray) -> bytes:
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index, _ans_model(counts))
    words = coder.get_compressed().astype("<u4")
    return values.astype(values.dtype.newbyteorder("<")).tobytes() + counts.astype("<u4").tobytes() + words.tobytes()


def _decode_ans(blob: bytes, n: int, num_values: int, dtype: np.dtype) -> np.ndarray:
    import constriction

    width = dtype.itemsize * num_values
    values = np.frombuffer(blob, dtype=dtype.newbyteorder("<"), count=num_values).astype(dtype)
    counts = np.frombuffer(blob, dtype="<u4", count=num_values, offset=width)
    words = np.frombuffer(blob, dtype="<u4", offset=width + 4 * num_values).astype(np.uint32)
    index = constriction.stream.stack.AnsCoder(words).decode(_ans_model(counts), n)
    return values[index]


def encode_stream(symbols: np.ndarray, level: int = ZSTD_LEVEL) -> tuple[dict, bytes]:
    """(spec, payload) of the smallest coding of a 1-D array of unsigned integers."""
    import zstandard

    symbols = np.ascontiguousarray(symbols)
    if symbols.size == 0 or bool((symbols == symbols[0]).all()):
        return {"coder": "const", "value": int(symbols[0]) if symbols.size else 0}, b""
    little = symbols.astype(symbols.dtype.newbyteorder("<")).tobytes()
    candidates = [({"coder": "raw"}, little), ({"coder": "zstd"}, zstandard.ZstdCompressor(level=level).compress(little))]
    values, counts = _distinct(symbols)
    if symbols.dtype == np.uint8 and int(values[-1]) <= 1:  # bits (kept or not): 8 to a byte, then zstd
        candidates.append(({"coder": "bits"}, zstandard.ZstdCompressor(level=level).compress(np.packbits(symbols).tobytes())))
    if symbols.dtype.itemsize > 1:  # wide symbols (patterns of 9+ tasks): also each byte on its own
        little_bytes = symbols.astype(symbols.dtype.newbyteorder("<")).view(np.uint8).reshape(-1, symbols.dtype.itemsize)
        planes = [encode_stream(plane, level) for plane in _columns(little_bytes)]
        candidates.append(
            ({"coder": "bytes", "planes": [{**spec, "bytes": len(blob)} for spec, blob in planes]}, b"".join(blob for _, blob in planes))
        )

    def cost(spec: dict, size: float) -> float:
        return size * (1 + SLOWER[spec["coder"]])

    ans = {"coder": "ans", "values": int(values.size)}
    # rANS is tried only where a table shorter than the data could pay off and, by its lower bound, it could
    # win (encoding it is the slowest step); it keeps its place in the list, third, for the same ties
    if values.size < symbols.size // 4 and cost(ans, _ans_lower_bound(values, counts)) <= min(cost(c[0], len(c[1])) for c in candidates):
        candidates.insert(2, (ans, _encode_ans(values, counts, _value_index(symbols, values))))
    return min(candidates, key=lambda c: cost(c[0], len(c[1])))


def unzstd(payload: bytes | np.ndarray, limit: int, what: str = "coded chunk") -> bytes:
    """One Zstandard frame decompressed to at most ``limit`` bytes: a frame that declares more, or (without a
    declared size) produces more, is refused before its output is allocated."""
    import zstandard

    if len(payload) < 4:  # numpy slices of the memory-mapped data are read through the buffer protocol
        raise CheckpointError(f"{what}: not a Zstandard frame ({len(payload)} bytes)")
    declared = zstandard.frame_content_size(payload)
    if declared > limit:
        raise CheckpointError(f"{what}: declares {declared} bytes once decompressed, at most {limit} expected")
    if declared >= 0:
        return zstandard.ZstdDecompressor().decompress(payload)
    data = zstandard.ZstdDecompressor().stream_reader(payload).read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{what}: decompresses to more than {limit} bytes")
    return data


def decode_stream(spec: Mapping, payload: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    """The symbols of one chunk coded by ``encode_stream``."""
    coder = spec.get("coder")
    if coder == "const":
        return np.full(n, int(spec["value"]), dtype=dtype)
    if coder == "raw":
        data = payload
    elif coder == "zstd":
        data = unzstd(payload, n * dtype.itemsize)
    elif coder == "ans":
        return _decode_ans(payload, n, int(spec["values"]), dtype)
    elif coder == "bits":
        packed = unzstd(payload, (n + 7) // 8)
        if len(packed) != (n + 7) // 8:
            raise CheckpointError(f"coded chunk holds {8 * len(packed)} bits, expected {n}")
        return np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n).astype(dtype)
    elif coder == "bytes":
        planes, position = [], 0
        for plane in spec["planes"]:
            planes.append(decode_stream(plane, payload[position : position + plane["bytes"]], n, np.dtype(np.uint8)))
            position += plane["bytes"]
        if len(planes) != dtype.itemsize:
            raise CheckpointError(f"coded chunk has {len(planes)} byte planes for {dtype.itemsize}-byte symbols")
        return _interleave(planes).view(dtype.newbyteorder("<")).reshape(-1).astype(dtype)
    else:
        raise CheckpointError(f"unknown coder {coder!r} in a coded collection (known: {', '.join(_CODERS)})")
    out = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    if out.size != n:
        raise CheckpointError(f"coded chunk holds {out.size} symbols, expected {n}")
    return out.astype(dtype)


# ---------------------------------------------------------------------------------------------
# patterns and value planes of one tensor


def tensor_patterns(masks: MaskSet, offset: int, count: int) -> np.ndarray:
    """T-bit pattern of each weight in [offset, offset + count) of the masks' flat layout."""
    dtype = pattern_dtype(len(masks))
    out = np.zeros(count, dtype=dtype)
    first, last = offset // 8, (offset + count + 7) // 8
    skip = offset - 8 * first
    for t, name in enumerate(masks.names):
        bits = np.unpackbits(masks.packed[name][first:last])[skip : skip + count]
        out |= bits.astype(dtype) << dtype.type(t)
    return out


def _columns(raw: np.ndarray) -> list[np.ndarray]:
    """The columns of an (n x width) byte matrix, each contiguous: byte j of every value."""
    return [np.ascontiguousarray(raw[:, j]) for j in range(raw.shape[1])]


def _interleave(planes: list[np.ndarray]) -> np.ndarray:
    """The (n x len(planes)) byte matrix whose columns are ``planes`` (the inverse of ``_columns``)."""
    return np.ascontiguousarray(np.stack(planes, axis=1)) if planes else np.zeros((0, 1), np.uint8)


def byte_planes(values: torch.Tensor) -> list[np.ndarray]:
    """Little-endian byte planes of a 1-D tensor (plane j holds byte j of every value)."""
    return _columns(values.contiguous().view(torch.uint8).reshape(-1, values.element_size()).numpy())


def from_planes(planes: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(_interleave(planes).reshape(-1)).view(dtype)


def value_contexts(values: torch.Tensor) -> np.ndarray:
    """Half-octave of each |value| (float32 exponent and first mantissa bit): integer ops on the bits, so the
    decoder computes exactly what the encoder did."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).numpy()
    return ((bits & np.int32(0x7FFFFFFF)) >> np.int32(22)).astype(np.int16)  # 0..511; int16 sorts by radix


def context_counts(values: torch.Tensor, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(each value's context clipped to [lo, hi], how many values fall in each of the 512 contexts)."""
    contexts = np.clip(value_contexts(values), lo, hi)
    return contexts, np.bincount(contexts, minlength=512) if contexts.size else np.zeros(512, dtype=np.int64)


#: the context groups' share of kept weights pooled at each extreme
CONTEXT_TAIL = 0.01


def encode_in_context(patterns: np.ndarray, kept_values: torch.Tensor, level: int = ZSTD_LEVEL) -> tuple[dict, bytes]:
    """(spec, payload) of the patterns of a chunk coded in context of the kept values (``context`` above)."""
    kept = patterns != 0
    contexts = value_contexts(kept_values)
    lo, hi = (int(q) for q in np.quantile(contexts, [CONTEXT_TAIL, 1 - CONTEXT_TAIL], method="nearest"))
    contexts = np.clip(contexts, lo, hi)
    spec: dict = {"coder": "context", "lo": lo, "hi": hi}
    blobs = []
    kept_spec, blob = encode_stream(kept.astype(np.uint8), level)
    spec["kept"] = {**kept_spec, "bytes": len(blob)}
    blobs.append(blob)
    order = np.argsort(contexts, kind="stable")
    grouped, sorted_contexts = patterns[kept][order], contexts[order]
    starts = np.flatnonzero(np.r_[True, sorted_contexts[1:] != sorted_contexts[:-1]])
    groups = []
    for begin, end in zip(starts, [*starts[1:], sorted_contexts.size]):
        group_spec, blob = encode_stream(grouped[begin:end], level)
        groups.append({**group_spec, "context": int(sorted_contexts[begin]), "bytes": len(blob)})
        blobs.append(blob)
    spec["groups"] = groups
    return spec, b"".join(blobs)


def decode_kept(spec: Mapping, payload: bytes | np.ndarray, n: int) -> np.ndarray:
    """The kept bits (bool, n) of patterns coded in context."""
    kept_spec = spec["kept"]
    return decode_stream(kept_spec, payload[: kept_spec["bytes"]], n, np.dtype(np.uint8)).astype(bool)


def _decode_groups(spec: Mapping, payload: bytes | np.ndarray, counts: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the context groups' patterns laid one after the other in increasing context, where group c starts),
    given how many kept weights fall in each context (``counts``, 512 entries)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    values = np.empty(int(counts.sum()), dtype=dtype)
    position, filled, previous = spec["kept"]["bytes"], 0, -1
    for group in spec["groups"]:
        context = int(group["context"])
        count = int(counts[context]) if previous < context < counts.size else 0
        if not count:
            raise CheckpointError("damaged context groups (a group of no kept value, or out of order)")
        previous = context
        blob = payload[position : position + group["bytes"]]
        values[filled : filled + count] = decode_stream(group, blob, count, dtype)
        position += group["bytes"]
        filled += count
    if filled != values.size:
        raise CheckpointError("damaged context groups (their sizes do not match the kept values)")
    return values, starts


def decode_in_context(
    spec: Mapping, payload: bytes | np.ndarray, kept: np.ndarray, kept_values: torch.Tensor, dtype: np.dtype
) -> np.ndarray:
    """The patterns coded by ``encode_in_context``, given the kept bits and the kept values."""
    from tallmasks.algebra import kernels

    contexts, counts = context_counts(kept_values, int(spec["lo"]), int(spec["hi"]))
    values, starts = _decode_groups(spec, payload, counts, dtype)
    out = kernels.ungroup(contexts, values, starts, kept)
    if out is None:  # without the kernels: the inverse of the encoder's stable sort
        kept_patterns = np.empty_like(values)
        kept_patterns[np.argsort(contexts, kind="stable")] = values
        out = np.zeros(kept.size, dtype=dtype)
        out[kept] = kept_patterns
    if int(np.count_nonzero(out)) != contexts.size:
        raise CheckpointError("damaged context groups (a kept weight with an empty pattern)")
    return out


_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


# ---------------------------------------------------------------------------------------------
# the index: one schema, then the rules between fields, all checked when a file is opened

_LEAF_CODERS = ("const", "raw", "zstd", "bits", "ans")
#: a stream inside another (a byte plane of ``bytes``, the kept bits or a group of ``context``): no offset
_INNER = Obj(
    {"coder": Enum((*_LEAF_CODERS, "bytes")), "bytes": Int(min=0)},
    {
        "value": Int(min=0, max=(1 << 64) - 1),
        "values": Int(min=1, max=1 << 32),
        "context": Int(0, 511),
        "planes": List(Obj({"bytes": Int(min=0)})),
    },
)
_STREAM = Obj(
    {"coder": Enum((*_LEAF_CODERS, "bytes", "context")), "offset": Int(min=0), "bytes": Int(min=0)},
    {
        "check": CHECKSUM_SCHEMA,
        "value": Int(min=0, max=(1 << 64) - 1),
        "values": Int(min=1, max=1 << 32),
        "planes": List(_INNER, max_len=8),
        "lo": Int(0, 511),
        "hi": Int(0, 511),
        "kept": _INNER,
        "groups": List(_INNER, max_len=512),
    },
)
_CHUNK_SCHEMA = Obj(
    {"n": Int(1, CHUNK), "kept": Int(min=0), "patterns": _STREAM, "planes": List(_STREAM, max_len=8)},
    {"scales": List(_STREAM, max_len=4)},
)
INDEX_SCHEMA = Map(
    Obj({"shape": List(Int(min=0), max_len=16), "dtype": Enum(tuple(_DTYPES)), "chunks": List(_CHUNK_SCHEMA)}),
    key=Str(max_len=1024),
)
INFO_SCHEMA = Obj(optional={"collection": Str(max_len=64), "kind": Str(max_len=64)})
VALUES_SCHEMA = Obj({"setting": Enum(VALUE_SETTINGS)}, {"block": Int(1, CHUNK)})


def header_check(packed_index: bytes, names_json: str, info_json: str, values_json: str = "") -> str:
    """The checksum of what a coded file's header holds: the compressed index, then the names and info JSON
    (and, in a lossy file, the values JSON)."""
    if values_json:
        return checksum(packed_index, "\0", names_json, "\0", info_json, "\0", values_json)
    return checksum(packed_index, "\0", names_json, "\0", info_json)


def _check_inner(spec: Mapping, n: int, itemsize: int, where: str, exact: bool = True) -> None:
    """The rules between fields of one stream that decodes to ``n`` symbols (at most ``n`` unless ``exact``: a
    context group, whose size the kept values decide) of ``itemsize`` bytes."""
    coder = spec["coder"]
    if coder == "const" and "value" not in spec:
        raise CheckpointError(f"{where}: a const stream without its value")
    if coder == "const" and spec["value"] >= 1 << (8 * itemsize):
        raise CheckpointError(f"{where}: const value {spec['value']} does not fit {itemsize} byte(s)")
    if coder == "ans" and ("values" not in spec or spec["values"] > n or spec["values"] > 1 << (8 * itemsize)):
        raise CheckpointError(f"{where}: rANS table of {spec.get('values')} values for {n} symbols")
    if coder == "raw" and (spec["bytes"] != n * itemsize if exact else spec["bytes"] > n * itemsize or spec["bytes"] % itemsize):
        raise CheckpointError(f"{where}: {spec['bytes']} raw bytes for {n} symbols of {itemsize} byte(s)")
    if coder == "bytes":
        planes = spec.get("planes") or []
        if len(planes) != itemsize or itemsize == 1:
            raise CheckpointError(f"{where}: {len(planes)} byte planes for {itemsize}-byte symbols")
        for j, plane in enumerate(planes):
            check(plane, _INNER, f"{where}.planes[{j}]", CheckpointError)
            if plane["coder"] == "bytes":
                raise CheckpointError(f"{where}.planes[{j}]: a byte plane split again")
            _check_inner(plane, n, 1, f"{where}.planes[{j}]", exact)
        if sum(p["bytes"] for p in planes) != spec["bytes"]:
            raise CheckpointError(f"{where}: its byte planes' lengths do not add up to its {spec['bytes']} bytes")


def check_index(index: dict, names_count: int, data_size: int, source: object, checksums: bool, codec: ValueCodec | None = None) -> None:
    """The rules of an index beyond its schema: each tensor's chunks cover its shape, each chunk keeps at most
    its weights and has its value planes (a byte plane per byte of its dtype, or the codec's planes and scales)
    where it keeps any, every stream's sub-streams add up, and the streams lie inside the data without
    overlapping (in a v2 file they tile it and have checksums)."""
    codec = codec or ValueCodec()
    width = pattern_dtype(names_count).itemsize
    ranges = []
    for key, entry in index.items():
        where = f"{source}: {key!r}"
        numel = math.prod(entry["shape"])
        if sum(chunk["n"] for chunk in entry["chunks"]) != numel:
            raise CheckpointError(
                f"{where}: its chunks hold {sum(c['n'] for c in entry['chunks'])} weights, its shape {entry['shape']} needs {numel}"
            )
        itemsize = _DTYPES[entry["dtype"]].itemsize
        for c, chunk in enumerate(entry["chunks"]):
            at = f"{where} chunk {c}"
            n, kept = chunk["n"], chunk["kept"]
            if kept > n:
                raise CheckpointError(f"{at}: {kept} kept weights of {n}")
            if len(chunk["planes"]) != (codec.planes(itemsize) if kept else 0):
                raise CheckpointError(f"{at}: {len(chunk['planes'])} byte planes for {entry['dtype']} ({codec.setting} values)")
            scales = chunk.get("scales", [])
            if len(scales) != (codec.scale_planes() if kept else 0):
                raise CheckpointError(f"{at}: {len(scales)} scale planes for {codec.setting} values")
            patterns = chunk["patterns"]
            if patterns["coder"] == "context":
                if "kept" not in patterns or "groups" not in patterns or not patterns.get("lo", 0) <= patterns.get("hi", -1):
                    raise CheckpointError(f"{at}: patterns coded in context without their kept bits, groups or range")
                _check_inner(patterns["kept"], n, 1, f"{at} patterns.kept")
                contexts = [g.get("context") for g in patterns["groups"]]
                if None in contexts or contexts != sorted(set(contexts)):
                    raise CheckpointError(f"{at}: context groups out of order")
                for g, group in enumerate(patterns["groups"]):
                    _check_inner(group, kept, width, f"{at} patterns.groups[{g}]", exact=False)
                if patterns["kept"]["bytes"] + sum(g["bytes"] for g in patterns["groups"]) != patterns["bytes"]:
                    raise CheckpointError(f"{at}: the context groups' lengths do not add up to the stream's {patterns['bytes']} bytes")
            else:
                _check_inner(patterns, n, width, f"{at} patterns")
            for j, plane in enumerate(chunk["planes"]):
                if plane["coder"] == "context":
                    raise CheckpointError(f"{at} planes[{j}]: a byte plane coded in context")
                _check_inner(plane, kept, 1, f"{at} planes[{j}]")
            for j, plane in enumerate(scales):
                if plane["coder"] == "context":
                    raise CheckpointError(f"{at} scales[{j}]: a byte plane coded in context")
                _check_inner(plane, codec.blocks(n), 1, f"{at} scales[{j}]")
            for spec in (patterns, *chunk["planes"], *scales):
                if checksums and "check" not in spec:
                    raise CheckpointError(f"{at}: a stream without its checksum")
                if spec["bytes"]:
                    ranges.append((spec["offset"], spec["bytes"], at))
    ranges.sort()
    end = 0
    for offset, size, at in ranges:
        if offset < end or (checksums and offset != end):
            raise CheckpointError(f"{at}: its data at byte {offset} overlaps or skips another stream's (damaged index)")
        end = offset + size
        if end > data_size:
            raise CheckpointError(f"{at}: its data ends at byte {end}, past the {data_size} bytes stored")
    if checksums and end != data_size and not (end == 0 and data_size == 1):  # an empty file stores one byte
        raise CheckpointError(f"{source}: the streams cover {end} of the {data_size} data bytes (damaged index)")


# ---------------------------------------------------------------------------------------------
# writing and reading a coded file


def write_coded(
    path: str | Path,
    masks: MaskSet,
    vector: Mapping[str, torch.Tensor],
    progress: bool = False,
    values: ValueCodec | None = None,
    prune_zeros: bool = False,
    report: dict | None = None,
) -> dict:
    """Code ``masks`` and ``vector`` (stored dtypes) into one safetensors file; returns its index.

    The file holds two uint8 tensors: ``data`` (every chunk's payload, one after the other) and ``index``
    (zstd-compressed JSON: per key its shape, dtype and chunks, each stream's coder, offset and length).
    ``values``: how the kept values are stored (``tallmasks.storage.values``; default exact); ``prune_zeros``:
    clear the mask bits of weights whose stored value is zero; ``report``, when given, receives
    ``max_abs_error``: the largest |stored - given| value over the kept weights (0 for exact values)."""
    import zstandard
    from safetensors.torch import save_file

    from tallmasks.core.progress import progress

    codec = values or ValueCodec()
    worst = 0.0
    layout = masks.layout
    index: dict[str, dict] = {}
    data = _Payloads()
    offset = 0
    for key, shape in progress(list(zip(layout.keys, layout.shapes)), desc="coding", disable=not progress, leave=False):
        numel = math.prod(shape)
        if key not in vector:
            raise CheckpointError(f"merged vector lacks key {key!r}")
        flat = vector[key].reshape(-1)
        if flat.numel() != numel:
            raise CheckpointError(f"merged vector {key!r} has {flat.numel()} entries, the masks {numel}")
        if str(flat.dtype).replace("torch.", "") not in _DTYPES:
            raise CheckpointError(f"merged vector {key!r} has dtype {flat.dtype}, not a floating-point type")
        chunks = []
        for start in range(0, numel, CHUNK):
            stop = min(numel, start + CHUNK)
            patterns = tensor_patterns(masks, offset + start, stop - start)
            positions = np.flatnonzero(patterns)
            given = flat[start:stop][torch.from_numpy(positions)]
            # payload: what the planes hold; kept_values: the values a reader gets back (the pattern contexts')
            payload, scales, kept_values = given, None, given
            if codec.lossy and positions.size:
                payload, scales, kept_values = codec.encode(given, positions, stop - start)
                worst = max(worst, float((kept_values - given.to(torch.float32)).abs().max()))
            if prune_zeros and positions.size:
                zero = (kept_values == 0).numpy()
                if zero.any():
                    patterns[positions[zero]] = 0
                    payload, kept_values = payload[torch.from_numpy(~zero)], kept_values[torch.from_numpy(~zero)]
            coded_patterns = encode_stream(patterns)
            if kept_values.numel() >= CONTEXT_MIN:
                in_context = encode_in_context(patterns, kept_values)
                if len(in_context[1]) < len(coded_patterns[1]):
                    coded_patterns = in_context
            entry = {"n": stop - start, "kept": int(kept_values.numel()), "patterns": data.add(*coded_patterns)}
            entry["planes"] = [data.add(*encode_stream(plane)) for plane in (byte_planes(payload) if entry["kept"] else [])]
            if codec.scale_planes():
                entry["scales"] = [data.add(*encode_stream(plane)) for plane in (byte_planes(scales) if entry["kept"] else [])]
            chunks.append(entry)
        index[key] = {"shape": list(shape), "dtype": str(flat.dtype).replace("torch.", ""), "chunks": chunks}
        offset += numel
    packed_index = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(json.dumps(index, separators=(",", ":")).encode())
    tensors = {"index": torch.frombuffer(bytearray(packed_index), dtype=torch.uint8), "data": data.tensor()}
    metadata = {"format": CODED_FORMAT, "names": json.dumps(masks.names), "info": json.dumps(masks.info)}
    if codec.lossy:
        metadata["format"], metadata["values"] = CODED_LOSSY_FORMAT, json.dumps(codec.spec())
    metadata["check"] = header_check(packed_index, metadata["names"], metadata["info"], metadata.get("values", ""))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    if report is not None:
        report["max_abs_error"] = worst
    return index


class _Payloads:
    """Chunk payloads laid one after the other; a stream's spec records its offset and length."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, spec: dict, blob: bytes) -> dict:
        spec = {**spec, "offset": self.size, "bytes": len(blob), "check": checksum(blob)}
        self.parts.append(blob)
        self.size += len(blob)
        return spec

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(self.parts) or b"\0"), dtype=torch.uint8)


@dataclass
class CodedTensor:
    """One tensor of a coded file: its patterns and the merged values where some mask keeps it."""

    key: str
    shape: tuple[int, ...]
    patterns: np.ndarray
    kept_values: torch.Tensor

    def vector(self) -> torch.Tensor:
        """tau_MTL with zeros where no task keeps a weight."""
        out = torch.zeros(self.patterns.size, dtype=self.kept_values.dtype)
        out.masked_scatter_(torch.from_numpy(self.patterns != 0), self.kept_values)
        return out.reshape(self.shape)

    def mask(self, task: int) -> torch.Tensor:
        return torch.from_numpy(_bit(self.patterns, task)).reshape(self.shape)

    def apply(self, theta0: torch.Tensor, task: int, scale: float = 1.0) -> torch.Tensor:
        """theta_0 where the task's bit is 0, (theta_0 + scale * tau) in float32 cast to theta_0's dtype where
        it is 1; arithmetic on the task's weights only (``CodedFile.apply_task`` is the fused path)."""
        out = theta0.reshape(-1).clone()
        kept = np.flatnonzero(self.patterns)
        chosen = _bit(self.patterns[kept], task)
        positions = kept[chosen]
        words = out.view(_WORDS[out.element_size()]).numpy()  # gather and scatter on raw words: any float dtype
        base = torch.from_numpy(words[positions]).view(out.dtype)
        summed = (base.to(torch.float32) + scale * self.kept_values[torch.from_numpy(chosen)].to(torch.float32)).to(out.dtype)
        words[positions] = summed.view(_WORDS[out.element_size()]).numpy()
        return out.reshape(theta0.shape)


_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit(patterns: np.ndarray, task: int) -> np.ndarray:
    one = patterns.dtype.type(1)
    return (
        ((patterns >> patterns.dtype.type(task)) & one).view(bool)
        if patterns.dtype.itemsize == 1
        else ((patterns >> patterns.dtype.type(task)) & one).astype(bool)
    )


def _mapped_tensor(path: Path, name: str) -> np.ndarray:
    """The bytes of one uint8 tensor of a safetensors file, memory-mapped (read as they are used)."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    start, stop = header[name]["data_offsets"]
    if stop == start:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size + start, shape=(stop - start,))


class CodedFile:
    """Read access to a coded file, tensor by tensor."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such coded file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            meta = self._handle.metadata() or {}
        except Exception as exc:
            raise CheckpointError(
                f"{self.path}: unreadable coded file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        if meta.get("format") not in CODED_FORMATS:
            raise CheckpointError(f"{self.path}: not a tallmasks coded file (format {meta.get('format')!r})")
        self.checksums = meta["format"] != CODED_FORMATS[0]
        source = f"{self.path}: header"
        self.names: list[str] = parse_json(meta.get("names", ""), f"{source} names", CheckpointError, names())
        pattern_dtype(len(self.names))  # 1 to MAX_TASKS tasks
        self.info: dict = parse_json(meta.get("info", "{}"), f"{source} info", CheckpointError, INFO_SCHEMA)
        self.lossy = meta["format"] == CODED_LOSSY_FORMAT
        if self.lossy and "values" not in meta:
            raise CheckpointError(f"{self.path}: damaged coded file (a lossy file without its values setting)")
        spec = parse_json(meta["values"], f"{source} values", CheckpointError, VALUES_SCHEMA) if self.lossy else None
        try:
            self.values: ValueCodec = codec_of(spec)
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        if self.lossy != self.values.lossy:
            raise CheckpointError(f"{self.path}: damaged coded file (format {meta['format']} with {self.values.setting} values)")
        try:
            packed = self._handle.get_tensor("index").numpy().tobytes()
            self._data = _mapped_tensor(self.path, "data")
        except Exception as exc:
            raise CheckpointError(f"{self.path}: damaged coded file (no index or data: {type(exc).__name__})") from None
        if self.checksums:
            if meta.get("check") != header_check(
                packed, meta.get("names", ""), meta.get("info", "{}"), meta.get("values", "") if self.lossy else ""
            ):
                raise CheckpointError(f"{self.path}: damaged coded file (the header's checksum does not match)")
        else:
            log.warning("%s: written before coded files had checksums (%s): damage to it cannot be detected", self.path, meta["format"])
        text = unzstd(packed, INDEX_MAX_BYTES, f"{self.path}: index")
        self.index: dict[str, dict] = parse_json(text, f"{self.path}: index", CheckpointError, INDEX_SCHEMA)
        check_index(self.index, len(self.names), int(self._data.size) or 1, f"{self.path}: index", self.checksums, self.values)
        self.pattern_dtype = pattern_dtype(len(self.names))
        self.layout = Layout(tuple(self.index), tuple(tuple(v["shape"]) for v in self.index.values()))

    def _payload(self, spec: Mapping, key: str = "") -> np.ndarray | bytes:
        """A stream's bytes (its offset and length checked when the file was opened), their checksum checked (files written before checksums: none)."""
        if not spec["bytes"]:
            blob: np.ndarray | bytes = b""
        else:
            blob = self._data[spec["offset"] : spec["offset"] + spec["bytes"]]
        if self.checksums and "check" in spec and checksum(blob) != spec["check"]:
            raise CheckpointError(f"{self.path}: damaged data of {key!r} at byte {spec['offset']} (checksum mismatch)")
        return blob

    @contextmanager
    def _reading(self, key: str):
        """Turn a corrupt payload's error (zstd, rANS or numpy, in their own words) into a one-line CheckpointError."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("numba"):  # the kernels failing to compile here, not the file
                raise
            raise CheckpointError(f"{self.path}: damaged chunk of {key!r} ({type(exc).__name__})") from None

    def _chunk(self, key: str, chunk: Mapping, dtype: torch.dtype) -> tuple[Mapping, np.ndarray, list[np.ndarray], torch.Tensor | None]:
        """(patterns spec, the kept bits where the patterns are coded in context or else the patterns, byte planes
        of the kept values, the kept values of a lossy file as float32) of one chunk, their sizes checked against
        the index."""
        spec = chunk["patterns"]
        if spec.get("coder") == "context":
            head = decode_kept(spec, self._payload(spec, key), chunk["n"])
        else:
            head = decode_stream(spec, self._payload(spec, key), chunk["n"], self.pattern_dtype)
        kept = int(np.count_nonzero(head))
        if kept != chunk["kept"]:
            raise CheckpointError(f"{self.path}: damaged chunk of {key!r} ({kept} kept weights, index says {chunk['kept']})")
        planes = [decode_stream(s, self._payload(s, key), kept, np.dtype(np.uint8)) for s in chunk["planes"]]
        if len(planes) != (self.values.planes(dtype.itemsize) if kept else 0):
            raise CheckpointError(f"{self.path}: damaged chunk of {key!r} ({len(planes)} byte planes for {dtype})")
        if not self.lossy or not kept:
            return spec, head, planes, None
        blocks = self.values.blocks(chunk["n"])
        scales = [decode_stream(s, self._payload(s, key), blocks, np.dtype(np.uint8)) for s in chunk.get("scales", [])]
        try:
            payload = from_planes(planes, self.values.payload_dtype(dtype))
            stored = self.values.decode(payload, from_planes(scales, torch.float32) if scales else None, np.flatnonzero(head), chunk["n"])
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: damaged chunk of {key!r} ({exc})") from None
        return spec, head, planes, stored

    def _dtype(self, key: str) -> torch.dtype:
        dtype = _DTYPES.get(self.index[key].get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{self.path}: unknown dtype {self.index[key].get('dtype')!r} for {key!r}")
        return dtype

    def chunks(self, key: str) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(patterns, kept values) of each chunk of one tensor in turn: at most ``CHUNK`` weights at a time."""
        dtype = self._dtype(key)
        with self._reading(key):
            for chunk in self.index[key]["chunks"]:
                spec, p, planes, stored = self._chunk(key, chunk, dtype)
                kept_values = from_planes(planes, dtype) if stored is None else stored
                if spec.get("coder") == "context":
                    try:
                        p = decode_in_context(spec, self._payload(spec, key), p, kept_values, self.pattern_dtype)
                    except CheckpointError as exc:
                        raise CheckpointError(f"{self.path}: chunk of {key!r}: {exc}") from None
                yield p, kept_values

    def read(self, key: str) -> CodedTensor:
        """Decode one tensor; a damaged or inconsistent chunk raises a one-line CheckpointError."""
        dtype = self._dtype(key)
        shape = tuple(self.index[key]["shape"])
        patterns, values = [], []
        for p, kept_values in self.chunks(key):
            patterns.append(p)
            values.append(kept_values)
        flat_patterns = np.concatenate(patterns) if patterns else np.zeros(0, self.pattern_dtype)
        if flat_patterns.size != math.prod(shape):
            raise CheckpointError(
                f"{self.path}: {key!r} holds {flat_patterns.size} weights, its shape {list(shape)} needs {math.prod(shape)}"
            )
        return CodedTensor(key, shape, flat_patterns, torch.cat(values) if values else torch.zeros(0, dtype=dtype))

    def profile(self) -> tuple[dict[str, float], list[int]]:
        """(each task's mask density, the agreement profile) decoded chunk by chunk: the memory of one chunk,
        whatever size the file declares; the same numbers as ``masks()``'s ``density`` and ``agreement``."""
        tasks = len(self.names)
        ones = np.zeros(tasks, dtype=np.int64)
        hist = np.zeros(tasks + 1, dtype=np.int64)
        for key in self.index:
            for patterns, _ in self.chunks(key):
                count = np.zeros(patterns.shape, dtype=np.int64)  # tasks per weight (numpy 1.x has no bitwise_count)
                for t in range(tasks):
                    bit = _bit(patterns, t)
                    ones[t] += int(np.count_nonzero(bit))
                    count += bit
                hist += np.bincount(count, minlength=tasks + 1)[: tasks + 1]
        numel = max(self.layout.numel, 1)
        return {name: int(ones[t]) / numel for t, name in enumerate(self.names)}, [int(v) for v in hist]

    def apply_task(self, key: str, theta0: torch.Tensor, task: int) -> torch.Tensor | None:
        """``read(key).apply(theta0, task)`` for a float32 tensor, the same bits, chunk by chunk in fused passes
        that never form the patterns of every weight (one pass joins the value planes and counts the contexts,
        one ungroups the patterns and adds the task's kept values); None where the kernels do not apply."""
        from tallmasks.algebra import kernels

        entry = self.index[key]
        if self._dtype(key) != torch.float32 or not kernels.usable(theta0):
            return None
        theta = theta0.reshape(-1).contiguous()
        out = torch.empty_like(theta)
        source, target = theta.numpy(), out.numpy()
        position = 0
        with self._reading(key):
            for chunk in entry["chunks"]:
                n = int(chunk["n"])
                if not 0 <= n <= source.size - position:  # checked before decoding anything
                    break
                spec, head, planes, stored = self._chunk(key, chunk, torch.float32)
                base, into = source[position : position + n], target[position : position + n]
                position += n
                if not planes:  # no weight kept
                    into[:] = base
                    continue
                in_context = spec.get("coder") == "context"
                lo, hi = (int(spec["lo"]), int(spec["hi"])) if in_context else (0, 511)
                if not 0 <= lo <= hi < 512:
                    raise CheckpointError(f"{self.path}: damaged chunk of {key!r} (context range {lo}..{hi})")
                if stored is None:
                    words, counts = kernels.join_words(planes, lo, hi)
                else:  # a lossy file: the decoded values' words, and their contexts counted
                    words = stored.numpy().view(np.uint32)
                    counts = context_counts(stored, lo, hi)[1]
                if not in_context:
                    kernels.apply_bit(base, head, words.view(np.float32), task, into)
                    continue
                try:
                    grouped, starts = _decode_groups(spec, self._payload(spec, key), counts, self.pattern_dtype)
                except CheckpointError as exc:
                    raise CheckpointError(f"{self.path}: chunk of {key!r}: {exc}") from None
                if kernels.apply_task_grouped(base, head, words, grouped, starts, lo, hi, task, into):
                    raise CheckpointError(f"{self.path}: chunk of {key!r}: damaged context groups (a kept weight with an empty pattern)")
        held = sum(int(c["n"]) for c in entry["chunks"])
        if position != source.size or held != source.size:
            raise CheckpointError(f"{self.path}: {key!r} holds {held} weights, its shape {list(theta0.shape)} needs {source.size}")
        return out.reshape(theta0.shape)

    def tensors(self) -> Iterator[CodedTensor]:
        for key in self.index:
            yield self.read(key)

    def task_index(self, name: str) -> int:
        if name not in self.names:
            raise CheckpointError(f"no task {name!r} in the collection (tasks: {', '.join(self.names)})")
        return self.names.index(name)

    def masks(self) -> MaskSet:
        """Every task's mask, bit-packed (the packbits format's MaskSet)."""
        from tallmasks.masks import BitPacker

        packers = [BitPacker(self.layout.numel) for _ in self.names]
        for tensor in self.tensors():
            for t, packer in enumerate(packers):
                packer.add(tensor.mask(t))
        return MaskSet(self.names, self.layout, [p.finish() for p in packers], self.info)

    def vector(self) -> dict[str, torch.Tensor]:
        """The stored merged vector, zero where no task keeps a weight."""
        return {tensor.key: tensor.vector() for tensor in self.tensors()}

    def stats(self) -> dict:
        """Bytes of the mask and value streams, weights kept, and the paper's scheme for the same collection."""
        numel = kept = mask_bytes = value_bytes = 0
        float_bytes = 0
        for entry in self.index.values():
            n = math.prod(entry["shape"])
            numel += n
            float_bytes += n * _DTYPES[entry["dtype"]].itemsize
            for chunk in entry["chunks"]:
                kept += chunk["kept"]
                mask_bytes += chunk["patterns"]["bytes"]
                value_bytes += sum(s["bytes"] for s in (*chunk["planes"], *chunk.get("scales", [])))
        tasks = len(self.names)
        return {
            "num_params": numel,
            "kept": kept,
            "kept_share": kept / max(numel, 1),
            "mask_bytes": mask_bytes,
            "value_bytes": value_bytes,
            "mask_bits_per_weight_per_task": 8 * mask_bytes / max(numel * tasks, 1),
            "file_bytes": self.path.stat().st_size,
            "paper_bytes": float_bytes + tasks * ((numel + 7) // 8),
        }


def decode_task(
    coded: CodedFile, theta0: Mapping[str, torch.Tensor], task: str, scale: float = 1.0, workers: int | None = None
) -> dict[str, torch.Tensor]:
    """theta_0 + scale * (m_t * tau_MTL) as a full state dict (keys theta_0 has and the file lacks come from theta_0).

    Tensors are decoded by ``workers`` threads (default: the cores, at most 4); zstd and the kernels release
    the interpreter's lock (rANS decoding may not), and each thread holds one chunk's temporaries at a time."""
    from concurrent.futures import ThreadPoolExecutor

    t = coded.task_index(task)
    extra = [k for k in coded.index if k not in theta0]
    if extra:
        raise CheckpointError(f"the collection has key {extra[0]!r} that the pre-trained model lacks")
    bases = {key: theta0[key] for key in theta0.keys()}
    for key, base in bases.items():
        if key not in coded.index:
            if base.dtype.is_floating_point:
                raise CheckpointError(f"the collection lacks floating-point key {key!r}")
        elif tuple(base.shape) != tuple(coded.index[key]["shape"]):
            raise CheckpointError(f"shape mismatch for {key!r}: {list(coded.index[key]['shape'])} vs {list(base.shape)}")

    def rebuild(key: str) -> torch.Tensor:
        base = bases[key]
        if key not in coded.index:
            return base
        fused = coded.apply_task(key, base, t) if scale == 1.0 else None
        return fused if fused is not None else coded.read(key).apply(base, t, scale)

    workers = workers or min(4, os.cpu_count() or 1)
    if workers == 1:
        return {key: rebuild(key) for key in bases}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:  # the largest tensors first, so that no thread is left with a large one at the end
        futures = {key: pool.submit(rebuild, key) for key in sorted(bases, key=lambda k: -bases[k].numel())}
        return {key: futures[key].result() for key in bases}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
