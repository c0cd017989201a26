"""Fine-tuning loop: layout, skip, resume, schedule, and 2-process gloo DDP on CPU (tiny demo model)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from tallmasks.core.errors import ConfigError
from tallmasks.experiments.finetuning import EPOCHS, FinetuneConfig, cosine_lr, finetune, launch, state_path
from tallmasks.io.checkpoints import load_state_dict
from tallmasks.models import DEMO_MODEL, ClassificationHead, ImageEncoder, finetuned_path, zeroshot_path
from tallmasks.models.paths import dataset_zeroshot_path


def _tensor_data(n=48, size=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def _head(classes=4, dim=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ClassificationHead(True, torch.randn(classes, dim, generator=g))


def _cfg(tmp_path, **overrides):
    base = FinetuneConfig(
        model_name=DEMO_MODEL,
        dataset="Shapes",
        model_location=str(tmp_path / "ckpt"),
        data_location=str(tmp_path / "data"),
        pretrained=None,
        lr=1e-3,
        batch_size=8,
        epochs=1,
        warmup_steps=2,
        num_workers=0,
        device="cpu",
    )
    return dataclasses.replace(base, **overrides)


def test_paper_defaults():
    cfg = FinetuneConfig(model_name="ViT-L-14", dataset="CarsVal").resolved()
    assert (cfg.batch_size, cfg.grad_accum, cfg.epochs) == (64, 2, 35)
    cfg = FinetuneConfig(model_name="ViT-B-32", dataset="MNIST").resolved()
    assert (cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.lr, cfg.weight_decay) == (128, 1, 5, 1e-5, 0.1)
    assert (cfg.warmup_steps, cfg.clip_grad, cfg.wandb_mode) == (500, 1.0, "disabled")
    assert len(EPOCHS) == 20 and EPOCHS["Flowers102"] == 147
    with pytest.raises(ConfigError, match="lr"):
        FinetuneConfig(lr=-1.0).resolved()
    with pytest.raises(ConfigError, match="Nope"):
        FinetuneConfig(dataset="Nope").resolved()


def test_cosine_schedule():
    assert cosine_lr(1.0, 4, 10, 0) == pytest.approx(0.25)
    assert cosine_lr(1.0, 4, 10, 3) == pytest.approx(1.0)
    assert cosine_lr(1.0, 4, 10, 4) == pytest.approx(1.0)
    assert cosine_lr(1.0, 4, 10, 7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_finetune_on_demo_task_writes_layout_and_skips(tmp_path):
    """Real path: encoder created from the demo config, head built from its text tower, load_split data."""
    cfg = _cfg(tmp_path, max_steps=3)
    seen = []
    out = finetune(cfg, callback=lambda step, loss: seen.append((step, loss)))
    loc = cfg.model_location
    assert out == finetuned_path(loc, DEMO_MODEL, "Shapes") and out.is_file()
    assert dataset_zeroshot_path(loc, DEMO_MODEL, "Shapes").is_file()
    assert zeroshot_path(loc, DEMO_MODEL).is_file()
    assert (tmp_path / "ckpt" / DEMO_MODEL / "head_ShapesVal.safetensors").is_file()
    assert [s for s, _ in seen] == [1, 2, 3] and all(math.isfinite(v) for _, v in seen)
    zs = load_state_dict(dataset_zeroshot_path(loc, DEMO_MODEL, "Shapes"))
    ft = load_state_dict(out)
    assert set(zs) == set(ft) and all(k.startswith("model.") for k in ft)
    assert not any(k.startswith("model.transformer.") for k in ft)
    assert any(not torch.equal(zs[k], ft[k]) for k in ft if k.startswith("model.visual."))
    # the saved encoder loads into a fresh ImageEncoder
    ImageEncoder(DEMO_MODEL, pretrained=None).load_state_dict(dict(ft))
    assert not state_path(loc, DEMO_MODEL, "Shapes").exists()
    # done: skipped without training
    again = []
    assert finetune(cfg, callback=lambda s, loss: again.append(s)) == out and again == []


class _Stop(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    data = _tensor_data()  # 48 samples / batch 8 = 6 steps per epoch; 2 epochs capped at 9 steps

    def run(location, interrupt_at=None, seen=None):
        torch.manual_seed(0)
        encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
        cfg = _cfg(tmp_path, model_location=str(location), epochs=2, max_steps=9, checkpoint_every=4)

        def callback(step, loss):
            if seen is not None:
                seen.append(step)
            if step == interrupt_at:
                raise _Stop

        return finetune(cfg, encoder=encoder, train_dataset=data, head=_head(), callback=callback)

    straight = run(tmp_path / "a")
    with pytest.raises(_Stop):
        run(tmp_path / "b", interrupt_at=6)
    resume_file = state_path(tmp_path / "b", DEMO_MODEL, "Shapes")
    assert resume_file.is_file() and not finetuned_path(tmp_path / "b", DEMO_MODEL, "Shapes").exists()
    seen = []
    resumed = run(tmp_path / "b", seen=seen)
    assert seen == [5, 6, 7, 8, 9]  # continued after the step-4 checkpoint
    assert not resume_file.exists()
    a, b = load_state_dict(straight), load_state_dict(resumed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_grad_accumulation_and_bf16_run(tmp_path):
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    cfg = _cfg(tmp_path, grad_accum=2, precision="bf16", max_steps=2)
    seen = []
    finetune(cfg, encoder=encoder, train_dataset=_tensor_data(n=32), head=_head(), callback=lambda s, loss: seen.append(s))
    assert seen == [1, 2]


def test_accumulation_steps_follow_the_papers_epoch_loop(tmp_path, monkeypatch):
    import tallmasks.experiments.finetuning as ft

    calls = []
    real = ft.cosine_lr
    monkeypatch.setattr(ft, "cosine_lr", lambda lr, w, total, step: calls.append((total, step)) or real(lr, w, total, step))
    cfg = _cfg(tmp_path, grad_accum=2, epochs=3)
    finetune(cfg, encoder=ImageEncoder(DEMO_MODEL, pretrained=None), train_dataset=_tensor_data(n=24), head=_head())
    # 3 batches an epoch: one step per epoch (at i=1), scheduled at i // 2 + epoch * 3 // 2 of 3 * 3 // 2 steps
    assert calls == [(4, 0), (4, 1), (4, 3)]


def test_ddp_two_processes_gloo(tmp_path):
    """Two spawned CPU processes (gloo) write the same layout as a single-process run."""
    torch.manual_seed(0)
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    cfg = _cfg(tmp_path, max_steps=2, batch_size=8)
    out = launch(cfg, world_size=2, encoder=encoder, train_dataset=_tensor_data(n=32), head=_head())
    loc = cfg.model_location
    assert out == finetuned_path(loc, DEMO_MODEL, "Shapes") and out.is_file()
    assert dataset_zeroshot_path(loc, DEMO_MODEL, "Shapes").is_file()
    ft, zs = load_state_dict(out), load_state_dict(zeroshot_path(loc, DEMO_MODEL))
    assert set(ft) == set(encoder.state_dict())
    assert any(not torch.equal(zs[k], ft[k]) for k in ft)
    for key, value in encoder.state_dict().items():
        assert torch.equal(zs[key], value)  # the caller's encoder is left untouched
    # gradients averaged over the two halves of each global batch = the single-process run (to within
    # float noise that Adam amplifies where gradients are ~0; one step moves weights by ~lr = 1e-3)
    single = finetune(
        dataclasses.replace(cfg, model_location=str(tmp_path / "single")),
        encoder=encoder,
        train_dataset=_tensor_data(n=32),
        head=_head(),
    )
    one = load_state_dict(single)
    for key in ft:
        assert torch.allclose(ft[key], one[key], atol=1e-4), (key, (ft[key] - one[key]).abs().max())


def test_cli_errors_exit_2():
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    for args in (["--model=ViT-X-1"], ["--datasets", "MNIST,NoSuchData", "--lr", "-1"]):
        proc = subprocess.run(
            [sys.executable, str(REPO / "finetune.py"), *args], capture_output=True, text=True, env=subprocess_env(), timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr


def test_train_head_trains_the_weight_saves_it_and_resumes_it(tmp_path):
    """--train-head: the head's weight moves (its bias stays zero), is saved over the location's head, and a
    run resumed from a periodic checkpoint ends with the same head and encoder as an uninterrupted one."""
    from tallmasks.models import head_path

    data = _tensor_data()

    def run(location, interrupt_at=None, **overrides):
        torch.manual_seed(0)
        cfg = _cfg(tmp_path, model_location=str(location), epochs=2, max_steps=9, checkpoint_every=4, **overrides)

        def callback(step, loss):
            if step == interrupt_at:
                raise _Stop

        return finetune(cfg, encoder=ImageEncoder(DEMO_MODEL, pretrained=None), train_dataset=data, head=_head(), callback=callback)

    run(tmp_path / "frozen")
    assert not head_path(tmp_path / "frozen", DEMO_MODEL, "Shapes").exists()  # a given head is not saved when frozen
    straight = run(tmp_path / "a", train_head=True)
    trained = ClassificationHead.load(head_path(tmp_path / "a", DEMO_MODEL, "Shapes"))
    assert not torch.allclose(trained.weight, _head().weight) and not trained.bias.any()
    with pytest.raises(_Stop):
        run(tmp_path / "b", interrupt_at=6, train_head=True)
    from tallmasks.core.errors import CheckpointError

    state = torch.load(state_path(tmp_path / "b", DEMO_MODEL, "Shapes"), weights_only=True)
    assert "head" in state
    headless = state_path(tmp_path / "c", DEMO_MODEL, "Shapes")
    headless.parent.mkdir(parents=True)
    torch.save({k: v for k, v in state.items() if k != "head"}, headless)
    with pytest.raises(CheckpointError, match="without the head"):  # a state saved without the head is refused
        run(tmp_path / "c", train_head=True)
    resumed = run(tmp_path / "b", train_head=True)
    again = ClassificationHead.load(head_path(tmp_path / "b", DEMO_MODEL, "Shapes"))
    torch.testing.assert_close(again.weight, trained.weight, atol=1e-6, rtol=0)
    a, b = load_state_dict(straight), load_state_dict(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
