"""Quantized values in the coded format (``compress --values``): every setting rebuilds exactly the plain
whole-vector formula (theta_0 + m_t * Q(tau_MTL)), its error stays within the specified bound, a lossy
collection says so everywhere and is never read as a lossless one, and bad settings are one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.io.integrity import json_checksum
from tallmasks.storage import coded
from tallmasks.storage.coded import CODED_FORMAT, CodedFile, decode_task
from tallmasks.storage.collection import collection_masks, collection_report, compress, decompress, open_coded
from tallmasks.storage.values import BLOCK, VALUE_SETTINGS

LOSSY = [s for s in VALUE_SETTINGS if s != "float32"]


@pytest.fixture
def checkpoints(tmp_path):
    """theta_0 and three fine-tuned checkpoints with tensors of several blocks (and one of a partial block)."""
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(12, 300, generator=g), "a.bias": torch.randn(300, generator=g), "b": torch.randn(7, generator=g)}
    save_file(base, str(tmp_path / "pt.safetensors"))
    paths = []
    for t in range(3):
        # task vectors of varied size: a few large entries per task, the rest small
        ft = {k: v + torch.randn(v.shape, generator=g) * (1e-3 + 2e-2 * (torch.rand(v.shape, generator=g) < 0.05)) for k, v in base.items()}
        save_file(ft, str(tmp_path / f"ft{t}.safetensors"))
        paths.append(tmp_path / f"ft{t}.safetensors")
    return tmp_path / "pt.safetensors", paths


def plain_quantize(vector: np.ndarray, kept: np.ndarray, setting: str, block: int = BLOCK) -> np.ndarray:
    """The specification's formula over one whole tensor: absmax of the kept weights per block of positions,
    s = M / q_max, q = clamp(round(v / s)), stored q * s; bfloat16: round to nearest."""
    v = vector.astype(np.float32).reshape(-1)
    if setting == "bfloat16":
        return torch.from_numpy(v).to(torch.bfloat16).to(torch.float32).numpy()
    qmax = 2 ** (int(setting[3:]) - 1) - 1
    blocks = math.ceil(v.size / block)
    magnitude = np.zeros(blocks * block, np.float32)
    magnitude[: v.size] = np.where(kept, np.abs(v), 0)
    scale = (magnitude.reshape(blocks, block).max(axis=1) / np.float32(qmax)).astype(np.float32)
    step = np.repeat(scale, block)[: v.size]
    q = np.where(step > 0, np.round(v / np.where(step > 0, step, 1)), 0)
    return (np.clip(q, -qmax, qmax).astype(np.float32) * step).astype(np.float32)


def _lossless(checkpoints, tmp_path):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "exact")
    _, file = open_coded(tmp_path / "exact")
    return file.vector(), collection_masks(tmp_path / "exact")


@pytest.mark.parametrize("setting", LOSSY)
def test_every_setting_rebuilds_the_plain_formula_within_its_bound(checkpoints, tmp_path, setting):
    pt, fts = checkpoints
    vector, masks = _lossless(checkpoints, tmp_path)
    compress(pt, fts, tmp_path / setting, values=setting)
    theta0 = _load(pt)
    for name in masks.names:
        model = decompress(tmp_path / setting, name)
        mask = masks.get(name)
        for key, base in theta0.items():
            kept = np.zeros(vector[key].numel(), bool)
            for t in masks.names:
                kept |= masks.get(t)[key].reshape(-1).numpy()
            stored = plain_quantize(vector[key].numpy(), kept, setting)
            expected = base.reshape(-1) + torch.from_numpy(mask[key].reshape(-1).numpy() * stored)
            assert torch.equal(model[key].reshape(-1), expected), (setting, name, key)
            exact = vector[key].reshape(-1).numpy()[kept]
            error = np.abs(stored[kept] - exact)
            if setting == "bfloat16":
                assert (error <= np.abs(exact) * 2.0**-8 * (1 + 1e-6)).all()
            else:
                qmax = 2 ** (int(setting[3:]) - 1) - 1
                magnitude = np.zeros(math.ceil(kept.size / BLOCK) * BLOCK, np.float32)
                magnitude[: kept.size] = np.where(kept, np.abs(vector[key].reshape(-1).numpy()), 0)
                bound = np.repeat(magnitude.reshape(-1, BLOCK).max(axis=1), BLOCK)[: kept.size][kept] / (2 * qmax)
                assert (error <= bound * (1 + 1e-5) + 1e-12).all()


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_blocks_restart_at_every_chunk_and_the_fused_path_agrees(checkpoints, tmp_path, monkeypatch):
    """Chunks of 1024 weights (the 3600-weight tensor spans four): the same stored values as one chunk, and the
    fused per-task path gives the same bits as decoding each tensor."""
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "one", values="int4")
    monkeypatch.setattr(coded, "CHUNK", 1024)
    compress(pt, fts, tmp_path / "many", values="int4")
    one, many = open_coded(tmp_path / "one")[1], open_coded(tmp_path / "many")[1]
    assert len(many.index["a.weight"]["chunks"]) == 4
    for key in one.index:
        assert torch.equal(one.read(key).vector(), many.read(key).vector())
    theta0 = _load(pt)
    for t, name in enumerate(many.names):
        fused = decode_task(many, theta0, name, workers=1)
        for key in many.index:
            assert torch.equal(fused[key], many.read(key).apply(theta0[key], t))


def test_float32_stays_the_lossless_v2_format(checkpoints, tmp_path):
    pt, fts = checkpoints
    meta = compress(pt, fts, tmp_path / "c")
    assert meta["format"] == CODED_FORMAT and meta["values"] == {
        "setting": "float32",
        "lossy": False,
        "prune_zeros": False,
        "description": "float32 (exact)",
    }
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "coded.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert header["format"] == CODED_FORMAT and "values" not in header
    assert not CodedFile(tmp_path / "c" / "coded.safetensors").lossy


def test_a_lossy_collection_says_so_and_is_never_taken_for_lossless(checkpoints, tmp_path):
    pt, fts = checkpoints
    meta = compress(pt, fts, tmp_path / "c", values="int3")
    assert meta["format"] == coded.CODED_LOSSY_FORMAT
    assert meta["values"]["lossy"] and meta["values"]["setting"] == "int3" and meta["values"]["block"] == BLOCK
    vector, _ = _lossless(checkpoints, tmp_path)
    measured = 0.0
    for tensor in open_coded(tmp_path / "c")[1].tensors():
        kept = torch.from_numpy(tensor.patterns != 0)
        measured = max(measured, float((tensor.kept_values - vector[tensor.key].reshape(-1)[kept]).abs().max()))
    assert meta["values"]["max_abs_error"] == pytest.approx(measured, rel=1e-6) and measured > 0
    report = collection_report(tmp_path / "c")
    assert report["values"]["lossy"] and report["format"] == coded.CODED_LOSSY_FORMAT
    shown = run_cli("-q", "inspect", tmp_path / "c")
    assert shown.returncode == 0 and "values: int3 (lossy" in shown.stdout and "LOSSY" in shown.stdout

    # meta.json rewritten to claim a lossless collection (checksum recomputed): the coded file says otherwise
    path = tmp_path / "c" / "meta.json"
    edited = json.loads(path.read_text())
    edited.update(format=CODED_FORMAT, values={"setting": "float32", "lossy": False})
    edited.pop("check")
    edited["check"] = json_checksum(edited)
    path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="holds int3 values"):
        decompress(tmp_path / "c", 0)
    # and the lossy format name with a lossless claim is refused by meta.json alone
    edited.update(format=coded.CODED_LOSSY_FORMAT)
    edited.pop("check")
    edited["check"] = json_checksum(edited)
    path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="lossy and lossless mixed up"):
        decompress(tmp_path / "c", 0)


def test_prune_zeros_keeps_every_model_and_drops_mask_bits(checkpoints, tmp_path):
    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "kept", values="int2")
    compress(pt, fts, tmp_path / "pruned", values="int2", prune_zeros=True)
    full, pruned = collection_masks(tmp_path / "kept"), collection_masks(tmp_path / "pruned")
    for name in full.names:
        a, b = decompress(tmp_path / "kept", name), decompress(tmp_path / "pruned", name)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert pruned.density(name) < full.density(name)
        for key, bits in pruned.get(name).items():
            assert not (bits & ~full.get(name)[key]).any()  # only bits cleared, never set
    sizes = [collection_report(tmp_path / c)["total_bytes"] for c in ("kept", "pruned")]
    assert sizes[1] < sizes[0]
    assert collection_report(tmp_path / "pruned")["values"]["prune_zeros"]


def test_bad_settings_are_one_line_errors_and_write_nothing(checkpoints, tmp_path):
    pt, fts = checkpoints
    for extra, message in (
        (["--values", "int9"], "--values must be one of float32, bfloat16, int8, int4, int3, int2, got 'int9'"),
        (["--values", "int4", "--storage", "packbits"], "need --storage coded"),
        (["--prune-zeros", "--storage", "packbits"], "need --storage coded"),
    ):
        res = run_cli("-q", "compress", "--pretrained", pt, "--finetuned", *fts, "--out", tmp_path / "out", *extra)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="values must be one of"):
        compress(pt, fts, tmp_path / "out", values="int5")
    with pytest.raises(ConfigError, match="need storage 'coded'"):
        compress(pt, fts, tmp_path / "out", values="bfloat16", storage="packbits")
    assert not (tmp_path / "out").exists()


def test_a_damaged_value_code_is_a_one_line_error(checkpoints, tmp_path):
    """A code above 2 q_max (a file that passes its checksums, written so on purpose) is refused, not decoded."""
    from tallmasks.storage.values import ValueCodec

    codec = ValueCodec("int2")
    codes, scales, _ = codec.encode(torch.tensor([1.0, -1.0, 0.5]), np.arange(3), 3)
    assert codes.max() <= 2
    codes[0] = 7
    with pytest.raises(CheckpointError, match="value code above 2"):
        codec.decode(codes, scales, np.arange(3), 3)
    with pytest.raises(CheckpointError, match="scales for"):
        codec.decode(codes, None, np.arange(3), 3)


def test_the_report_marks_a_lossy_collection(checkpoints, tmp_path):
    from tallmasks.report.tables import storage_rows

    pt, fts = checkpoints
    compress(pt, fts, tmp_path / "exact")
    compress(pt, fts, tmp_path / "small", values="int4")
    exact, small = storage_rows([tmp_path / "exact", tmp_path / "small"], [])
    assert exact[3] == "coded" and small[3] == "coded (int4, lossy)"
