"""Sharded safetensors checkpoints (an index and its shards, as Hugging Face saves large models)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_sharded, tiny_state

from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
from tallmasks.core.errors import CheckpointError
from tallmasks.io.checkpoints import ShardedStateDict, load_state_dict, sha256_file
from tallmasks.merging import merge


@pytest.fixture
def sharded(tmp_path):
    """theta_0 and two fine-tuned checkpoints, each as a single file and as a sharded folder."""
    pt = tiny_state(0)
    fts = [tiny_state(i + 1, pt) for i in range(2)]
    singles, folders = [], []
    for name, state in [("pt", pt), ("ft0", fts[0]), ("ft1", fts[1])]:
        single = tmp_path / f"{name}.pt"
        torch.save(state, single)
        singles.append(single)
        folders.append(save_sharded(state, tmp_path / name))
    return pt, singles, folders


def test_a_sharded_folder_reads_like_the_state_dict(sharded):
    pt, _, folders = sharded
    index = json.loads((folders[0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    for source in (folders[0], folders[0] / "model.safetensors.index.json"):
        state = load_state_dict(source)
        assert isinstance(state, ShardedStateDict) and set(state) == set(pt)
        for key, value in pt.items():
            assert state.shape(key) == tuple(value.shape) and state.dtype(key) == value.dtype
            assert torch.equal(state[key], value)
    assert len(load_state_dict(folders[0]).files) == 1 + len(set(index["weight_map"].values()))
    assert sha256_file(folders[0]) == sha256_file(folders[0])


@pytest.mark.parametrize("method,params", [("sum", {}), ("ties", {"k": 20}), ("breadcrumbs", {}), ("magmax", {})])
def test_merging_sharded_folders_equals_single_files(sharded, method, params):
    _, singles, folders = sharded
    expected = merge(CheckpointSet(singles[0], singles[1:]), method, **params)
    for block_elems in (1 << 22, 3):
        got = merge(CheckpointSet(folders[0], folders[1:], block_elems=block_elems), method, **params)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_cli_merges_sharded_folders(sharded, tmp_path):
    _, singles, folders = sharded
    out = tmp_path / "sharded.safetensors"
    res = run_cli(
        "merge",
        "--method",
        "ties",
        "--pretrained",
        folders[0],
        "--finetuned",
        *folders[1:],
        "--out",
        out,
        "--alpha",
        "0.4",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    expected = apply_vector(load_state_dict(singles[0]), merge(CheckpointSet(singles[0], singles[1:]), "ties"), 0.4)
    got = load_state_dict(out)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    res = run_cli("inspect", folders[0])
    assert res.returncode == 0 and "files" in res.stdout


def test_broken_shards_are_one_line_errors(sharded, tmp_path):
    _, _, folders = sharded
    folder = folders[1]
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))

    def expect(message, source=folder):
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict(source)
        assert "\n" not in str(info.value)

    moved = tmp_path / "moved.safetensors"
    (folder / shards[0]).rename(moved)
    expect("shard .* is missing")
    moved.rename(folder / shards[0])
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], key: shards[1]}}))
    expect("lacks tensor")
    unlisted = next(k for k, v in index["weight_map"].items() if v == shards[1])
    index_path.write_text(json.dumps({"weight_map": {k: v for k, v in index["weight_map"].items() if k != unlisted}}))
    expect("is not in the index")
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], key: "../elsewhere.safetensors"}}))
    expect("not a .safetensors file beside the index")
    index_path.write_text("{not json")
    expect("not a readable shard index")
    index_path.unlink()
    expect("holds several checkpoints")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect("without a safetensors checkpoint", empty)
    (empty / "pytorch_model.bin.index.json").write_text("{}")
    expect("sharded .bin checkpoints are not supported", empty)
    res = run_cli("merge", "--method", "sum", "--pretrained", folders[0], "--finetuned", folder, "--out", tmp_path / "o.pt")
    assert res.returncode == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()
