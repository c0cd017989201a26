"""Where checkpoints and heads live, in the released layout."""

from __future__ import annotations

from pathlib import Path


def val_name(dataset: str) -> str:
    """``MNIST`` and ``MNISTVal`` both give ``MNISTVal``."""
    return (dataset[:-3] if dataset.endswith("Val") else dataset) + "Val"


def zeroshot_path(model_location: str | Path, model_name: str) -> Path:
    """<loc>/<model>/MNISTVal/nonlinear_zeroshot.pt (the pre-trained encoder)."""
    return Path(model_location, model_name, "MNISTVal", "nonlinear_zeroshot.pt")


def finetuned_path(model_location: str | Path, model_name: str, dataset: str) -> Path:
    """<loc>/<model>/<Dataset>Val/nonlinear_finetuned.pt."""
    return Path(model_location, model_name, val_name(dataset), "nonlinear_finetuned.pt")


def dataset_zeroshot_path(model_location: str | Path, model_name: str, dataset: str) -> Path:
    """<loc>/<model>/<Dataset>Val/nonlinear_zeroshot.pt, written by fine-tuning beside its result."""
    return Path(model_location, model_name, val_name(dataset), "nonlinear_zeroshot.pt")


def head_path(model_location: str | Path, model_name: str, dataset: str, released: bool = False) -> Path:
    """<loc>/<model>/head_<Dataset>Val.safetensors (ours) or .pt (released, pickled)."""
    suffix = ".pt" if released else ".safetensors"
    return Path(model_location, model_name, f"head_{val_name(dataset)}{suffix}")


def mask_dir(model_location: str | Path) -> Path:
    """Where TALL masks live: model_location with its last 'checkpoints' folder replaced by 'tall_masks'
    (the released layout models/checkpoints -> models/tall_masks), else <model_location>/../tall_masks."""
    path = Path(model_location).expanduser()
    parts = list(path.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "checkpoints":
            parts[i] = "tall_masks"
            return Path(*parts)
    return path.parent / "tall_masks"
