"""The offline non-local experiment (``python -m tallmasks.demo --nonlocal``) on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tallmasks.datasets import DEMO_DATASETS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nonlocal_experiment_end_to_end(tmp_path):
    """Two quick foundations, their experts, every variant through the runner: the JSON has the issue's
    structure, accuracies are fractions that agree with the runner's results files, theta_0 of the unaligned
    merge is the foundations' mean, and the variance-collapse table and figure are written."""
    from tallmasks.demo.local import DemoConfig
    from tallmasks.demo.non_local import FIGURE_NAME, NONLOCAL_VARIANTS, RESULTS_NAME, NonLocalSettings, format_tables, run_nonlocal
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import DEMO_MODEL, zeroshot_path

    tasks = DEMO_DATASETS[:2]
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = DemoConfig.quick(tasks=tasks, cache_dir=cache, output_dir=out)
    settings = NonLocalSettings(
        methods=("sum", "seed_ties_tall"),
        tact_images=16,
        repair_images=8,
        calibration_sizes=(8, 4000),
        augmented_sizes=(8,),
        alpha_points=2,
    )
    returned = run_nonlocal(cfg, settings)
    summary = json.loads((out / RESULTS_NAME).read_text())
    assert summary == json.loads(json.dumps(returned)) and "align_tact" in format_tables(summary)
    assert set(summary["zeroshot"]) == {"nonlocal_none", "nonlocal_align", "local"}
    assert set(summary["nonlocal"]) == set(summary["local"]) == set(summary["long"]) == {"sum", "seed_ties_tall"}
    assert set(summary["nonlocal"]["sum"]) == set(NONLOCAL_VARIANTS)
    assert set(summary["local"]["sum"]) == set(summary["long"]["sum"]) == {"none", "tact"}
    assert summary["foundations"]["reference"]["tasks"] == tasks[:1] and summary["foundations"]["other"]["tasks"] == tasks[1:]

    for label, run in summary["runs"].items():
        if label.startswith("zeroshot/"):
            assert 0.0 <= run["avg_top1"] <= 1.0 and summary["zeroshot"][label.split("/")[1]] == run["avg_normalized_top1"]
            continue
        setting, method, variant = label.split("/")[-3:]
        result = json.loads(open(run["results_path"]).read())
        assert 0.0 <= run["avg_top1"] <= 1.0, label
        # normalized accuracy: the mean over tasks of the merged model's top-1 over its own expert's
        expected = sum(result["per_task"][t]["top1"] / result["finetuned_accuracies"][t] for t in tasks) / len(tasks)
        assert run["avg_normalized_top1"] == pytest.approx(expected), label
        if not label.startswith("calibration"):
            assert summary[setting][method][variant] == run["avg_normalized_top1"], label
        if setting == "embedding_ablation":  # every cell aligned; corrected unless "+none"
            assert "alignment" in run and ("correction" in run) == (not variant.endswith("+none")), label
            continue
        assert ("alignment" in run) == (setting == "nonlocal" and variant != "none"), label
        corrected = variant in ("tact", "align_tact", "align_repair", "align_repair_seed_code") or label.startswith("calibration")
        assert ("correction" in run) == corrected, label
        if corrected:
            assert run["correction"]["embedding"] is True, label  # the output embedding corrected too
        if "alignment" in run:
            assert run["alignment"]["embedding"] is True, label
        assert 0.0 <= run["val_avg_normalized_top1"]  # alpha chosen on validation
    for group in ("nonlocal", "local", "long"):
        for value in summary[group]["sum"].values():
            assert 0.0 <= summary["runs"]["local/sum/none"]["avg_top1"] <= 1.0 and math.isfinite(value) and value >= 0.0
    assert summary["runs"]["nonlocal/sum/align_tact"]["correction"]["name"] == "tact"
    assert summary["runs"]["nonlocal/sum/align_repair"]["correction"]["num_images"] == 8
    assert summary["runs"]["nonlocal/sum/align_repair_seed_code"]["correction"]["rule"] == "seed_code"
    assert summary["runs"]["nonlocal/sum/align_repair"]["correction"]["rule"] == "mean_std"
    assert summary["std_ratio"]["local"]["sites"][-1].endswith("visual:out")  # the output embedding is a site
    augmented = summary["runs"]["calibration_augmented/nonlocal/sum/8"]["correction"]
    assert augmented["augment"] is True and augmented["num_images"] == 8
    assert set(summary["calibration_size"]["augmented"]["local"]["sum"]) == {"8"}
    # the output embedding's two changes apart (the seed's merge): its both-on and align-only cells are the grid's
    ablation = summary["embedding_ablation"]["seed_ties_tall"]
    assert set(ablation) == {f"{a}+{c}" for a in ("plain", "embedding") for c in ("none", "plain", "embedding")}
    assert ablation["embedding+embedding"] == summary["nonlocal"]["seed_ties_tall"]["align_tact"]
    assert ablation["embedding+none"] == summary["nonlocal"]["seed_ties_tall"]["align"]
    assert summary["runs"]["embedding_ablation/seed_ties_tall/plain+embedding"]["alignment"]["embedding"] is False
    assert summary["runs"]["embedding_ablation/seed_ties_tall/embedding+plain"]["correction"]["embedding"] is False
    assert "output embedding" in format_tables(summary)
    markdown = format_tables(summary, "markdown")  # the docs' tables: rows named by their merge, std ratios per site
    assert "| the seed's merge (`seed_ties_tall`" in markdown and "| site | ln_pre in |" in markdown
    assert "| local | " in markdown and "embedding |" in markdown.split("| site |")[1].splitlines()[0]

    calibration = summary["calibration_size"]
    assert set(calibration["nonlocal"]["sum"]) == set(calibration["local"]["sum"]) == {"8", "4000"}
    assert calibration["images_used"]["8"] == 8 and 8 < calibration["images_used"]["4000"] < 4000  # capped by the split

    ratios = summary["std_ratio"]
    assert set(ratios) == {"non-local", "non-local aligned", "local", "long fine-tuning"}
    for entry in ratios.values():
        assert entry["sites"] and set(entry["before"]) == set(entry["after"]) == set(entry["sites"])
        assert all(value > 0 and math.isfinite(value) for value in [*entry["before"].values(), *entry["after"].values()])
    assert (out / FIGURE_NAME).stat().st_size > 0

    # theta_0 without alignment: the mean of the two foundations as they are
    theta0 = {name: load_state_dict(zeroshot_path(path, DEMO_MODEL)) for name, path in summary["checkpoints"].items()}
    for key in ("model.visual.conv1.weight", "model.visual.transformer.resblocks.0.mlp.c_fc.weight"):
        torch.testing.assert_close(theta0["unaligned"][key], (theta0["local"][key] + theta0["other"][key]) / 2)
        assert not torch.equal(theta0["local"][key], theta0["other"][key])
    assert theta0["long"][key].equal(theta0["local"][key])


def test_nonlocal_cnn_setting_end_to_end(tmp_path):
    """--architecture cnn: two VGG foundations, experts with trained heads (each differs from the zero-shot
    head of its foundation), weight matching of the chain with the output embedding, TACT at the VGG's 9
    sites; nonlocal_cnn.json has the ViT file's structure and the figure is written."""
    from tallmasks.datasets import get_spec
    from tallmasks.demo.local import DemoConfig, pretrain_foundation
    from tallmasks.demo.non_local import FIGURE_NAMES, NONLOCAL_VARIANTS, RESULTS_NAMES, NonLocalSettings, format_tables, run_nonlocal
    from tallmasks.models import DEMO_CNN_MODEL, ClassificationHead, build_zeroshot_head, head_path
    from tallmasks.non_local.weight_matching import load_permutation

    tasks = DEMO_DATASETS[:2]
    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = DemoConfig.quick(tasks=tasks, cache_dir=cache, output_dir=out)
    settings = NonLocalSettings(
        methods=("sum", "seed_ties_tall"),
        tact_images=16,
        repair_images=8,
        calibration_sizes=(8,),
        augmented_sizes=(),
        alpha_points=2,
        architecture="cnn",
    )
    summary = run_nonlocal(cfg, settings)
    assert json.loads((out / RESULTS_NAMES["cnn"]).read_text()) == json.loads(json.dumps(summary))
    assert (out / FIGURE_NAMES["cnn"]).stat().st_size > 0 and not (out / RESULTS_NAMES["vit"]).exists()
    assert summary["model"] == DEMO_CNN_MODEL and summary["architecture"] == "cnn"
    assert set(summary["nonlocal"]["seed_ties_tall"]) == set(NONLOCAL_VARIANTS)
    assert set(summary["local"]["sum"]) == {"none", "tact"}
    assert summary["settings"]["demo"]["finetune"]["train_head"] is True
    assert set(summary["embedding_ablation"]["seed_ties_tall"]) == {
        "plain+none",
        "plain+embedding",
        "embedding+none",
        "embedding+embedding",
    }
    for entry in summary["std_ratio"].values():
        assert len(entry["sites"]) == 9 and entry["sites"][-1] == "model.visual.layers.26:out"
    assert "| site | conv1 | conv2 | conv3 | conv4 | conv5 | conv6 | dense1 | dense2 | embedding |" in format_tables(summary, "markdown")
    record = summary["runs"]["nonlocal/sum/align"]["alignment"]
    perm = load_permutation(record["permutation_file"])
    assert "1/P_embed" in perm and not torch.equal(perm["1/P_embed"], torch.arange(64))
    foundation = pretrain_foundation(settings.demo_config(cfg).pretrain, cache)  # the cached reference foundation
    for task in tasks[:1]:  # trained heads: the expert's head is not the zero-shot head of its foundation
        trained = ClassificationHead.load(head_path(summary["checkpoints"]["local"], DEMO_CNN_MODEL, task))
        spec = get_spec(task)
        zeroshot = build_zeroshot_head(foundation.clip, spec.classnames, spec.templates, model_name=DEMO_CNN_MODEL)
        assert trained.weight.shape == zeroshot.weight.shape and not torch.allclose(trained.weight, zeroshot.weight, atol=1e-4)


def test_long_regime_follows_the_demo_settings():
    from tallmasks.demo.local import FinetuneSettings
    from tallmasks.demo.non_local import NonLocalSettings

    base = FinetuneSettings(steps=7, lr=1e-3, warmup_steps=2, batch_size=16)
    long = NonLocalSettings(long_steps_factor=3, long_lr_factor=5).long_finetune(base)
    assert (long.steps, long.warmup_steps, long.lr, long.batch_size) == (21, 6, pytest.approx(5e-3), 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--other-seed", "0"], "--other-seed must differ"),
        (["--methods", "consensus"], "non-local methods are sum, ties, tall_mask"),
        (["--tasks", DEMO_DATASETS[0]], "at least 2 tasks"),
        (["--calibration-sizes", "0"], "--calibration-sizes must be >= 1"),
        (["--alpha-points", "1"], "--alpha-points must be >= 2"),
        (["--seed", "0", "2"], "one --seed"),
    ],
)
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, args, message):
    from tallmasks.demo.cli import main

    assert main(["--nonlocal", "--quick", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_defaults_run_the_seed_merge_and_write_to_results_nonlocal():
    from tallmasks.demo.non_local import DEFAULT_METHODS, parse_args

    cfg, settings = parse_args(["--quick"])
    assert str(cfg.output_dir) == "results/nonlocal" and settings.methods == DEFAULT_METHODS and settings.embedding
    assert {"seed_ties_tall", "tall_mask_ties"} <= set(settings.methods)
    settings.check(cfg)  # every default method is one the experiment runs
    cfg, settings = parse_args(["--quick", "--output-dir", "elsewhere", "--no-embedding"])
    assert str(cfg.output_dir) == "elsewhere" and not settings.embedding
    assert settings.calibration_sizes == (20, 50, 200, 1000) and settings.augmented_sizes == (200, 1000)


def test_the_cnn_setting_swaps_in_the_vgg_and_trained_heads_and_keeps_the_vit_caches():
    """--architecture cnn: the VGG foundation (the ViT's pre-training otherwise), experts with trained heads
    after a linear probe, its shorter calibration tables unless given; the ViT's cache keys are unchanged."""
    from tallmasks.demo.local import FinetuneSettings, PretrainSettings
    from tallmasks.demo.non_local import CNN_AUGMENTED_SIZES, CNN_CALIBRATION_SIZES, CNN_PROBE_STEPS, parse_args
    from tallmasks.models import DEMO_CNN_MODEL, DEMO_MODEL

    cfg, settings = parse_args(["--architecture", "cnn"])
    assert settings.architecture == "cnn" and cfg.model == DEMO_MODEL  # swapped when the experiment runs
    assert (settings.calibration_sizes, settings.augmented_sizes) == (CNN_CALIBRATION_SIZES, CNN_AUGMENTED_SIZES)
    cnn = settings.demo_config(cfg)
    assert cnn.model == DEMO_CNN_MODEL and cnn.finetune.train_head and cnn.finetune.probe_steps == CNN_PROBE_STEPS
    assert (cnn.pretrain.steps, cnn.finetune.steps, cnn.finetune.lr) == (cfg.pretrain.steps, cfg.finetune.steps, cfg.finetune.lr)
    assert cnn.pretrain.fingerprint() != cfg.pretrain.fingerprint() and cnn.finetune.fingerprint() != cfg.finetune.fingerprint()
    assert settings.demo_config(cfg) == cnn and parse_args([])[1].demo_config(cfg) is cfg
    _, given = parse_args(["--architecture", "cnn", "--calibration-sizes", "7", "--augmented-sizes"])
    assert (given.calibration_sizes, given.augmented_sizes) == ((7,), ())
    # the ViT's foundation and experts keep the cache keys of the committed results (made before the CNN fields)
    committed = json.loads((Path(__file__).resolve().parents[1] / "results" / "nonlocal" / "nonlocal.json").read_text())
    assert PretrainSettings().fingerprint() == committed["foundations"]["reference"]["fingerprint"]
    assert f"experts-{FinetuneSettings().fingerprint()}" in committed["checkpoints"]["local"]


def test_result_paths_under_the_working_folder_are_written_relative(tmp_path):
    from tallmasks.demo.non_local import relative_paths

    root = tmp_path / "repo"
    summary = {"a": str(root / ".demo_cache" / "x.json"), "b": ["/elsewhere/y", str(root / "z")], "c": 1.5, "d": {"e": str(root)}}
    assert relative_paths(summary, root) == {"a": ".demo_cache/x.json", "b": ["/elsewhere/y", "z"], "c": 1.5, "d": {"e": str(root)}}


def test_tables_of_a_results_file_and_one_line_errors(tmp_path, capsys):
    from tallmasks.demo.non_local import tables_main

    bad = tmp_path / "other.json"
    bad.write_text('{"nonlocal": {}}')
    for path, message in ((tmp_path / "missing.json", "no such JSON file"), (bad, "not a non-local results file")):
        assert tables_main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    committed = Path(__file__).resolve().parents[1] / "results" / "nonlocal" / "nonlocal.json"
    assert tables_main([str(committed)]) == 0 and "| TA (`sum`, alpha on Val) |" in capsys.readouterr().out
