"""The fused CPU kernels give, bit for bit, what the torch code gives (every task count 1-20, tails, ties)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tallmasks.algebra import kernels
from tallmasks.algebra.reduction import stacked_tail
from tallmasks.algebra.task_vectors import Block, CheckpointSet
from tallmasks.algebra.topk import KthInWindows
from tallmasks.merging import merge
from tallmasks.merging.ops import _ties_block


def bits(tensor):
    return tensor.contiguous().view(torch.int32)


def quantized_taus(count, n, seed):
    """Task vectors with many exact ties, zeros, and columns whose summed sign is zero."""
    g = torch.Generator().manual_seed(seed)
    taus = torch.round(torch.randn(count, n, generator=g) * 3) / 8
    taus[:, : n // 10] = 0.0
    if count >= 2:
        taus[0, n // 10 : n // 5] = 0.5
        taus[1, n // 10 : n // 5] = -0.5  # opposite signs that cancel
    return taus


def test_kernels_are_available():
    assert kernels.kernels() is not None  # numba is a dependency: a broken build must fail here


@pytest.mark.parametrize("count", list(range(1, 21)) + [33, 80])  # 80: cascades inside the interleaved tail
def test_ties_kernel_equals_the_torch_block(count):
    n = 301
    taus = quantized_taus(count, n, seed=count)
    thresholds = taus.abs().quantile(0.6, dim=1).tolist()
    for tail in (0, stacked_tail(n), n):
        for agg in ("mean", "sum"):
            for zero_sign in (1.0, -1.0):
                for th in (thresholds, None):
                    block = Block("k", 0, n, torch.zeros(n), [], tail=tail)
                    expected, sign, kept = _ties_block(block, taus.clone(), th, agg, zero_sign)
                    out = torch.empty(n)
                    signs, mattered, finite = kernels.ties_block(taus.clone(), th, tail, agg == "mean", zero_sign, out)
                    assert torch.equal(bits(out), bits(expected)), (tail, agg, zero_sign, th is None)
                    assert signs == int(sign.sum()) and finite
                    assert mattered == bool(((sign == 0) & kept).any())


def test_ties_kernel_reports_non_finite_sums():
    taus = torch.tensor([[1.0, float("nan")], [2.0, 1.0]])
    _, _, finite = kernels.ties_block(taus, [0.5, 0.5], 0, True, 1.0, torch.empty(2))
    assert not finite
    taus = torch.tensor([[1.0, float("nan")], [2.0, 1.0]])  # NaN below its threshold still shows
    _, _, finite = kernels.ties_block(taus, [0.5, 100.0], 0, True, 1.0, torch.empty(2))
    assert not finite


def test_window_kernel_equals_the_torch_counts(monkeypatch):
    taus = quantized_taus(5, 5000, seed=7)
    windows = [(-1.0, 0.25), (0.0, 0.375), (0.125, 0.125), (0.25, 1.0), (3.0, 4.0)]
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        selector = KthInWindows([2500] * 5, windows, cap=10_000)
        for start in range(0, 5000, 700):
            assert selector.add(taus[:, start : start + 700].clone())
        results.append((selector.values(), selector._below.tolist(), selector._at_most.tolist(), selector._count))
    assert results[0] == results[1]
    monkeypatch.setattr(kernels, "ENABLED", True)
    dense = torch.full((1, 4000), 0.5)  # every entry in the window: more than the kernel's buffer
    selector = KthInWindows([10], [(0.0, 1.0)], cap=10_000)
    selector.add(dense.clone())
    assert selector.values() == [0.5] and selector._count == [4000]


def _states(count, seed):
    g = torch.Generator().manual_seed(seed)
    pt = {"a.weight": torch.randn(40, 9, generator=g), "b.bias": torch.randn(31, generator=g), "c": torch.randn((), generator=g)}
    fts = [{k: v + torch.round(torch.randn(v.shape, generator=g) * 3) / 64 - 0.02 for k, v in pt.items()} for _ in range(count)]
    return pt, fts


@pytest.mark.parametrize("count", [1, 2, 8, 17, 18, 20])
def test_ties_merges_agree_with_and_without_kernels(count, monkeypatch):
    pt, fts = _states(count, seed=count)
    for k, agg in [(20, "mean"), (100, "sum"), (50, "mean")]:
        merged = []
        for enabled in (True, False):
            monkeypatch.setattr(kernels, "ENABLED", enabled)
            merged.append(merge(CheckpointSet(pt, fts, block_elems=37), "ties", k=k, ties_agg=agg))
        for key in merged[0]:
            assert torch.equal(bits(merged[0][key]), bits(merged[1][key])), (k, agg, key)


def test_window_kernel_keeps_exactly_a_full_buffer():
    # 1024 magnitudes inside the window (the kernel's buffer for a 2048-column block), then outside ones
    inside = torch.linspace(0.5, 0.9, 1024)
    block = torch.cat([inside, torch.full((1024,), 2.0)]).view(1, -1)
    below, at_most = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    kept, finite = kernels.window_counts(block.clone(), np.array([0.1], np.float32), np.array([1.0], np.float32), below, at_most)
    assert finite and torch.equal(kept[0], inside) and below[0] == at_most[0] == 0


@pytest.mark.parametrize("count, values", [(8, [3e38, -3e38, 0.0, 0.0, 3e38, -3e38, 0.0, 0.0]), (18, [3e38] * 16 + [-3e38] * 2)])
def test_a_nan_sum_of_finite_inputs_takes_the_majority_sign_as_in_torch(count, values, monkeypatch):
    # opposite float32 overflows make the trimmed sum NaN, whose torch.sign is 0: the key is merged again
    # with the majority sign (-1 here) on both paths
    pt = {"z": torch.zeros(64)}
    fts = [{"z": torch.full((64,), v)} for v in values]
    fts[0]["z"][:40] = -1.0  # a negative majority of signs
    merged = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        merged.append(merge(CheckpointSet(pt, fts), "ties", k=100, ties_agg="sum")["z"])
    assert torch.equal(bits(merged[0]), bits(merged[1]))


def test_sample_reads_about_one_entry_in_stride_from_torch_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    pt = {
        "wide": torch.randn(1, 20000, generator=g),
        "tall": torch.randn(3000, 7, generator=g),
        "bias": torch.randn(5000, generator=g),
        "cube": torch.randn(30, 20, 10, generator=g),
        "s": torch.randn((), generator=g),
    }
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pt.items()} for _ in range(2)]
    keys = sorted(pt)
    taus = torch.stack([torch.cat([ft[k].reshape(-1) - pt[k].reshape(-1) for k in keys]) for ft in fts])
    samples = []
    for suffix in (".pt", ".safetensors"):
        paths = []
        for i, state in enumerate([pt, *fts]):
            path = tmp_path / f"m{i}{suffix}"
            torch.save(state, path) if suffix == ".pt" else save_file({k: v.contiguous() for k, v in state.items()}, str(path))
            paths.append(path)
        samples.append(CheckpointSet(paths[0], paths[1:]).sample_taus(stride=8, chunk_elems=100))
    assert torch.equal(samples[0], samples[1])
    expected, offset = [], 0
    for k in keys:
        n = pt[k].numel()
        expected += [taus[:, offset + a : offset + min(n, a + 100)] for a in range(0, n, 800)]
        offset += n
    assert torch.equal(samples[0], torch.cat(expected, 1))
    assert samples[0].shape[1] <= taus.shape[1] / 8 + 5 * 100


def test_thresholds_of_a_model_without_entries():
    from tallmasks.masks import topk_thresholds

    pt = {"empty": torch.zeros(0, 3)}
    assert topk_thresholds(CheckpointSet(pt, [pt, pt]), 20, window=True) == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_coded_format_kernels_on_every_pattern_width(dtype):
    """ungroup inverts a stable sort by context; apply_bit adds the kept values where the task's bit is set
    (theta_0's bits elsewhere), for patterns of 8, 16, 32 and 64 tasks."""
    if kernels.kernels() is None:
        pytest.skip("numba kernels unavailable")
    rng = np.random.default_rng(0)
    bits = np.dtype(dtype).itemsize * 8
    patterns = rng.integers(0, 2**62, 5000, dtype=np.uint64).astype(dtype)
    patterns[::7] = 0
    kept = patterns != 0
    values = torch.from_numpy(rng.standard_normal(int(kept.sum())).astype(np.float32))
    theta = torch.from_numpy(rng.standard_normal(5000).astype(np.float32))
    full = torch.zeros(5000)
    full[torch.from_numpy(kept)] = values
    for task in (0, bits // 2, bits - 1):
        bit = torch.from_numpy(((patterns >> dtype(task)) & dtype(1)).astype(bool))
        out = torch.empty_like(theta)
        kernels.apply_bit(theta.numpy(), patterns, values.numpy(), task, out.numpy())
        assert torch.equal(out, torch.where(bit, theta + full, theta))
    contexts = rng.integers(0, 512, 5000).astype(np.int16)
    counts = np.bincount(contexts, minlength=512)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    grouped = patterns[np.argsort(contexts, kind="stable")]
    kept_here = rng.random(7000) < 5000 / 7000
    kept_here[np.flatnonzero(kept_here)[5000:]] = False
    kept_here[np.flatnonzero(~kept_here)[: 5000 - int(kept_here.sum())]] = True  # exactly 5000 kept of 7000
    expected = np.zeros(7000, dtype=dtype)
    expected[kept_here] = patterns
    assert np.array_equal(kernels.ungroup(contexts, grouped, starts, kept_here), expected)
