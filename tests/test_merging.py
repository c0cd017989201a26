"""Every merging method against a plain whole-vector implementation of its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tallmasks.algebra import reduction
from tallmasks.algebra.task_vectors import CheckpointSet, TaskVector, apply_vector
from tallmasks.algebra.topk import kth_smallest_magnitude
from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.masks import Layout, MaskSet, consensus_mask, magnitude_masks, tall_mask, tall_masks
from tallmasks.merging import METHODS, alpha_candidates, alpha_grid, merge

# ------------------------------------------------------------------------------------------------
# plain whole-vector references (the formulas of DESIGN.md, on stacked flat vectors)


def flat(state, keys):
    return torch.cat([state[k].reshape(-1).float() for k in keys])


def seq_sum(rows):
    total = torch.zeros_like(rows[0])
    for row in rows:
        total += row
    return total


def stacked_sum(matrix):
    """The paper's sum over tasks: the stacked (tasks x parameters) matrix's .sum(0)."""
    return matrix.sum(0)


def bits(tensor):
    return tensor.contiguous().view(torch.int32)


def ref_topk(matrix, k):
    if k == 100:
        return matrix.clone()
    d = matrix.shape[1]
    kth = d - int(d * (k / 100))
    thresholds = matrix.abs().kthvalue(kth, dim=1, keepdim=True).values
    return matrix * (matrix.abs() >= thresholds)


def ref_ties(matrix, k, agg):
    trimmed = ref_topk(matrix, k)
    sign = torch.sign(stacked_sum(trimmed))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    total = stacked_sum(selected)
    if agg == "mean":
        total = total / torch.clamp((selected != 0).sum(0).float(), min=1)
    return total


def ref_tall(flat_pt, flat_ft, merged, lam):
    return (flat_pt - flat_ft).abs() > ((flat_pt + merged) - flat_ft).abs() * lam


# ------------------------------------------------------------------------------------------------
# a tiny model with the awkward cases: tied magnitudes, a frozen (zero) task vector entry,
# sign conflicts, a 0-dim tensor, an integer buffer


def make_states(num_tasks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    pt = {
        "a.weight": torch.randn(5, 7, generator=g),
        "a.bias": torch.randn(7, generator=g),
        "b.scale": torch.randn((), generator=g),
        "c.frozen": torch.randn(3, 3, generator=g),
        "d.weight": torch.randn(11, 3, generator=g),
        "buf.count": torch.tensor([3, 1, 4], dtype=torch.int64),
    }
    fts = []
    for t in range(num_tasks):
        ft = {}
        for key, value in pt.items():
            if not value.dtype.is_floating_point:
                ft[key] = value.clone()
            elif key == "c.frozen":
                ft[key] = value.clone()  # zero task vector
            else:
                delta = torch.randn(value.shape, generator=g) * (0.1 + 0.05 * t)
                # quantize so that many magnitudes tie exactly
                delta = torch.round(delta * 8) / 8
                ft[key] = value + delta
        # explicit sign conflict on one entry
        ft["a.bias"][0] = pt["a.bias"][0] + (0.5 if t % 2 == 0 else -0.5)
        fts.append(ft)
    return pt, fts


@pytest.fixture(params=[1 << 22, 5], ids=["whole", "tiny-blocks"])
def cs_and_refs(request):
    pt, fts = make_states()
    cs = CheckpointSet(pt, fts, names=[f"T{i}" for i in range(len(fts))], block_elems=request.param)
    keys = cs.float_keys
    flat_pt = flat(pt, keys)
    flat_ft = torch.stack([flat(ft, keys) for ft in fts])
    taus = flat_ft - flat_pt
    return cs, keys, flat_pt, flat_ft, taus


def as_flat(vector, keys):
    return torch.cat([vector[k].reshape(-1) for k in keys])


@pytest.mark.parametrize("k", [100, 20, 37.5, 1, 99.9])
def test_task_arithmetic_matches_reference(cs_and_refs, k):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "sum", k=k), keys)
    assert torch.equal(bits(got), bits(stacked_sum(ref_topk(taus, k))))


@pytest.mark.parametrize("k", [20, 100, 50])
@pytest.mark.parametrize("agg", ["mean", "sum"])
def test_ties_matches_reference(cs_and_refs, k, agg):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "ties", k=k, ties_agg=agg), keys)
    assert torch.equal(bits(got), bits(ref_ties(taus, k, agg)))


def many_task_states(num_tasks, seed=0):
    """theta_0 and num_tasks fine-tuned states over 231 floats (the flat vector ends in a 7-entry
    tail that the stacked sum adds in another order); task vectors span six orders of magnitude,
    so that summation order shows in the last bits."""
    g = torch.Generator().manual_seed(seed)
    pt = {"a.weight": torch.randn(5, 37, generator=g), "b.scale": torch.randn((), generator=g), "c.bias": torch.randn(45, generator=g)}
    scales = torch.logspace(-3, 3, num_tasks).tolist() if num_tasks > 1 else [1.0]
    fts = [{k: v + torch.randn(v.shape, generator=g) * scale for k, v in pt.items()} for scale in scales]
    return pt, fts


@pytest.mark.parametrize("block_elems", [1 << 22, 7, 40, 64])
def test_task_sums_equal_the_stacked_sum_for_1_to_20_tasks(block_elems):
    for num_tasks in range(1, 21):
        pt, fts = many_task_states(num_tasks)
        cs = CheckpointSet(pt, fts, block_elems=block_elems)
        taus = torch.stack([flat(ft, cs.float_keys) for ft in fts]) - flat(pt, cs.float_keys)
        for k in (100, 30):
            got = as_flat(merge(cs, "sum", k=k), cs.float_keys)
            assert torch.equal(bits(got), bits(stacked_sum(ref_topk(taus, k)))), (num_tasks, k)
    # the fixture tells the orders apart: task by task differs from the stacked sum at 20 tasks
    assert not torch.equal(bits(seq_sum(taus)), bits(stacked_sum(taus)))


@pytest.mark.parametrize("block_elems", [1 << 22, 7])
def test_ties_equals_the_stacked_reference_for_1_to_20_tasks(block_elems):
    for num_tasks in range(1, 21) if block_elems > 1000 else [1, 5, 17, 18, 20]:
        pt, fts = many_task_states(num_tasks, seed=1)
        cs = CheckpointSet(pt, fts, block_elems=block_elems)
        taus = torch.stack([flat(ft, cs.float_keys) for ft in fts]) - flat(pt, cs.float_keys)
        for agg in ("mean", "sum"):
            got = as_flat(merge(cs, "ties", k=20, ties_agg=agg), cs.float_keys)
            assert torch.equal(bits(got), bits(ref_ties(taus, 20, agg))), (num_tasks, agg)


def test_stacked_sum_order_for_any_width_and_task_count():
    g = torch.Generator().manual_seed(5)
    for num_tasks in [1, 2, 4, 5, 16, 17, 18, 20, 33, 64, 70, 300]:
        for d in [2, 3, 7, 8, 31, 45, 100, 1000]:
            matrix = torch.randn(num_tasks, d, generator=g) * torch.logspace(-4, 4, num_tasks).view(-1, 1)
            matrix[:, ::3] = -0.0
            got = reduction.stacked_sum(list(matrix), tail=reduction.stacked_tail(d))
            assert torch.equal(bits(got), bits(matrix.sum(0))), (num_tasks, d)


@pytest.mark.parametrize("majority", [-1.0, 0.0])
def test_ties_zero_sign_with_negative_or_tied_majority(majority):
    # 'w' entry 0 cancels (+1, -1): its elected sign is the majority sign; 'v' sets the majority
    pt = {"v": torch.zeros(3), "w": torch.zeros(2)}
    v = [-1.0, -1.0, -1.0] if majority < 0 else [1.0, -1.0, 0.0]
    fts = [{"v": torch.tensor(v), "w": torch.tensor([1.0, 2.0])}, {"v": torch.tensor(v), "w": torch.tensor([-1.0, -3.0])}]
    cs = CheckpointSet(pt, fts, block_elems=1)
    got = merge(cs, "ties", k=100, ties_agg="sum")
    assert torch.equal(got["w"], torch.tensor([-1.0, -3.0]))
    keys = cs.float_keys
    taus = torch.stack([flat(ft, keys) for ft in fts])
    assert torch.equal(as_flat(got, keys), ref_ties(taus, 100, "sum"))


def test_ties_zero_sign_takes_majority_sign():
    # entry 0: +1 and -1 cancel -> summed sign 0 -> majority (positive overall) -> keep +1
    pt = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, 2.0, 3.0, -1.0])}, {"w": torch.tensor([-1.0, 1.0, 1.0, 0.0])}]
    cs = CheckpointSet(pt, fts)
    got = merge(cs, "ties", k=100, ties_agg="sum")["w"]
    assert torch.equal(got, torch.tensor([1.0, 3.0, 4.0, -1.0]))


def test_average_and_zeroshot_share_the_sum_vector(cs_and_refs):
    cs, keys, *_ = cs_and_refs
    base = as_flat(merge(cs, "sum"), keys)
    assert torch.equal(as_flat(merge(cs, "average"), keys), base)
    assert torch.equal(as_flat(merge(cs, "zeroshot"), keys), base)
    assert alpha_candidates("average", num_tasks=4) == [0.25]
    assert alpha_candidates("zeroshot") == [0.0]
    assert alpha_candidates("tall_mask") == [1.0]
    assert alpha_candidates("sum", 21) == pytest.approx([i / 10 for i in range(1, 11)])
    assert alpha_candidates("sum", 21, specify_lambda=0.3) == [0.3]
    assert alpha_candidates("sum", 21, specify_lambda="None") == alpha_grid(21)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.45, 1.0])
@pytest.mark.parametrize("use_ties", [False, True])
def test_tall_mask_matches_reference(cs_and_refs, lam, use_ties):
    cs, keys, flat_pt, flat_ft, taus = cs_and_refs
    vector = merge(cs, "tall_mask", use_ties=use_ties)
    merged = as_flat(vector, keys)
    expected_merged = ref_ties(taus, 20, "sum") if use_ties else stacked_sum(taus)
    assert torch.equal(merged, expected_merged)
    packed = tall_masks(cs, vector, lam)
    for t in range(cs.num_tasks):
        expected = ref_tall(flat_pt, flat_ft[t], merged, lam)
        assert torch.equal(as_flat(tall_mask(cs, t, vector, lam), keys), expected)
        assert torch.equal(packed.flat(cs.names[t]), expected)
        # same layout as the released masks: np.packbits of the flat vector in sorted key order
        assert np.array_equal(packed.packed[cs.names[t]], np.packbits(expected.numpy()))


def test_tall_mask_lambda_zero_selects_exactly_the_changed_entries(cs_and_refs):
    cs, keys, flat_pt, flat_ft, _ = cs_and_refs
    vector = merge(cs, "tall_mask")
    for t in range(cs.num_tasks):
        mask = as_flat(tall_mask(cs, t, vector, 0.0), keys)
        assert torch.equal(mask, flat_ft[t] != flat_pt)
    frozen = tall_mask(cs, 0, vector, 0.0)["c.frozen"]
    assert not frozen.any()


def test_per_task_lambdas(cs_and_refs):
    cs, keys, flat_pt, flat_ft, taus = cs_and_refs
    vector = merge(cs, "tall_mask")
    lambdas = [0.2, 0.3, 0.5, 0.6]
    masks = tall_masks(cs, vector, lambdas)
    for t, lam in enumerate(lambdas):
        assert torch.equal(masks.flat(cs.names[t]), ref_tall(flat_pt, flat_ft[t], as_flat(vector, keys), lam))
    with pytest.raises(ConfigError, match="tall_mask_lambda"):
        tall_masks(cs, vector, [0.2, 0.3])


@pytest.mark.parametrize("prun", [0, 1, 2, 3, 4, 5])
def test_consensus_matches_reference(cs_and_refs, prun):
    cs, keys, flat_pt, flat_ft, taus = cs_and_refs
    vector = merge(cs, "tall_mask")
    masks = tall_masks(cs, vector, 0.4)
    if prun > cs.num_tasks:  # every weight would be dropped: refused, not an all-zero vector
        with pytest.raises(ConfigError, match=f"prun_thre_k={prun} is more than the {cs.num_tasks} tasks"):
            merge(cs, "consensus", masks=masks, prun_thre_k=prun)
        return
    got = as_flat(merge(cs, "consensus", masks=masks, prun_thre_k=prun), keys)
    counts = sum(ref_tall(flat_pt, flat_ft[t], stacked_sum(taus), 0.4).float() for t in range(cs.num_tasks))
    assert torch.equal(got, stacked_sum(taus) * (counts >= prun))
    if prun == 0:
        assert torch.equal(got, as_flat(merge(cs, "sum"), keys))


def test_consensus_with_ties_base(cs_and_refs):
    cs, keys, *_ = cs_and_refs
    ties_vector = merge(cs, "tall_mask", use_ties=True)
    masks = tall_masks(cs, ties_vector, 0.3)
    got = as_flat(merge(cs, "consensus", masks=masks, prun_thre_k=0, use_ties=True), keys)
    assert torch.equal(got, as_flat(ties_vector, keys))


def test_magnitude_masking(cs_and_refs):
    cs, keys, _, _, taus = cs_and_refs
    vector = merge(cs, "mag_masking", k=10)
    assert torch.equal(as_flat(vector, keys), stacked_sum(taus))
    masks = magnitude_masks(cs, k=10)
    expected = ref_topk(taus, 10) != 0
    d = taus.shape[1]
    kth = d - int(d * 0.1)
    for t in range(cs.num_tasks):
        threshold = taus[t].abs().kthvalue(kth).values
        assert torch.equal(masks.flat(cs.names[t]), taus[t].abs() >= threshold)
        assert torch.equal(masks.flat(cs.names[t]) & (taus[t] != 0), expected[t])


def test_kth_selection_is_exact_with_ties_zeros_and_subnormals():
    g = torch.Generator().manual_seed(3)
    values = torch.cat(
        [
            torch.zeros(50),
            torch.full((30,), 0.125),
            -torch.full((30,), 0.125),
            torch.randn(200, generator=g),
            torch.tensor([1e-40, -1e-39, 3e38, -0.0]),
        ]
    )
    parts = [values[:17], values[17:200], values[200:]]
    for rank in [1, 2, 50, 51, 80, 81, 110, 111, 200, values.numel()]:
        expected = values.abs().kthvalue(rank).values.item()
        assert kth_smallest_magnitude(parts, rank) == expected


def _window_states(num_tasks=3, seed=5):
    """A model with large, small, zero-vector and heavily quantized tensors (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    pt = {
        "big.weight": torch.randn(300, 40, generator=g),
        "big.bias": torch.randn(40, generator=g),
        "frozen.weight": torch.randn(64, 8, generator=g),
        "scale": torch.randn((), generator=g),
        "wide.weight": torch.randn(2, 5000, generator=g),
    }
    fts = []
    for t in range(num_tasks):
        ft = {}
        for key, value in pt.items():
            delta = torch.randn(value.shape, generator=g) * (0.01 * (t + 1))
            if key == "frozen.weight":
                delta = torch.zeros_like(value)
            elif t == 1:
                delta = torch.round(delta * 300) / 300  # ties: many equal magnitudes
            ft[key] = value + delta
        fts.append(ft)
    return pt, fts


@pytest.mark.parametrize("k", [20, 10, 50, 99.99, 0.01])
def test_one_pass_thresholds_equal_kthvalue_and_take_one_pass(k):
    from tallmasks.masks import topk_thresholds

    pt, fts = _window_states()
    keys = sorted(pt)
    taus = torch.stack([flat(ft, keys) - flat(pt, keys) for ft in fts])
    d = taus.shape[1]
    rank = d - int(d * (k / 100))
    expected = [taus[t].abs().kthvalue(rank).values.item() for t in range(len(fts))]
    cs = CheckpointSet(pt, fts, block_elems=1000)
    passes = cs.passes
    assert topk_thresholds(cs, k, window=True) == expected
    assert cs.passes - passes == 1  # the windows held every threshold
    assert topk_thresholds(CheckpointSet(pt, fts, block_elems=1000), k, window=False) == expected


def test_one_pass_thresholds_fall_back_exactly_where_a_window_misses(monkeypatch):
    from tallmasks import masks as masks_module
    from tallmasks.masks import topk_thresholds

    pt, fts = _window_states()
    keys = sorted(pt)
    taus = torch.stack([flat(ft, keys) - flat(pt, keys) for ft in fts])
    d = taus.shape[1]
    rank = d - int(d * 0.2)
    expected = [taus[t].abs().kthvalue(rank).values.item() for t in range(len(fts))]
    real = masks_module.sample_window
    calls = []

    def misplaced(sample, fraction, slack):  # the second task's window lies above its threshold
        calls.append(1)
        lo, hi = real(sample, fraction, slack)
        return (hi, 2 * hi + 1) if len(calls) == 2 else (lo, hi)

    monkeypatch.setattr(masks_module, "sample_window", misplaced)
    cs = CheckpointSet(pt, fts, block_elems=1000)
    passes = cs.passes
    assert topk_thresholds(cs, 20, window=True) == expected
    assert cs.passes - passes == 3  # one windowed pass, then two histogram passes for that task alone


def test_windowed_selection_cases():
    from tallmasks.algebra.topk import KthInWindows, sample_window

    values = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 2.0, 3.0, 3.0, 4.0])
    for rank in range(1, 11):
        expected = values.kthvalue(rank).values.item()
        for window in [(-1.0, 5.0), (0.0, 0.5), (0.5, 3.0), (0.5, 0.5), (1.0, 2.0), (3.0, 4.0)]:
            selector = KthInWindows([rank], [window], cap=100)
            assert selector.add(-values.view(1, -1).clone()) is True
            got = selector.values()[0]
            lo, hi = window
            below = int((values < lo).sum())
            shown = below < rank <= int((values <= hi).sum())
            assert got == (expected if shown else None), (rank, window)
    selector = KthInWindows([5], [(-1.0, 5.0)], cap=3)  # keeps more than its cap: falls back
    selector.add(values.view(1, -1).clone())
    assert selector.values() == [None]
    selector = KthInWindows([5], [(-1.0, 5.0)], cap=100)
    assert selector.add(torch.tensor([[1.0, float("nan")]])) is False
    lo, hi = sample_window(torch.arange(1000.0), 0.5, 0.01)
    assert lo < 500 <= hi and hi - lo < 40
    assert sample_window(torch.arange(10.0), 0.999, 0.01)[1] == torch.finfo(torch.float32).max
    assert sample_window(torch.arange(10.0), 0.001, 0.01)[0] == -1.0


def test_integer_buffers_pass_through_and_dtypes_are_kept():
    pt, fts = make_states(2)
    half_pt = {k: (v.half() if v.dtype.is_floating_point else v) for k, v in pt.items()}
    half_fts = [{k: (v.half() if v.dtype.is_floating_point else v) for k, v in ft.items()} for ft in fts]
    cs = CheckpointSet(half_pt, half_fts)
    assert "buf.count" not in cs.float_keys
    vector = merge(cs, "sum")
    assert all(v.dtype == torch.float32 for v in vector.values())
    model = apply_vector(half_pt, vector, alpha=0.5)
    assert model["buf.count"] is half_pt["buf.count"]
    assert model["a.weight"].dtype == torch.float16
    expected = (half_pt["a.weight"].float() + 0.5 * vector["a.weight"]).half()
    assert torch.equal(model["a.weight"], expected)


def test_task_vector_algebra():
    pt, fts = make_states(2)
    tv0 = TaskVector.from_checkpoints(pt, fts[0])
    tv1 = TaskVector.from_checkpoints(pt, fts[1])
    assert set(tv0.vector) == {"a.weight", "a.bias", "b.scale", "c.frozen", "d.weight"}
    both = tv0 + tv1
    assert torch.equal(both["a.weight"], tv0["a.weight"] + tv1["a.weight"])
    assert torch.equal((both - tv1)["d.weight"], both["d.weight"] - tv1["d.weight"])
    assert torch.equal((2 * tv0)["a.bias"], tv0["a.bias"] * 2)
    assert sum([tv0, tv1])["b.scale"] == both["b.scale"]
    assert tv0.norm() == pytest.approx(np.sqrt(tv0.dot(tv0)))
    mask = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in tv0.vector.items()}
    assert all(not v.any() for v in tv0.masked(mask).vector.values())
    rebuilt = tv0.apply_to(pt)
    assert torch.allclose(rebuilt["a.weight"], fts[0]["a.weight"])
    assert torch.equal(rebuilt["buf.count"], pt["buf.count"])


def test_maskset_roundtrip_and_agreement(tmp_path, cs_and_refs):
    cs, keys, flat_pt, flat_ft, taus = cs_and_refs
    vector = merge(cs, "tall_mask")
    masks = tall_masks(cs, vector, 0.4)
    path = tmp_path / "m.safetensors"
    masks.save(path)
    loaded = MaskSet.load(path)
    assert loaded.names == masks.names and loaded.layout == masks.layout
    for name in masks.names:
        assert np.array_equal(loaded.packed[name], masks.packed[name])
        assert set(loaded.get(name)) == set(keys)
    counts = sum(masks.flat(n).long() for n in masks.names)
    expected = torch.bincount(counts, minlength=cs.num_tasks + 1).tolist()
    assert masks.agreement() == expected
    assert sum(expected) == cs.num_float_params
    # from_dicts agrees with the streamed packer
    again = MaskSet.from_dicts({n: masks.get(n) for n in masks.names}, Layout.of(cs))
    assert all(np.array_equal(again.packed[n], masks.packed[n]) for n in masks.names)
    assert consensus_mask(masks, 1)["c.frozen"].sum() == 0


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_are_named():
    pt, fts = make_states(2)
    bad = dict(fts[0])
    del bad["a.bias"]
    with pytest.raises(CheckpointError, match="missing key 'a.bias'"):
        CheckpointSet(pt, [bad, fts[1]])
    bad = dict(fts[0], extra=torch.zeros(1))
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        CheckpointSet(pt, [bad])
    bad = dict(fts[0], **{"a.bias": torch.zeros(8)})
    with pytest.raises(CheckpointError, match="shape mismatch for 'a.bias'"):
        CheckpointSet(pt, [bad])
    bad = dict(fts[0], **{"a.bias": fts[0]["a.bias"].double()})
    with pytest.raises(CheckpointError, match="dtype mismatch for 'a.bias'"):
        CheckpointSet(pt, [bad])
    bad = {k: v.clone() for k, v in fts[0].items()}
    bad["d.weight"][2, 1] = float("nan")
    with pytest.raises(CheckpointError, match="'d.weight' contains NaN or Inf"):
        merge(CheckpointSet(pt, [bad]), "sum")
    cs = CheckpointSet(pt, fts)
    for k in [0, -5, 101, "abc"]:
        with pytest.raises(ConfigError, match="k must be"):
            merge(cs, "ties", k=k)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        merge(cs, "nope")
    with pytest.raises(ConfigError, match="no hyperparameter 'kk'"):
        merge(cs, "sum", kk=3)
    with pytest.raises(ConfigError, match="tall_mask_lambda"):
        tall_mask(cs, 0, merge(cs, "sum"), -0.1)
    with pytest.raises(ConfigError, match="prun_thre_k"):
        merge(cs, "consensus", masks=tall_masks(cs, merge(cs, "sum"), 0.4), prun_thre_k=-1)
    with pytest.raises(ConfigError, match="TALL masks"):
        merge(cs, "consensus")
    with pytest.raises(ConfigError, match="ties_agg"):
        merge(cs, "ties", ties_agg="max")


@pytest.mark.parametrize("block_elems", [1 << 22, 4])
def test_nan_and_inf_are_named_whichever_pass_meets_them(block_elems):
    pt, fts = make_states(3)
    cases = [("sum", {}, 1, "d.weight"), ("ties", {"k": 20}, 2, "a.bias"), ("ties", {"k": 100}, 0, "b.scale")]
    for method, params, culprit, key in cases:
        states = [{k: v.clone() for k, v in ft.items()} for ft in fts]
        base = {k: v.clone() for k, v in pt.items()}
        target = base if culprit == 0 else states[culprit - 1]
        target[key].view(-1)[-1] = float("inf") if culprit % 2 else float("nan")
        labels = ["theta0", "ft1", "ft2", "ft3"]
        cs = CheckpointSet(base, states, block_elems=block_elems)
        cs.pretrained_label, cs.finetuned_labels = labels[0], labels[1:]
        with pytest.raises(CheckpointError, match=f"^{labels[culprit]}: tensor '{key}' contains NaN or Inf$"):
            merge(cs, method, **params)
    # a pass that computes nothing showing NaN/Inf (TALL masks from a given vector) checks the inputs itself
    states = [{k: v.clone() for k, v in ft.items()} for ft in fts]
    states[2]["a.weight"][0, 0] = float("nan")
    cs = CheckpointSet(pt, states, block_elems=block_elems)
    vector = {k: torch.zeros(cs.shapes[k]) for k in cs.float_keys}
    with pytest.raises(CheckpointError, match="'a.weight' contains NaN or Inf"):
        tall_masks(cs, vector, 0.4)


def test_merges_from_files_equal_merges_in_memory(tmp_path):
    # .pt inputs are memory-mapped, their pages mapped ahead and released after each tensor, every pass
    from safetensors.torch import save_file

    pt, fts = make_states(3)
    torch.save(pt, tmp_path / "pt.pt")
    paths = []
    for i, ft in enumerate(fts):
        path = tmp_path / (f"ft{i}.safetensors" if i == 2 else f"ft{i}.pt")
        if i == 2:
            save_file({k: v.contiguous() for k, v in ft.items()}, str(path))
        else:
            torch.save(ft, path)
        paths.append(path)
    on_disk = CheckpointSet(tmp_path / "pt.pt", paths, block_elems=5)
    in_memory = CheckpointSet(pt, fts, block_elems=5)
    for _ in range(2):
        for method, params in [("ties", {"k": 20}), ("sum", {"k": 30}), ("sum", {})]:
            got = as_flat(merge(on_disk, method, **params), on_disk.float_keys)
            assert torch.equal(bits(got), bits(as_flat(merge(in_memory, method, **params), in_memory.float_keys)))
    assert torch.equal(on_disk.pretrained["a.weight"], pt["a.weight"])  # released pages read back intact


def test_one_thread_and_several_give_the_same_bits():
    # several torch threads: blocks go to worker threads; one thread: the blocks are walked in turn
    pt, fts = many_task_states(18, seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            cs = CheckpointSet(pt, fts, block_elems=16)
            vectors = [merge(cs, "ties", k=20), merge(cs, "sum", k=50), merge(cs, "mag_masking")]
            masks = tall_masks(cs, vectors[1], 0.3)
            results.append(([bits(as_flat(v, cs.float_keys)) for v in vectors], [masks.packed[n] for n in cs.names]))
            assert torch.get_num_threads() == count  # restored after the walks
    finally:
        torch.set_num_threads(threads)
    (one, one_masks), (many, many_masks) = results
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    assert all(np.array_equal(a, b) for a, b in zip(one_masks, many_masks))


def test_overflow_from_finite_inputs_is_not_an_input_error():
    pt = {"w": torch.tensor([-3e38, 1.0])}
    fts = [{"w": torch.tensor([3e38, 2.0])}]
    got = merge(CheckpointSet(pt, fts), "sum")["w"]
    assert torch.isinf(got[0]) and got[1] == 1.0


def test_registry_lists_every_paper_method():
    assert {"zeroshot", "average", "sum", "ties", "tall_mask", "consensus", "mag_masking"} <= set(METHODS)
    assert METHODS["ties"].defaults["k"] == 20
    assert METHODS["mag_masking"].defaults["k"] == 10
    assert METHODS["consensus"].defaults["prun_thre_k"] == 2
