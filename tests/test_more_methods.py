"""Breadcrumbs, MagMax, Model Stock, PCB, CART and WUDI against plain whole-vector implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_merging import as_flat, cs_and_refs, seq_sum  # noqa: F401  (cs_and_refs: a fixture)

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.core.errors import ConfigError
from tallmasks.merging import METHODS, alpha_candidates, merge

# ------------------------------------------------------------------------------------------------
# tiny models: test_merging's (tied magnitudes, a zero task vector, sign conflicts, a 0-dim tensor, an
# integer buffer) and a transformer-shaped one whose attention/MLP matrices CART and WUDI treat as such


def layer_states(num_tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    pt = {
        "blocks.0.attn.in_proj_weight": torch.randn(6, 4, generator=g),
        "blocks.0.attn.in_proj_bias": torch.randn(6, generator=g),
        "blocks.0.mlp.c_fc.weight": torch.randn(8, 4, generator=g),
        "blocks.0.mlp.c_proj.weight": torch.randn(4, 8, generator=g),
        "blocks.0.mlp.frozen.weight": torch.randn(3, 3, generator=g),
        "proj": torch.randn(4, 3, generator=g),
        "scale": torch.randn((), generator=g),
        "steps": torch.tensor([2], dtype=torch.int64),
    }
    fts = []
    for _ in range(num_tasks):
        ft = {}
        for key, value in pt.items():
            if not value.dtype.is_floating_point or "frozen" in key:
                ft[key] = value.clone()
            else:
                ft[key] = value + torch.round(torch.randn(value.shape, generator=g) * 0.3 * 8) / 8
        fts.append(ft)
    fts[0]["blocks.0.mlp.c_fc.weight"] = pt["blocks.0.mlp.c_fc.weight"].clone()  # one task leaves a matrix alone
    return pt, fts


def per_key(taus, cs, key):
    """The (tasks x numel) slice of one key in the stacked flat task vectors."""
    offset = 0
    for k in cs.float_keys:
        n = cs.numel(k)
        if k == key:
            return taus[:, offset : offset + n]
        offset += n
    raise KeyError(key)


# ------------------------------------------------------------------------------------------------
# MagMax


def ref_magmax(taus):
    magnitude = taus.abs()
    is_max = magnitude == magnitude.max(0).values
    last = taus.shape[0] - 1 - torch.flip(is_max, [0]).float().argmax(0)
    return taus[last, torch.arange(taus.shape[1])]


def test_magmax_matches_reference(cs_and_refs):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "magmax"), keys)
    assert torch.equal(got, ref_magmax(taus))


def test_magmax_ties_go_to_the_later_task():
    pt = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -2.0, 0.0])}, {"w": torch.tensor([-1.0, 2.0, 0.0])}, {"w": torch.tensor([0.5, 1.0, 0.0])}]
    assert torch.equal(merge(CheckpointSet(pt, fts), "magmax")["w"], torch.tensor([-1.0, 2.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# Model Breadcrumbs


def ref_breadcrumbs(cs, taus, beta, gamma):
    out = []
    for key in cs.float_keys:
        rows = per_key(taus, cs, key)
        if len(cs.shapes[key]) == 0:
            out.append(seq_sum(list(rows)))
            continue
        n = rows.shape[1]
        ordered = rows.abs().sort(dim=1).values
        keep = rows.abs() >= ordered[:, int(n * beta)].unsqueeze(1)
        if int(n * gamma) < n:
            keep &= rows.abs() < ordered[:, int(n * gamma)].unsqueeze(1)
        out.append(seq_sum(list(rows * keep)))
    return torch.cat(out)


@pytest.mark.parametrize("beta,gamma", [(0.85, 0.993), (0.0, 1.0), (0.3, 0.7), (0.5, 0.6)])
def test_breadcrumbs_matches_reference(cs_and_refs, beta, gamma):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "breadcrumbs", beta=beta, gamma=gamma), keys)
    assert torch.equal(got, ref_breadcrumbs(cs, taus, beta, gamma))
    assert alpha_candidates("breadcrumbs", 21) == pytest.approx([i / 10 for i in range(1, 11)])


def test_breadcrumbs_drops_outliers_and_small_entries():
    pt = {"w": torch.zeros(10)}
    fts = [{"w": torch.arange(1.0, 11.0)}]
    got = merge(CheckpointSet(pt, fts), "breadcrumbs", beta=0.2, gamma=0.9)["w"]
    assert torch.equal(got, torch.tensor([0, 0, 3, 4, 5, 6, 7, 8, 9, 0.0]))


@pytest.mark.parametrize("params", [{"beta": 0.9, "gamma": 0.9}, {"beta": -0.1}, {"gamma": 1.5}, {"beta": "x"}])
def test_breadcrumbs_refuses_bad_cuts(cs_and_refs, params):
    with pytest.raises(ConfigError, match="beta|gamma"):
        merge(cs_and_refs[0], "breadcrumbs", **params)


# ------------------------------------------------------------------------------------------------
# Model Stock


def ref_model_stock(cs, taus):
    out = []
    count = taus.shape[0]
    for key in cs.float_keys:
        rows = per_key(taus, cs, key).double().numpy()
        angles = []
        for i in range(count):
            for j in range(i + 1, count):
                norms = math.sqrt(float(rows[i] @ rows[i]) * float(rows[j] @ rows[j]))
                cos = float(np.clip(rows[i] @ rows[j] / (norms + 1e-8), -1, 1))
                angles.append(np.degrees(np.arccos(cos)))
        cos = np.cos(np.radians(np.mean(angles)))
        ratio = count * cos / ((count - 1) * cos + 1 + 1e-8)
        out.append(torch.from_numpy(rows.mean(0) * ratio).float())
    return torch.cat(out)


def test_model_stock_matches_reference(cs_and_refs):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "model_stock"), keys)
    assert torch.allclose(got, ref_model_stock(cs, taus), atol=1e-6, rtol=1e-5)
    assert alpha_candidates("model_stock") == [1.0]


def test_model_stock_ratio_of_identical_and_orthogonal_task_vectors():
    pt = {"same": torch.zeros(2), "orth": torch.zeros(2)}
    fts = [
        {"same": torch.tensor([1.0, 1.0]), "orth": torch.tensor([1.0, 0.0])},
        {"same": torch.tensor([1.0, 1.0]), "orth": torch.tensor([0.0, 1.0])},
    ]
    got = merge(CheckpointSet(pt, fts), "model_stock")
    assert torch.allclose(got["same"], torch.tensor([1.0, 1.0]), atol=1e-6)  # t = 1: the average
    assert torch.allclose(got["orth"], torch.zeros(2), atol=1e-6)  # t = 0: the pre-trained model
    with pytest.raises(ConfigError, match="at least 2"):
        merge(CheckpointSet(pt, fts[:1]), "model_stock")


# ------------------------------------------------------------------------------------------------
# PCB-merging


def ref_pcb(taus, ratio, clamp_ratio=1e-4):
    count, d = taus.shape

    def clamp_rows(x, low_ratio, high_ratio):
        ordered = x.sort(dim=1).values
        return torch.clamp(x, ordered[:, int(d * low_ratio)].unsqueeze(1), ordered[:, int(d * (1 - high_ratio) - 1)].unsqueeze(1))

    def minmax(x):
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return torch.where(high > low, (x - low) / (high - low), torch.zeros_like(x))

    magnitude = clamp_rows(taus.abs(), clamp_ratio, clamp_ratio)
    scores = torch.exp(count * minmax(magnitude) ** 2) * torch.tanh(taus * seq_sum(list(taus)))
    scale = minmax(clamp_rows(scores, 1 - ratio, 0))
    weighted = seq_sum(list(torch.sign(taus) * magnitude * scale))
    return weighted / torch.clamp(seq_sum(list(scale)), min=1e-12)


@pytest.mark.parametrize("ratio", [0.1, 0.05, 0.5, 1.0])
def test_pcb_matches_reference(cs_and_refs, ratio):
    cs, keys, _, _, taus = cs_and_refs
    got = as_flat(merge(cs, "pcb", pcb_ratio=ratio), keys)
    assert torch.allclose(got, ref_pcb(taus, ratio), atol=1e-6, rtol=1e-5)
    with pytest.raises(ConfigError, match="pcb_ratio"):
        merge(cs, "pcb", pcb_ratio=0)


def test_pcb_of_one_repeated_task_is_that_task_clamped():
    g = torch.Generator().manual_seed(3)
    pt = {"w": torch.zeros(4000)}
    tau = torch.randn(4000, generator=g)
    got = merge(CheckpointSet(pt, [{"w": tau}, {"w": tau.clone()}]), "pcb", pcb_ratio=1.0)["w"]
    ordered = tau.abs().sort().values
    clamped = torch.sign(tau) * torch.clamp(tau.abs(), ordered[0], ordered[3998])
    kept = got != 0
    assert torch.allclose(got[kept], clamped[kept], atol=1e-6) and kept.sum() >= 3990


# ------------------------------------------------------------------------------------------------
# CART and WUDI (per layer matrix)


@pytest.fixture(params=[1 << 22, 5], ids=["whole", "tiny-blocks"])
def layer_setup(request):
    pt, fts = layer_states()
    cs = CheckpointSet(pt, fts, block_elems=request.param)
    return cs, pt, fts


def layer_taus(cs, pt, fts, key):
    return [(ft[key] - pt[key]).float() for ft in fts]


def ref_cart(cs, pt, fts, rank_ratio, prior):
    out = {}
    for key in cs.float_keys:
        taus = layer_taus(cs, pt, fts, key)
        mean = seq_sum(taus) / len(taus)
        centred = [tau - mean for tau in taus]
        if key.endswith("weight") and ("attn" in key or "mlp" in key) and taus[0].dim() == 2 and rank_ratio > 0:
            low = []
            for c in centred:
                u, s, vh = torch.linalg.svd(c, full_matrices=False)
                r = max(1, int(rank_ratio * len(s)))
                low.append(u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
            centred = low
        out[key] = mean if rank_ratio == 0 else mean + prior * seq_sum(centred)
    return out


@pytest.mark.parametrize("rank_ratio,prior", [(0.12, 2.0), (0.5, 1.0), (1.0, 1.5), (0.0, 2.0)])
def test_cart_matches_reference(layer_setup, rank_ratio, prior):
    cs, pt, fts = layer_setup
    got = merge(cs, "cart", rank_ratio=rank_ratio, prior=prior)
    expected = ref_cart(cs, pt, fts, rank_ratio, prior)
    for key in cs.float_keys:
        assert torch.allclose(got[key], expected[key], atol=1e-5), key
    # full rank: every task's centred vector is kept, so the merge is mean + prior * (sum of centred) = mean
    if rank_ratio == 1.0:
        mean = seq_sum(layer_taus(cs, pt, fts, "proj")) / 3
        assert torch.allclose(got["proj"], mean, atol=1e-5)


def ref_wudi(taus, iterations, lr):
    merged = torch.nn.Parameter(seq_sum(taus).clone())
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    active = [t for t in taus if float((t * t).sum()) > 0]
    for _ in range(iterations if active else 0):
        loss = sum(torch.sum(((merged - t) @ t.T) ** 2) / torch.sum(t * t) for t in active)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def test_wudi_matches_the_autograd_loss(layer_setup):
    cs, pt, fts = layer_setup
    got = merge(cs, "wudi", iterations=25, lr=1e-3)
    for key in cs.float_keys:
        shape = cs.shapes[key]
        if len(shape) == 2 and ("attn" in key or "mlp" in key):
            taus = layer_taus(cs, pt, fts, key)
            expected = ref_wudi(taus, 25, 1e-3)
            assert torch.allclose(got[key], expected, atol=1e-5), key
            if any(float(t.abs().sum()) > 0 for t in taus):
                assert not torch.allclose(got[key], seq_sum(taus))  # the optimisation moved it
        else:
            assert torch.equal(got[key], torch.zeros(shape)), key  # pre-trained value kept
    frozen = got["blocks.0.mlp.frozen.weight"]
    assert torch.equal(frozen, torch.zeros_like(frozen))
    assert alpha_candidates("wudi") == [1.0]


def test_wudi_lowers_its_loss_and_checks_its_settings(layer_setup):
    cs, pt, fts = layer_setup
    key = "blocks.0.attn.in_proj_weight"
    taus = layer_taus(cs, pt, fts, key)

    def loss(m):
        return float(sum(torch.sum(((m - t) @ t.T) ** 2) / torch.sum(t * t) for t in taus))

    start = loss(seq_sum(taus))
    assert loss(merge(cs, "wudi", iterations=50, lr=1e-2)[key]) < start
    assert torch.equal(merge(cs, "wudi", iterations=0)[key], seq_sum(taus))
    for params in ({"iterations": -1}, {"iterations": 1.5}, {"lr": 0}, {"lr": "fast"}):
        with pytest.raises(ConfigError, match="iterations|lr"):
            merge(cs, "wudi", **params)


def test_new_methods_are_registered_with_their_papers_defaults():
    assert METHODS["breadcrumbs"].defaults == {"beta": 0.85, "gamma": 0.993, "device": "cpu"}
    assert METHODS["pcb"].defaults == {"pcb_ratio": 0.1, "device": "cpu"}
    assert METHODS["cart"].defaults == {"rank_ratio": 0.12, "prior": 2.0, "device": "cpu"}
    assert METHODS["wudi"].defaults == {"iterations": 300, "lr": 1e-5, "device": "cpu"}
    assert {"magmax", "model_stock"} <= set(METHODS)


def test_cli_param_sets_a_hyperparameter(tmp_path, tiny_checkpoints, capsys):
    from tallmasks.cli import main
    from tallmasks.io.checkpoints import load_state_dict

    pt, fts, _ = tiny_checkpoints
    out = tmp_path / "crumbs.safetensors"
    args = [
        "-q",
        "merge",
        "--method",
        "breadcrumbs",
        "--pretrained",
        str(pt),
        "--finetuned",
        *map(str, fts),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main([*args, "--param", "beta=0.5", "--param", "gamma=0.9"]) == 0
    expected = merge(CheckpointSet(pt, fts), "breadcrumbs", beta=0.5, gamma=0.9)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for bad, message in [
        ("bogus=1", "--param bogus: method 'breadcrumbs' has no hyperparameter"),
        ("beta=2", "--param beta must be"),
        ("beta", "NAME=VALUE"),
    ]:
        assert main([*args, "--param", bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("failures", [1, 2])
def test_svd_retries_where_lapack_fails_to_converge(monkeypatch, failures):
    from tallmasks.merging import layers

    real = torch.linalg.svd
    calls = []

    def flaky(matrix, full_matrices=True):
        calls.append(matrix.dtype)
        if len(calls) <= failures:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(12, 5, generator=g) @ torch.randn(5, 9, generator=g)  # rank 5: repeated zero values
    u, s, vh = layers.svd(matrix)
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (12, 9) and vh.shape == (9, 9)
    assert torch.allclose(u @ torch.diag(s) @ vh, matrix, atol=1e-5)
    assert calls[:2] == [torch.float32, torch.float64][: len(calls[:2])]
    assert torch.allclose(u.T @ u, torch.eye(9), atol=1e-5)
