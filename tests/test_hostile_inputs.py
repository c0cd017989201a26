"""Hostile inputs to align, merge and convert, and to a sharded checkpoint's index: each is refused in one
line naming its culprit (nothing written, nothing outside the output) or handled as a valid input."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import save_sharded, tiny_state

from tallmasks.algebra.task_vectors import CheckpointSet
from tallmasks.cli import main
from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.io.checkpoints import (
    checkpoint_files,
    checkpoint_size,
    load_state_dict,
    require_checkpoint,
    require_finite,
    save_state_dict,
)
from tallmasks.merging import merge
from tallmasks.merging.methods.pcb import cut_rank

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys, argv: list) -> str:
    """The one error line of a refused command (exit code 2)."""
    assert main(["-q", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (rather than hang) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# align


def mlp_state(seed: int, hidden: int = 16, inputs: int = 6) -> dict[str, torch.Tensor]:
    """The state dict of Linear(inputs, hidden) -> ReLU -> Linear(hidden, 4), random."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (hidden, inputs), "0.bias": (hidden,), "2.weight": (4, hidden), "2.bias": (4,)}
    return {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}


@pytest.fixture
def align_inputs(tmp_path):
    """A reference, an other foundation and one expert (tiny MLPs), in their own folder."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, seed in [("a", 0), ("b", 1), ("e", 2)]:
        save_state_dict(mlp_state(seed), folder / f"{name}.safetensors")
    return folder


def align_args(folder: Path, out: Path, *extra) -> list:
    return ["align", "--reference", folder / "a.safetensors", "--other", folder / "b.safetensors", "--arch", "mlp", "--out", out, *extra]


@pytest.mark.parametrize("name", ["../../X", "../X", "sub/X", "..", ".hidden", "", "a\\b", "tab\there"])
def test_align_refuses_expert_names_that_are_not_plain_file_names(tmp_path, align_inputs, capsys, name):
    before = snapshot(tmp_path)
    out = tmp_path / "run" / "aligned"
    line = error_line(capsys, align_args(align_inputs, out, "--experts", align_inputs / "e.safetensors", "--names", name))
    assert "--names entry" in line and repr(name) in line
    assert snapshot(tmp_path) == before  # nothing written, inside or beside --out
    assert not (tmp_path / "run").exists() and not (tmp_path / "X.safetensors").exists()
    assert not (tmp_path.parent / "X.safetensors").exists()


def test_align_refuses_a_default_expert_name_that_cannot_name_a_file(tmp_path, align_inputs, capsys):
    hidden = align_inputs / ".e.safetensors"
    hidden.write_bytes((align_inputs / "e.safetensors").read_bytes())
    before = snapshot(tmp_path)
    line = error_line(capsys, align_args(align_inputs, tmp_path / "aligned", "--experts", hidden))
    assert "expert name" in line and "'.e'" in line and "--names" in line
    assert snapshot(tmp_path) == before


def test_align_with_plain_names_writes_inside_out_only(tmp_path, align_inputs):
    out = tmp_path / "aligned"
    assert main(["-q", *map(str, align_args(align_inputs, out, "--experts", align_inputs / "e.safetensors", "--names", "task-1"))]) == 0
    assert (out / "experts" / "task-1.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "inputs"]


@pytest.mark.parametrize("which,value", [("a", float("nan")), ("b", float("inf")), ("b", float("-inf"))])
def test_align_refuses_non_finite_weights_naming_file_and_key(tmp_path, capsys, which, value):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, seed in [("a", 0), ("b", 1)]:
        state = mlp_state(seed)
        if name == which:
            state["2.weight"][1, 3] = value
        save_state_dict(state, folder / f"{name}.safetensors")
    before = snapshot(tmp_path)
    line = error_line(capsys, align_args(folder, tmp_path / "aligned"))
    assert str(folder / f"{which}.safetensors") in line and "'2.weight'" in line and "NaN or Inf" in line
    assert snapshot(tmp_path) == before


def test_require_finite_names_the_first_bad_tensor():
    require_finite({"w": torch.ones(3), "n": torch.tensor([1, 2]), "empty": torch.zeros(0)}, "x.pt")
    with pytest.raises(CheckpointError, match=r"^x\.pt: tensor 'w' holds NaN or Inf"):
        require_finite({"w": torch.tensor([1.0, float("nan")], dtype=torch.float16)}, "x.pt")


@pytest.mark.parametrize("hidden,inputs", [(0, 6), (16, 0)])
def test_align_handles_zero_size_layers(tmp_path, capsys, hidden, inputs):
    """A permuted axis of size 0 has nothing to match; a zero-size tensor permutes to itself."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name, seed in [("a", 0), ("b", 1)]:
        save_state_dict(mlp_state(seed, hidden, inputs), folder / f"{name}.safetensors")
    out = tmp_path / "aligned"
    assert main(["-q", *map(str, align_args(folder, out))]) == 0, capsys.readouterr().err
    other = load_state_dict(folder / "b.safetensors")
    foundation = load_state_dict(out / "foundation.safetensors")
    assert set(foundation) == set(other)
    for key in other:
        assert foundation.shape(key) == other.shape(key)
        if not other.numel(key):
            assert foundation.numel(key) == 0
    if hidden == 0:  # nothing to permute: the other foundation unchanged
        assert all(torch.equal(foundation[k], other[k]) for k in other)


# ---------------------------------------------------------------------------------------------
# merge: parameters that drive loops or ranks


def block_states(num_blocks: int = 3, num_tasks: int = 2) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(5)
    pt = {f"m.blocks.{i}.w": torch.randn(4, 3, generator=g) for i in range(num_blocks)}
    pt["m.head.weight"] = torch.randn(2, 3, generator=g)
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pt.items()} for _ in range(num_tasks)]
    return pt, fts


@pytest.fixture
def merge_inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    pt, fts = block_states()
    torch.save(pt, folder / "pt.pt")
    paths = []
    for i, ft in enumerate(fts):
        torch.save(ft, folder / f"ft{i}.pt")
        paths.append(folder / f"ft{i}.pt")
    return folder / "pt.pt", paths


def merge_args(merge_inputs, out, method, *extra) -> list:
    pt, fts = merge_inputs
    return ["merge", "--method", method, "--pretrained", pt, "--finetuned", *fts, "--out", out, "--device", "cpu", *extra]


@pytest.mark.parametrize("value", ["100000000000", "4", "1000"])
def test_lines_refuses_more_blocks_than_the_model_has_before_any_loop(tmp_path, merge_inputs, capsys, value):
    before = snapshot(tmp_path)
    out = tmp_path / "lines.safetensors"
    with deadline(10):
        line = error_line(capsys, merge_args(merge_inputs, out, "lines", "--alpha", "1", "--param", f"num_blocks={value}"))
    assert f"num_blocks={value}" in line and "3 blocks" in line
    assert snapshot(tmp_path) == before


def test_lines_accepts_num_blocks_up_to_the_blocks_present():
    pt, fts = block_states()
    cs = CheckpointSet(pt, fts)
    assert merge(cs, "lines", num_blocks=3).info["num_blocks"] == 3
    assert merge(cs, "lines", num_blocks=2).info["num_blocks"] == 2
    with deadline(10), pytest.raises(ConfigError, match=r"num_blocks=4 is more than the 3 blocks"):
        merge(cs, "lines", num_blocks=4)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 137, 1000, 12345, 10**9])
def test_pcb_cut_rank_stays_within_the_scores(d):
    for ratio in (5e-324, 1e-300, 1e-17, 1e-16, 1e-12, 0.5 / d, 1 / d, 0.1, 0.5, 1.0):
        rank = cut_rank(d, ratio)
        assert 1 <= rank <= d
        assert rank == min(int(d * (1 - ratio)), d - 1) + 1
    assert cut_rank(d, 1.0) == 1 and cut_rank(d, 1e-300) == d


@pytest.mark.parametrize("ratio", [1e-300, 5e-324, 1e-16])
def test_pcb_with_a_tiny_ratio_keeps_no_score_like_the_reference_index_d_minus_1(ratio):
    pt, fts = block_states()
    cs = CheckpointSet(pt, fts)
    d = cs.num_float_params
    got = merge(cs, "pcb", pcb_ratio=ratio)
    expected = merge(cs, "pcb", pcb_ratio=0.5 / d)  # int(d * (1 - ratio)) = d - 1 in the reference
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(torch.isfinite(v).all() for v in got.values())


def test_cli_pcb_with_a_tiny_ratio_writes_the_model(tmp_path, merge_inputs):
    out = tmp_path / "pcb.safetensors"
    assert main(["-q", *map(str, merge_args(merge_inputs, out, "pcb", "--alpha", "1", "--param", "pcb_ratio=1e-300"))]) == 0
    assert set(load_state_dict(out)) == set(torch.load(merge_inputs[0]))


# ---------------------------------------------------------------------------------------------
# convert and sharded checkpoints


@pytest.fixture
def sharded(tmp_path):
    state = tiny_state(0)
    folder = save_sharded(state, tmp_path / "sharded")
    assert len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    return state, folder


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("via_index", [False, True])
def test_convert_accepts_a_sharded_folder(tmp_path, sharded, suffix, via_index):
    state, folder = sharded
    source = folder / "model.safetensors.index.json" if via_index else folder
    before = snapshot(folder)
    out = tmp_path / f"whole{suffix}"
    assert main(["-q", "convert", str(source), str(out)]) == 0
    got = load_state_dict(out)
    assert set(got) == set(state)
    for key, value in state.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert snapshot(folder) == before


def test_convert_refuses_a_destination_inside_the_sharded_folder(sharded, capsys):
    _, folder = sharded
    before = snapshot(folder)
    line = error_line(capsys, ["convert", folder, folder / "whole.safetensors"])
    assert "lies inside" in line and str(folder) in line
    assert snapshot(folder) == before


def test_convert_refuses_a_folder_without_a_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(capsys, ["convert", empty, tmp_path / "out.safetensors"])
    assert str(empty) in line and "without a safetensors checkpoint" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_checkpoint_size_and_require_checkpoint(tmp_path, sharded):
    state, folder = sharded
    files = checkpoint_files(folder)
    assert files[0].name == "model.safetensors.index.json" and len(files) == 1 + len(list(folder.glob("*.safetensors")))
    assert checkpoint_files(folder / "model.safetensors.index.json") == files
    assert checkpoint_size(folder) == sum(f.stat().st_size for f in files) == checkpoint_size(files[0])
    single = tmp_path / "single.pt"
    torch.save(state, single)
    assert checkpoint_size(single) == single.stat().st_size
    assert require_checkpoint(folder) == folder and require_checkpoint(single) == single
    for bad, message in [(tmp_path / "missing.pt", "no such checkpoint"), (tmp_path, "without a safetensors checkpoint")]:
        for check in (require_checkpoint, checkpoint_size):
            with pytest.raises(CheckpointError, match=message) as info:
                check(bad)
            assert "\n" not in str(info.value) and str(bad) in str(info.value)


def hostile_indices(weight_map: dict) -> list[tuple[str, str]]:
    """(index text, expected message part) for indices of the wrong structure."""
    key, shard = next(iter(weight_map.items()))
    return [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"weight_map": ' * 50_000 + "{}" + "}" * 50_000, "nested too deeply"),
        ("[]", "expected an object, found a list"),
        ('"weights"', "expected an object, found a string"),
        ("null", "expected an object, found null"),
        ("{}", "weight_map: missing"),
        (json.dumps({"weight_map": list(weight_map)}), "weight_map: expected an object, found a list"),
        (json.dumps({"weight_map": {**weight_map, key: 3}}), f"weight_map.{key}: expected a string, found a number"),
        (json.dumps({"weight_map": {**weight_map, key: [shard]}}), f"weight_map.{key}: expected a string, found a list"),
        (json.dumps({"weight_map": weight_map, "metadata": "big"}), "metadata: expected an object, found a string"),
        (json.dumps({"weight_map": {**weight_map, key: "../x.safetensors"}}), "not a .safetensors file beside the index"),
        (json.dumps({"weight_map": {**weight_map, key: "/etc/x.safetensors"}}), "not a .safetensors file beside the index"),
        (json.dumps({"weight_map": {**weight_map, key: "x.bin"}}), "not a .safetensors file beside the index"),
        (json.dumps({"weight_map": {**weight_map, key: ".x.safetensors"}}), "cannot name a file"),
        (json.dumps({"weight_map": {**weight_map, key: "a\\b.safetensors"}}), "cannot name a file"),
        (json.dumps({"weight_map": {**weight_map, key: "a\nb.safetensors"}}), "cannot name a file"),
        (json.dumps({"weight_map": {}}), "non-empty 'weight_map'"),
        ('{"weight_map": {"a": NaN}}', "not valid JSON"),
    ]


def test_a_hostile_shard_index_is_one_line_naming_the_index(tmp_path, sharded, capsys):
    state, folder = sharded
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for text, message in hostile_indices(index["weight_map"]):
        index_path.write_text(text)
        with pytest.raises(CheckpointError) as info:
            load_state_dict(folder)
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"{index_path}: ") and message in line, (message, line[:300])
        assert len(line) < 1000
        out = tmp_path / "out.safetensors"
        assert str(index_path) in error_line(capsys, ["convert", folder, out])
        assert not out.exists()
    # a valid index with metadata, as Hugging Face writes it, still reads
    index_path.write_text(json.dumps({"metadata": {"total_size": 123, "format": "pt"}, "weight_map": index["weight_map"]}))
    loaded = load_state_dict(folder)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
