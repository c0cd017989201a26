"""The offline demo: its task suite of generated scenes, captions, vocabulary, pre-training, and short end-to-end runs."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tallmasks.datasets import DEMO_DATASETS, get_spec, load_split, scenes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_suite_is_one_ordered_list_of_at_least_twenty_tasks_with_distinct_label_spaces():
    assert DEMO_DATASETS == [t.name for t in scenes.SCENE_TASKS] and len(DEMO_DATASETS) >= 20
    label_spaces = [tuple(get_spec(name + "Val").classnames) for name in DEMO_DATASETS]
    assert len(set(label_spaces)) == len(label_spaces)
    for name, classes in zip(DEMO_DATASETS, label_spaces):
        assert len(classes) >= 2 and len(set(classes)) == len(classes), name
        assert all(isinstance(t(classes[0]), str) for t in get_spec(name).templates)


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("name", [DEMO_DATASETS[i] for i in (4, 7, 19)])
def test_splits_sizes_disjoint_pools_and_the_paper_val_rule(name):
    train, val, test = (load_split(name, s, "unused") for s in ("train", "val", "test"))
    n = len(train) + len(val)
    assert n == scenes.TRAIN_SIZE and len(test) == scenes.TEST_SIZE >= 1000
    assert len(val) == min(int(0.1 * n), 5000)
    expected = torch.utils.data.random_split(range(n), [n - len(val), len(val)], generator=torch.Generator().manual_seed(0))
    assert list(val.indices) == list(expected[1].indices) and list(train.indices) == list(expected[0].indices)
    # no image is shared between the train/val pool, the test pool and the pre-training pool
    images, _, _ = scenes.task_pool(name, "pretrain", 300)
    pools = {
        "train": {_digest(train[i][0]) for i in range(len(train))} | {_digest(val[i][0]) for i in range(len(val))},
        "test": {_digest(test[i][0]) for i in range(len(test))},
        "pretrain": {hashlib.sha1(im.tobytes()).hexdigest() for im in images},
    }
    assert pools["train"].isdisjoint(pools["test"]) and pools["pretrain"].isdisjoint(pools["train"] | pools["test"])
    classes = len(get_spec(name).classnames)
    for dataset in (train, test):
        labels = [dataset[i][1] for i in range(len(dataset))]
        assert set(labels) == set(range(classes))
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (scenes.IMAGE_SIZE,) * 2
    assert isinstance(label, int)


def test_handwritten_digit_pools_are_disjoint():
    pools = scenes.glyph_pools()
    flat = {pool: np.concatenate(list(by_digit.values())) for pool, by_digit in pools.items()}
    together = np.concatenate(list(flat.values()))
    assert len(together) == len(set(together.tolist())) == 1797


def test_scenes_are_deterministic_and_tasks_differ_in_inputs():
    a, label_a, facts_a = scenes.draw("Counts", "test", 7)
    b, label_b, facts_b = scenes.draw("Counts", "test", 7)
    assert np.array_equal(a, b) and label_a == label_b and facts_a == facts_b
    assert facts_a["count"] == label_a + 1
    means = np.stack([scenes.task_pool(name, "pretrain", 64)[0].reshape(64, -1).mean(0) for name in DEMO_DATASETS])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert np.all(distances[~np.eye(len(means), dtype=bool)] > 0)


def test_foundation_fingerprint_follows_the_rendered_scenes(monkeypatch):
    from tallmasks.demo.local import PretrainSettings

    before = PretrainSettings().fingerprint()
    assert PretrainSettings().fingerprint() == before
    task = scenes.TASKS_BY_NAME["Shapes"]

    def brighter(rng, label, pool):
        canvas, facts = task.draw(rng, label, pool)
        canvas.pixels[:] = np.minimum(canvas.pixels + 1, 255)
        return canvas, facts

    changed = scenes.SceneTask(task.name, task.classnames, task.templates, brighter, task.description)
    monkeypatch.setattr(scenes, "SCENE_TASKS", [changed, *scenes.SCENE_TASKS[1:]])
    assert PretrainSettings().fingerprint() != before  # a changed scene is never served a stale cached foundation


def test_house_numbers_contrast_with_their_plate():
    for index in range(20):
        image, _, _ = scenes.draw("StreetDigits", "train", index)
        luminance = image.astype(np.float32).mean(axis=-1)
        assert luminance.max() - luminance.min() > 100, index


def test_captions_are_partial_noisy_and_in_the_demo_vocabulary():
    from tallmasks.models import DEMO_MODEL, get_tokenizer
    from tallmasks.models.vocabulary import words_of

    rng = np.random.default_rng(0)
    facts = {"shape": "circle", "color": "red", "texture": "striped", "count": 3}
    exact = scenes.CaptionStyle(mention=1.0, noise=0.0, exact_count=1.0)
    assert scenes.caption(facts, rng, exact) == "three red circles on a striped background"
    noisy = [scenes.caption(facts, rng, scenes.CaptionStyle(mention=0.5, noise=0.5)) for _ in range(200)]
    assert any("red" not in c for c in noisy) and any("circle" not in c for c in noisy)
    assert any("blue" in c or "green" in c or "yellow" in c for c in noisy)
    vocabulary = set(words_of(scenes.corpus()))
    tokenizer = get_tokenizer(DEMO_MODEL)
    for name in DEMO_DATASETS:
        for i in range(30):
            text = scenes.caption(scenes.draw(name, "pretrain", i)[2], rng, scenes.CaptionStyle())
            assert set(words_of([text])) <= vocabulary, text
            assert int((tokenizer([text])[0] != 0).sum()) <= 24  # fits the context with its start and end tokens


def test_shipped_vocabulary_is_learned_from_the_demo_corpus():
    from tallmasks.models import DEMO_MODEL, create_clip, get_tokenizer
    from tallmasks.models.encoder import CONFIG_DIR
    from tallmasks.models.vocabulary import learn_bpe, read_bpe, vocabulary_size, words_of

    words = words_of(scenes.corpus())
    merges = learn_bpe(words)
    assert read_bpe(CONFIG_DIR / "tallmasks-demo-bpe.txt.gz") == merges
    tokenizer = get_tokenizer(DEMO_MODEL)
    assert tokenizer.vocab_size == vocabulary_size(merges)
    assert all(len(tokenizer.encode(w)) == 1 for w in words)
    clip = create_clip(DEMO_MODEL, pretrained=None)
    assert clip.token_embedding.num_embeddings == tokenizer.vocab_size
    assert tokenizer(["an unknown word: zebra!"]).max() < tokenizer.vocab_size  # bytes still tokenize


def test_pretraining_reduces_the_contrastive_loss():
    from tallmasks.demo.local import PretrainingData, contrastive_loss, pretrain
    from tallmasks.models import DEMO_MODEL, create_clip, get_tokenizer

    torch.manual_seed(0)
    clip = create_clip(DEMO_MODEL, pretrained=None)
    cfg = clip.visual.preprocess_cfg
    data = PretrainingData(get_tokenizer(DEMO_MODEL), cfg["mean"], cfg["std"], 40, scenes.CaptionStyle())
    probe = torch.arange(0, len(data), len(data) // 128)[:128]
    probe_captions = data.captions(probe.tolist(), np.random.default_rng(1))

    def probe_loss() -> float:
        with torch.no_grad():
            return float(contrastive_loss(clip.eval(), data.images[probe], probe_captions, data))

    before = probe_loss()
    losses = pretrain(clip, data, steps=25, batch_size=64, lr=2e-3, seed=0)
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert probe_loss() < before - 0.05


def _runner_available() -> bool:
    try:
        return importlib.util.find_spec("tallmasks.experiments.runner") is not None
    except ModuleNotFoundError:
        return False


needs_runner = pytest.mark.skipif(not _runner_available(), reason="tallmasks.experiments.runner (run_experiment) is not available")


@needs_runner
def test_quick_demo_writes_a_complete_summary(tmp_path):
    from tallmasks.demo.local import SUMMARY_METHODS, DemoConfig, run_demo

    cfg = DemoConfig.quick(num_tasks=2, cache_dir=tmp_path / "cache", output_dir=tmp_path / "out")
    summary = run_demo(cfg)
    tasks = DEMO_DATASETS[:2]
    written = json.loads((tmp_path / "out" / "summary_2tasks.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written["methods"]) == set(SUMMARY_METHODS) and written["tasks"] == tasks
    assert written["seeds"] == {"pretrain": 0, "finetune": 0}
    for name, entry in written["methods"].items():
        assert set(entry["per_task"]) == set(tasks), name
        assert 0.0 <= entry["avg_top1"] <= 1.0
        assert entry["avg_normalized_top1"] >= 0.0
    assert written["methods"]["finetuned"]["avg_normalized_top1"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "mask_agreement_2tasks.png").stat().st_size > 0
    assert written["profile"] == "fast"
    shape = written["task_vectors"]
    assert set(shape["per_task"]) == set(tasks) and -1.0 <= shape["cosine"]["min"] <= shape["cosine"]["max"] <= 1.0
    agreement = shape["agreement"]
    profile = written["mask_agreement"]["weights"]  # the same masks, counted over the whole image tower
    assert agreement["catastrophic"] == pytest.approx(profile[0] / sum(profile))
    assert agreement["kept_by_all"] == pytest.approx(profile[-1] / sum(profile))


@needs_runner
def test_experts_are_cached_and_reused_across_task_counts(tmp_path, monkeypatch):
    import tallmasks.experiments.finetuning as finetuning
    from tallmasks.demo.local import DemoConfig, experts_location, pretrain_foundation, run_demo
    from tallmasks.models import DEMO_MODEL, finetuned_path

    trained: list[str] = []
    original = finetuning.finetune

    def counting(cfg, **kwargs):
        trained.append(cfg.dataset)
        return original(cfg, **kwargs)

    monkeypatch.setattr(finetuning, "finetune", counting)
    common = dict(cache_dir=tmp_path / "cache", output_dir=tmp_path / "out", methods=["zeroshot", "sum", "finetuned"])
    first = run_demo(DemoConfig.quick(num_tasks=2, **common))
    location = experts_location(pretrain_foundation(DemoConfig.quick().pretrain, tmp_path / "cache"), DemoConfig.quick().finetune)
    stamps = {t: finetuned_path(location, DEMO_MODEL, t).stat().st_mtime_ns for t in DEMO_DATASETS[:2]}
    second = run_demo(DemoConfig.quick(num_tasks=3, **common))
    assert trained == DEMO_DATASETS[:3]  # the first two experts were not fine-tuned again
    assert {t: finetuned_path(location, DEMO_MODEL, t).stat().st_mtime_ns for t in DEMO_DATASETS[:2]} == stamps
    for task in DEMO_DATASETS[:2]:
        assert second["methods"]["finetuned"]["per_task"][task] == first["methods"]["finetuned"]["per_task"][task]
    assert (tmp_path / "out" / "summary_2tasks.json").is_file() and (tmp_path / "out" / "summary_3tasks.json").is_file()


def test_experts_fine_tuned_in_worker_processes_equal_those_fine_tuned_in_turn(tmp_path):
    from tallmasks.demo.local import DemoConfig, finetune_experts, pretrain_foundation
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import DEMO_MODEL, finetuned_path

    cfg = DemoConfig.quick()
    tasks = DEMO_DATASETS[:3]
    files = {}
    for workers in (1, 2):
        foundation = pretrain_foundation(cfg.pretrain, tmp_path / f"cache{workers}")
        location = finetune_experts(foundation, tasks, cfg.finetune, workers=workers)
        files[workers] = {t: load_state_dict(finetuned_path(location, DEMO_MODEL, t)) for t in tasks}
    for task in tasks:
        one, two = files[1][task], files[2][task]
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one), task


def test_a_worker_process_that_dies_is_one_clear_error():
    import os

    from tqdm import tqdm

    from tallmasks.core.errors import TallmasksError
    from tallmasks.demo.local import _in_processes

    with pytest.raises(TallmasksError, match="worker process for Shapes died.*workers=1"):
        _in_processes(os._exit, [(3,)], ["Shapes"], 2, tqdm(disable=True))


def test_command_line_seeds_methods_and_errors(tmp_path, capsys):
    from tallmasks.demo.local import DemoConfig, main, parse_args

    configs = parse_args(["--num-tasks", "14", "--seed", "0", "2", "--methods", "sum", "finetuned"])
    assert [c.pretrain.seed for c in configs] == [0, 2] and configs[0].methods == ["sum", "finetuned"]
    assert configs[0].task_names() == DEMO_DATASETS[:14]
    assert configs[0].summary_name() == "summary_14tasks.json" and configs[1].summary_name() == "summary_14tasks_seed2.json"
    assert DemoConfig().summary_name() == "summary.json"
    assert configs[0].pretrain.fingerprint() != configs[1].pretrain.fingerprint()
    assert configs[0].finetune.fingerprint() == configs[1].finetune.fingerprint()
    assert main(["--methods", "no_such_method", "--cache-dir", str(tmp_path)]) == 2
    assert "no_such_method" in capsys.readouterr().err
    assert main(["--num-tasks", "99", "--cache-dir", str(tmp_path)]) == 2
    assert parse_args(["--workers", "3"])[0].workers == 3 and DemoConfig.quick().workers == 1
    assert DemoConfig().workers == 1 and parse_args([])[0].workers >= 1 and parse_args(["--quick"])[0].workers == 1
    assert main(["--workers", "0", "--cache-dir", str(tmp_path)]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written before the inputs are checked


def test_profiles_select_fine_tuning_and_output(capsys):
    from tallmasks.demo.local import PROFILES, DemoConfig, parse_args

    fast, paper = parse_args([])[0], parse_args(["--profile", "paper", "--num-tasks", "20"])[0]
    assert fast.finetune == DemoConfig().finetune == PROFILES["fast"] and str(fast.output_dir) == "results/demo"
    assert paper.finetune == PROFILES["paper"] and paper.profile == "paper" and str(paper.output_dir) == "results/demo-paper"
    assert (paper.finetune.lr, paper.finetune.weight_decay, paper.finetune.warmup_steps) == (1e-5, 0.1, 500)
    assert paper.finetune.steps >= 2000 and paper.finetune.fingerprint() != fast.finetune.fingerprint()
    quick = parse_args(["--profile", "paper", "--quick", "--output-dir", "elsewhere"])[0]
    assert quick.finetune.lr == 1e-5 and quick.finetune.steps == DemoConfig.quick().finetune.steps and str(quick.output_dir) == "elsewhere"
    with pytest.raises(SystemExit):
        parse_args(["--profile", "slow"])
    assert "--profile" in capsys.readouterr().err


def test_task_vector_shape_figures_equal_a_plain_numpy_computation():
    from tallmasks.demo.shape import cosine_matrix, kurtosis, top_share

    rng = np.random.default_rng(0)
    x = rng.standard_t(5, size=20_000)
    centred = x - x.mean()
    assert kurtosis(torch.from_numpy(x)) == pytest.approx(np.mean(centred**4) / np.mean(centred**2) ** 2)
    squares = np.sort(x**2)[::-1]
    assert top_share(torch.from_numpy(x)) == pytest.approx(squares[:4000].sum() / squares.sum())
    assert kurtosis(torch.from_numpy(rng.standard_normal(200_000))) == pytest.approx(3.0, abs=0.05)
    vectors = [rng.standard_normal(50) for _ in range(3)]
    expected = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in vectors] for a in vectors]
    np.testing.assert_allclose(cosine_matrix([torch.from_numpy(v) for v in vectors]).numpy(), expected)


def test_profile_comparison_reads_both_profiles_and_names_a_missing_summary(tmp_path, capsys):
    from dataclasses import asdict

    from tallmasks.demo.local import PROFILES
    from tallmasks.demo.profiles import TASK_COUNTS, main, summary_file

    rng = np.random.default_rng(1)
    methods = ["zeroshot", "sum", "ties", "consensus", "tall_mask", "tall_mask_ties", "finetuned"]
    written = {}
    for profile in ("fast", "paper"):
        for n in TASK_COUNTS:
            tasks = DEMO_DATASETS[:n]
            norm = {m: float(rng.uniform(0.3, 1.0)) for m in methods}
            per_task = {
                t: {"kurtosis": float(rng.uniform(2, 6)), "top20_share": 0.6, "norm_ratio": 0.03, "mask_density": 0.4} for t in tasks
            }
            summary = {
                "tasks": tasks,
                "methods": {
                    m: {"avg_normalized_top1": v, "avg_top1": v / 2, "per_task": {t: {"top1": v / 2} for t in tasks}}
                    for m, v in norm.items()
                },
                "settings": {"finetune": asdict(PROFILES[profile])},
                "task_vectors": {
                    "per_task": per_task,
                    "cosine": {"mean": 0.1, "min": 0.0, "max": 0.4},
                    "agreement": {"catastrophic": 0.05, "selfish": 0.1, "kept_by_all": 0.07},
                },
            }
            path = summary_file(tmp_path / profile, n)
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(summary))
            written[(profile, n)] = norm
    args = ["--fast-dir", str(tmp_path / "fast"), "--paper-dir", str(tmp_path / "paper")]
    args += ["--output", str(tmp_path / "profiles.json"), "--figure", str(tmp_path / "scaling.png")]
    assert main(args) == 0
    out = json.loads((tmp_path / "profiles.json").read_text())
    for (profile, n), norm in written.items():
        assert out["profiles"][profile]["runs"][str(n)]["normalized"]["ties"] == pytest.approx(100 * norm["ties"])
    assert out["paper_vit_b32_normalized"]["8"]["tall_mask"] == pytest.approx(99.7)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    tables = capsys.readouterr().out
    assert f"{100 * written[('paper', 20)]['consensus']:.1f}" in tables and "kurtosis" in tables
    assert "paper profile, 20 tasks" in tables and "| ColorCounts |" in tables  # the per-task tables
    original = summary_file(tmp_path / "paper", 8).read_text()
    quick = json.loads(original)
    quick["settings"]["finetune"]["steps"] = 3
    summary_file(tmp_path / "paper", 8).write_text(json.dumps(quick))
    assert main(args) == 2
    assert "paper profile" in capsys.readouterr().err
    summary_file(tmp_path / "paper", 8).write_text(original)
    summary_file(tmp_path / "paper", 14).unlink()
    assert main(args) == 2
    assert "summary_14tasks.json" in capsys.readouterr().err
