"""Normalized accuracy and the choice of alpha (merging coefficient) and lambda (TALL masks)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tallmasks.core.errors import TallmasksError
from tallmasks.eval.results import read_json

FT_FILE = "nonlinear_ft_accuracies.json"
ZS_FILE = "zeroshot_accuracies.json"


def finetuned_accuracies(
    model: str, datasets: Sequence[str], single_task_dir: str | Path, model_location: str | Path
) -> tuple[dict[str, float], list[str]]:
    """Fine-tuned single-task accuracy of each dataset and its Val split ("MNIST", "MNISTVal").

    Looks in ``<single_task_dir>/<model>/nonlinear_ft_accuracies.json`` first, then in
    ``<model_location>/<model>/nonlinear_ft_accuracies.json`` (written by eval_single_task.py);
    returns (accuracies, files used). A dataset found in neither raises a one-line error.
    """
    candidates = [Path(single_task_dir) / model / FT_FILE, Path(model_location) / model / FT_FILE]
    tables = [(p, read_json(p)) for p in candidates if p.exists()]
    for path, table in tables:
        if not isinstance(table, dict):
            raise TallmasksError(f"{path}: expected a JSON object of accuracies, found {type(table).__name__}")
    out: dict[str, float] = {}
    used: list[str] = []
    for dataset in datasets:
        for key in (dataset, dataset + "Val"):
            for path, table in tables:
                if key in table:
                    out[key] = _accuracy(table[key], key, path)
                    if str(path) not in used:
                        used.append(str(path))
                    break
            else:
                where = " or ".join(str(p) for p in candidates)
                raise TallmasksError(
                    f"no fine-tuned accuracy for {key} of {model} in {where}; measure it with "
                    f"`python eval_single_task.py --model={model} --finetuning-mode=standard`"
                )
    return out, used


def _accuracy(value: object, key: str, path: Path) -> float:
    """A fine-tuned accuracy as a fraction in (0, 1]; a percentage or a non-number is a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TallmasksError(f"{path}: fine-tuned accuracy of {key} must be a number, got {value!r}")
    if not 0 < value <= 1:
        hint = " (accuracies are fractions: write 0.943, not 94.3)" if 1 < value <= 100 else ""
        raise TallmasksError(f"{path}: fine-tuned accuracy of {key} must be in (0, 1], got {value!r}{hint}")
    return float(value)


def normalized_accuracy(accuracy: float, finetuned: float) -> float:
    """accuracy / fine-tuned single-task accuracy."""
    return float(accuracy) / float(finetuned)


def average_normalized(top1: Mapping[str, float], finetuned: Mapping[str, float], suffix: str = "") -> dict[str, float]:
    """Paper-style metrics for {dataset: top1}: "<D><suffix>:top1", ":normalized_top1", and the averages."""
    metrics: dict[str, float] = {}
    for dataset, acc in top1.items():
        name = dataset + suffix
        metrics[f"{name}:top1"] = float(acc)
        metrics[f"{name}:normalized_top1"] = normalized_accuracy(acc, finetuned[name])
    n = max(len(top1), 1)
    metrics["avg_top1"] = sum(float(v) for v in top1.values()) / n
    metrics["avg_normalized_top1"] = sum(metrics[f"{d}{suffix}:normalized_top1"] for d in top1) / n
    return metrics


def select_alpha(val_metrics: Mapping[float, Mapping[str, float]], metric: str = "avg_normalized_top1") -> float:
    """The coefficient with the highest ``metric``; ties go to the first (lowest) one, as a strict ``>``."""
    if not val_metrics:
        raise ValueError("no validation results to choose a coefficient from")
    best, best_value = None, None
    for alpha, metrics in val_metrics.items():
        value = float(metrics[metric])
        if best is None or value > best_value:
            best, best_value = alpha, value
    return float(best)


def select_per_task(val_top1: Mapping[Any, Mapping[str, float]], datasets: Sequence[str]) -> dict[str, Any]:
    """Per task, the setting with the highest validation accuracy of that task (first one on ties)."""
    chosen: dict[str, Any] = {}
    for dataset in datasets:
        best, best_value = None, None
        for setting, accs in val_top1.items():
            value = float(accs[dataset])
            if best is None or value > best_value:
                best, best_value = setting, value
        if best is None:
            raise ValueError(f"no validation results for {dataset}")
        chosen[dataset] = best
    return chosen


def select_lambdas(val_top1: Mapping[float, Mapping[str, float]], datasets: Sequence[str]) -> dict[str, float]:
    """Per task, the TALL lambda with the highest validation accuracy of that task (first one on ties)."""
    return {dataset: float(lam) for dataset, lam in select_per_task(val_top1, datasets).items()}
