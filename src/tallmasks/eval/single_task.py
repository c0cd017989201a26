"""Zero-shot or fine-tuned single-task accuracy per dataset (val and test), merged into a JSON table."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.core.progress import progress
from tallmasks.eval.cache import default_num_workers, load_or_build_split
from tallmasks.eval.distributed import check_device, init_distributed
from tallmasks.eval.evaluator import Evaluator
from tallmasks.eval.results import atomic_write_json, read_json
from tallmasks.io.checkpoints import load_state_dict
from tallmasks.io.guard import check_output, require_file

log = logging.getLogger(__name__)

MODES = {"none": "zeroshot_accuracies.json", "standard": "nonlinear_ft_accuracies.json"}


def accuracies_path(output_dir: str | Path, model: str, mode: str) -> Path:
    """<output_dir>/<model>/{zeroshot,nonlinear_ft}_accuracies.json."""
    if mode not in MODES:
        raise ConfigError(f"finetuning mode must be one of {', '.join(MODES)}, got {mode!r}")
    return Path(output_dir) / model / MODES[mode]


def merge_accuracies(path: str | Path, new: dict[str, float]) -> dict[str, float]:
    """Update the JSON table at ``path`` with ``new`` (keys kept sorted), atomically; returns the table."""
    path = Path(path)
    table = read_json(path) if path.is_file() else {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a JSON object of accuracies")
    table.update({k: float(v) for k, v in new.items()})
    table = dict(sorted(table.items()))
    atomic_write_json(path, table)
    return table


def evaluate_single_task(
    model: str,
    mode: str,
    datasets: Sequence[str] | None = None,
    model_location: str | Path = "models/checkpoints",
    data_location: str | Path = "~/data",
    output_dir: str | Path = "results/single_task",
    batch_size: int = 512,
    device: str = "auto",
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> dict[str, float]:
    """Accuracy of the zero-shot (mode "none") or fine-tuned ("standard") model of each dataset on its
    val ("<D>Val") and test ("<D>") splits; merged into the table under ``output_dir``; returns the new values."""
    from tallmasks.datasets import load_split, resolve_datasets
    from tallmasks.models import ImageEncoder, finetuned_path, get_classification_head, zeroshot_path

    out_path = accuracies_path(output_dir, model, mode)
    names = resolve_datasets(None, list(datasets)) if datasets else resolve_datasets(None, None)
    model_location = Path(os.path.expanduser(str(model_location)))
    data_location = Path(os.path.expanduser(str(data_location)))
    cache = Path(os.path.expanduser(str(cache_dir))) if cache_dir else data_location / ".tallmasks_cache"
    zs = zeroshot_path(model_location, model)
    paths = {d: (zs if mode == "none" else finetuned_path(model_location, model, d)) for d in names}
    for path in [zs, *paths.values()]:
        if not Path(path).exists():
            raise CheckpointError(f"{path}: checkpoint not found")
        require_file(path, "checkpoint")
    dist, dev = init_distributed(check_device(device, "--device"))
    if dist.is_main:  # the table is checked before the work: not an input, writable
        check_output(out_path, [zs, *paths.values()], label="accuracy table")
    encoder = ImageEncoder(model, pretrained=None)
    evaluator = Evaluator(encoder, load_state_dict(zs), dev, precision, batch_size, dist)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    new: dict[str, float] = {}
    for dataset in progress(names, desc=f"{model} {mode}", disable=not dist.is_main, leave=False):
        evaluator.load_state(load_state_dict(paths[dataset]))
        evaluator.set_head(dataset, get_classification_head(model, dataset, model_location, device="cpu"))
        for split, key in (("val", dataset + "Val"), ("test", dataset)):
            data = dist.main_first(
                lambda d=dataset, s=split: load_or_build_split(
                    lambda: load_split(d, s, data_location),
                    d,
                    s,
                    cache,
                    encoder.image_size,
                    encoder.val_preprocess,
                    workers,
                    build=dist.is_main,
                )
            )
            correct, total = evaluator.count_correct(dataset, data)
            new[key] = correct / total
        log.info("%s: test %.2f%%, val %.2f%%", dataset, 100 * new[dataset], 100 * new[dataset + "Val"])
    if dist.is_main:
        merge_accuracies(out_path, new)
        log.info("updated %s", out_path)
    return new
