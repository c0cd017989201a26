"""End to end: main.py (subprocess and run_experiment) on tiny demo-model checkpoints and the demo tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "config"

scenes = pytest.importorskip("tallmasks.datasets.scenes", reason="the offline demo tasks (tallmasks.datasets.scenes) are not available")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    """theta_0, two fine-tuned checkpoints, zero-shot heads and fine-tuned accuracies for two demo tasks."""
    from tallmasks.datasets import DEMO_DATASETS
    from tallmasks.eval.results import atomic_write_json
    from tallmasks.models import DEMO_MODEL, ImageEncoder, create_clip, finetuned_path, get_classification_head, zeroshot_path

    root = tmp_path_factory.mktemp("e2e")
    loc = root / "checkpoints"
    tasks = list(DEMO_DATASETS[:2])
    torch.manual_seed(0)
    theta0 = ImageEncoder(DEMO_MODEL, pretrained=None).state_dict()
    zs = zeroshot_path(loc, DEMO_MODEL)
    zs.parent.mkdir(parents=True, exist_ok=True)
    torch.save(theta0, zs)
    clip = create_clip(DEMO_MODEL, pretrained=None)
    table = {}
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(i + 1)
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else v for k, v in theta0.items()}
        path = finetuned_path(loc, DEMO_MODEL, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ft, path)
        get_classification_head(DEMO_MODEL, task, loc, clip_model=clip)
        table[task] = table[task + "Val"] = 0.8
    atomic_write_json(loc / DEMO_MODEL / "nonlinear_ft_accuracies.json", table)
    overrides = [
        f"model={DEMO_MODEL}",
        f"DATASETS=[{','.join(tasks)}]",
        f"model_location={loc}",
        f"data_location={root / 'data'}",
        f"results_dir={root / 'results'}",
        f"single_task_dir={root / 'none'}",
        "n_eval_points=4",
        "num_workers=0",
        "batch_size=64",
        "device=cpu",
    ]
    return {"root": root, "loc": loc, "tasks": tasks, "overrides": overrides}


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


MAIN_ENV = {"PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def run_main(args, cwd, launcher=(), **env):
    cmd = [sys.executable, *launcher, str(REPO / "main.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**MAIN_ENV, **env}, timeout=300)


def only_result(folder):
    [path] = [p for p in folder.glob("*.json") if not p.name.endswith(".journal.json")]
    return json.loads(path.read_text())


def test_config_keeps_the_paper_overrides():
    cfg = compose(["model=ViT-L-14", "method=ties", "method.k=20", "num_tasks=20"])
    assert cfg.model == "ViT-L-14" and cfg.method.name == "ties" and cfg.method.k == 20 and cfg.num_tasks == 20
    assert cfg.method.full_name == "ties_k=20"
    cfg = compose(["method=consensus", "method.prun_thre_k=2", "method.use_ties=true"])
    assert cfg.method.use_ties is True and cfg.method.prun_thre_k == 2 and cfg.wandb.mode == "disabled"
    cfg = compose(["method=tall_mask", "method.load_mask=true", "DATASETS=[MNIST,Cars]"])
    assert list(cfg.DATASETS) == ["MNIST", "Cars"] and cfg.method.load_mask is True


def test_main_sum_end_to_end_and_one_line_errors(demo_setup):
    root, tasks = demo_setup["root"], demo_setup["tasks"]
    proc = run_main([*demo_setup["overrides"], "method=sum"], cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = [p for p in (root / "results").glob("*sum*.json") if not p.name.endswith(".journal.json")]
    res = json.loads(path.read_text())
    assert set(res["val"]) == {"0.5", "1"}  # n_eval_points=4 -> alphas 0.5, 1.0
    assert res["selection"]["alpha"] in (0.5, 1.0)
    for task in tasks:
        top1 = res["test"][f"{task}:top1"]
        assert 0 <= top1 <= 1 and res["test"][f"{task}:normalized_top1"] == pytest.approx(top1 / 0.8)
    assert res["avg_top1"] == pytest.approx(sum(res["test"][f"{t}:top1"] for t in tasks) / 2)

    proc = run_main([*demo_setup["overrides"], "method=consensus", "method.use_ties=true"], cwd=root)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: TALL masks not found") and "Traceback" not in proc.stderr
    proc = run_main([*demo_setup["overrides"], "method=sum", "batch_size=abc"], cwd=root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: batch_size must be an integer, got 'abc'"]


def test_missing_checkpoint_is_a_one_line_error(demo_setup):
    from tallmasks.core.errors import CheckpointError
    from tallmasks.experiments.runner import run_experiment

    with pytest.raises(CheckpointError, match="ShapesVal/nonlinear_finetuned.pt"):
        run_experiment(compose([*demo_setup["overrides"], "method=sum", "model_location=" + str(demo_setup["root"] / "nowhere")]))


def test_tall_mask_saves_masks_that_consensus_and_load_mask_read(demo_setup):
    from tallmasks.experiments.runner import run_experiment, tall_mask_path
    from tallmasks.masks import MaskSet
    from tallmasks.models import DEMO_MODEL

    tasks = demo_setup["tasks"]
    res = run_experiment(compose([*demo_setup["overrides"], "method=tall_mask"]))
    lambdas = res["selection"]["lambdas"]
    assert set(lambdas) == set(tasks) and all(v in (0.2, 0.3, 0.4, 0.5, 0.6) for v in lambdas.values())
    assert res["evaluations"]["evaluated"] == 5 * len(tasks) + len(tasks)
    path = Path(res["mask_path"])
    assert path.parent == demo_setup["root"] / "tall_masks" / DEMO_MODEL and path.is_file()
    assert path.name.startswith(tall_mask_path(demo_setup["loc"], DEMO_MODEL, len(tasks), use_ties=False).stem + "_")
    assert MaskSet.load(path).names == tasks
    # per task, the chosen lambda is the best on that task's validation split
    for task, lam in lambdas.items():
        best = max(res["val"][k][f"{task}Val:top1"] for k in res["val"])
        assert res["val"][f"{lam:.6g}"][f"{task}Val:top1"] == best

    loaded = run_experiment(compose([*demo_setup["overrides"], "method=tall_mask", "method.load_mask=true"]))
    assert loaded["test"] == res["test"]
    cons = run_experiment(compose([*demo_setup["overrides"], "method=consensus", "method.prun_thre_k=2"]))
    assert cons["selection"]["alpha"] in (0.5, 1.0) and Path(cons["results_path"]).is_file()


def test_resume_does_not_redo_finished_evaluations(demo_setup, monkeypatch):
    from tallmasks.eval.evaluator import Evaluator
    from tallmasks.experiments.runner import run_experiment

    overrides = [*demo_setup["overrides"], "method=ties", "results_dir=" + str(demo_setup["root"] / "resume")]
    calls = {"n": 0}
    original = Evaluator.count_correct

    def flaky(self, dataset, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the run is stopped during its 4th evaluation
        return original(self, dataset, data)

    monkeypatch.setattr(Evaluator, "count_correct", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(compose(overrides))
    assert not list((demo_setup["root"] / "resume").glob("*tasks_ties_k=20*[!l].json"))  # no results file yet
    calls["n"] = -100
    res = run_experiment(compose(overrides))
    # 2 alphas x 2 tasks on val + 2 test evaluations = 6; the first 3 were journaled
    assert res["evaluations"] == {"evaluated": 3, "reused": 3}
    again = run_experiment(compose(overrides))
    assert again["evaluations"] == {"evaluated": 0, "reused": 6} and again["test"] == res["test"]
    # a checkpoint replaced in place (new mtime) invalidates the journal
    import os

    from tallmasks.models import DEMO_MODEL, finetuned_path

    ft = finetuned_path(demo_setup["loc"], DEMO_MODEL, demo_setup["tasks"][0])
    stat = ft.stat()
    os.utime(ft, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = run_experiment(compose(overrides))
    assert changed["evaluations"] == {"evaluated": 6, "reused": 0}
    # so does a zero-shot head replaced in place
    from tallmasks.models import head_path

    head = head_path(demo_setup["loc"], DEMO_MODEL, demo_setup["tasks"][1])
    stat = head.stat()
    os.utime(head, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert run_experiment(compose(overrides))["evaluations"] == {"evaluated": 6, "reused": 0}


def test_eval_single_task_merges_table(demo_setup, tmp_path):
    from tallmasks.eval.results import atomic_write_json
    from tallmasks.eval.single_task import evaluate_single_task
    from tallmasks.models import DEMO_MODEL

    out = tmp_path / "single"
    atomic_write_json(out / DEMO_MODEL / "zeroshot_accuracies.json", {"Other": 0.5})
    new = evaluate_single_task(
        DEMO_MODEL,
        "none",
        demo_setup["tasks"][:1],
        demo_setup["loc"],
        demo_setup["root"] / "data",
        out,
        batch_size=64,
        device="cpu",
        num_workers=0,
    )
    table = json.loads((out / DEMO_MODEL / "zeroshot_accuracies.json").read_text())
    task = demo_setup["tasks"][0]
    assert table["Other"] == 0.5 and table[task] == new[task] and 0 <= table[task + "Val"] <= 1


def test_torchrun_two_cpu_ranks_equal_one_process(demo_setup):
    import socket

    from tallmasks.experiments.runner import run_experiment

    root = demo_setup["root"]
    single = run_experiment(compose([*demo_setup["overrides"], "method=sum", "results_dir=" + str(root / "one")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
    proc = run_main([*demo_setup["overrides"], "method=sum", "results_dir=" + str(root / "two")], root, launcher)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = only_result(root / "two")
    assert two["test"] == single["test"] and two["val"] == single["val"]


def test_world_size_spawns_ranks_that_equal_one_process(demo_setup):
    from tallmasks.experiments.runner import run_experiment

    root = demo_setup["root"]
    single = run_experiment(compose([*demo_setup["overrides"], "method=ties", "results_dir=" + str(root / "one_ties")]))
    args = [*demo_setup["overrides"], "method=ties", "world_size=2"]
    proc = run_main([*args, "results_dir=" + str(root / "spawned")], root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spawned = only_result(root / "spawned")
    assert spawned["test"] == single["test"] and spawned["val"] == single["val"]
    # a bad input inside the ranks still ends in one error line and a non-zero exit
    bad = run_main([*args, "method.k=0", "results_dir=" + str(root / "bad")], root)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    assert not (root / "bad").exists() or not any((root / "bad").glob("*.json"))


def test_launch_settings_are_checked():
    import os
    import socket

    from tallmasks.core.errors import ConfigError
    from tallmasks.experiments.runner import _launch_settings

    assert _launch_settings(compose(["world_size=2", "port=None", "device=cpu"])) == (2, None)
    assert _launch_settings(compose(["world_size=1", "port=12355"])) == (1, 12355)
    with pytest.raises(ConfigError, match="world_size must be >= 1"):
        _launch_settings(compose(["world_size=0", "device=cpu"]))
    with pytest.raises(ConfigError, match="world_size must be an integer"):
        _launch_settings(compose(["world_size=two"]))
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=f"world_size={cores + 1} is more than the {cores} CPU cores"):
        _launch_settings(compose([f"world_size={cores + 1}", "device=cpu"]))
    assert _launch_settings(compose([f"world_size={cores + 1}", "device=cpu", "force_world_size=true"]))[0] == cores + 1
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port={port} cannot be used"):
            _launch_settings(compose(["world_size=2", f"port={port}", "device=cpu"]))


def test_missing_zeroshot_encoder_is_fetched_or_named(tmp_path):
    """Like the paper's code, a missing MNISTVal/nonlinear_zeroshot.pt is saved from the openai weights;
    offline, that fails in one line naming the model."""
    from tallmasks.models import finetuned_path, zeroshot_path

    loc = tmp_path / "checkpoints"
    ft = finetuned_path(loc, "ViT-B-32", "MNIST")
    ft.parent.mkdir(parents=True)
    ft.write_bytes(b"")
    args = [
        "model=ViT-B-32",
        "DATASETS=[MNIST]",
        f"model_location={loc}",
        f"data_location={tmp_path / 'data'}",
        f"results_dir={tmp_path / 'results'}",
        "device=cpu",
    ]
    proc = run_main(args, tmp_path, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "could not fetch" in line and "ViT-B-32" in line and "pretrained_weights=PATH" in line
    assert not zeroshot_path(loc, "ViT-B-32").exists() and not (tmp_path / "results").exists()


def test_main_tact_end_to_end_records_the_correction(demo_setup):
    """main.py's run with correction=tact: calibrated per task on unlabeled training images; the results name,
    JSON and per-task correction files record it."""
    from tallmasks.core.errors import ConfigError
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.non_local import load_correction

    root = demo_setup["root"]
    args = [*demo_setup["overrides"], "method=ties", "correction=tact", "correction.num_images=48", "results_dir=" + str(root / "tact")]
    res = run_experiment(compose(args))
    path = Path(res["results_path"])
    assert path.name.endswith("_tact48.json") and json.loads(path.read_text())["correction"] == res["correction"]
    record = res["correction"]
    assert record["name"] == "tact" and record["num_images"] == 48 and record["sites"] == 1 + 4 * 3
    # one calibration per (alpha, task) on validation, reused for the test split
    assert record["calibrations"] == len(res["val"]) * len(demo_setup["tasks"])
    for task in demo_setup["tasks"]:
        corr, meta = load_correction(record["files"][task])
        assert meta["task"] == task and len(corr) == record["sites"]
        assert all(scale.shape == shift.shape for scale, shift in corr.values())
    calibration = list((root / "data" / ".tallmasks_cache").glob("*/*/train_calibration48_seed0.images.npy"))
    assert len(calibration) == len(demo_setup["tasks"])
    with pytest.raises(ConfigError, match="correction.num_images must be >= 1"):
        run_experiment(compose([*args, "correction.num_images=0"]))


def test_tact_calibrates_every_merged_vector_of_a_grid(demo_setup):
    """With method.grid, each combination's merged vector gets its own calibrations (none reused across
    combinations), and the chosen one is calibrated anew for the test split."""
    from tallmasks.experiments.runner import run_experiment

    root, tasks = demo_setup["root"], demo_setup["tasks"]
    res = run_experiment(
        compose(
            [
                *demo_setup["overrides"],
                "method=ties",
                "method.grid={k:[100,20]}",
                "correction=tact",
                "correction.num_images=16",
                "results_dir=" + str(root / "tact_grid"),
            ]
        )
    )
    combinations, alphas = 2, len(res["val"]) // 2
    assert res["correction"]["calibrations"] == (combinations * alphas + 1) * len(tasks)
    assert set(res["correction"]["files"]) == set(tasks) and "_tact16" in Path(res["results_path"]).name


def test_correction_and_alignment_settings_are_checked_up_front(demo_setup):
    from tallmasks.core.errors import ConfigError
    from tallmasks.experiments.runner import Experiment

    base = [*demo_setup["overrides"], "method=sum"]
    plain = Experiment(compose(base))
    assert not plain.correction.enabled and not plain.alignment.enabled and plain.variant == ""
    repair = Experiment(compose([*base, "correction=repair"]))
    assert repair.correction.num_images == 1000 and repair.results_path().name.endswith("_repair1000.json")
    assert repair.mask_path().name.endswith("_repair1000.safetensors")
    for overrides, message in (
        (["correction=tact", "+correction.images=5"], "unknown config field correction.images for correction 'tact'"),
        (["correction=tact", "correction.eps=-1"], "correction.eps must be >= 0"),
        (["+correction.num_images=5"], "correction=none takes no fields"),
        (["correction.name=tac"], "correction must be one of none, tact, repair"),
        (["alignment=weight_matching"], "needs alignment.foundations"),
        (["alignment=weight_matching", "alignment.foundations=[x]", "alignment.max_iter=0"], "alignment.max_iter must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            Experiment(compose([*base, *overrides]))


def test_main_weight_matching_undoes_a_permuted_foundation(demo_setup, tmp_path):
    """A second foundation that is the first with its units permuted, and an expert fine-tuned "from it"
    (the same expert, permuted): alignment=weight_matching recovers the plain run exactly."""
    import shutil

    from tallmasks.core.errors import ConfigError
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.models import DEMO_MODEL, finetuned_path, head_path, zeroshot_path
    from tallmasks.non_local import apply_permutation, heads_of_model, random_permutation, vit_spec

    loc, tasks = demo_setup["loc"], demo_setup["tasks"]
    other = tmp_path / "other" / "checkpoints"
    theta0 = torch.load(zeroshot_path(loc, DEMO_MODEL), weights_only=True)
    spec = vit_spec(theta0, heads_of_model(DEMO_MODEL))
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    for source, target in [
        (zeroshot_path(loc, DEMO_MODEL), zeroshot_path(other, DEMO_MODEL)),
        (finetuned_path(loc, DEMO_MODEL, tasks[1]), finetuned_path(other, DEMO_MODEL, tasks[1])),
    ]:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(apply_permutation(spec, perm, torch.load(source, weights_only=True)), target)
    shutil.copy(head_path(loc, DEMO_MODEL, tasks[1]), head_path(other, DEMO_MODEL, tasks[1]))
    shutil.copy(loc / DEMO_MODEL / "nonlinear_ft_accuracies.json", other / DEMO_MODEL / "nonlinear_ft_accuracies.json")

    plain = run_experiment(compose([*demo_setup["overrides"], "method=sum", "results_dir=" + str(tmp_path / "plain")]))
    aligned_args = [
        *demo_setup["overrides"],
        "method=sum",
        "alignment=weight_matching",
        f"alignment.foundations=[{other}]",
        "results_dir=" + str(tmp_path / "aligned"),
    ]
    aligned = run_experiment(compose([*aligned_args, "alignment.assignment=[0,1]"]))
    assert aligned["test"] == plain["test"] and aligned["val"] == plain["val"]
    record = aligned["alignment"]
    assert record["assignment"] == {tasks[0]: 0, tasks[1]: 1} and record["iterations"][1] >= 1
    assert record["objective"][1][1] > record["objective"][1][0]
    assert "_wm" in Path(aligned["results_path"]).name and Path(record["permutation_file"]).is_file()
    with pytest.raises(ConfigError, match=f"expert of {tasks[1]} exists under several foundations"):
        run_experiment(compose(aligned_args))


@pytest.mark.parametrize("method", ["magmax", "breadcrumbs", "model_stock", "pcb", "cart", "wudi"])
def test_main_runs_the_later_methods(demo_setup, method):
    """Each later method merges and evaluates through main.py's runner with its paper's defaults (its
    config file's grid left out here for time; the grid mechanism has its own test)."""
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.merging import get_method

    res = run_experiment(
        compose([*demo_setup["overrides"], f"method={method}", "method.grid=null", "results_dir=" + str(demo_setup["root"] / method)])
    )
    assert Path(res["results_path"]).is_file() and res["results_path"].startswith(str(demo_setup["root"] / method))
    expected = [0.5, 1.0] if get_method(method).coefficient == "grid" else [1.0]
    assert res["selection"]["alpha"] in expected and len(res["val"]) == len(expected)
    for task in demo_setup["tasks"]:
        assert 0 <= res["test"][f"{task}:top1"] <= 1


def test_grid_hyperparameters_are_chosen_on_validation_with_alpha(demo_setup, monkeypatch):
    """method.grid: every combination merged once, alpha and the combination chosen jointly on validation."""
    from tallmasks.core.errors import ConfigError
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.merging import merge as real_merge

    tasks = demo_setup["tasks"]
    merged = []

    def counting_merge(cs, method, **params):
        merged.append(params["k"])
        return real_merge(cs, method, **params)

    monkeypatch.setattr("tallmasks.merging.merge", counting_merge)
    overrides = [*demo_setup["overrides"], "method=ties", "method.grid={k:[100,20]}", "results_dir=" + str(demo_setup["root"] / "grid")]
    res = run_experiment(compose(overrides))
    assert merged == [100.0, 20.0]  # each distinct merge computed once
    assert set(res["val"]) == {f"k={k}|{a}" for k in (100, 20) for a in ("0.5", "1")}
    best_key = max(res["val"], key=lambda key: res["val"][key]["avg_normalized_top1"])  # first on ties, as the runner
    assert res["selection"] == {"alpha": float(best_key.split("|")[1]), "k": float(best_key.split("|")[0][2:])}
    assert res["val_best"] == res["val"][best_key]
    assert res["evaluations"]["evaluated"] == 2 * 2 * len(tasks) + len(tasks)
    name = Path(res["results_path"]).name
    assert f"ties_k={res['selection']['k']:g}" in name and "_grid-k=100,20" in name
    # the chosen merge is the one evaluated on test: the same as a run without a grid at the chosen k
    fixed = run_experiment(
        compose(
            [
                *demo_setup["overrides"],
                "method=ties",
                f"method.k={res['selection']['k']}",
                f"specify_lambda={res['selection']['alpha']}",
                "results_dir=" + str(demo_setup["root"] / "fixed"),
            ]
        )
    )
    assert fixed["test"] == res["test"]
    for grid, message in [
        ("{kk:[1]}", "not a hyperparameter"),
        ("{k:[]}", "non-empty list"),
        ("{k:abc}", "non-empty list"),
        ("{ties_agg:[max]}", "must be one of mean, sum"),
        ("{k:[0]}", "must be > 0"),
        ("{k:[20,20]}", "lists a value twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_experiment(compose([*demo_setup["overrides"], "method=ties", f"method.grid={grid}"]))


@pytest.mark.parametrize(
    "method,extra", [("lines", ["method.base_method=ties"]), ("tsv", []), ("iso_c", []), ("iso_cts", []), ("dare", ["method.p=0.5"])]
)
def test_new_methods_run_on_the_demo_model(demo_setup, method, extra):
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.merging import alpha_candidates

    tasks = demo_setup["tasks"]
    overrides = [*demo_setup["overrides"], f"method={method}", *extra, "n_eval_points=2", "results_dir=" + str(demo_setup["root"] / "new")]
    res = run_experiment(compose(overrides))
    params = {k: v for k, v in res["method"].items() if k not in ("name", "full_name", "grid")}
    alphas = alpha_candidates(method, 2, params=params)
    assert res["selection"]["alpha"] in alphas and set(res["val"]) == {f"{a:.6g}" for a in alphas}
    assert res["evaluations"]["evaluated"] == len(alphas) * len(tasks) + len(tasks)
    assert all(0 <= res["per_task"][t]["top1"] <= 1 for t in tasks)
    assert Path(res["results_path"]).is_file() and f"_{method}" in Path(res["results_path"]).name
    if method == "lines":
        assert res["merge_info"]["base_method"] == "ties" and res["merge_info"]["num_blocks"] >= 1


def test_main_emr_per_task_models(demo_setup):
    """EMR-merging through main.py: per-task masks and rescalers on the TALL evaluation path, nothing chosen."""
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.merging import CheckpointSet, merge
    from tallmasks.merging.methods.emr import emr_masks
    from tallmasks.models import DEMO_MODEL, finetuned_path, zeroshot_path

    root, tasks, loc = demo_setup["root"], demo_setup["tasks"], demo_setup["loc"]
    res = run_experiment(compose([*demo_setup["overrides"], "method=emr", "results_dir=" + str(root / "emr")]))
    assert res == {**only_result(root / "emr"), "results_path": res["results_path"], "rank": 0}
    assert set(res["val"]) == {"emr"} and res["evaluations"]["evaluated"] == 2 * len(tasks)
    cs = CheckpointSet(zeroshot_path(loc, DEMO_MODEL), [finetuned_path(loc, DEMO_MODEL, t) for t in tasks], names=tasks)
    scales = emr_masks(cs, merge(cs, "emr")).info["scales"]
    assert res["selection"]["scales"] == pytest.approx(scales) and all(s > 0 for s in scales.values())


def test_main_seed_ties_tall_is_the_seed_merge_with_lambda_one(demo_setup):
    """The non-local seed's merge through main.py: its TIES vector, TALL masks at lambda 1, alpha 1, nothing chosen."""
    from tallmasks.experiments.runner import run_experiment
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.merging import CheckpointSet, merge
    from tallmasks.merging.methods.seed_ties import seed_tall_mask
    from tallmasks.models import DEMO_MODEL, finetuned_path, zeroshot_path

    root, tasks, loc = demo_setup["root"], demo_setup["tasks"], demo_setup["loc"]
    res = run_experiment(compose([*demo_setup["overrides"], "method=seed_ties_tall", "results_dir=" + str(root / "seed")]))
    assert res["selection"]["lambdas"] == dict.fromkeys(tasks, 1.0) and set(res["val"]) == {"1"}
    theta0 = load_state_dict(zeroshot_path(loc, DEMO_MODEL))
    experts = [load_state_dict(finetuned_path(loc, DEMO_MODEL, t)) for t in tasks]
    cs = CheckpointSet(theta0, experts, names=tasks)
    vector = merge(cs, "seed_ties_tall")
    for index in range(len(tasks)):
        mask = seed_tall_mask(cs, index, vector)
        for key in ("model.visual.proj", "model.visual.conv1.weight"):
            tau = experts[index][key].float() - theta0[key].float()
            assert torch.equal(mask[key], tau.abs() >= (vector[key] - tau).abs()), key
