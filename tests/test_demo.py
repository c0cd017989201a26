"""The offline demo: its eight digit tasks, contrastive pre-training, and a short end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tallmasks.datasets import DEMO_DATASETS, get_spec, load_split
from tallmasks.datasets import digits

EXPECTED_CLASSES = {
    "DigitsRotated": 10,
    "DigitsParity": 2,
    "DigitsSize": 2,
    "DigitsMod3": 3,
    "DigitsColored": 10,
    "DigitsLoops": 3,
    "DigitsPrime": 2,
    "DigitsBold": 10,
}


def test_eight_tasks_registered_with_their_class_counts():
    assert DEMO_DATASETS == list(EXPECTED_CLASSES)
    for name, count in EXPECTED_CLASSES.items():
        spec = get_spec(name + "Val")
        assert spec.name == name and len(spec.classnames) == count
        assert all(isinstance(t(spec.classnames[0]), str) for t in spec.templates)


def test_pools_are_disjoint_and_cover_the_digits():
    pools = digits.source_pools()
    together = np.concatenate([pools["pretrain"], pools["train"], pools["test"]])
    assert len(together) == 1797 and len(set(together.tolist())) == 1797


@pytest.mark.parametrize("name", ["DigitsRotated", "DigitsMod3", "DigitsColored", "DigitsPrime"])
def test_splits_sizes_disjointness_labels_and_images(name):
    train, val, test = (load_split(name, s, "unused") for s in ("train", "val", "test"))
    n = len(train) + len(val)
    assert len(val) == min(int(0.1 * n), 5000) and len(test) == digits.TEST_SIZE
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted(train.indices + val.indices) == list(range(n))
    # the paper's split rule: random_split with a generator seeded 0
    expected = torch.utils.data.random_split(range(n), [n - len(val), len(val)], generator=torch.Generator().manual_seed(0))
    assert list(val.indices) == list(expected[1].indices)
    for dataset in (train, val, test):
        labels = {dataset[i][1] for i in range(len(dataset))}
        assert labels <= set(range(EXPECTED_CLASSES[name]))
        assert len(labels) == EXPECTED_CLASSES[name]
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.size == (digits.DEMO_IMAGE_SIZE, digits.DEMO_IMAGE_SIZE)
    assert isinstance(label, int)


def test_labels_follow_the_digit():
    images, labels = digits._digits()
    test_idx = digits.source_pools()["test"]
    parity = load_split("DigitsParity", "test", "")
    loops = load_split("DigitsLoops", "test", "")
    for j in range(20):
        d = int(labels[test_idx[j]])
        assert parity[j][1] == d % 2
        assert loops[j][1] == digits.LOOPS[d]


def test_tasks_are_deterministic_and_views_differ():
    a = np.asarray(load_split("DigitsMod3", "test", "")[5][0])
    digits._task_pool.cache_clear()
    b = np.asarray(load_split("DigitsMod3", "test", "")[5][0])
    assert np.array_equal(a, b)
    image8 = digits._digits()[0][0]
    renders = [digits.render(image8, view, key=0).tobytes() for view in digits.VIEWS]
    assert len(set(renders)) == len(renders)


def test_pretraining_reduces_the_contrastive_loss():
    import open_clip

    from tallmasks.demo import PretrainingData, contrastive_loss, pretrain
    from tallmasks.models import DEMO_MODEL, create_clip

    torch.manual_seed(0)
    clip = create_clip(DEMO_MODEL, pretrained=None)
    cfg = clip.visual.preprocess_cfg
    data = PretrainingData(open_clip.get_tokenizer(DEMO_MODEL), cfg["mean"], cfg["std"])
    probe = torch.arange(0, len(data), len(data) // 128)[:128]
    probe_captions = data.caption_ids(probe.tolist(), random.Random(1))

    def probe_loss() -> float:
        with torch.no_grad():
            return float(contrastive_loss(clip.eval(), data.images[probe], probe_captions, data.tokens))

    before = probe_loss()
    losses = pretrain(clip, data, steps=25, batch_size=64, lr=2e-3, seed=0)
    assert len(losses) == 25 and all(np.isfinite(losses))
    assert probe_loss() < before - 0.05


def _runner_available() -> bool:
    try:
        return importlib.util.find_spec("tallmasks.eval.runner") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _runner_available(), reason="tallmasks.eval.runner (run_experiment) is not available")
def test_quick_demo_writes_a_complete_summary(tmp_path):
    from tallmasks.demo import SUMMARY_METHODS, DemoConfig, run_demo

    cfg = DemoConfig.quick(
        tasks=["DigitsParity", "DigitsMod3"], cache_dir=tmp_path / "cache", output_dir=tmp_path / "out", threads=1
    )
    summary = run_demo(cfg)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert set(written["methods"]) == set(SUMMARY_METHODS)
    for name, entry in written["methods"].items():
        assert set(entry["per_task"]) == {"DigitsParity", "DigitsMod3"}, name
        assert 0.0 <= entry["avg_top1"] <= 1.0
        assert entry["avg_normalized_top1"] >= 0.0
    assert written["methods"]["finetuned"]["avg_normalized_top1"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "mask_agreement.png").stat().st_size > 0
