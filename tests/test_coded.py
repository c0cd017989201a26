"""The coded collection format: each coder round-trips, the file decodes to the packbits format's
masks and vector, and a decompressed task equals theta_0 + m_t * tau_MTL bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_cli

from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
from tallmasks.core.errors import CheckpointError
from tallmasks.io.checkpoints import load_state_dict
from tallmasks.masks import Layout, MaskSet, tall_masks
from tallmasks.merging import merge
from tallmasks.storage import coded
from tallmasks.storage.coded import CodedFile, decode_stream, decode_task, encode_stream, tensor_patterns, write_coded
from tallmasks.storage.collection import collection_masks, collection_report, compress, decompress


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so that -0.0 != 0.0 and NaN payloads count."""
    return tensor.reshape(-1).contiguous().view(torch.uint8) if tensor.dtype.is_floating_point else tensor


def _streams():
    rng = np.random.default_rng(0)
    skewed = (rng.random(5000) < 0.05).astype(np.uint8) * rng.integers(1, 4, 5000).astype(np.uint8)
    runs = np.repeat(rng.integers(0, 2**20, 40).astype(np.uint32), 200)
    return {
        "const": np.full(100, 7, dtype=np.uint16),
        "ans": skewed,
        "zstd": runs,
        "raw": rng.integers(0, 256, 4000).astype(np.uint8),
    }


@pytest.mark.parametrize("expected", ["const", "ans", "zstd", "raw"])
def test_each_coder_round_trips_and_the_cheapest_is_kept(expected):
    symbols = _streams()[expected]
    spec, blob = encode_stream(symbols)
    assert spec["coder"] == expected
    out = decode_stream(spec, blob, symbols.size, symbols.dtype)
    assert out.dtype == symbols.dtype and np.array_equal(out, symbols)
    assert len(blob) <= symbols.nbytes


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_ans_over_wide_patterns(dtype):
    rng = np.random.default_rng(1)
    values = rng.integers(0, np.iinfo(dtype).max, 6, dtype=dtype, endpoint=True)
    symbols = values[rng.choice(6, size=3000, p=[0.8, 0.1, 0.05, 0.03, 0.01, 0.01])]
    spec, blob = encode_stream(symbols)
    assert np.array_equal(decode_stream(spec, blob, symbols.size, np.dtype(dtype)), symbols)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint64])
@pytest.mark.parametrize("skew", [0.0, 0.5, 0.95, 0.999])
def test_rans_never_beats_its_lower_bound(dtype, skew):
    """The writer skips rANS where its lower bound cannot win, so the bound must hold for real encodings."""
    rng = np.random.default_rng(int(skew * 1000))
    k = 40
    p = np.full(k, (1 - skew) / (k - 1))
    p[0] = skew if skew else p[0]
    p /= p.sum()
    values = rng.choice(min(int(np.iinfo(dtype).max), 2**31 - 1), size=k, replace=False).astype(dtype)
    for n in (50, 3000, 100000):
        symbols = values[rng.choice(k, size=n, p=p)]
        distinct, counts = coded._distinct(symbols)
        if distinct.size < 2:  # one value is the const coder's
            continue
        blob = coded._encode_ans(distinct, counts, coded._value_index(symbols, distinct))
        bound = coded._ans_lower_bound(distinct, counts)
        assert bound <= len(blob) <= 1.01 * bound + 64  # a bound, and a close one (else rANS would never be skipped)
        assert np.array_equal(coded._decode_ans(blob, n, distinct.size, np.dtype(dtype)), symbols)


def _random_masks(num_tasks: int, shapes: dict, density: float, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    keys = sorted(shapes)
    layout = Layout(tuple(keys), tuple(shapes[k] for k in keys))
    masks = {f"T{t}": {k: torch.rand(shapes[k], generator=g) < density for k in keys} for t in range(num_tasks)}
    return MaskSet.from_dicts(masks, layout, {"kind": "tall"})


@pytest.mark.parametrize("num_tasks, dtype", [(3, torch.float32), (9, torch.bfloat16), (20, torch.float16)])
def test_coded_file_holds_the_masks_and_the_kept_vector(tmp_path, monkeypatch, num_tasks, dtype):
    monkeypatch.setattr(coded, "CHUNK", 37)  # chunks that start inside a byte of the packed masks
    shapes = {"a.weight": (13, 11), "b.bias": (5,), "c.scale": (), "d.empty": (0,)}
    masks = _random_masks(num_tasks, shapes, density=0.15)
    g = torch.Generator().manual_seed(3)
    vector = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    write_coded(tmp_path / "c.safetensors", masks, vector)
    file = CodedFile(tmp_path / "c.safetensors")
    back = file.masks()
    assert back.names == masks.names and back.layout == masks.layout
    assert all(np.array_equal(back.packed[n], masks.packed[n]) for n in masks.names)
    kept = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
    for name in masks.names:
        for key, bits in masks.get(name).items():
            kept[key] |= bits
    for key, value in file.vector().items():
        assert value.dtype == dtype
        assert torch.equal(_bits(value[kept[key]]), _bits(vector[key][kept[key]]))
        assert not value[~kept[key]].any()
    stats = file.stats()
    assert stats["kept"] == sum(int(v.sum()) for v in kept.values())
    assert stats["paper_bytes"] == sum(v.numel() for v in vector.values()) * vector["a.weight"].element_size() + num_tasks * (
        (masks.layout.numel + 7) // 8
    )


def _magnitude_masks(num_tasks: int, n: int, seed: int = 0) -> tuple[MaskSet, dict]:
    """TALL-like masks: task t keeps a weight when its own share of the merged value dominates, so a large
    merged value is kept by few tasks and a small one by many (the structure the context coder models)."""
    g = torch.Generator().manual_seed(seed)
    taus = torch.randn(num_tasks, n, generator=g) * torch.rand(num_tasks, 1, generator=g)
    merged = taus.sum(0)
    keep = taus.abs() >= 0.4 * (merged - taus).abs()
    layout = Layout(("w",), ((n,),))
    masks = MaskSet.from_dicts({f"T{t}": {"w": keep[t]} for t in range(num_tasks)}, layout, {"kind": "tall"})
    return masks, {"w": merged}


@pytest.mark.parametrize("num_tasks", [4, 20])
def test_patterns_coded_in_context_of_the_kept_values(tmp_path, num_tasks):
    masks, vector = _magnitude_masks(num_tasks, 30000)
    patterns = tensor_patterns(masks, 0, 30000)
    kept = patterns != 0
    kept_values = vector["w"][torch.from_numpy(kept)]
    spec, blob = coded.encode_in_context(patterns, kept_values)
    assert spec["coder"] == "context" and len(spec["groups"]) > 1
    assert len(blob) < len(encode_stream(patterns)[1])  # the context pays on such masks
    bits = coded.decode_kept(spec, blob, patterns.size)
    assert np.array_equal(bits, kept)
    assert np.array_equal(coded.decode_in_context(spec, blob, bits, kept_values, patterns.dtype), patterns)
    write_coded(tmp_path / "c.safetensors", masks, vector)  # the writer picks it and the reader undoes it
    file = CodedFile(tmp_path / "c.safetensors")
    assert file.index["w"]["chunks"][0]["patterns"]["coder"] == "context"
    assert all(np.array_equal(file.masks().packed[n], masks.packed[n]) for n in masks.names)
    damaged = {**spec, "groups": spec["groups"][:-1]}  # a group lost: one line, not a wrong mask
    with pytest.raises(CheckpointError, match="context groups"):
        coded.decode_in_context(damaged, blob, bits, kept_values, patterns.dtype)


def test_wide_patterns_are_coded_byte_by_byte_when_their_joint_table_does_not_pay():
    rng = np.random.default_rng(2)
    low = rng.choice(256, size=20000, p=np.r_[0.9, np.full(255, 0.1 / 255)])  # each byte skewed, 65k joint values
    high = rng.choice(256, size=20000, p=np.r_[0.9, np.full(255, 0.1 / 255)])
    symbols = (low | (high << 8)).astype(np.uint32)
    spec, blob = encode_stream(symbols)
    assert spec["coder"] == "bytes" and [p["coder"] for p in spec["planes"]][2:] == ["const", "const"]
    assert np.array_equal(decode_stream(spec, blob, symbols.size, symbols.dtype), symbols)
    assert len(blob) < 0.5 * symbols.size  # about 1.3 bits for each of the two live bytes


def test_patterns_are_the_tasks_bits():
    masks = _random_masks(11, {"w": (4, 9)}, density=0.4, seed=5)
    patterns = tensor_patterns(masks, 3, 30)
    expected = sum(masks.flat(n)[3:33].numpy().astype(np.uint16) << t for t, n in enumerate(masks.names))
    assert patterns.dtype == np.uint16 and np.array_equal(patterns, expected)


def test_decode_task_equals_the_formula_bit_for_bit(tmp_path, tiny_checkpoints):
    pt, fts, st = tiny_checkpoints
    cs = CheckpointSet(pt, [*fts, st])
    vector = merge(cs, "sum")
    masks = tall_masks(cs, vector, [0.2, 0.4, 0.5, 0.6])
    write_coded(tmp_path / "c.safetensors", masks, vector)
    theta0 = load_state_dict(pt)
    file = CodedFile(tmp_path / "c.safetensors")
    for name in masks.names:
        got = decode_task(file, theta0, name)
        expected = apply_vector(theta0, vector, 1.0, masks.get(name))
        assert set(got) == set(expected)
        assert all(torch.equal(_bits(got[k]), _bits(expected[k])) for k in expected), name


@pytest.mark.parametrize("fused", [True, False])
def test_context_groups_and_task_weights_with_and_without_the_fused_kernels(tmp_path, monkeypatch, fused):
    """Ungrouping the context groups and adding a task's kept values: the kernels' single passes and the
    numpy/torch code give the formula's bits, special values included."""
    from tallmasks.algebra import kernels

    monkeypatch.setattr(kernels, "ENABLED", fused)
    masks, vector = _magnitude_masks(6, 30000, seed=4)
    vector["w"][:4] = torch.tensor([float("nan"), float("inf"), -0.0, 3e38])
    write_coded(tmp_path / "c.safetensors", masks, vector)
    file = CodedFile(tmp_path / "c.safetensors")
    assert file.index["w"]["chunks"][0]["patterns"]["coder"] == "context"
    assert all(np.array_equal(file.masks().packed[n], masks.packed[n]) for n in masks.names)
    g = torch.Generator().manual_seed(5)
    theta0 = {"w": torch.randn(30000, generator=g)}
    theta0["w"][:6] = torch.tensor([1.0, float("-inf"), 0.0, 3e38, -0.0, float("nan")])
    for name in masks.names:
        got = decode_task(file, theta0, name)["w"]
        kept = masks.get(name)["w"]
        expected = torch.where(kept, theta0["w"] + vector["w"], theta0["w"])
        assert torch.equal(_bits(got), _bits(expected)), name


@pytest.mark.parametrize("num_tasks", [6, 20, 33, 64])  # patterns of 8, 32 and 64 bits; tasks beyond bit 31
def test_one_task_in_fused_passes_is_the_formula_over_chunks_and_threads(tmp_path, monkeypatch, num_tasks):
    """``apply_task`` (join the value planes, ungroup and add in one pass, never forming every pattern) over
    chunks coded in context and one coded as a single stream, one and two threads: the formula's bits."""
    from tallmasks.algebra import kernels

    if kernels.kernels() is None:
        pytest.skip("numba kernels unavailable")
    monkeypatch.setattr(coded, "CHUNK", 13000)  # chunks of 13000, 13000 and 4000 weights; the last too small for context
    masks, vector = _magnitude_masks(num_tasks, 30000, seed=6)
    vector["w"][13000:13004] = torch.tensor([float("nan"), float("inf"), -0.0, 3e38])
    write_coded(tmp_path / "c.safetensors", masks, vector)
    file = CodedFile(tmp_path / "c.safetensors")
    assert [c["patterns"]["coder"] for c in file.index["w"]["chunks"]][:2] == ["context", "context"]
    assert file.index["w"]["chunks"][2]["patterns"]["coder"] != "context"
    theta0 = {"w": torch.randn(30000, generator=torch.Generator().manual_seed(7))}
    theta0["w"][12999:13005] = torch.tensor([1.0, float("-inf"), 0.0, 3e38, -0.0, float("nan")])
    for t, name in enumerate(masks.names):
        expected = torch.where(masks.get(name)["w"], theta0["w"] + vector["w"], theta0["w"])
        assert torch.equal(_bits(file.apply_task("w", theta0["w"], t)), _bits(expected)), name
        for workers in (1, 2):
            assert torch.equal(_bits(decode_task(file, theta0, name, workers=workers)["w"]), _bits(expected)), name
    chunk = file.index["w"]["chunks"][1]["patterns"]
    chunk["groups"] = chunk["groups"][:-1]  # a group lost: one line, not a wrong task
    with pytest.raises(CheckpointError, match="damaged context groups"):
        file.apply_task("w", theta0["w"], 0)


def test_coded_and_packbits_collections_decompress_alike(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    compress(pt, fts, tmp_path / "p", storage="packbits", use_ties=True, lambdas=[0.3, 0.4, 0.5])
    compress(pt, fts, tmp_path / "c", storage="coded", use_ties=True, lambdas=[0.3, 0.4, 0.5])
    p, c = collection_masks(tmp_path / "p"), collection_masks(tmp_path / "c")
    assert all(np.array_equal(p.packed[n], c.packed[n]) for n in p.names)
    for name in p.names:
        a, b = decompress(tmp_path / "p", name), decompress(tmp_path / "c", name)
        assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a), name
    report = collection_report(tmp_path / "c")
    assert report["storage"] == "coded" and report["total_bytes"] < collection_report(tmp_path / "p")["total_bytes"]
    assert report["mask_bits_per_weight_per_task"] == 8 * report["mask_bytes"] / (report["num_params"] * 3)


def test_released_masks_convert_with_one_command(tmp_path, tiny_checkpoints):
    """--model reads the released layout: theta_0, the fine-tuned checkpoints and TALL_mask_<N>task.npy."""
    pt, fts, _ = tiny_checkpoints
    cs = CheckpointSet(pt, fts, names=["MNIST", "Cars", "DTD"])
    masks = tall_masks(cs, merge(cs, "sum"), 0.4)
    location = tmp_path / "models" / "checkpoints"
    model_dir = location / "tiny"
    model_dir.mkdir(parents=True)
    for path in [pt, *fts]:
        (model_dir / path.parent.name).mkdir(exist_ok=True)
        (model_dir / path.parent.name / path.name).write_bytes(path.read_bytes())
    mask_dir = tmp_path / "models" / "tall_masks" / "tiny"
    mask_dir.mkdir(parents=True)
    np.save(mask_dir / "TALL_mask_3task.npy", {n: masks.packed[n] for n in masks.names})
    out = tmp_path / "coded"
    res = run_cli("-q", "compress", "--model", "tiny", "--model-location", location, "--names", "MNIST", "Cars", "DTD", "--out", out)
    assert res.returncode == 0, res.stderr
    back = collection_masks(out)
    assert back.names == masks.names and all(np.array_equal(back.packed[n], masks.packed[n]) for n in masks.names)
    res = run_cli("inspect", out)
    assert "bits per weight per task" in res.stdout and "paper's scheme" in res.stdout


def test_damaged_or_foreign_files_are_refused(tmp_path, tiny_checkpoints):
    pt, _, _ = tiny_checkpoints
    with pytest.raises(CheckpointError, match="no such coded file"):
        CodedFile(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a tallmasks coded file"):
        CodedFile(_as_safetensors(pt, tmp_path))
    with pytest.raises(CheckpointError, match="unknown coder"):
        decode_stream({"coder": "lzw"}, b"", 1, np.dtype(np.uint8))


def _as_safetensors(pt, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in load_state_dict(pt).items()}, str(path))
    return path


def test_a_damaged_payload_is_one_line(tmp_path):
    masks = _random_masks(5, {"w": (64, 40)}, density=0.2)
    vector = {"w": torch.randn(64, 40)}
    write_coded(tmp_path / "c.safetensors", masks, vector)
    file = CodedFile(tmp_path / "c.safetensors")
    file._data = np.full(file._data.shape, 0x5A, dtype=np.uint8)  # every payload byte overwritten
    with pytest.raises(CheckpointError, match="damaged data of 'w' at byte 0 \\(checksum mismatch\\)"):
        file.read("w")
    file.checksums = False  # a v1 file, without checksums: the decoders' own errors are one line too
    with pytest.raises(CheckpointError, match="damaged chunk of 'w'"):
        file.read("w")


def test_model_layout_finds_main_py_masks_of_a_custom_task_list(tmp_path, tiny_checkpoints):
    """--model with --names other than the paper's first N reads the masks main.py saved for that list
    (their name carries the list's tag), not a missing untagged file."""
    from tallmasks.experiments.runner import datasets_tag, tall_mask_path

    pt, fts, _ = tiny_checkpoints
    names = ["MNIST", "Cars", "DTD"]
    cs = CheckpointSet(pt, fts, names=names)
    masks = tall_masks(cs, merge(cs, "sum"), 0.3)
    location = tmp_path / "models" / "checkpoints"
    for path in [pt, *fts]:
        (location / "tiny" / path.parent.name).mkdir(parents=True, exist_ok=True)
        (location / "tiny" / path.parent.name / path.name).write_bytes(path.read_bytes())
    tag = datasets_tag(names)
    assert tag  # not the paper's first three
    masks.save(tall_mask_path(location, "tiny", 3, False, tag=tag))
    out = tmp_path / "coded"
    res = run_cli("-q", "compress", "--model", "tiny", "--model-location", location, "--names", *names, "--out", out)
    assert res.returncode == 0, res.stderr
    back = collection_masks(out)
    assert all(np.array_equal(back.packed[n], masks.packed[n]) for n in names)
