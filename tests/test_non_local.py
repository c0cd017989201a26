"""Non-local merging: permutation specs, weight matching, TACT and REPAIR, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.non_local import (
    Corrector,
    Moments,
    align_foundations,
    apply_permutation,
    check_permutation,
    correction,
    fold_correction,
    invert_permutation,
    load_correction,
    load_weights,
    mlp_spec,
    random_permutation,
    repair,
    resnet_spec,
    save_correction,
    std_ratios,
    tact,
    vit_spec,
    weight_matching,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


# ---------------------------------------------------------------------------------------------
# tiny models


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 4)).eval()


def make_vit(seed: int) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=8, patch_size=4, width=24, layers=2, heads=3, mlp_ratio=2, output_dim=5).eval()


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (stem, layer1/layer2 of BasicBlocks, fc), narrow."""

    def __init__(self):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 12, stride=2, downsample=down))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def with_random_norm_stats(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm affine parameters and running statistics (so that they must permute too)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = 1 + 0.3 * torch.randn(n, generator=g)
            module.bias.data = 0.3 * torch.randn(n, generator=g)
            module.running_mean = 0.2 * torch.randn(n, generator=g)
            module.running_var = 0.5 + torch.rand(n, generator=g)
    return model.eval()


def make_resnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return with_random_norm_stats(TinyResNet(), seed)


def make_torchvision_resnet(block: str) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(0)
    return with_random_norm_stats(ResNet(BasicBlock if block == "basic" else Bottleneck, [1, 1, 1, 1], num_classes=5), 0)


MODELS = {
    "mlp": (make_mlp, lambda sd: mlp_spec(sd), (9, 6)),
    "resnet": (make_resnet, lambda sd: resnet_spec(sd), (4, 3, 8, 8)),
    "vit": (make_vit, lambda sd: vit_spec(sd, heads=3), (5, 3, 8, 8)),
}


def inputs(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def copy_with(make, state) -> nn.Module:
    model = make(99)
    model.load_state_dict(state)
    return model.eval()


def plain_objective(a: dict, b: dict) -> float:
    """<a, b> over every floating-point entry, as one flat vector."""
    keys = [k for k in a if a[k].dtype.is_floating_point]
    return float(torch.cat([a[k].double().flatten() for k in keys]) @ torch.cat([b[k].double().flatten() for k in keys]))


# ---------------------------------------------------------------------------------------------
# permutations


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_random_permutation_leaves_outputs_unchanged(name):
    make, spec_of, shape = MODELS[name]
    model = make(0)
    state = model.state_dict()
    spec = spec_of(state)
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    check_permutation(spec, perm)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in perm.values())
    permuted = apply_permutation(spec, perm, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    x = inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(copy_with(make, permuted)(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_torchvision_resnet_spec_covers_every_key(block):
    model = make_torchvision_resnet(block)
    state = model.state_dict()
    spec = resnet_spec(state)
    assert set(spec.axes) == set(state)  # running statistics and num_batches_tracked included
    assert spec.axes["bn1.running_mean"][0].perm == "P_stem"
    perm = random_permutation(spec, torch.Generator().manual_seed(2))
    other = make_torchvision_resnet(block)
    other.load_state_dict(apply_permutation(spec, perm, state))
    x = inputs((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-4, rtol=1e-4)


def test_vit_permutation_moves_heads_as_wholes():
    spec = vit_spec(make_vit(0).state_dict(), heads=3)
    assert spec.heads == {"P_attn0": 3, "P_attn1": 3}
    assert spec.axes["transformer.resblocks.0.attn.in_proj_weight"][0].repeats == 3  # Q, K, V share it
    perm = random_permutation(spec, torch.Generator().manual_seed(3))
    blocks = perm["P_attn0"].view(3, 8) // 8
    assert bool((blocks == blocks[:, :1]).all())
    split = dict(perm, P_attn0=torch.roll(torch.arange(24), 1))
    with pytest.raises(ConfigError, match="splits a head"):
        check_permutation(spec, split)
    with pytest.raises(ConfigError, match="do not divide"):
        vit_spec(make_vit(0).state_dict(), heads=5)


def test_spec_errors_name_the_key():
    state = make_resnet(0).state_dict()
    state["layer1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="layer1.0.extra.weight"):
        resnet_spec(state)
    with pytest.raises(CheckpointError, match="not one chain"):
        mlp_spec({"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 5)})


# ---------------------------------------------------------------------------------------------
# weight matching


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_weight_matching_recovers_a_permutation_and_never_decreases(name):
    make, spec_of, _ = MODELS[name]
    a = make(0).state_dict()
    spec = spec_of(a)
    perm = random_permutation(spec, torch.Generator().manual_seed(4))
    b = apply_permutation(spec, perm, a)
    trace = []

    def watch(_iteration, _group, current):
        trace.append(plain_objective(a, apply_permutation(spec, current, b)))

    result = weight_matching(spec, a, b, seed=1, callback=watch)
    inverse = invert_permutation(perm)
    assert all(torch.equal(result.perm[g], inverse[g]) for g in spec.groups)
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(trace, trace[1:]))
    assert trace[-1] == pytest.approx(plain_objective(a, a), rel=1e-9)
    assert result.objective[-1] == pytest.approx(trace[-1], rel=1e-9)
    assert all(later > earlier for earlier, later in zip(result.objective, result.objective[1:]))


def test_weight_matching_of_different_models_improves_and_stops():
    a, b = make_vit(0).state_dict(), make_vit(1).state_dict()
    spec = vit_spec(a, heads=3)
    result = weight_matching(spec, a, b, max_iter=3)
    assert result.iterations <= 3 and result.objective[-1] > result.objective[0]
    with pytest.raises(ConfigError, match="max_iter"):
        weight_matching(spec, a, b, max_iter=0)


def test_align_foundations_averages_aligned_foundations_and_permutes_experts():
    a = make_mlp(0).state_dict()
    spec = mlp_spec(a)
    perm = random_permutation(spec, torch.Generator().manual_seed(5))
    b = apply_permutation(spec, perm, a)  # the same foundation, its units shuffled
    g = torch.Generator().manual_seed(6)
    expert_a = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    expert_b = apply_permutation(spec, perm, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()})
    aligned = align_foundations(spec, [a, b], [expert_a, expert_b], [0, 1])
    for key in a:
        torch.testing.assert_close(aligned.theta0[key], a[key])
        assert torch.equal(aligned.experts[0][key], expert_a[key])
        assert torch.equal(aligned.experts[1][key], apply_permutation(spec, invert_permutation(perm), expert_b)[key])
    assert aligned.results[0] is None and aligned.results[1].iterations >= 1
    with pytest.raises(ConfigError, match="out of range"):
        align_foundations(spec, [a, b], [expert_a], [2])


# ---------------------------------------------------------------------------------------------
# statistics and the correction


def plain_moments(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = values.movedim(dim, -1).reshape(-1, values.shape[dim]).double()
    return rows.mean(0), rows.std(0, unbiased=False)


def test_moments_equal_the_whole_vector_statistics():
    x = 3 + 1e3 * torch.randn(3, 5, 7, 4, generator=torch.Generator().manual_seed(7))
    moments = Moments()
    for part in x.split([1, 2]):  # batches of different sizes
        moments.update(part, 1)
    mean, std = plain_moments(x, 1)
    torch.testing.assert_close(moments.mean, mean, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(moments.std, std, rtol=1e-12, atol=1e-9)


CORRECTED = {
    "mlp": (make_mlp, (64, 6)),
    "resnet": (make_resnet, (24, 3, 8, 8)),
    "vit": (make_vit, (24, 3, 8, 8)),
}


def expert_merged_inputs(name: str, seed: int):
    """(constructor, expert, merged, calibration inputs, the model to correct) for a tiny model family."""
    make, shape = CORRECTED[name]
    return make, make(1), make(2), inputs(shape, seed), make(0)


def plain_site_statistics(model: nn.Module, corrector: Corrector, x: torch.Tensor, task: str | None) -> dict:
    """Each site's (corrected) values captured in one pass by plain hooks registered after the corrector's,
    reduced over the whole batch at once; sites inside attention are measured by the corrector itself."""
    seen, handles = {}, []

    def keep(name: str, value: torch.Tensor) -> None:  # returns None: the forward pass is not changed
        seen[name] = value.clone()

    for site in corrector.sites:
        module = model.get_submodule(site.module)
        if site.where == "out":
            handles.append(module.register_forward_hook(lambda _m, _a, out, n=site.name: keep(n, out)))
        elif site.where == "in":
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=site.name: keep(n, args[0])))
    with torch.no_grad(), corrector.use(task):
        model(x)
    for handle in handles:
        handle.remove()
    out = {name: plain_moments(value, corrector.by_name[name].channel_dim) for name, value in seen.items()}
    inside = {s.name for s in corrector.sites if s.where == "context"}
    if inside:
        measured = corrector.statistics(x, task, batch_size=len(x))
        out.update({name: (measured[name].mean, measured[name].std) for name in inside})
    return out


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_calibrated_statistics_equal_the_experts_at_every_site(name):
    _make, expert, merged, x, model = expert_merged_inputs(name, 8)
    corrector = Corrector(model)
    load_weights(model, expert.state_dict())
    target = plain_site_statistics(model, corrector, x, None)
    load_weights(model, merged.state_dict())
    before = plain_site_statistics(model, corrector, x, None)
    corrections = tact(model, merged.state_dict(), {"t": expert.state_dict()}, {"t": x}, batch_size=7)
    after = plain_site_statistics(model, corrector, x, "t")
    assert set(corrections["t"]) == set(target) == set(after) == {s.name for s in corrector.sites}
    for site, (mean, std) in target.items():
        torch.testing.assert_close(after[site][0], mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after[site][1], std, atol=1e-4, rtol=1e-4)
    assert any(not torch.allclose(before[s][1], target[s][1], rtol=1e-2) for s in target)


def test_correction_of_the_expert_itself_is_the_identity():
    expert = make_vit(1)
    x = inputs((16, 3, 8, 8), 9)
    with torch.no_grad():
        plain = expert(x)
    model = make_vit(0)
    corrections = tact(model, expert.state_dict(), {"t": expert.state_dict()}, {"t": x}, batch_size=5)
    for scale, shift in corrections["t"].values():
        torch.testing.assert_close(scale, torch.ones_like(scale), atol=1e-5, rtol=0)
        torch.testing.assert_close(shift, torch.zeros_like(shift), atol=1e-5, rtol=0)
    with torch.no_grad(), correction(model, "t"):
        torch.testing.assert_close(model(x), plain, atol=1e-5, rtol=1e-5)


def test_chained_calibration_equals_full_passes():
    """The ViT's blocks replayed on cached inputs give the corrections that full forward passes give."""
    expert, merged = make_vit(1), make_vit(2)
    x = inputs((20, 3, 8, 8), 10)
    results = []
    for chain in (None, []):
        model = make_vit(0)
        corrector = Corrector(model, chain=chain)
        load_weights(model, expert.state_dict())
        target = corrector.statistics(x, batch_size=8)
        load_weights(model, merged.state_dict())
        results.append(corrector.calibrate("t", x, target, batch_size=8))
        corrector.remove()
    assert Corrector(make_vit(0)).chain  # the ViT's blocks form a chain
    for site, (scale, shift) in results[0].items():
        torch.testing.assert_close(scale, results[1][site][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(shift, results[1][site][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_folding_leaves_outputs_unchanged(name):
    make, expert, merged, x, model = expert_merged_inputs(name, 11)
    corrections = tact(model, merged.state_dict(), {"t": expert.state_dict()}, {"t": x}, batch_size=8)
    with torch.no_grad(), correction(model, "t"):
        hooked = model(x)
    corrector = model._tallmasks_corrector
    folded, leftover = fold_correction(model.state_dict(), corrector.sites, corrections["t"])
    if name == "vit":  # only the residual stream cannot be folded
        assert sorted(leftover) == ["transformer.resblocks.0:out", "transformer.resblocks.1:out"]
    else:
        assert leftover == {}
        plain = copy_with(make, folded)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), hooked, atol=1e-5, rtol=1e-4)
    exported = make(0)
    Corrector(exported).set("t", leftover)
    load_weights(exported, folded)
    with torch.no_grad(), correction(exported, "t"):
        torch.testing.assert_close(exported(x), hooked, atol=1e-5, rtol=1e-4)


def test_calibrating_one_task_leaves_another_untouched(tmp_path):
    expert_s, expert_t, merged = make_vit(1), make_vit(2), make_vit(3)
    xs, xt = inputs((12, 3, 8, 8), 12), inputs((12, 3, 8, 8), 13)
    model = make_vit(0)
    first = tact(model, merged.state_dict(), {"s": expert_s.state_dict()}, {"s": xs}, batch_size=6)["s"]
    saved = {site: (scale.clone(), shift.clone()) for site, (scale, shift) in first.items()}
    with torch.no_grad(), correction(model, "s"):
        out_s = model(xs)
    tact(model, merged.state_dict(), {"t": expert_t.state_dict()}, {"t": xt}, batch_size=6)
    corrector = model._tallmasks_corrector
    assert set(corrector.corrections) == {"s", "t"}
    for site, (scale, shift) in saved.items():
        assert torch.equal(corrector.corrections["s"][site][0], scale)
        assert torch.equal(corrector.corrections["s"][site][1], shift)
    with torch.no_grad(), correction(model, "s"):
        torch.testing.assert_close(model(xs), out_s, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="no correction calibrated for task 'u'"):
        with correction(model, "u"):
            pass
    # stored per task as a small file, loaded back onto a fresh model
    path = tmp_path / "s.safetensors"
    save_correction(path, corrector.corrections["s"], {"task": "s"})
    loaded, meta = load_correction(path)
    fresh = make_vit(0)
    load_weights(fresh, merged.state_dict())
    Corrector(fresh).set("s", loaded)
    with torch.no_grad(), correction(fresh, "s"):
        torch.testing.assert_close(fresh(xs), out_s, atol=1e-6, rtol=1e-6)
    assert meta["task"] == "s" and path.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match="not a correction file"):
        load_correction(_write_plain(tmp_path / "plain.safetensors"))


def _write_plain(path):
    from tallmasks.io.checkpoints import save_state_dict

    save_state_dict({"w": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_repair_at_an_interpolation_endpoint_returns_the_endpoint(t):
    a, b = make_vit(1).state_dict(), make_vit(2).state_dict()
    merged = {k: (1 - t) * a[k] + t * b[k] for k in a}
    x = {"a": inputs((10, 3, 8, 8), 14), "b": inputs((10, 3, 8, 8), 15)}
    model = make_vit(0)
    corrections = repair(model, merged, {"a": a, "b": b}, x, weights=[1 - t, t], batch_size=5)
    assert corrections["a"] is corrections["b"]  # one shared correction
    endpoint = copy_with(make_vit, a if t == 0 else b)
    pooled = torch.cat([x["a"], x["b"]])
    with torch.no_grad(), correction(model, "a"):
        torch.testing.assert_close(model(pooled), endpoint(pooled), atol=1e-5, rtol=1e-5)


def test_std_ratios_measure_variance_collapse_and_its_correction():
    expert = make_vit(1)
    merged = {k: 0.5 * v for k, v in make_vit(2).state_dict().items()}  # a shrunken model
    x = inputs((16, 3, 8, 8), 16)
    model = make_vit(0)
    tact(model, merged, {"t": expert.state_dict()}, {"t": x}, batch_size=8)
    ratios = std_ratios(model, merged, {"t": expert.state_dict()}, {"t": x}, batch_size=8)["t"]
    assert set(ratios["before"]) == set(ratios["after"])
    assert ratios["before"]["transformer.resblocks.0.mlp.c_fc:out"] < 0.9
    assert all(r == pytest.approx(1.0, abs=1e-4) for r in ratios["after"].values())


# ---------------------------------------------------------------------------------------------
# the align command


def test_cli_align_writes_aligned_foundation_theta0_and_experts(tmp_path, capsys):
    from tallmasks.io.checkpoints import load_state_dict, save_state_dict

    a = make_mlp(0).state_dict()
    spec = mlp_spec(a)
    perm = random_permutation(spec, torch.Generator().manual_seed(17))
    g = torch.Generator().manual_seed(18)
    expert = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    save_state_dict(a, tmp_path / "a.safetensors")
    torch.save(apply_permutation(spec, perm, a), tmp_path / "b.pt")
    save_state_dict(apply_permutation(spec, perm, expert), tmp_path / "e.safetensors")
    out = tmp_path / "aligned"
    res = run_cli(
        "-q",
        "align",
        "--reference",
        tmp_path / "a.safetensors",
        "--other",
        tmp_path / "b.pt",
        "--arch",
        "mlp",
        "--experts",
        tmp_path / "e.safetensors",
        "--names",
        "task",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    foundation, theta0 = load_state_dict(out / "foundation.safetensors"), load_state_dict(out / "theta0.safetensors")
    aligned_expert = load_state_dict(out / "experts" / "task.safetensors")
    for key in a:
        assert torch.equal(foundation[key], a[key]) and torch.equal(theta0[key], a[key])
        assert torch.equal(aligned_expert[key], expert[key])
    record = json.loads((out / "alignment.json").read_text())
    assert record["objective"][1] > record["objective"][0] and record["arch"] == "mlp"

    from tallmasks.cli import main as cli_main

    def error_of(*args) -> str:  # bad input, in process: exit code 2 and one error line
        assert cli_main(["-q", "align", *map(str, args)]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert error_of("--reference", tmp_path / "a.safetensors", "--other", tmp_path / "b.pt", "--arch", "mlp", "--out", out).startswith(
        "error: --out"
    )
    bad = tmp_path / "bad.safetensors"
    save_state_dict({**a, "0.weight": torch.zeros(3, 6)}, bad)
    line = error_of("--reference", tmp_path / "a.safetensors", "--other", bad, "--arch", "mlp", "--out", tmp_path / "x")
    assert line.startswith("error: ") and "0.weight" in line
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    assert (
        error_of(
            "--reference",
            tmp_path / "a.safetensors",
            "--other",
            tmp_path / "b.pt",
            "--arch",
            "mlp",
            "--heads",
            "2",
            "--out",
            tmp_path / "y",
        )
        == "error: --heads and --model apply to --arch vit only"
    )
    assert (
        "resnet layout"
        in error_of(
            "--reference", tmp_path / "a.safetensors", "--other", tmp_path / "b.pt", "--arch", "cnn", "--out", tmp_path / "y"
        ).lower()
    )


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_repair_seed_code_rule_is_the_seed_formula_and_agrees_with_the_mean_for_two(n):
    import functools

    from tallmasks.core.errors import ConfigError
    from tallmasks.non_local.correction import SiteStats, repair_target

    rng = np.random.default_rng(n)
    variances = [torch.from_numpy(rng.uniform(0.1, 5.0, size=6)) for _ in range(n)]
    means = [torch.from_numpy(rng.standard_normal(6)) for _ in range(n)]
    stats = [{"site": SiteStats(m, v.sqrt())} for m, v in zip(means, variances)]
    seed = repair_target(stats, rule="seed_code")["site"]
    # the seed's merge_batch_stats: var = ((1/N) * reduce(lambda x, y: sqrt(x) + sqrt(y), v)) ** 2
    seed_var = ((1.0 / n) * functools.reduce(lambda x, y: np.sqrt(x) + np.sqrt(y), [v.numpy() for v in variances])) ** 2
    np.testing.assert_allclose(seed.std.numpy() ** 2, seed_var, rtol=1e-12)
    np.testing.assert_allclose(seed.mean.numpy(), np.mean([m.numpy() for m in means], axis=0), rtol=1e-12)
    plain = repair_target(stats)["site"]
    np.testing.assert_allclose(plain.std.numpy(), np.mean([v.sqrt().numpy() for v in variances], axis=0), rtol=1e-12)
    if n == 2:
        np.testing.assert_allclose(seed.std.numpy(), plain.std.numpy(), rtol=1e-12)
    elif n > 2:
        assert not np.allclose(seed.std.numpy(), plain.std.numpy())
    with pytest.raises(ConfigError, match="rule"):
        repair_target(stats, rule="other")


def test_vit_output_embedding_permutes_with_the_heads():
    """embedding=True: proj's columns form their own group; the permuted model's features are the original
    ones permuted, and a head permuted with permute_head gives the same logits."""
    from tallmasks.non_local.permutation import EMBEDDING_GROUP, permute_head

    model = make_vit(0)
    state = model.state_dict()
    spec = vit_spec(state, heads=3, embedding=True)
    assert spec.sizes[EMBEDDING_GROUP] == state["proj"].shape[1] and EMBEDDING_GROUP not in vit_spec(state, heads=3).sizes
    perm = random_permutation(spec, torch.Generator().manual_seed(3))
    assert not torch.equal(perm[EMBEDDING_GROUP], torch.arange(state["proj"].shape[1]))
    x = inputs((5, 3, 8, 8))
    head = torch.randn(7, state["proj"].shape[1], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain, permuted = model(x), copy_with(make_vit, apply_permutation(spec, perm, state))(x)
    torch.testing.assert_close(permuted, plain[:, perm[EMBEDDING_GROUP]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted @ permute_head(head, perm).T, plain @ head.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(permute_head(head, {"P_residual": perm["P_residual"]}), head)  # no embedding group: unchanged


def test_embedding_sites_are_calibrated_after_the_blocks():
    _make, expert, merged, x, model = expert_merged_inputs("vit", 8)
    corrector = Corrector(model, embedding=True)
    names = [s.name for s in corrector.sites]
    assert names[-1] == ":out" and len(names) == len(Corrector(make_vit(0)).sites) + 1
    load_weights(model, expert.state_dict())
    target = plain_site_statistics(model, corrector, x, None)
    tact(model, merged.state_dict(), {"t": expert.state_dict()}, {"t": x}, batch_size=7)
    after = plain_site_statistics(model, corrector, x, "t")
    for site in (":out",):
        torch.testing.assert_close(after[site][0], target[site][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(after[site][1], target[site][1], atol=1e-4, rtol=1e-4)


def test_augmented_calibration_views_are_seeded_crops_and_flips_of_the_training_images():
    from PIL import Image

    from tallmasks.non_local.experiment import AugmentedViews, CorrectionSettings, calibration_split_name

    rng = np.random.default_rng(0)
    base = [(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), i % 3) for i in range(5)]
    views = AugmentedViews(base, 12, seed=0)
    again = AugmentedViews(base, 12, seed=0)
    assert len(views) == 12
    arrays = [np.asarray(views[i][0]) for i in range(12)]
    for i, array in enumerate(arrays):
        assert array.shape == (16, 16, 3) and views[i][1] == base[i % 5][1]
        assert np.array_equal(array, np.asarray(again[i][0]))  # the same views every time
    assert not np.array_equal(arrays[0], arrays[5])  # two views of one image differ
    assert not np.array_equal(np.asarray(AugmentedViews(base, 1, seed=1)[0][0]), arrays[0])
    assert calibration_split_name(200, augment=True) != calibration_split_name(200)
    assert CorrectionSettings("tact", 200, augment=True).tag == "_tact200_aug" and CorrectionSettings("tact", 200).tag == "_tact200"
