"""The non-local seed's merge (seed_ties_tall) against a plain numpy whole-vector implementation of its code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tallmasks.merging import CheckpointSet, merge


def seed_ties_numpy(theta0: dict, experts: list[dict], keep: float) -> dict:
    """compute_ties_vector of the seed, written out on numpy arrays, one tensor at a time."""
    out = {}
    for key, base in theta0.items():
        trimmed = []
        for expert in experts:
            v = (expert[key] - base).astype(np.float64)
            s = np.sort(np.abs(v).ravel())
            cutoff = s[min(int(np.round((1 - keep) * s.size)), s.size - 1)]
            trimmed.append(np.where(np.abs(v) <= cutoff, 0.0, v))
        trimmed = np.stack(trimmed)
        sign = np.sign(trimmed.sum(0))
        agree = trimmed * sign >= 0
        out[key] = (trimmed * agree).sum(0) / agree.sum(0)
    return out


def checkpoints(num_tasks: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = {"a.weight": (12, 7), "a.bias": (7,), "b.weight": (5, 3, 2), "scalar": (), "pair": (2,)}
    theta0 = {k: np.asarray(rng.standard_normal(s), dtype=np.float32) for k, s in shapes.items()}
    experts = [
        {k: np.asarray(v + rng.laplace(scale=0.1, size=v.shape), dtype=np.float32) for k, v in theta0.items()} for _ in range(num_tasks)
    ]
    return theta0, experts


@pytest.mark.parametrize("num_tasks,keep", [(2, 0.5), (5, 0.5), (8, 0.3)])
def test_seed_ties_vector_equals_the_seed_code_written_out(num_tasks, keep):
    from tallmasks.merging.methods.seed_ties import seed_ties_vector

    theta0, experts = checkpoints(num_tasks)
    cs = CheckpointSet(
        {k: torch.from_numpy(v) for k, v in theta0.items()}, [{k: torch.from_numpy(v) for k, v in e.items()} for e in experts]
    )
    got = seed_ties_vector(cs, keep=keep)
    want = seed_ties_numpy(theta0, experts, keep)
    for key in theta0:
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert not got["scalar"].any() and not got["pair"].any()  # the seed's trimming keeps none of 1 or 2 entries
    kept = int((got["a.weight"] != 0).sum())
    assert 0 < kept and got["a.weight"].abs().max() > 0
    assert torch.equal(merge(cs, "seed_ties_tall", keep=keep)["a.weight"], got["a.weight"])


def test_seed_trim_keeps_slightly_under_half_and_its_mean_counts_zeros():
    from tallmasks.merging.methods.seed_ties import seed_trim

    v = torch.arange(1, 1001, dtype=torch.float32)
    assert int((seed_trim(v, 0.5) != 0).sum()) == 499
    assert int((seed_trim(torch.arange(1, 8, dtype=torch.float32), 0.5) != 0).sum()) == 2
    # three tasks, one non-zero trimmed entry: the seed divides by 3 (non-opposing, zeros included)
    theta0 = {"w": torch.zeros(4)}
    experts = [{"w": torch.tensor([3.0, 0.05, 0.1, 0.2])}] + [{"w": torch.tensor([0.1, 0.2, 0.3, 0.4])} for _ in range(2)]
    from tallmasks.merging.methods.seed_ties import seed_ties_vector

    vector = seed_ties_vector(CheckpointSet(theta0, experts), keep=0.5)
    assert vector["w"][0] == pytest.approx(1.0) and vector["w"][3] == pytest.approx(0.8 / 3)
