"""Downloads without any network: layout mapping, verification of released formats, error messages, CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, subprocess_env

from tallmasks.core.errors import ConfigError
from tallmasks.experiments.download import (
    GDRIVE_FOLDERS,
    expected_files,
    explain_network_error,
    kind_root,
    masks_location,
    place,
    plan_from_folder,
    plan_from_listing,
    report_error,
    verify,
)
from tallmasks.models import ClassificationHead
from tallmasks.models import paths as tallmasks_paths

FAKE_LISTING = [
    ".gitattributes",
    "README.md",
    "single_task/ViT-B-32/MNISTVal/nonlinear_finetuned.pt",
    "single_task/ViT-B-32/CarsVal/nonlinear_finetuned.pt",
    "single_task/ViT-B-32/MNISTVal/nonlinear_zeroshot.pt",
    "single_task/ViT-B-32/head_MNISTVal.pt",
    "single_task/ViT-B-32/heads/head_CarsVal.pt",
    "single_task/VIT-B-16/MNISTVal/nonlinear_finetuned.pt",
    "single_task/VIT-B-16/head_MNISTVal.pt",
    "single_task/ViT-L-14/MNISTVal/nonlinear_finetuned.pt",
    "single_task/ViT-L-14/nonlinear_zeroshot.pt",
    "tall_masks/ViT-B-32/TALL_mask_8task.npy",
    "tall_masks/ViT-B-32/TALL_mask_20task.npy",
    "tall_masks/ViT-B-16/TALL_mask_8task.npy",
    "tall_masks/ViT-B-16/notes.txt",
]


def test_layout_from_listing():
    plan = plan_from_listing(FAKE_LISTING, "ViT-B-32", "checkpoints")
    assert plan.files == {
        "single_task/ViT-B-32/MNISTVal/nonlinear_finetuned.pt": "MNISTVal/nonlinear_finetuned.pt",
        "single_task/ViT-B-32/CarsVal/nonlinear_finetuned.pt": "CarsVal/nonlinear_finetuned.pt",
        "single_task/ViT-B-32/MNISTVal/nonlinear_zeroshot.pt": "MNISTVal/nonlinear_zeroshot.pt",
        "single_task/ViT-B-32/head_MNISTVal.pt": "head_MNISTVal.pt",
        "single_task/ViT-B-32/heads/head_CarsVal.pt": "head_CarsVal.pt",
    }
    b16 = plan_from_listing(FAKE_LISTING, "ViT-B-16", "checkpoints")  # VIT-B-16 on the hub
    assert b16.files == {
        "single_task/VIT-B-16/MNISTVal/nonlinear_finetuned.pt": "MNISTVal/nonlinear_finetuned.pt",
        "single_task/VIT-B-16/head_MNISTVal.pt": "head_MNISTVal.pt",
    }
    l14 = plan_from_listing(FAKE_LISTING, "ViT-L-14", "checkpoints")
    assert l14.files["single_task/ViT-L-14/nonlinear_zeroshot.pt"] == "MNISTVal/nonlinear_zeroshot.pt"
    masks = plan_from_listing(FAKE_LISTING, "ViT-B-16", "tall_masks")
    assert masks.files == {"tall_masks/ViT-B-16/TALL_mask_8task.npy": "TALL_mask_8task.npy"}
    with pytest.raises(ConfigError, match="ViT-H-14"):
        plan_from_listing(FAKE_LISTING, "ViT-H-14", "checkpoints")


def test_targets_where_main_looks(tmp_path):
    loc = tmp_path / "models" / "checkpoints"
    assert kind_root("checkpoints", "ViT-B-32", loc) == loc / "ViT-B-32"
    assert kind_root("tall_masks", "ViT-B-32", loc) == tmp_path / "models" / "tall_masks" / "ViT-B-32"
    assert masks_location("a/checkpoints").as_posix() == "a/tall_masks"
    assert masks_location("/data/ckpts") == tallmasks_paths.mask_dir("/data/ckpts") == Path("/data/tall_masks")
    assert expected_files("tall_masks") == ["TALL_mask_8task.npy", "TALL_mask_14task.npy", "TALL_mask_20task.npy"]
    assert len(expected_files("checkpoints")) == 20 and "CarsVal/nonlinear_finetuned.pt" in expected_files("checkpoints")
    assert set(GDRIVE_FOLDERS) == {"checkpoints", "tall_masks"}


def _encoder_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.visual.proj": torch.randn(4, 3, generator=g), "model.logit_scale": torch.tensor(1.0)}


def _write_released_checkpoints(root, datasets):
    for name in datasets:
        (root / f"{name}Val").mkdir(parents=True, exist_ok=True)
        torch.save(_encoder_state(), root / f"{name}Val" / "nonlinear_finetuned.pt")


def test_verify_reports_missing_and_corrupt_by_name(tmp_path):
    root = tmp_path / "ViT-B-32"
    _write_released_checkpoints(root, ["MNIST", "Cars", "DTD"])
    torch.save(ClassificationHead(True, torch.randn(3, 4)).state_dict(), root / "head_MNISTVal.pt")
    (root / "CarsVal" / "nonlinear_finetuned.pt").write_bytes(b"truncated garbage")
    expected = [f"{n}Val/nonlinear_finetuned.pt" for n in ("MNIST", "Cars", "DTD", "SVHN")]
    report = verify(root, expected, extra=["head_MNISTVal.pt"])
    assert sorted(report.ok) == ["DTDVal/nonlinear_finetuned.pt", "MNISTVal/nonlinear_finetuned.pt", "head_MNISTVal.pt"]
    assert report.missing == ["SVHNVal/nonlinear_finetuned.pt"]
    assert list(report.corrupt) == ["CarsVal/nonlinear_finetuned.pt"]
    assert not (root / "CarsVal" / "nonlinear_finetuned.pt").exists()  # removed so a rerun fetches it again
    message = str(report_error(report, root, "rerun"))
    assert "\n" not in message and "SVHNVal/nonlinear_finetuned.pt" in message and "CarsVal" in message
    # verified files are recorded and skipped while unchanged; a changed file is checked again
    again = verify(root, expected[:1] + expected[2:3])
    assert again.complete
    (root / "DTDVal" / "nonlinear_finetuned.pt").write_bytes(b"changed")
    assert list(verify(root, expected[2:3]).corrupt) == ["DTDVal/nonlinear_finetuned.pt"]


def test_verify_released_masks_and_refuses_payload(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = tmp_path / "tall_masks" / "ViT-B-32"
    root.mkdir(parents=True)
    np.save(root / "TALL_mask_8task.npy", {"MNIST": np.packbits(np.ones(16, dtype=bool))})
    np.save(root / "TALL_mask_14task.npy", {"MNIST": Payload()}, allow_pickle=True)
    report = verify(root, expected_files("tall_masks"))
    assert report.ok == ["TALL_mask_8task.npy"]
    assert report.missing == ["TALL_mask_20task.npy"]
    assert "posix.system" in report.corrupt["TALL_mask_14task.npy"] or "system" in report.corrupt["TALL_mask_14task.npy"]
    assert not (tmp_path / "pwned").exists()


def test_place_and_folder_plan(tmp_path):
    staged = tmp_path / "staged"
    (staged / "ViT-B-32" / "MNISTVal").mkdir(parents=True)
    torch.save(_encoder_state(), staged / "ViT-B-32" / "MNISTVal" / "nonlinear_finetuned.pt")
    torch.save(_encoder_state(), staged / "ViT-B-32" / "head_MNISTVal.pt")
    (staged / "ViT-B-32" / "head_CarsVal.pt.part").write_bytes(b"partial")
    plan = plan_from_folder(staged, "ViT-B-32", "checkpoints")
    assert sorted(plan.files.values()) == ["MNISTVal/nonlinear_finetuned.pt", "head_MNISTVal.pt"]
    root = tmp_path / "ckpt" / "ViT-B-32"
    placed = place(staged, root, plan.files)
    assert sorted(placed) == ["MNISTVal/nonlinear_finetuned.pt", "head_MNISTVal.pt"]
    assert (root / "MNISTVal" / "nonlinear_finetuned.pt").is_file()


def test_network_error_messages():
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = explain_network_error(LocalEntryNotFoundError("cannot find the requested files"), "hf")
    assert "cannot reach the Hugging Face hub" in offline and "--source=gdrive" in offline and "\n" not in offline
    import requests

    refused = explain_network_error(requests.ConnectionError("Name or service not known"), "gdrive", "ViT-B-32", "checkpoints")
    assert "cannot reach Google Drive" in refused and "--source=hf" in refused
    assert "cannot reach" in explain_network_error(socket.gaierror(-2, "Name or service not known"), "hf")


def test_gdrive_quota_message():
    exceptions = pytest.importorskip("gdown.exceptions")
    quota = explain_network_error(
        exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file recently."),
        "gdrive",
        "ViT-B-32",
        "checkpoints",
    )
    assert "quota" in quota and GDRIVE_FOLDERS["checkpoints"]["ViT-B-32"] in quota and "\n" not in quota


def test_hub_http_error_messages():
    from huggingface_hub.errors import RepositoryNotFoundError

    httpx = pytest.importorskip(_http_module())
    assert "cannot reach" in explain_network_error(httpx.ConnectError("connection refused"), "hf")
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/nik-dim/tall_masks"))
    missing = explain_network_error(RepositoryNotFoundError("404 Repository Not Found", response=response), "hf")
    assert "nik-dim/tall_masks" in missing and "not accessible" in missing


def _http_module() -> str:
    """The HTTP client module that huggingface_hub raises errors from (httpx2 in recent versions)."""
    import importlib.util

    return "httpx2" if importlib.util.find_spec("httpx2") else "httpx"


def _cli(*args):
    env = subprocess_env()
    env["HF_HUB_OFFLINE"] = "1"  # the hub client then fails at once, without any network access
    return subprocess.run(
        [sys.executable, str(REPO / "download_checkpoints.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_bad_model_exits_2():
    proc = _cli("--model=ViT-H-14", "--kind=checkpoints")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model 'ViT-H-14'") and "Traceback" not in proc.stderr
    proc = _cli("--model=ViT-B-32", "--kind=weights")
    assert proc.returncode == 2 and "unknown kind" in proc.stderr


def test_cli_offline_hub_gives_one_line(tmp_path):
    """HF_HUB_OFFLINE makes the hub client fail without touching the network."""
    proc = _cli("--model=ViT-B-32", "--kind=tall_masks", f"--model-location={tmp_path / 'checkpoints'}")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hugging Face hub") and "Traceback" not in proc.stderr
    assert not (tmp_path / "tall_masks").exists()  # nothing left behind
