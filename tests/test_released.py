"""Released heads and masks: exact formats built locally, loaded without running pickle code."""

from __future__ import annotations

import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from tallmasks.core.errors import CheckpointError
from tallmasks.io.released import load_released_masks
from tallmasks.models import ClassificationHead, get_classification_head
from tallmasks.models.heads import convert_released_head, load_released_head

PAPER_MODULE = "src.models.modeling"


def _save_paper_head(path, weights, normalize=True, biases=None):
    """torch.save a module whose class lives at src.models.modeling.ClassificationHead, as the paper's code did."""
    saved = {name: sys.modules.get(name) for name in ("src", "src.models", PAPER_MODULE)}
    module = types.ModuleType(PAPER_MODULE)

    class PaperHead(torch.nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            output_size, input_size = weights.shape
            super().__init__(input_size, output_size)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    PaperHead.__name__ = PaperHead.__qualname__ = "ClassificationHead"
    PaperHead.__module__ = PAPER_MODULE
    module.ClassificationHead = PaperHead
    sys.modules.setdefault("src", types.ModuleType("src"))
    sys.modules.setdefault("src.models", types.ModuleType("src.models"))
    sys.modules[PAPER_MODULE] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save(PaperHead(normalize, weights, biases), path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    assert PAPER_MODULE not in sys.modules or saved[PAPER_MODULE] is not None


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_released_head_loads_into_our_class(tmp_path):
    weights, biases = torch.randn(7, 16), torch.randn(7)
    path = tmp_path / "head_MNISTVal.pt"
    _save_paper_head(path, weights, normalize=True, biases=biases)
    head = load_released_head(path)
    assert type(head) is ClassificationHead
    assert head.normalize is True
    assert torch.equal(head.weight, weights) and torch.equal(head.bias, biases)
    features = torch.randn(3, 16)
    expected = (features / features.norm(dim=-1, keepdim=True)) @ weights.T + biases
    assert torch.allclose(head(features), expected, atol=1e-6)


def test_released_head_normalize_false_and_conversion(tmp_path):
    weights = torch.randn(4, 8)
    path = tmp_path / "head_CarsVal.pt"
    _save_paper_head(path, weights, normalize=False)
    out = convert_released_head(path)
    assert out == tmp_path / "head_CarsVal.safetensors"
    head = ClassificationHead.load(out)
    assert head.normalize is False
    assert torch.equal(head.weight, weights) and torch.count_nonzero(head.bias) == 0


def test_get_classification_head_converts_released_on_first_use(tmp_path):
    weights = torch.randn(10, 8)
    folder = tmp_path / "ViT-B-32"
    folder.mkdir()
    _save_paper_head(folder / "head_MNISTVal.pt", weights)
    head = get_classification_head("ViT-B-32", "MNIST", tmp_path)
    assert torch.equal(head.weight, weights)
    assert (folder / "head_MNISTVal.safetensors").is_file()
    (folder / "head_MNISTVal.pt").unlink()
    again = get_classification_head("ViT-B-32", "MNISTVal", tmp_path)
    assert torch.equal(again.weight, weights)


def test_released_masks_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    bools = {name: rng.random(1001) > 0.5 for name in ("MNIST", "Cars", "DTD")}
    path = tmp_path / "TALL_mask_3task.npy"
    np.save(path, {name: np.packbits(mask) for name, mask in bools.items()})
    masks = load_released_masks(path)
    assert list(masks) == ["MNIST", "Cars", "DTD"]
    for name, packed in masks.items():
        assert packed.dtype == np.uint8
        assert np.array_equal(np.unpackbits(packed)[:1001].astype(bool), bools[name])


@pytest.mark.parametrize("kind", ["numpy arrays", "uint8 tensors", "legacy format"])
def test_torch_saved_released_masks(tmp_path, kind):
    # the paper's code loads its mask files with torch.load: a torch.save'd dict is read as well
    rng = np.random.default_rng(1)
    packed = {name: np.packbits(rng.random(1001) > 0.5) for name in ("MNIST", "Cars")}
    path = tmp_path / "TALL_mask_2task.npy"
    if kind == "uint8 tensors":
        torch.save({name: torch.from_numpy(value) for name, value in packed.items()}, path)
    else:
        torch.save(packed, path, _use_new_zipfile_serialization=kind != "legacy format")
    masks = load_released_masks(path)
    assert list(masks) == ["MNIST", "Cars"]
    assert all(np.array_equal(masks[name], packed[name]) for name in packed)


def test_torch_saved_masks_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "payload.npy": {"MNIST": _Payload(marker)},
        "floats.npy": {"MNIST": torch.zeros(3)},
        "list.npy": [np.zeros(2, dtype=np.uint8)],
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    reasons = {"payload.npy": "forbidden global", "floats.npy": "not a packed uint8 array", "list.npy": "dict"}
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError) as info:
            load_released_masks(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message and reason in message
    (tmp_path / "text.npy").write_text("neither")
    with pytest.raises(CheckpointError, match="neither an np.save'd nor a torch.save'd"):
        load_released_masks(tmp_path / "text.npy")
    assert not marker.exists()


def test_payload_head_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "head_MNISTVal.pt"
    torch.save(_Payload(marker), path)
    with pytest.raises(CheckpointError) as info:
        load_released_head(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not marker.exists()


def test_payload_mask_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "TALL_mask_8task.npy"
    np.save(path, {"MNIST": _Payload(marker)}, allow_pickle=True)
    with pytest.raises(CheckpointError) as info:
        load_released_masks(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not marker.exists()


def test_wrong_formats_are_refused(tmp_path):
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(4, dtype=np.uint8))
    with pytest.raises(CheckpointError, match="plain"):
        load_released_masks(plain)
    truncated = tmp_path / "TALL_mask_8task.npy"
    np.save(truncated, {"MNIST": np.packbits(np.ones(64, dtype=bool))})
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="TALL_mask_8task"):
        load_released_masks(truncated)
    with pytest.raises(CheckpointError, match="head"):
        load_released_head(plain)
    with pytest.raises(CheckpointError, match="no such"):
        load_released_head(tmp_path / "absent.pt")


def test_cli_convert_recognises_a_released_head(tmp_path):
    from conftest import run_cli

    weights = torch.randn(3, 8)
    src = tmp_path / "head_MNISTVal.pt"
    _save_paper_head(src, weights)
    res = run_cli("convert", src, tmp_path / "head_MNISTVal.safetensors")
    assert res.returncode == 0, res.stderr
    head = ClassificationHead.load(tmp_path / "head_MNISTVal.safetensors")
    assert torch.equal(head.weight, weights) and head.normalize is True
    res = run_cli("convert", src, tmp_path / "head.pt")
    assert res.returncode == 2 and "head converts to a .safetensors" in res.stderr
    assert not (tmp_path / "head.pt").exists()
