"""The tallmasks console command, through subprocesses: merge, compress, decompress, inspect, convert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, subprocess_env

from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
from tallmasks.io.checkpoints import load_state_dict
from tallmasks.masks import MaskSet, tall_masks
from tallmasks.merging import merge
from tallmasks.storage.collection import collection_report, compress, decompress


def test_merge_writes_vector_or_model(tmp_path, tiny_checkpoints):
    pt, fts, st = tiny_checkpoints
    out = tmp_path / "ties.safetensors"
    res = run_cli("-q", "merge", "--method", "ties", "--pretrained", pt, "--finetuned", *fts, st, "--out", out)
    assert res.returncode == 0, res.stderr
    got = load_state_dict(out)
    expected = merge(CheckpointSet(pt, [*fts, st]), "ties")
    assert set(got) == set(expected)  # float entries only
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    out = tmp_path / "model.pt"
    res = run_cli("-q", "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts, "--alpha", "0.3", "--out", out)
    assert res.returncode == 0, res.stderr
    model = load_state_dict(out)
    cs = CheckpointSet(pt, fts)
    expected = apply_vector(load_state_dict(pt), merge(cs, "sum"), 0.3)
    assert set(model) == set(expected)
    assert all(torch.equal(model[k], expected[k]) for k in expected)


def test_merge_consensus_uses_tall_masks(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    out = tmp_path / "cons.safetensors"
    res = run_cli(
        "-q",
        "merge",
        "--method",
        "consensus",
        "--pretrained",
        pt,
        "--finetuned",
        *fts,
        "--prun-thre-k",
        "2",
        "--tall-mask-lambda",
        "0.3",
        "0.4",
        "0.5",
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr
    cs = CheckpointSet(pt, fts)
    masks = tall_masks(cs, merge(cs, "sum"), [0.3, 0.4, 0.5])
    expected = merge(cs, "consensus", masks=masks, prun_thre_k=2)
    got = load_state_dict(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "storage, files",
    [("packbits", ["masks.safetensors", "merged.safetensors", "meta.json"]), ("coded", ["coded.safetensors", "meta.json"])],
)
def test_compress_decompress_inspect(tmp_path, tiny_checkpoints, storage, files):
    pt, fts, _ = tiny_checkpoints
    out = tmp_path / "collection"
    res = run_cli("compress", "--pretrained", pt, "--finetuned", *fts, "--tall-mask-lambda", "0.4", "--out", out, "--storage", storage)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == files
    report = collection_report(out)
    assert report["tasks"] == ["MNIST", "Cars", "DTD"]
    assert report["total_bytes"] <= report["budget_bytes"]
    # decompress == theta_0 + m_t * tau_MTL
    rebuilt = tmp_path / "cars.safetensors"
    res = run_cli("decompress", out, "--task", "Cars", "--out", rebuilt)
    assert res.returncode == 0, res.stderr
    cs = CheckpointSet(pt, fts)
    vector = merge(cs, "sum")
    mask = tall_masks(cs, vector, 0.4).get("Cars")
    expected = apply_vector(load_state_dict(pt), vector, 1.0, mask)
    got = load_state_dict(rebuilt)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    res = run_cli("decompress", out, "--task", "1", "--out", tmp_path / "again.pt")
    assert res.returncode == 0
    assert torch.equal(load_state_dict(tmp_path / "again.pt")["model.visual.proj"], got["model.visual.proj"])
    # inspect: text, json, plot
    res = run_cli("inspect", out, "--plot", tmp_path / "agree.png")
    assert res.returncode == 0, res.stderr
    assert "catastrophic" in res.stdout and "selfish" in res.stdout
    assert (tmp_path / "agree.png").read_bytes()[:4] == b"\x89PNG"
    res = run_cli("inspect", out, "--json")
    data = json.loads(res.stdout)
    assert sum(data["agreement"]) == data["num_params"]
    res = run_cli("inspect", pt)
    assert res.returncode == 0 and "tensors" in res.stdout


def test_magnitude_compression_and_ties_base(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    meta = compress(pt, fts, tmp_path / "mag", masks="magnitude", k=25, storage="packbits")
    assert meta["masks"] == {"kind": "magnitude", "k": 25.0}
    masks = MaskSet.load(tmp_path / "mag" / "masks.safetensors")
    assert all(abs(masks.density(n) - 0.25) < 0.05 for n in masks.names)
    meta = compress(pt, fts, tmp_path / "ties", use_ties=True, lambdas=[0.2, 0.5, 0.6])
    model = decompress(tmp_path / "ties", "DTD")
    cs = CheckpointSet(pt, fts)
    vector = merge(cs, "tall_mask", use_ties=True)
    expected = apply_vector(load_state_dict(pt), vector, 1.0, tall_masks(cs, vector, 0.6).get("DTD"))
    assert all(torch.equal(model[k], expected[k]) for k in expected)


def test_compressed_size_budget_at_vit_b_32_key_count(tmp_path):
    """The metadata overhead stays under 64 KiB with a real model's number of keys."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    del model.transformer
    keys = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    # same keys, tiny tensors: the overhead is what is measured
    pt = {k: torch.zeros(2) for k in keys}
    fts = [{k: torch.randn(2) for k in keys} for _ in range(3)]
    torch.save(pt, tmp_path / "pt.pt")
    paths = []
    for i, ft in enumerate(fts):
        paths.append(tmp_path / f"ft{i}.pt")
        torch.save(ft, paths[-1])
    for storage in ("packbits", "coded"):
        compress(tmp_path / "pt.pt", paths, tmp_path / storage, storage=storage)
        report = collection_report(tmp_path / storage)
        assert len(keys) > 100
        assert report["total_bytes"] <= report["budget_bytes"]


def test_convert(tmp_path, tiny_checkpoints):
    pt, _, _ = tiny_checkpoints
    res = run_cli("convert", pt, tmp_path / "pt.safetensors")
    assert res.returncode == 0, res.stderr
    a, b = load_state_dict(pt), load_state_dict(tmp_path / "pt.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "args, message",
    [
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{missing}", "--out", "{out}"], "no such checkpoint file"),
        (["merge", "--method", "ties", "--k", "0", "--pretrained", "{pt}", "--finetuned", "{ft}", "--out", "{out}"], "k must be"),
        (["merge", "--method", "ties", "--k", "150", "--pretrained", "{pt}", "--finetuned", "{ft}", "--out", "{out}"], "k must be"),
        (
            ["merge", "--method", "consensus", "--tall-mask-lambda", "-1", "--pretrained", "{pt}", "--finetuned", "{ft}", "--out", "{out}"],
            "tall_mask_lambda",
        ),
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{nan}", "--out", "{out}"], "contains NaN or Inf"),
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{shape}", "--out", "{out}"], "shape mismatch"),
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{extra}", "--out", "{out}"], "unexpected key"),
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{evil}", "--out", "{out}"], "refused"),
        (["merge", "--method", "sum", "--pretrained", "{pt}", "--finetuned", "{ft}", "--out", "{tmp}/x.txt"], "use a .safetensors or .pt"),
        (["decompress", "{tmp}", "--task", "0", "--out", "{out}"], "not a compressed collection"),
    ],
)
def test_bad_input_one_line_error_no_output(tmp_path, tiny_checkpoints, args, message):
    pt, fts, _ = tiny_checkpoints
    base = load_state_dict(fts[0])
    nan = {k: v.clone() for k, v in base.items()}
    nan["model.visual.proj"][0, 0] = float("inf")
    torch.save(nan, tmp_path / "nan.pt")
    shape = dict(base, **{"model.visual.proj": torch.zeros(4, 8)})
    torch.save(shape, tmp_path / "shape.pt")
    torch.save(dict(base, extra=torch.zeros(1)), tmp_path / "extra.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(dict(base, evil=Evil()), tmp_path / "evil.pt")
    out = tmp_path / "out.safetensors"
    fill = dict(
        pt=pt,
        ft=fts[0],
        missing=tmp_path / "nope.pt",
        out=out,
        nan=tmp_path / "nan.pt",
        shape=tmp_path / "shape.pt",
        extra=tmp_path / "extra.pt",
        evil=tmp_path / "evil.pt",
        tmp=tmp_path,
    )
    res = run_cli(*[a.format(**fill) for a in args])
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert "pwned" not in res.stdout
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_method_is_rejected(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    res = run_cli("merge", "--method", "bogus", "--pretrained", pt, "--finetuned", *fts, "--out", tmp_path / "o.pt")
    assert res.returncode != 0 and "invalid choice: 'bogus'" in res.stderr


def test_compress_refuses_foreign_nonempty_folder(tmp_path, tiny_checkpoints):
    pt, fts, _ = tiny_checkpoints
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    res = run_cli("compress", "--pretrained", pt, "--finetuned", *fts, "--out", folder)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert (folder / "notes.txt").read_text() == "keep me"


def test_console_script_when_installed(tmp_path, tiny_checkpoints):
    script = Path(sys.executable).parent / "tallmasks"
    if not script.exists():
        pytest.skip("package not installed in this environment (no tallmasks console script)")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 0 and "compress" in res.stdout


def test_prepare_data_names_the_manual_dataset(tmp_path):
    res = run_cli("prepare-data", "EuroSAT", "--root", tmp_path)
    assert res.returncode == 2
    assert "EuroSAT" in res.stderr and str(tmp_path) in res.stderr
