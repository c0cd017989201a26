"""Shared fixtures: tiny synthetic checkpoints on disk and a subprocess runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tallmasks.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd or REPO,
        timeout=300,
    )


def tiny_state(seed: int, base: dict | None = None, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "model.visual.conv1.weight": torch.randn(8, 3, 2, 2, generator=g),
            "model.visual.proj": torch.randn(8, 4, generator=g),
            "model.visual.ln.weight": torch.randn(8, generator=g),
            "model.logit_scale": torch.randn((), generator=g),
            "model.visual.steps": torch.tensor([7], dtype=torch.int64),
        }
    out = {}
    for key, value in base.items():
        if value.dtype.is_floating_point:
            out[key] = value + scale * torch.randn(value.shape, generator=g)
        else:
            out[key] = value.clone()
    return out


def save_sharded(state: dict, folder: Path, max_shard_size: int = 200) -> Path:
    """``state`` as a sharded safetensors checkpoint (Hugging Face's writer: shards and an index) in ``folder``."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, folder, max_shard_size=max_shard_size)
    return folder


@pytest.fixture
def one_thread():
    """Torch on one thread: the tiny models run faster so, and the suite shares two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_checkpoints(tmp_path):
    """theta_0 (.pt) and three fine-tuned checkpoints in the released layout (.pt) plus one .safetensors."""
    from safetensors.torch import save_file

    pt = tiny_state(0)
    root = tmp_path / "ckpt"
    (root / "MNISTVal").mkdir(parents=True)
    pt_path = root / "MNISTVal" / "nonlinear_zeroshot.pt"
    torch.save(pt, pt_path)
    paths = []
    for i, name in enumerate(["MNIST", "Cars", "DTD"]):
        folder = root / f"{name}Val"
        folder.mkdir(exist_ok=True)
        path = folder / "nonlinear_finetuned.pt"
        torch.save(tiny_state(i + 1, pt), path)
        paths.append(path)
    st_path = tmp_path / "svhn.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state(9, pt).items()}, str(st_path))
    return pt_path, paths, st_path
