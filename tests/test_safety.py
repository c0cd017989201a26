"""Data safety and honest failure: the output guard, the cache identity rule, collection integrity,
file names that carry every setting, and one-line errors instead of tracebacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env, tiny_state
from PIL import Image

from tallmasks.cli import main as cli
from tallmasks.core.errors import CheckpointError, ConfigError, OutputError, TallmasksError, one_line
from tallmasks.core.params import Percent, PositiveInt
from tallmasks.io.checkpoints import save_state_dict
from tallmasks.io.guard import atomic_output, check_output, remove_stale_temporaries, require_file


def run(capsys, *args) -> tuple[int, str]:
    """The CLI in this process: (exit code, the error lines it printed)."""
    code = cli(["-q", *map(str, args)])
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("error:"))


@pytest.fixture
def ckpts(tmp_path):
    pt = tiny_state(0)
    torch.save(pt, tmp_path / "pt.pt")
    fts = []
    for i in range(3):
        fts.append(tmp_path / f"ft{i}.pt")
        torch.save(tiny_state(i + 1, pt), fts[-1])
    return tmp_path / "pt.pt", fts


def unchanged(path: Path, before: bytes) -> bool:
    return path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 1. an output that is an input, or lies inside a collection that is read


def test_merge_refuses_an_input_as_output_by_inode(tmp_path, ckpts, capsys):
    pt, fts = ckpts
    before = fts[0].read_bytes()
    os.link(fts[0], tmp_path / "alias.pt")  # another name, the same file
    (tmp_path / "link.pt").symlink_to(pt)
    for out, culprit in ((fts[0], "ft0.pt"), (tmp_path / "alias.pt", "ft0.pt"), (tmp_path / "link.pt", "pt.pt")):
        code, err = run(capsys, "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts[:2], "--out", out)
        assert code == 2 and "is one of this command's inputs" in err and culprit in err
    assert unchanged(fts[0], before)
    code, err = run(capsys, "convert", fts[0], tmp_path / "alias.pt")
    assert code == 2 and "is one of this command's inputs" in err and unchanged(fts[0], before)


def test_decompress_and_plot_refuse_theta0_and_the_collection(tmp_path, ckpts, capsys):
    pt, fts = ckpts
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts[:2], "--out", tmp_path / "c")[0] == 0
    parts = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    theta0 = pt.read_bytes()
    code, err = run(capsys, "decompress", tmp_path / "c", "--task", "0", "--out", pt)
    assert code == 2 and "is one of this command's inputs" in err
    code, err = run(capsys, "decompress", tmp_path / "c", "--task", "0", "--out", tmp_path / "c" / "merged.safetensors")
    assert code == 2 and "lies inside" in err
    code, err = run(capsys, "inspect", tmp_path / "c", "--plot", tmp_path / "c" / "agreement.png")
    assert code == 2 and "lies inside" in err
    assert unchanged(pt, theta0) and {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == parts
    assert run(capsys, "decompress", tmp_path / "c", "--task", "0", "--out", tmp_path / "ok.pt")[0] == 0


# ---------------------------------------------------------------------------------------------
# 2. compress replaces only a previous collection's own files


@pytest.mark.parametrize("storage, part", [("packbits", "merged.safetensors"), ("coded", "coded.safetensors")])
def test_compress_over_a_collection_keeps_other_files(tmp_path, ckpts, capsys, storage, part):
    pt, fts = ckpts
    out = tmp_path / "c"
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts[:2], "--out", out)[0] == 0
    (out / "notes.txt").write_text("keep me")
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts, "--out", out, "--storage", storage)[0] == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "meta.json").read_text())["tasks"] == ["ft0", "ft1", "ft2"]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors")) == sorted(
        ["merged.safetensors", "masks.safetensors"] if storage == "packbits" else ["coded.safetensors"]
    )
    # an input that is one of the collection's own files is not overwritten
    before = (out / part).read_bytes()
    code, err = run(capsys, "compress", "--pretrained", pt, "--finetuned", out / part, "--out", out)
    assert code == 2 and "is one of this command's inputs" in err and unchanged(out / part, before)


# ---------------------------------------------------------------------------------------------
# 6. collection parts belong together; meta.json and mask layouts checked


@pytest.mark.parametrize("storage, parts", [("packbits", ("masks.safetensors", "merged.safetensors")), ("coded", ("coded.safetensors",))])
def test_collection_parts_from_another_collection_are_refused(tmp_path, ckpts, capsys, storage, parts):
    pt, fts = ckpts
    for name, chosen in (("a", fts[:2]), ("b", [fts[0], fts[2]])):
        assert (
            run(
                capsys,
                "compress",
                "--pretrained",
                pt,
                "--finetuned",
                *chosen,
                "--names",
                "x",
                "y",
                "--out",
                tmp_path / name,
                "--storage",
                storage,
            )[0]
            == 0
        )
    for part in parts:
        mixed = tmp_path / f"mixed-{part}"
        shutil.copytree(tmp_path / "a", mixed)
        shutil.copy(tmp_path / "b" / part, mixed / part)
        for args in (["decompress", mixed, "--task", "x", "--out", tmp_path / "o.pt"], ["inspect", mixed]):
            code, err = run(capsys, *args)
            assert code == 2 and f"{part}: belongs to another collection" in err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize(
    "meta, message",
    [
        ([1, 2], "not a compressed collection"),
        ({"format": "tallmasks-compressed-v2", "tasks": ["x"]}, "masks: missing"),
        ({"format": "tallmasks-compressed-v2", "tasks": ["x", "x"], "masks": {}, "num_params": 1, "pretrained": {}}, "'x' appears twice"),
    ],
)
def test_damaged_meta_json_is_one_line(tmp_path, ckpts, capsys, meta, message):
    pt, fts = ckpts
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts[:2], "--out", tmp_path / "c")[0] == 0
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    code, err = run(capsys, "decompress", tmp_path / "c", "--task", "0", "--out", tmp_path / "o.pt")
    assert code == 2 and (message in err or "not a compressed collection" in err), err


def test_masks_of_another_model_are_refused(tmp_path, ckpts, capsys):
    from tallmasks.algebra.task_vectors import CheckpointSet
    from tallmasks.experiments.runner import load_tall_masks
    from tallmasks.masks import Layout, MaskSet

    pt, fts = ckpts
    cs = CheckpointSet(pt, fts[:2])
    other = Layout(("model.other",), ((7,),))
    MaskSet(cs.names, other, [np.zeros(1, np.uint8), np.zeros(1, np.uint8)]).save(tmp_path / "masks.safetensors")
    with pytest.raises(CheckpointError, match="masks made for another model"):
        load_tall_masks(cs, tmp_path / "masks.safetensors", [])
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts[:2], "--out", tmp_path / "c", "--storage", "packbits")[0] == 0
    shutil.copy(tmp_path / "masks.safetensors", tmp_path / "c" / "masks.safetensors")
    for args in (["inspect", tmp_path / "c"], ["decompress", tmp_path / "c", "--task", "0", "--out", tmp_path / "o.pt"]):
        code, err = run(capsys, *args)
        assert code == 2 and "masks.safetensors" in err


# ---------------------------------------------------------------------------------------------
# 3. every setting in the file name, or the file refuses reuse


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_results_and_mask_names_carry_every_setting():
    from tallmasks.experiments.runner import Experiment

    def exp(*overrides):
        return Experiment(_compose(["device=cpu", *overrides]))

    names = {exp("method=ties", f"method.ties_agg={agg}").results_path().name for agg in ("mean", "sum")}
    assert len(names) == 2 and any("ties_agg=sum" in n for n in names)
    assert exp("method=ties").results_path().name == "ViT-B-32_8tasks_ties_k=20.json"  # defaults stay implicit
    cons = {
        exp("method=consensus", f"method.prun_thre_k={k}", f"method.use_ties={t}").results_path().name
        for k in (1, 2)
        for t in ("true", "false")
    }
    assert len(cons) == 4
    masks = {
        exp("method=tall_mask", *extra).mask_path().name
        for extra in (
            [],
            ["method.k=20"],
            ["precision=bf16"],
            ["method.use_ties=true"],
            ["method.use_ties=true", "method.ties_agg=mean"],
            ["DATASETS=[MNIST,Cars,DTD,EuroSAT,GTSRB,RESISC45,SVHN,SUN397]"],
        )
    }
    assert len(masks) == 6 and "TALL_mask_8task.safetensors" in masks
    # consensus reads the masks of the tall_mask run with the same base vector
    assert exp("method=consensus", "method.use_ties=true").mask_path() == exp("method=tall_mask", "method.use_ties=true").mask_path()


def test_masks_built_under_other_settings_are_refused(tmp_path, ckpts):
    from tallmasks.algebra.task_vectors import CheckpointSet
    from tallmasks.experiments.runner import load_tall_masks
    from tallmasks.masks import tall_masks
    from tallmasks.merging import merge

    pt, fts = ckpts
    cs = CheckpointSet(pt, fts[:2])
    settings = {"model": "M", "datasets": cs.names, "precision": "fp32", "k": 20.0}
    tall_masks(cs, merge(cs, "sum", k=20), 0.4, info={"settings": settings}).save(tmp_path / "m.safetensors")
    assert load_tall_masks(cs, tmp_path / "m.safetensors", [], settings).names == cs.names
    with pytest.raises(CheckpointError, match="masks built with k=20.0, this run has k=100.0"):
        load_tall_masks(cs, tmp_path / "m.safetensors", [], {**settings, "k": 100.0})


# ---------------------------------------------------------------------------------------------
# 4, 5. the split cache and the journal: keyed on identity, damaged state rebuilt or ignored


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
        self.labels = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_split_cache_follows_the_data_and_rebuilds_damage(tmp_path, monkeypatch):
    import tallmasks.eval.cache as cache

    builds = []
    build = cache.build_split
    monkeypatch.setattr(cache, "build_split", lambda *a, **k: (builds.append(1), build(*a, **k))[1])
    data = {"d": Images(10, 0)}

    def load(**kw):
        return cache.load_or_build_split(lambda: data["d"], "Toy", "test", tmp_path, 8, num_workers=0, **kw)

    first = load()
    assert len(builds) == 1 and load().identity == first.identity and len(builds) == 1
    data["d"] = Images(10, 1)  # re-prepared: same length, other images
    second = load()
    assert len(builds) == 2 and second.identity != first.identity
    with pytest.raises(TallmasksError, match="missing or stale"):  # a rank that only reads never uses stale data
        data["d"] = Images(12, 2)
        load(build=False)
    data["d"] = Images(12, 2)
    subset = torch.utils.data.Subset(data["d"], [0, 2, 4])
    data["d"] = subset
    assert len(load()) == 3
    subset.indices = [1, 3, 5]  # another Val split of the same base
    load()
    assert len(builds) == 4
    images, labels, _ = cache._files(cache.cache_path(tmp_path, 8, "Toy", "test"))
    np.save(labels, np.zeros(2, dtype=np.int64))  # labels shorter than the images
    assert len(load()) == 3 and len(builds) == 5
    with open(images, "r+b") as handle:  # truncated images
        handle.truncate(images.stat().st_size // 2)
    assert len(load()) == 3 and len(builds) == 6


def test_journal_ignores_invalid_entries_and_other_runs(tmp_path):
    from tallmasks.eval.results import Journal

    path = tmp_path / "j.json"
    journal = Journal(path, {"a": 1})
    journal.record("alpha=0.1", "MNIST", "val", 3, 4)
    data = json.loads(path.read_text())
    data["entries"]["zero|MNIST|val"] = {"correct": 0, "total": 0}
    data["entries"]["bad|MNIST|val"] = {"correct": 5, "total": 4}
    path.write_text(json.dumps(data))
    again = Journal(path, {"a": 1})
    assert len(again) == 1 and again.get("alpha=0.1", "MNIST", "val") == {"correct": 3, "total": 4}
    assert len(Journal(path, {"a": 2})) == 0


# ---------------------------------------------------------------------------------------------
# 7, 9. values accepted without a word before; the config validated once, up front


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.use_ties=maybe", "method.use_ties must be true or false, got 'maybe'"),
        ("n_eval_points=2.7", "n_eval_points must be an integer, got 2.7"),
        ("num_tasks=abc", "num_tasks must be an integer"),
        ("batch_size=abc", "batch_size must be an integer"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("specify_lambda=nan", "specify_lambda must be a finite number"),
        ("specify_lambda=inf", "specify_lambda must be a finite number"),
        ("device=foo", "device: unknown device 'foo'"),
        ("method.prun_thre_k=9", "method.prun_thre_k=9 is more than the 8 tasks"),
        ("+method.bogus=1", "unknown config field method.bogus"),
        ("+bogus=1", "unknown config field bogus"),
        ("+method.grid={prun_thre_k:[1,2.5]}", "method.grid.prun_thre_k[1] must be an integer"),
        ("wandb.mode=on", "wandb.mode must be one of disabled, online, offline"),
        ("port=70000", "port must be >= 1 and <= 65535"),
    ],
)
def test_config_is_validated_once_with_one_line_errors(override, message):
    from tallmasks.experiments.config import validate_config

    with pytest.raises(ConfigError) as info:
        validate_config(_compose(["method=consensus", "device=cpu", override]))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, ckpts, capsys):
    from tallmasks.experiments.config import validate_config

    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        validate_config(_compose(["device=cuda"]))
    pt, fts = ckpts
    code, err = run(
        capsys, "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts, "--device", "cuda", "--out", tmp_path / "o.pt"
    )
    assert code == 2 and "no CUDA GPU is available" in err


def test_a_new_method_is_validated_from_its_signature(monkeypatch):
    from tallmasks.experiments.config import validate_config
    from tallmasks.merging import registry as base

    def toy(cs, *, k: Percent = 50, mode: str = "a", steps: int = 3, device: str = "cpu"):
        return {}

    monkeypatch.setitem(base.METHODS, "toy", base.Method("toy", toy, base.COEF_GRID, "toy"))
    settings = validate_config(
        _compose(["method=sum", "method.name=toy", "~method.full_name", "~method.k", "+method.steps=7", "device=cpu"])
    )
    assert settings.method.params == {"k": 50, "mode": "a", "steps": 7}
    for override, message in (
        ("+method.steps=x", "method.steps must be an integer"),
        ("+method.k=0", "method.k must be > 0"),
        ("+method.depth=2", "unknown config field method.depth for method 'toy'"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate_config(_compose(["method=sum", "method.name=toy", "~method.full_name", "~method.k", override, "device=cpu"]))


def test_finetuned_accuracy_table_must_hold_fractions(tmp_path):
    from tallmasks.eval.selection import finetuned_accuracies

    table = tmp_path / "M" / "nonlinear_ft_accuracies.json"
    table.parent.mkdir()
    for value, message in ((94.3, "write 0.943, not 94.3"), ("high", "must be a number"), (0, "must be in \\(0, 1\\]")):
        table.write_text(json.dumps({"MNIST": value, "MNISTVal": 0.9}))
        with pytest.raises(TallmasksError, match=message):
            finetuned_accuracies("M", ["MNIST"], tmp_path, tmp_path / "none")


def test_non_finite_alpha_overflow_and_empty_checkpoints_are_refused(tmp_path, ckpts, capsys):
    pt, fts = ckpts
    out = tmp_path / "o.pt"
    for alpha in ("nan", "inf", "1e39"):
        code, err = run(capsys, "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts, "--alpha", alpha, "--out", out)
        assert code == 2 and ("--alpha must be a finite number" in err or "would hold NaN or Inf" in err), err
    code, err = run(capsys, "merge", "--method", "consensus", "--pretrained", pt, "--finetuned", *fts, "--prun-thre-k", "4", "--out", out)
    assert code == 2 and "--prun-thre-k=4 is more than the 3 tasks" in err
    half = {"model.w": torch.zeros(4, dtype=torch.float16)}
    save_state_dict(half, tmp_path / "h0.safetensors")
    for i in range(2):
        save_state_dict({"model.w": torch.full((4,), 60000.0, dtype=torch.float16)}, tmp_path / f"h{i + 1}.safetensors")
    code, err = run(
        capsys,
        "merge",
        "--method",
        "sum",
        "--pretrained",
        tmp_path / "h0.safetensors",
        "--finetuned",
        tmp_path / "h1.safetensors",
        tmp_path / "h2.safetensors",
        "--out",
        out,
    )
    assert code == 2 and "tensor 'model.w' would hold NaN or Inf in float16" in err
    torch.save({"model.n": torch.tensor([1])}, tmp_path / "ints.pt")
    code, err = run(
        capsys, "merge", "--method", "sum", "--pretrained", tmp_path / "ints.pt", "--finetuned", tmp_path / "ints.pt", "--out", out
    )
    assert code == 2 and "no floating-point tensor" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 8, 11, 12, 13. unwritable or full locations found first, pipes never opened, temporaries, umask


def test_unwritable_or_full_locations_are_refused_before_the_work(tmp_path, ckpts, capsys, monkeypatch):
    import tallmasks.algebra.task_vectors as tv

    pt, fts = ckpts
    opened = []
    monkeypatch.setattr(tv.CheckpointSet, "_validate", lambda self: opened.append(1))
    for out, message in ((pt / "x.safetensors", "is a file, not a folder"), ("/proc/tallmasks-test.safetensors", "cannot write in /proc")):
        code, err = run(capsys, "merge", "--method", "ties", "--pretrained", pt, "--finetuned", *fts, "--out", out)
        assert code == 2 and message in err
    assert not opened  # refused before the checkpoints were even read
    with pytest.raises(OutputError, match="needs about .* free in"):
        check_output(tmp_path / "big.pt", expected_bytes=1 << 62)


def test_write_failures_are_one_line(tmp_path, ckpts):
    """A file size limit makes every write past 64 KiB fail (EFBIG), as a full disk does with ENOSPC."""
    pt, fts = ckpts
    big = {"model.w": torch.zeros(1 << 16)}
    torch.save(big, tmp_path / "big0.pt")
    torch.save({"model.w": torch.ones(1 << 16)}, tmp_path / "big1.pt")

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    for suffix in ("safetensors", "pt"):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "tallmasks.cli",
                "merge",
                "--method",
                "sum",
                "--pretrained",
                tmp_path / "big0.pt",
                "--finetuned",
                tmp_path / "big1.pt",
                "--out",
                tmp_path / f"o.{suffix}",
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            preexec_fn=limit,
            timeout=300,
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        [line] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert f"o.{suffix}: cannot write it" in line
        assert not list(tmp_path.glob(f".o.{suffix}.*"))
    # the split cache: reserved up front, so a full disk is an error line rather than SIGBUS in a memory map
    code = (
        "import resource, signal, numpy as np, torch\n"
        "from PIL import Image\n"
        "from tallmasks.eval.cache import load_or_build_split\n"
        "from tallmasks.core.errors import TallmasksError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "data = [(Image.new('RGB', (64, 64), (i, 0, 0)), 0) for i in range(64)]\n"
        f"try:\n    load_or_build_split(lambda: data, 'Toy', 'test', {str(tmp_path / 'cache')!r}, 64, num_workers=0)\n"
        "except TallmasksError as exc:\n    print('error:', exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert res.returncode == 0 and "cannot write it (File too large)" in res.stdout, (res.stdout, res.stderr[-2000:])


def test_write_failure_classification(tmp_path):
    from tallmasks.io.guard import write_failure

    assert "No space left on device" in str(write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "o"))
    reading = FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere/input.png")
    assert write_failure(reading, tmp_path / "o") is None  # about an input, not the output
    assert write_failure(RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0"), tmp_path / "o")
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path / "o")
    assert write_failure(RuntimeError("shape mismatch"), tmp_path / "o") is None
    assert write_failure(ValueError("bad value"), tmp_path / "o") is None


def test_named_pipes_are_refused_not_opened(tmp_path, ckpts):
    pt, fts = ckpts
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    for args in (["inspect", fifo], ["merge", "--method", "sum", "--pretrained", pt, "--finetuned", fifo, "--out", tmp_path / "o.pt"]):
        res = subprocess.run(
            [sys.executable, "-m", "tallmasks.cli", *map(str, args)], capture_output=True, text=True, env=subprocess_env(), timeout=120
        )
        assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr[-2000:]
    with pytest.raises(CheckpointError, match="not a regular file"):
        require_file(fifo)


def test_temporaries_are_named_after_their_output_and_stale_ones_removed(tmp_path):
    from tallmasks.io.guard import _HOST

    out = tmp_path / "m.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.safetensors.{_HOST}-{dead.pid}-00ff.tmp"
    stale.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".m.safetensors.{_HOST}-{dead.pid}-0aaa.tmp"
    stale_dir.mkdir()
    live = tmp_path / f".m.safetensors.{_HOST}-{os.getppid()}-00ee.tmp"
    live.write_bytes(b"y")
    other = tmp_path / ".other.safetensors.00000000-1-00dd.tmp"
    other.write_bytes(b"z")
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".m.safetensors.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert not stale.exists() and not stale_dir.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(out) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(tmp_path, ckpts, capsys, umask):
    pt, fts = ckpts
    old = os.umask(umask)
    try:
        assert run(capsys, "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts, "--out", tmp_path / "m.safetensors")[0] == 0
        assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts, "--out", tmp_path / "c")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "c" / "meta.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# messages a new user meets


def test_cli_messages_for_new_users(tmp_path, ckpts, capsys, caplog):
    pt, fts = ckpts
    code, err = run(capsys, "inspect", tmp_path / "nowhere")
    assert code == 2 and "no such file or folder" in err
    code, err = run(capsys, "inspect", pt, "--plot", tmp_path / "p.png")
    assert code == 2 and "--plot draws the agreement of a collection or mask file" in err and not (tmp_path / "p.png").exists()
    code, err = run(
        capsys, "merge", "--method", "sum", "--pretrained", pt, "--finetuned", *fts[:2], "--names", "a", "a", "--out", tmp_path / "o.pt"
    )
    assert code == 2 and "--names" in err
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts[:2], "--out", tmp_path / "c")[0] == 0
    caplog.set_level("INFO", logger="tallmasks")
    assert cli(["decompress", str(tmp_path / "c"), "--task", "1", "--out", str(tmp_path / "t.pt")]) == 0
    assert "wrote task ft1 to" in caplog.text
    assert one_line(RuntimeError("Error downloading x.gz:\nTried https://a, got: <urlopen error>")).endswith("<urlopen error>")


def test_inspect_json_into_a_closed_pipe_is_quiet(tmp_path, ckpts, capsys):
    pt, fts = ckpts
    assert run(capsys, "compress", "--pretrained", pt, "--finetuned", *fts, "--out", tmp_path / "c")[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "tallmasks.cli", "inspect", str(tmp_path / "c"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head` finishing early
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipeError" not in err


def test_eval_single_task_help_is_whole():
    res = subprocess.run(
        [sys.executable, str(REPO / "eval_single_task.py"), "--help"], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert res.returncode == 0 and "merged into\nresults/single_task/<model>/" in res.stdout


def test_a_new_config_group_is_validated_from_its_registered_functions(monkeypatch):
    from tallmasks.core.params import Group
    from tallmasks.experiments import config as schema

    def tact(model, *, num_images: PositiveInt = 100, by_layer: bool = True):
        return model

    registry = {"tact": tact}

    def lookup(name):
        if name not in registry:
            raise ConfigError(f"unknown correction {name!r}")
        return registry[name]

    monkeypatch.setitem(schema.GROUPS, "correction", Group(lookup, required=False))
    assert "correction" not in schema.validate_config(_compose(["device=cpu"])).groups  # optional, absent
    settings = schema.validate_config(_compose(["device=cpu", "correction.name=tact", "+correction.num_images=8"]))
    assert settings.groups["correction"].params == {"num_images": 8, "by_layer": True}
    for override, message in (
        ("+correction.num_images=0", "correction.num_images must be >= 1"),
        ("+correction.by_layer=maybe", "correction.by_layer must be true or false"),
        ("+correction.images=8", "unknown config field correction.images for correction 'tact'"),
    ):
        with pytest.raises(ConfigError, match=message):
            schema.validate_config(_compose(["device=cpu", "correction.name=tact", override]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_anywhere_is_refused_before_writing(tmp_path, dtype, bad):
    """save_state_dict(finite=True) finds one NaN or Inf wherever it lies (first, last, inside a long tensor,
    a scalar), names its tensor and writes nothing; finite, empty and integer tensors pass."""
    from tallmasks.io.checkpoints import save_state_dict

    ok = {"empty": torch.zeros(0, dtype=dtype), "ints": torch.arange(5), "scalar": torch.tensor(1.5, dtype=dtype)}
    save_state_dict({**ok, "w": torch.randn(70001).to(dtype)}, tmp_path / "fine.pt", finite=True)
    for where in (0, 12345, 70000, None):
        w = torch.randn(70001).to(dtype)
        state = {**ok, "w": w}
        if where is None:
            state["scalar"] = torch.tensor(bad, dtype=dtype)
        else:
            w[where] = bad
        out = tmp_path / f"bad_{where}.pt"
        with pytest.raises(CheckpointError, match=f"tensor '{'scalar' if where is None else 'w'}' would hold NaN or Inf"):
            save_state_dict(state, out, finite=True)
        assert not out.exists()
