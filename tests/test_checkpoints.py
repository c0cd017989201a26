"""Safe loading (no pickle code runs), lazy safetensors access, atomic saving."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.io.checkpoints import atomic_path, convert_checkpoint, load_state_dict, save_state_dict


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_payload_is_refused_without_running(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(target)}, path)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_state_dict(path)
    assert not target.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload(target)))
    with pytest.raises(CheckpointError, match="raw.pt"):
        load_state_dict(raw)
    assert not target.exists()


def test_pt_and_safetensors_roundtrip(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(()).half()}
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"m{suffix}"
        save_state_dict(state, path)
        loaded = load_state_dict(path)
        assert set(loaded) == set(state)
        assert loaded.shape("a") == (3, 4) and loaded.dtype("c") == torch.float16
        for key in state:
            assert torch.equal(loaded[key], state[key])
    convert_checkpoint(tmp_path / "m.pt", tmp_path / "n.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "n.safetensors")["a"], state["a"])


def test_legacy_unzipped_pt_is_read(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(3))


def test_non_state_dicts_and_missing_files(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_state_dict(tmp_path / "absent.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        load_state_dict(bad)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3}, nested)
    assert list(load_state_dict(nested)) == ["w"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
