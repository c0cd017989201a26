"""LiNeS, TSV-M, Iso-C, Iso-CTS, EMR-merging and DARE against plain whole-vector implementations of their
formulas, on a tiny model with residual blocks, layer matrices, tied magnitudes and zero task vectors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_merging import ref_ties, ref_topk, seq_sum

from tallmasks.algebra.coefficients import ScaledVector
from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
from tallmasks.core.errors import ConfigError
from tallmasks.masks import tall_masks
from tallmasks.merging import METHODS, alpha_candidates, merge
from tallmasks.merging.methods.emr import emr_masks
from tallmasks.merging.methods.lines import block_depth, infer_num_blocks

# ------------------------------------------------------------------------------------------------
# a tiny model: three residual blocks, matrices of both orientations, a conv kernel, text_projection,
# a frozen matrix (zero task vector for every task), a matrix only some tasks change, a 0-dim tensor,
# an integer buffer; updates quantized so that magnitudes tie and sums cancel


def make_states(num_tasks: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "m.blocks.0.attn.weight": (6, 4),
        "m.blocks.0.ln.bias": (4,),
        "m.blocks.1.mlp.weight": (4, 7),
        "m.blocks.2.mlp.weight": (5, 3),
        "m.conv.weight": (2, 3, 2, 2),
        "m.text_projection": (4, 3),
        "m.frozen": (3, 3),
        "m.partly": (4, 4),
        "m.scale": (),
    }
    # quantized, so that theta_t - theta_0 is exact and magnitudes tie exactly
    pt = {key: torch.round(torch.randn(shape, generator=g) * 4) / 4 for key, shape in shapes.items()}
    pt["m.count"] = torch.tensor([3, 1], dtype=torch.int64)
    fts = []
    for t in range(num_tasks):
        ft = {}
        for key, value in pt.items():
            if not value.dtype.is_floating_point or key == "m.frozen" or (key == "m.partly" and t == 0):
                ft[key] = value.clone()
                continue
            delta = torch.round(torch.randn(value.shape, generator=g) * (0.2 + 0.1 * t) * 8) / 8
            ft[key] = value + delta
        # an exact sign conflict: task 0 and task 1 cancel on one entry
        ft["m.blocks.0.ln.bias"][0] = pt["m.blocks.0.ln.bias"][0] + (0.5 if t == 0 else -0.5 if t == 1 else 0.0)
        fts.append(ft)
    return pt, fts


@pytest.fixture(params=[1 << 22, 5], ids=["whole", "tiny-blocks"])
def setup(request):
    pt, fts = make_states()
    cs = CheckpointSet(pt, fts, names=["A", "B", "C"], block_elems=request.param)
    taus = {key: torch.stack([ft[key].float() - pt[key].float() for ft in fts]) for key in cs.float_keys}
    return cs, pt, fts, taus


def flat(vector, keys):
    return torch.cat([vector[key].reshape(-1) for key in keys])


def stacked(taus, keys):
    """The (tasks x parameters) matrix of the whole-vector formulas."""
    return torch.cat([taus[key].reshape(taus[key].shape[0], -1) for key in keys], dim=1)


def is_matrix(key, value):
    return value.dim() == 3 and "text_projection" not in key  # stacked: tasks x rows x cols


def mean_of(rows):
    mean = rows[0].clone()
    for i in range(1, rows.shape[0]):
        mean += (rows[i] - mean) / (i + 1)
    return mean


def polar(matrix):
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


# ------------------------------------------------------------------------------------------------
# LiNeS


@pytest.mark.parametrize("base_method,k", [("sum", None), ("sum", 50), ("ties", None), ("consensus", None)])
def test_lines_matches_reference(setup, base_method, k):
    cs, pt, _, taus = setup
    keys = cs.float_keys
    matrix = stacked(taus, keys)
    masks = tall_masks(cs, merge(cs, "sum"), 0.4) if base_method == "consensus" else None
    params = {"base_method": base_method, "k": k}
    if masks is not None:
        params["masks"] = masks
    vector = merge(cs, "lines", **params)
    assert isinstance(vector, ScaledVector)
    # the base vector and the summed task vectors of the reference
    if base_method == "sum":
        merged = seq_sum(ref_topk(matrix, k or 100))
        summed = merged
    elif base_method == "ties":
        merged = ref_ties(matrix, 20, "mean")
        summed = seq_sum(matrix)
    else:
        merged = flat(merge(cs, "consensus", masks=masks), keys)
        summed = seq_sum(matrix)
    assert torch.equal(flat(vector, keys), merged)
    alpha = (float(summed.double().abs().sum()) / float(merged.double().abs().sum())) / cs.num_tasks
    if base_method == "sum":
        assert vector.info["lines_alpha"] == 1 / cs.num_tasks  # ||sum||_1 / ||tau_MTL||_1 = 1 exactly for TA
    assert vector.info["lines_alpha"] == pytest.approx(alpha, rel=1e-12)
    assert vector.info["num_blocks"] == 3
    beta = 0.3
    model = apply_vector(pt, vector, alpha=beta)
    depth = {"m.blocks.0.attn.weight": 0, "m.blocks.0.ln.bias": 0, "m.blocks.1.mlp.weight": 1, "m.blocks.2.mlp.weight": 2}
    offset = 0
    for key in keys:
        n = pt[key].numel()
        scale = vector.info["lines_alpha"] + beta * (depth[key] / 2 if key in depth else 0.0)
        expected = (pt[key].float() + scale * merged[offset : offset + n].reshape(pt[key].shape)).to(pt[key].dtype)
        assert torch.equal(model[key], expected), key
        offset += n
    assert torch.equal(model["m.count"], pt["m.count"])


def test_lines_blocks_and_grid():
    keys = [
        "model.visual.transformer.resblocks.0.ln_1.weight",
        "model.visual.transformer.resblocks.11.mlp.c_fc.weight",
        "model.visual.transformer.resblocks.1.attn.in_proj_weight",
        "model.visual.conv1.weight",
        "a.3.b.1.c",
    ]
    assert infer_num_blocks(keys) == 12
    assert [block_depth(k, 12) for k in keys] == [0, 11, 1, None, 1]  # the smallest index written .<i>. , as the reference
    assert infer_num_blocks(["w", "b"]) == 1
    assert alpha_candidates("lines", 21, params={"base_method": "ties"}) == pytest.approx([i / 10 for i in range(1, 16)])
    assert alpha_candidates("lines", 21) == pytest.approx([i / 10 for i in range(1, 11)])
    assert METHODS["lines"].needs_masks({"base_method": "consensus"}) and not METHODS["lines"].needs_masks({})


def test_lines_evaluator_applies_per_layer_coefficients(setup):
    """The runner's in-place weights equal apply_vector's theta_0 + (alpha + beta * depth) * tau."""
    from tallmasks.eval.evaluator import Evaluator

    cs, pt, _, _ = setup

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for key, value in pt.items():
                self.register_buffer(key.replace(".", "_"), value.clone())

        def state_dict(self, *args, **kwargs):
            return {key: getattr(self, key.replace(".", "_")) for key in pt}

    vector = merge(cs, "lines", base_method="ties")
    evaluator = Evaluator(Tiny(), pt)
    evaluator.load_vector(vector)
    evaluator.set_weights(0.7)
    expected = apply_vector(pt, vector, alpha=0.7)
    for key in cs.float_keys:
        assert torch.equal(evaluator.targets[key], expected[key]), key


# ------------------------------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS (per-key whole-tensor formulas, the references' steps)


def per_layer(taus, matrix_formula):
    """The formula on every layer matrix, the running mean of the task vectors elsewhere."""
    return {key: matrix_formula(value) if is_matrix(key, value) else mean_of(value) for key, value in taus.items()}


def ref_tsv_layer(value):
    num_tasks, rows, cols = value.shape
    rank = min(rows, cols)
    kept = int(rank * (1 / num_tasks))
    sum_u, sum_s, sum_v = torch.zeros(rows, rank), torch.zeros(rank), torch.zeros(rank, cols)
    for t in range(num_tasks):
        u, s, vh = torch.linalg.svd(value[t], full_matrices=False)
        sum_u[:, t * kept : (t + 1) * kept] = u[:, :kept]
        sum_s[t * kept : (t + 1) * kept] = s[:kept]
        sum_v[t * kept : (t + 1) * kept] = vh[:kept]
    return polar(sum_u) @ torch.diag(sum_s) @ polar(sum_v)


def ref_iso_c(taus):
    out = {}
    for key, value in taus.items():
        total = seq_sum(value)
        if not is_matrix(key, value):
            out[key] = total / value.shape[0]
            continue
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        out[key] = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
    return out


def ref_iso_cts_layer(value, fraction):
    num_tasks = value.shape[0]
    rank = min(value.shape[1:])
    common = int(rank * fraction)
    common = rank - round((rank - common) / num_tasks) * num_tasks
    per_task = (rank - common) // num_tasks
    u, s, vh = torch.linalg.svd(seq_sum(value), full_matrices=False)
    projector = u[:, :common] @ u[:, :common].T  # the reference's (U U^T) w
    us, ss, vs = [], [], []
    for t in range(num_tasks):
        ut, st, vht = torch.linalg.svd(value[t] - projector @ value[t], full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vs.append(vht[:per_task])
    basis_u = torch.cat([*us, u[:, :common]], dim=1)
    values = torch.cat([*ss, s[:common]])
    basis_v = torch.cat([*vs, vh[:common]], dim=0)
    return polar(basis_u) @ torch.diag(torch.full_like(values, float(values.mean()))) @ polar(basis_v)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_spectral_methods_match_reference(setup, method):
    cs, _, _, taus = setup
    got = merge(cs, method)
    if method == "iso_c":
        expected = ref_iso_c(taus)
    else:
        expected = per_layer(taus, ref_tsv_layer if method == "tsv" else lambda value: ref_iso_cts_layer(value, 0.8))
    assert set(got) == set(cs.float_keys)
    for key in cs.float_keys:
        assert got[key].shape == taus[key].shape[1:] and got[key].dtype == torch.float32
        assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), key
    assert not got["m.frozen"].any()  # no task changed it: exactly zero
    assert alpha_candidates(method, 21) == pytest.approx([i / 10 for i in range(1, 31)])  # 0.1 ... 3.0, as the references


def test_iso_cts_fraction_and_tsv_rank_properties(setup):
    cs, _, _, taus = setup
    # fraction 1: only the common space, i.e. Iso-C on every layer matrix
    full = merge(cs, "iso_cts", common_space_fraction=1.0)
    iso_c = merge(cs, "iso_c")
    for key in ["m.blocks.0.attn.weight", "m.blocks.1.mlp.weight", "m.partly"]:
        assert torch.allclose(full[key], iso_c[key], atol=1e-5)
    # TSV-M of one task keeps its whole spectrum: the task vector itself
    single = CheckpointSet(*make_states(1), names=["A"])
    pt1, fts1 = make_states(1)
    got = merge(single, "tsv")
    assert torch.allclose(got["m.blocks.1.mlp.weight"], fts1[0]["m.blocks.1.mlp.weight"] - pt1["m.blocks.1.mlp.weight"], atol=1e-5)
    for bad in [-0.1, 1.5, "x", True]:
        with pytest.raises(ConfigError, match="common_space_fraction"):
            merge(cs, "iso_cts", common_space_fraction=bad)


# ------------------------------------------------------------------------------------------------
# EMR-merging


def ref_emr(matrix):
    sign = torch.sign(seq_sum(matrix))
    magnitude = (matrix.abs() * (matrix * sign > 0)).max(dim=0).values
    unified = sign * magnitude
    masks = matrix * unified > 0
    own = matrix.double().abs().sum(1)
    kept = (unified.double().abs() * masks).sum(1)
    scales = torch.where(kept > 0, own / kept, torch.ones_like(own))
    return unified, masks, scales


def test_emr_matches_reference(setup):
    cs, pt, _, taus = setup
    keys = cs.float_keys
    matrix = stacked(taus, keys)
    vector = merge(cs, "emr")
    unified, masks, scales = ref_emr(matrix)
    assert torch.equal(flat(vector, keys), unified)
    # the cancelling entry (+0.5, -0.5, 0): sign 0, nothing elected, no task keeps it
    offset = sum(pt[k].numel() for k in keys[: keys.index("m.blocks.0.ln.bias")])
    assert unified[offset] == 0 and not masks[:, offset].any()
    packed = emr_masks(cs, vector)
    for t, name in enumerate(cs.names):
        assert torch.equal(packed.flat(name), masks[t])
        assert packed.info["scales"][name] == pytest.approx(float(scales[t]), rel=1e-12)
    # task t's model: theta_0 + lambda_t * (m_t * tau_uni)
    model = apply_vector(pt, vector, alpha=packed.info["scales"]["B"], mask=packed.get("B"))
    n = pt["m.blocks.1.mlp.weight"].numel()
    start = sum(pt[k].numel() for k in keys[: keys.index("m.blocks.1.mlp.weight")])
    expected = pt["m.blocks.1.mlp.weight"] + packed.info["scales"]["B"] * (
        unified[start : start + n] * masks[1, start : start + n]
    ).reshape(4, 7)
    assert torch.equal(model["m.blocks.1.mlp.weight"], expected)


def test_emr_task_with_zero_vector_rebuilds_theta0():
    pt, fts = make_states(2)
    fts.append({k: v.clone() for k, v in pt.items()})  # a task that changed nothing
    cs = CheckpointSet(pt, fts, names=["A", "B", "Z"])
    masks = emr_masks(cs, merge(cs, "emr"))
    assert masks.density("Z") == 0 and masks.info["scales"]["Z"] == 1.0


# ------------------------------------------------------------------------------------------------
# DARE


def dare_keep(cs, p, seed):
    """The reference drop masks: per task and key, one CPU stream seeded from (seed, task name, key)."""
    rows = []
    for name in cs.names:
        parts = []
        for key in cs.float_keys:
            digest = hashlib.sha256(f"{seed}:{name}:{key}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            parts.append(torch.rand(cs.numel(key), generator=g) >= p)
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("base_method,k", [("sum", None), ("sum", 30), ("ties", None)])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_dare_matches_reference(setup, base_method, k, p):
    cs, _, _, taus = setup
    keys = cs.float_keys
    dropped = stacked(taus, keys) * dare_keep(cs, p, 7)
    if p < 1:
        dropped = dropped / (1 - p)
    expected = ref_ties(dropped, 20, "mean") if base_method == "ties" else seq_sum(ref_topk(dropped, k or 100))
    got = flat(merge(cs, "dare", p=p, base_method=base_method, k=k, seed=7), keys)
    assert torch.equal(got, expected)
    if p == 0.0 and base_method == "sum" and k is None:
        assert torch.equal(got, flat(merge(cs, "sum"), keys))


def test_dare_is_reproducible_per_task_and_seed(setup):
    cs, pt, fts, taus = setup
    keys = cs.float_keys
    a = flat(merge(cs, "dare", p=0.5, seed=1), keys)
    assert torch.equal(a, flat(merge(cs, "dare", p=0.5, seed=1), keys))
    assert not torch.equal(a, flat(merge(cs, "dare", p=0.5, seed=2), keys))
    # a task's drops depend on its name, not on the other tasks or their order
    alone = CheckpointSet(pt, [fts[1]], names=["B"])
    reordered = CheckpointSet(pt, [fts[1], fts[0]], names=["B", "A"])
    one = flat(merge(alone, "dare", p=0.5, seed=1, rescale=False), keys)
    two = flat(merge(reordered, "dare", p=0.5, seed=1, rescale=False), keys)
    expected_b = stacked(taus, keys)[1] * dare_keep(cs, 0.5, 1)[1]
    assert torch.equal(one, expected_b)
    assert torch.equal(two - one, stacked(taus, keys)[0] * dare_keep(cs, 0.5, 1)[0])
    assert not flat(merge(cs, "dare", p=1.0), keys).any()
    for bad, message in [({"p": 1.5}, "drop rate"), ({"base_method": "consensus"}, "base_method"), ({"seed": 0.5}, "seed")]:
        with pytest.raises(ConfigError, match=message):
            merge(cs, "dare", **bad)


def test_new_methods_are_registered_with_their_defaults():
    assert {"lines", "tsv", "iso_c", "iso_cts", "emr", "dare"} <= set(METHODS)
    assert METHODS["iso_cts"].defaults["common_space_fraction"] == 0.8
    assert METHODS["dare"].defaults["p"] == 0.9 and METHODS["dare"].defaults["base_method"] == "sum"
    assert METHODS["emr"].task_models is not None and METHODS["emr"].coefficient == "one"
    assert METHODS["lines"].needs_alpha


# ------------------------------------------------------------------------------------------------
# the console command and compression


def test_cli_merge_takes_any_hyperparameter(tmp_path, tiny_checkpoints, capsys):
    from conftest import run_cli

    from tallmasks.cli import main
    from tallmasks.io.checkpoints import load_state_dict

    pt, fts, _ = tiny_checkpoints
    cs = CheckpointSet(pt, fts)
    out = tmp_path / "dare.safetensors"
    res = run_cli(
        "-q",
        "merge",
        "--method",
        "dare",
        "--pretrained",
        pt,
        "--finetuned",
        *fts,
        "--param",
        "p=0.5",
        "--param",
        "base_method=ties",
        "--param",
        "seed=3",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    expected = merge(cs, "dare", p=0.5, base_method="ties", seed=3)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # LiNeS over consensus: TALL masks built as for consensus; the model needs its beta (--alpha)
    out = tmp_path / "lines.pt"
    args = [
        "-q",
        "merge",
        "--method",
        "lines",
        "--pretrained",
        str(pt),
        "--finetuned",
        *map(str, fts),
        "--param",
        "base_method=consensus",
        "--tall-mask-lambda",
        "0.3",
        "--out",
        str(out),
    ]
    assert main(args) == 2 and "pass --alpha" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--alpha", "0.5"]) == 0
    masks = tall_masks(cs, merge(cs, "sum"), 0.3)
    expected = apply_vector(load_state_dict(pt), merge(cs, "lines", base_method="consensus", masks=masks), 0.5)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for bad, message in [
        (["--param", "q=1"], "has no hyperparameter 'q'"),
        (["--param", "p"], "expected NAME=VALUE"),
        (["--param", "p=abc"], "--param p must be a finite number"),
        (["--param", "p=2"], "--param p must be >= 0 and <= 1"),
        (["--param", "base_method=consensus"], "must be one of sum, ties"),
    ]:
        code = main(
            [
                "-q",
                "merge",
                "--method",
                "dare",
                "--pretrained",
                str(pt),
                "--finetuned",
                *map(str, fts),
                *bad,
                "--out",
                str(tmp_path / "bad.pt"),
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad.pt").exists()


def test_compress_stores_emr_masks_and_rescalers(tmp_path, tiny_checkpoints):
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.storage.collection import collection_report, compress, decompress

    pt, fts, _ = tiny_checkpoints
    meta = compress(pt, fts, tmp_path / "emr", masks="emr")
    cs = CheckpointSet(pt, fts)
    vector = merge(cs, "emr")
    masks = emr_masks(cs, vector)
    assert meta["masks"]["kind"] == "emr" and meta["masks"]["scales"] == pytest.approx(masks.info["scales"])
    for name in cs.names:
        expected = apply_vector(load_state_dict(pt), vector, masks.info["scales"][name], masks.get(name))
        model = decompress(tmp_path / "emr", name)
        assert all(torch.equal(model[k], expected[k]) for k in expected), name
    assert collection_report(tmp_path / "emr")["masks"]["scales"] == meta["masks"]["scales"]
