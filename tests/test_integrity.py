"""Damaged and hostile collections: every read path (decompress, inspect, report, the stored-collection
evaluation) checks the checksums and bounds before it uses the bytes; damage is one line naming the part,
never a wrong model written with exit 0, and no declared size is allocated before it is checked."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import save_sharded, tiny_state

from tallmasks.cli import main
from tallmasks.core.errors import CheckpointError
from tallmasks.io.checkpoints import save_state_dict
from tallmasks.io.integrity import checksum, json_checksum, tensor_checksum
from tallmasks.masks import MaskSet
from tallmasks.storage.coded import CODED_FORMATS, INDEX_MAX_BYTES, CodedFile
from tallmasks.storage.collection import collection_report, compress, decompress, read_meta

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["MNIST", "Cars", "DTD"]


@pytest.fixture
def checkpoints(tmp_path):
    """theta_0 and three experts (.safetensors), larger than one bit plane's smallest stream."""
    base = tiny_state(0)
    base["model.visual.big"] = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    folder = tmp_path / "inputs"
    folder.mkdir()
    save_state_dict(base, folder / "pt.safetensors")
    paths = []
    for i, name in enumerate(TASKS):
        save_state_dict(tiny_state(i + 1, base), folder / f"{name}.safetensors")
        paths.append(folder / f"{name}.safetensors")
    return folder / "pt.safetensors", paths


def error_line(capsys, argv: list) -> str:
    assert main(["-q", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def header(path: Path) -> tuple[int, dict]:
    """(header length, header JSON) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def rewrite_header(path: Path, head: dict) -> None:
    """Replace a safetensors file's header (padded to a multiple of 8 bytes), keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def flip_data_bit(path: Path, byte_in_data: int) -> None:
    """Flip one bit of a safetensors file's data section (not its header)."""
    n, _ = header(path)
    raw = bytearray(path.read_bytes())
    raw[8 + n + byte_in_data] ^= 0x10
    path.write_bytes(bytes(raw))


def refresh_meta(folder: Path) -> None:
    """meta.json's recorded sizes and checksum made to match the parts again (as a forger would): the
    part's own checksums must still find the damage."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["parts"] = {p: (folder / p).stat().st_size for p in meta["parts"]}
    meta.pop("check")
    meta["check"] = json_checksum(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def refused_everywhere(capsys, folder: Path, pt: Path, out: Path, part: str) -> None:
    """decompress, inspect and report refuse the collection in one line naming ``part``; nothing written."""
    line = error_line(capsys, ["decompress", folder, "--task", "MNIST", "--out", out, "--pretrained", pt])
    assert part in line, line
    assert not out.exists()
    line = error_line(capsys, ["inspect", folder])
    assert part in line, line
    line = error_line(capsys, ["report", folder, "--out", out.parent / "report"])
    assert part in line, line
    assert not (out.parent / "report").exists()


# ---------------------------------------------------------------------------------------------
# coded collections


@pytest.fixture
def coded(checkpoints, tmp_path) -> tuple[Path, dict, bytes, torch.Tensor]:
    """A coded collection in ``tmp_path / "c"``: its coded file's (path, header metadata, packed index, data)."""
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "c", names=TASKS)
    path = tmp_path / "c" / "coded.safetensors"
    return (path, *read_coded(path))


def read_coded(path: Path) -> tuple[dict, bytes, torch.Tensor]:
    """(header metadata, packed index, data tensor) of a coded file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), handle.get_tensor("index").numpy().tobytes(), handle.get_tensor("data")


def write_coded_parts(path: Path, meta: dict, packed: bytes, data: torch.Tensor, fix_check: bool = True) -> None:
    """A coded file of these parts, its header checksum made to match (unless not ``fix_check``): the reader's
    own rules must find what is wrong, not only the header's checksum."""
    from safetensors.torch import save_file

    from tallmasks.storage.coded import header_check

    if fix_check:
        meta = {**meta, "check": header_check(packed, meta.get("names", ""), meta.get("info", "{}"))}
    save_file({"index": torch.frombuffer(bytearray(packed), dtype=torch.uint8), "data": data}, str(path), metadata=meta)


def packed_json(value) -> bytes:
    return zstandard.ZstdCompressor().compress((value if isinstance(value, str) else json.dumps(value)).encode())


def top_streams(index: dict):
    """Every stream with an offset in the data (patterns and byte planes of every chunk)."""
    for entry in index.values():
        for chunk in entry["chunks"]:
            yield chunk["patterns"]
            yield from chunk["planes"]


def copy_collection(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for part in src.iterdir():
        (dst / part.name).write_bytes(part.read_bytes())
    return dst


def test_a_flipped_bit_in_any_coded_stream_is_found(checkpoints, tmp_path, capsys):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "c", names=TASKS)
    meta, packed, data = read_coded(tmp_path / "c" / "coded.safetensors")
    streams = [s for s in top_streams(CodedFile(tmp_path / "c" / "coded.safetensors").index) if s["bytes"]]
    assert len(streams) > 2
    for i, spec in enumerate(streams):
        folder = copy_collection(tmp_path / "c", tmp_path / f"damaged{i}")
        damaged = data.clone()
        damaged[spec["offset"] + spec["bytes"] // 2] ^= 0x10
        write_coded_parts(folder / "coded.safetensors", meta, packed, damaged, fix_check=False)
        refresh_meta(folder)
        with pytest.raises(CheckpointError, match="damaged data of .* \\(checksum mismatch\\)"):
            decompress(folder, "MNIST", pretrained=pt)
    refused_everywhere(capsys, folder, pt, tmp_path / "out.safetensors", "coded.safetensors")


@pytest.mark.parametrize("change", ["alias", "negative", "beyond", "gap"])
def test_aliased_or_negative_offsets_are_refused(coded, tmp_path, change):
    path, meta, packed, data = coded
    index = json.loads(json.dumps(CodedFile(path).index))
    streams = [s for s in top_streams(index) if s["bytes"]]
    assert len(streams) >= 2
    if change == "alias":
        streams[1]["offset"] = streams[0]["offset"]
    elif change == "negative":
        streams[0]["offset"] = -8
    elif change == "beyond":
        streams[-1]["offset"] = 1 << 40
    else:
        streams[-1]["offset"] += 1
    write_coded_parts(path, meta, packed_json(index), data)
    with pytest.raises(CheckpointError) as info:
        CodedFile(path)
    assert "\n" not in str(info.value) and "coded.safetensors" in str(info.value)


def test_an_index_bomb_is_refused_before_it_is_inflated(coded, tmp_path):
    import resource

    path, meta, packed, data = coded
    bomb = zstandard.ZstdCompressor(level=3).compress(b" " * (INDEX_MAX_BYTES + 1024))
    assert len(bomb) < 1 << 20
    write_coded_parts(path, meta, bomb, data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="index"):
        CodedFile(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2 * INDEX_MAX_BYTES // 1024  # never more than the bound (plus the copy being decoded)


def test_a_declared_chunk_of_billions_is_refused_not_allocated(coded, tmp_path, capsys):
    path, meta, packed, data = coded
    index = json.loads(json.dumps(CodedFile(path).index))
    entry = next(iter(index.values()))
    entry["chunks"][0]["n"] = 5_000_000_000
    write_coded_parts(path, meta, packed_json(index), data)
    refresh_meta(tmp_path / "c")
    line = error_line(capsys, ["inspect", tmp_path / "c"])
    assert "coded.safetensors" in line and "5000000000" in line


@pytest.mark.parametrize("field", ["index", "names", "info"])
@pytest.mark.parametrize("value", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '"text"', "{", "NaN"])
def test_wrong_json_types_and_deep_nesting_in_the_coded_header(coded, tmp_path, field, value):
    path, meta, packed, data = coded
    if field == "index":
        packed = packed_json(value)
    else:
        meta[field] = value
    write_coded_parts(path, meta, packed, data)
    with pytest.raises(CheckpointError) as info:
        CodedFile(path)
    assert "\n" not in str(info.value) and "coded.safetensors" in str(info.value)


def test_an_edited_coded_header_is_refused(coded, tmp_path):
    path, meta, packed, data = coded
    write_coded_parts(path, {**meta, "names": json.dumps(["Cars", "MNIST", "DTD"])}, packed, data, fix_check=False)
    with pytest.raises(CheckpointError, match="header's checksum does not match"):
        CodedFile(path)


# ---------------------------------------------------------------------------------------------
# packbits collections and mask files


@pytest.mark.parametrize(
    "part, byte, message, read",
    [
        ("merged.safetensors", 100, "merged.safetensors: damaged tensor", lambda folder, pt: decompress(folder, "MNIST", pretrained=pt)),
        (
            "masks.safetensors",
            3,
            "masks.safetensors: damaged mask of 'MNIST'",
            lambda folder, pt: MaskSet.load(folder / "masks.safetensors"),
        ),
    ],
    ids=["merged vector", "mask"],
)
def test_a_flipped_bit_in_a_packbits_part_is_found(checkpoints, tmp_path, capsys, part, byte, message, read):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "p", names=TASKS, storage="packbits")
    flip_data_bit(tmp_path / "p" / part, byte)
    refresh_meta(tmp_path / "p")
    with pytest.raises(CheckpointError, match=message):
        read(tmp_path / "p", pt)
    refused_everywhere(capsys, tmp_path / "p", pt, tmp_path / "out.safetensors", part)


def test_a_truncated_part_is_named(checkpoints, tmp_path, capsys):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "p", names=TASKS, storage="packbits")
    merged = tmp_path / "p" / "merged.safetensors"
    merged.write_bytes(merged.read_bytes()[:-4])
    line = error_line(capsys, ["inspect", tmp_path / "p"])
    assert "merged.safetensors" in line


def test_an_edited_meta_json_is_refused(checkpoints, tmp_path, capsys):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "e", names=TASKS, masks="emr", storage="packbits")
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    meta["masks"]["scales"]["MNIST"] *= 2  # a task rebuilt with another scale: a wrong model
    (tmp_path / "e" / "meta.json").write_text(json.dumps(meta))
    line = error_line(capsys, ["decompress", tmp_path / "e", "--task", "MNIST", "--out", tmp_path / "o.safetensors", "--pretrained", pt])
    assert "meta.json: damaged or edited collection metadata" in line
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "tasks": "MNIST"},
        lambda m: {**m, "masks": {**m["masks"], "scales": [1, 2]}},
        lambda m: {**m, "masks": {**m["masks"], "scales": {"MNIST": "big"}}},
        lambda m: {**m, "num_params": -3},
        lambda m: {**m, "pretrained": None},
        lambda m: {**m, "deep": json.loads("[" * 500 + "]" * 500)},
    ],
)
def test_meta_json_of_the_wrong_shape_is_one_line(checkpoints, tmp_path, capsys, edit):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "e", names=TASKS, masks="emr", storage="packbits")
    meta = edit(json.loads((tmp_path / "e" / "meta.json").read_text()))
    (tmp_path / "e" / "meta.json").write_text(json.dumps(meta))
    line = error_line(capsys, ["inspect", tmp_path / "e"])
    assert "meta.json" in line


def test_meta_json_nested_past_the_parser_is_one_line(checkpoints, tmp_path, capsys):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "p", names=TASKS, storage="packbits")
    (tmp_path / "p" / "meta.json").write_text('{"format": "tallmasks-compressed-v2", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    line = error_line(capsys, ["inspect", tmp_path / "p"])
    assert "meta.json: not valid JSON (nested too deeply)" in line


def test_collections_without_checksums_are_still_read(checkpoints, tmp_path, caplog):
    """A v1 collection (written before checksums) decodes to the same model, with a warning."""
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "p", names=TASKS, storage="packbits")
    expected = decompress(tmp_path / "p", "Cars", pretrained=pt)
    folder = tmp_path / "p"
    meta = json.loads((folder / "meta.json").read_text())
    meta.pop("check")
    meta.pop("parts")
    meta["format"] = "tallmasks-compressed-v1"
    (folder / "meta.json").write_text(json.dumps(meta))
    _, head = header(folder / "masks.safetensors")
    head["__metadata__"]["format"] = "tallmasks-maskset-v1"
    rewrite_header(folder / "masks.safetensors", head)
    with caplog.at_level("WARNING"):
        got = decompress(folder, "Cars", pretrained=pt)
    assert "before collections had checksums" in caplog.text
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert CODED_FORMATS[0] == "tallmasks-coded-v1"


def test_the_checksums_are_of_the_stored_bytes():
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensor_checksum(tensor) != tensor_checksum(tensor.reshape(3, 2))  # the shape counts
    assert tensor_checksum(tensor) != tensor_checksum(tensor.to(torch.float64))  # so does the dtype
    assert checksum(b"ab", "c") == checksum(b"abc")
    assert len(checksum(np.zeros(3, np.uint8))) == 16
    assert json_checksum({"a": 1, "b": 2}) == json_checksum({"b": 2, "a": 1})


# ---------------------------------------------------------------------------------------------
# writing: stale temporaries, a sharded theta_0


def test_a_stale_temporary_alone_does_not_block_compress(checkpoints, tmp_path):
    pt, fts = checkpoints
    out = tmp_path / "out"
    out.mkdir()
    from tallmasks.io import guard

    dead = 2**22 + 12345  # above any pid this machine hands out
    stale = out / f".coded.safetensors.{guard._HOST}-{dead}-abcd1234.tmp"
    stale.write_bytes(b"partial")
    compress(pt, fts, out, names=TASKS)
    assert not stale.exists()
    assert read_meta(out)["tasks"] == TASKS


def test_compress_from_a_sharded_theta0(checkpoints, tmp_path):
    """A sharded theta_0 compresses and rebuilds the same task as the single file it was cut from."""
    from tallmasks.io.checkpoints import load_state_dict

    pt, fts = checkpoints
    folder = save_sharded(dict(load_state_dict(pt)), tmp_path / "sharded", max_shard_size=4096)
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    compress(folder, fts, tmp_path / "c", names=TASKS)
    compress(pt, fts, tmp_path / "single", names=TASKS)
    got = decompress(tmp_path / "c", "DTD", pretrained=folder)
    ref = decompress(tmp_path / "single", "DTD", pretrained=pt)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in got)
    assert collection_report(tmp_path / "c")["tasks"] == TASKS
