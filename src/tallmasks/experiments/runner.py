"""The experiment runner behind ``main.py``: load, merge, choose alpha or lambda on validation,
evaluate on test, record.

Call it from Python with a composed Hydra config::

    from hydra import compose, initialize_config_dir
    from tallmasks.experiments.runner import run_experiment

    with initialize_config_dir(config_dir="/abs/path/to/config", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=ViT-B-32", "method=ties"])
    results = run_experiment(cfg)   # dict; results["results_path"] is the JSON written
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tallmasks.core.errors import CheckpointError, ConfigError, TallmasksError
from tallmasks.core.params import parameters
from tallmasks.core.progress import progress
from tallmasks.eval.cache import SplitData, default_num_workers, load_or_build_split
from tallmasks.eval.distributed import DistInfo, check_port, init_distributed, spawn_ranks, under_launcher
from tallmasks.eval.evaluator import Evaluator
from tallmasks.eval.results import Journal, atomic_write_json, file_signature
from tallmasks.eval.selection import average_normalized, finetuned_accuracies, select_alpha, select_per_task
from tallmasks.experiments.config import plain_config, validate_config
from tallmasks.io.guard import check_output
from tallmasks.models.paths import mask_dir
from tallmasks.non_local.experiment import AlignmentSettings, CorrectionSettings

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# file names


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def datasets_tag(datasets: list[str]) -> str:
    """The part of result and mask file names that names the task list: "" for the first N of the
    paper's list, else "_" and a short hash of the list."""
    from tallmasks.datasets import ALL_DATASETS

    if list(datasets) == ALL_DATASETS[: len(datasets)]:
        return ""
    return "_" + hashlib.sha1(",".join(datasets).encode()).hexdigest()[:8]


def tall_mask_path(
    model_location: str | Path,
    model: str,
    num_tasks: int,
    use_ties: bool,
    ties_agg: str = "sum",
    k: float = 100,
    precision: str = "fp32",
    tag: str = "",
) -> Path:
    """The one path where method=tall_mask saves its chosen masks and load_mask/consensus read them. Every
    setting that changes the masks is in the name, defaults left out: the base vector (TIES and its
    aggregation, or TA's k), the precision lambda was chosen at, and ``tag`` (a non-default task list)."""
    suffix = f"_use_ties_{ties_agg}" if use_ties else ("" if float(k) == 100 else f"_k={_value_text(float(k))}")
    suffix += "" if precision == "fp32" else f"_{precision}"
    return mask_dir(model_location) / model / f"TALL_mask_{int(num_tasks)}task{suffix}{tag}.safetensors"


def released_mask_paths(model_location: str | Path, model: str, num_tasks: int, use_ties: bool, ties_agg: str = "sum") -> list[Path]:
    """Released ``.npy`` names accepted as a fallback (converted on first use)."""
    folder = mask_dir(model_location) / model
    if use_ties:
        return [folder / f"TALL_mask_{num_tasks}task_use_ties_{ties_agg}.npy", folder / f"TALL_mask_{num_tasks}task_use_ties.npy"]
    return [folder / f"TALL_mask_{num_tasks}task.npy"]


def load_tall_masks(cs, path: Path, released: list[Path], settings: dict | None = None):
    """Our saved MaskSet (refused when built under other ``settings``), else a released .npy converted (and
    saved at ``path``); else a one-line error. The masks must cover this model's layout."""
    from tallmasks.masks import Layout, MaskSet

    if path.is_file():
        masks = MaskSet.load(path)
        masks.check_layout(Layout.of(cs), path)
        masks.check_settings(settings or {}, path)
        return masks.subset(cs.names)
    for candidate in released:
        if candidate.is_file():
            from tallmasks.io.released import load_released_masks

            packed = load_released_masks(candidate)
            masks = MaskSet.from_packed(packed, Layout.of(cs), {"kind": "tall", "source": str(candidate)}, origin=candidate)
            masks = masks.subset(cs.names)
            masks.save(path)
            log.info("converted released masks %s -> %s", candidate, path)
            return masks
    raise ConfigError(f"TALL masks not found at {path}: run method=tall_mask first (with the same model, tasks and use_ties)")


# ---------------------------------------------------------------------------------------------
# the experiment


class Experiment:
    """One run of main.py: settings (validated once by tallmasks.experiments.config), file names, run key."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.settings = validate_config(cfg)
        self.raw = plain_config(cfg)
        c, m = self.settings.main, self.settings.method
        from tallmasks.merging import get_method, grid_combinations

        self.model: str = c.model
        self.datasets: list[str] = list(self.settings.datasets)
        self.num_tasks = len(self.datasets)
        self.method_name: str = m.name
        self.method: dict[str, Any] = m.as_dict()
        self.method_spec = get_method(self.method_name)
        self.pool = self.settings.pool  # model_source=hf: a pool of transformers CLIP checkpoints (tallmasks.experiments.pools)
        self.grid: dict[str, list] = dict(m.run.get("grid") or {})
        self.combinations: list[dict[str, Any]] = grid_combinations(self.grid)
        self.n_eval_points = c.n_eval_points
        self.specify_lambda = c.specify_lambda
        self.model_location = _expand(c.model_location)
        self.data_location = _expand(c.data_location)
        self.cache_dir = _expand(c.cache_dir) if c.cache_dir else self.data_location / ".tallmasks_cache"
        self.results_dir = _expand(c.results_dir)
        self.single_task_dir = _expand(c.single_task_dir)
        self.pretrained_weights = str(_expand(c.pretrained_weights)) if c.pretrained_weights else None
        self.batch_size = c.batch_size
        self.precision = c.precision
        self.num_workers = default_num_workers() if c.num_workers is None else c.num_workers
        self.device_cache_gb = c.device_cache_gb
        self.wandb = {"project": c.wandb.project, "mode": c.wandb.mode, "group": c.wandb.group}
        self.device_name = c.device
        self.full_name = str(m.run.get("full_name") or f"{self.method_name}_k={_value_text(m.params.get('k'))}")
        self.load_mask = bool(m.run.get("load_mask", False))
        self.use_ties = bool(m.params.get("use_ties", False))
        self.ties_agg = str(m.params.get("ties_agg") or "sum")
        self.correction = CorrectionSettings.of(self.settings.groups.get("correction"))
        self.alignment = AlignmentSettings.of(self.settings.groups.get("alignment"))

    @property
    def variant(self) -> str:
        """Name suffix of the alignment and correction settings (empty for neither)."""
        return self.alignment.tag + self.correction.tag

    # -- names ----------------------------------------------------------------------------------

    def merge_params(self, device: torch.device, combination: dict[str, Any] | None = None) -> dict:
        """The method's hyperparameters from the config, with one grid combination applied."""
        params = {**self.settings.method.params, **(combination or {})}
        if "device" in self.method_spec.defaults:
            params["device"] = str(device)
        return params

    def grid_tag(self) -> str:
        """``_grid-<name>=<values>...`` for a non-empty grid (a hash when long); empty otherwise."""
        if not self.grid:
            return ""
        text = "-".join(f"{name}=" + ",".join(_value_text(v) for v in values) for name, values in self.grid.items())
        if len(text) > 80:
            text = hashlib.sha1(text.encode()).hexdigest()[:8]
        return "_grid-" + text

    def chosen_full_name(self, chosen: dict[str, Any]) -> str:
        """The method's full name with grid-chosen values: the config's ``full_name`` resolved with them."""
        if not chosen:
            return self.full_name
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(self.cfg, DictConfig):
                cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=False))
                for key, value in chosen.items():
                    cfg.method[key] = value
                name = OmegaConf.to_container(cfg, resolve=True)["method"].get("full_name")
                return str(name) if name else self.full_name
        except ImportError:  # pragma: no cover
            pass
        return self.full_name

    def journal_path(self) -> Path:
        return self.results_path().with_suffix(".journal.json")

    def datasets_tag(self) -> str:
        """ "" for the first N of the paper's list, else a short hash of the task list."""
        return datasets_tag(self.datasets)

    def results_path(self, chosen: dict[str, Any] | None = None) -> Path:
        """<results_dir>/<model>_<N>tasks_<full_name>[_<hyperparameter>=<value> ...][_grid-...].json: every
        setting that changes the result is in the name (defaults left out); with a grid, the chosen values
        (``chosen``; the journal's name has the configured ones) and the grid itself."""
        defaults = {name: p.default for name, p in parameters(self.method_spec.fn, ("device",)).items()}
        full_name = self.chosen_full_name(chosen or {})
        params = {**self.settings.method.params, **(chosen or {})}
        shown = []
        for key in sorted(params):
            value = params[key]
            text = f"{key}={_value_text(value)}"
            if value != defaults.get(key) and text not in full_name:
                shown.append("_" + text)
        extra = "_loaded" if self.load_mask else ""
        extra += "" if self.specify_lambda is None else f"_alpha={_value_text(self.specify_lambda)}"
        extra += "" if self.n_eval_points == 21 else f"_n{self.n_eval_points}"
        extra += "" if self.precision == "fp32" else f"_{self.precision}"
        extra += self.grid_tag() + self.variant
        source = f"_{self.pool.name}" if self.pool is not None else ""
        name = f"{self.model}{source}_{self.num_tasks}tasks_{full_name}{''.join(shown)}{self.datasets_tag()}{extra}.json"
        return self.results_dir / name.replace("/", "-")

    def mask_settings(self, chosen: dict[str, Any] | None = None) -> dict[str, Any]:
        """What TALL masks depend on (with grid-chosen values); recorded in the mask file and checked when read."""
        method = {**self.method, **(chosen or {})}
        use_ties, ties_agg = bool(method.get("use_ties", False)), str(method.get("ties_agg") or "sum")
        base = {"use_ties": use_ties, "ties_agg": ties_agg} if use_ties else {"k": float(method.get("k") or 100)}
        variant = {key: group.record() for key, group in (("alignment", self.alignment), ("correction", self.correction)) if group.enabled}
        return {"model": self.model, "datasets": self.datasets, "precision": self.precision, **base, **variant}

    def mask_path(self, chosen: dict[str, Any] | None = None) -> Path:
        settings = self.mask_settings(chosen)
        return tall_mask_path(
            self.model_location,
            self.model,
            self.num_tasks,
            settings.get("use_ties", False),
            settings.get("ties_agg", "sum"),
            settings.get("k", 100),
            self.precision,
            self.datasets_tag() + self.variant,
        )

    def run_key(self, inputs: list[Path] = (), data: dict[str, str] | None = None) -> dict:
        """What a finished evaluation depends on: ``inputs`` (checkpoints, heads, masks read) by size and
        mtime, the splits' cache identities ``data``, and every setting."""
        return {
            "inputs": [file_signature(path) for path in inputs],
            "data": dict(sorted((data or {}).items())),
            "model": self.model,
            "datasets": self.datasets,
            "method": {k: v for k, v in self.method.items() if k != "full_name"},
            "n_eval_points": self.n_eval_points,
            "specify_lambda": self.specify_lambda,
            "precision": self.precision,
            "model_location": str(self.model_location.resolve()),
            "correction": self.correction.record(),
            "alignment": self.alignment.record(),
        }


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(str(path)))


def _check_files(paths: list[Path]) -> None:
    from tallmasks.io.guard import require_file

    for path in paths:
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found (download it with download_checkpoints.py or fine-tune with finetune.py)")
        require_file(path, "checkpoint")


def _init_wandb(exp: Experiment, dist: DistInfo):
    mode = str(exp.wandb.get("mode", "disabled"))
    if mode == "disabled" or not dist.is_main:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb.mode is not 'disabled' but wandb is not installed (pip install wandb)") from None
    return wandb.init(
        config=exp.raw, mode=mode, project=exp.wandb.get("project", "task-vectors"), group=exp.wandb.get("group") or exp.model, dir="logs/"
    )


def run_experiment(cfg: Any) -> dict:
    """Run one experiment described by a main.py config; returns the results dict (rank 0 writes it)."""
    start = time.perf_counter()
    exp = Experiment(cfg)
    dist, device = init_distributed(exp.device_name)
    from tallmasks.datasets import load_split
    from tallmasks.merging import CheckpointSet, merge
    from tallmasks.models import (
        MODELS,
        ImageEncoder,
        finetuned_path,
        get_classification_head,
        save_zeroshot_encoder,
        zeroshot_path,
    )

    log.info(
        "%s on %s: %d tasks (%s), device %s, precision %s",
        exp.full_name,
        exp.model,
        exp.num_tasks,
        ", ".join(exp.datasets),
        device,
        exp.precision,
    )
    if exp.pool is not None:  # converted once into the released layout; its own fine-tuned accuracies
        from tallmasks.experiments.pools import ensure_finetuned_accuracies, prepare_pool

        exp.model_location = dist.main_first(lambda: prepare_pool(exp.pool, exp.model_location, exp.datasets))
        exp.single_task_dir = exp.model_location
        ensure_finetuned_accuracies(
            exp.model_location,
            exp.model,
            exp.datasets,
            dist,
            data_location=exp.data_location,
            batch_size=exp.batch_size,
            device=exp.device_name,
            precision=exp.precision,
            cache_dir=exp.cache_dir,
            num_workers=exp.num_workers,
        )
    from tallmasks.non_local.experiment import Sources, resolve_sources

    sources = (
        resolve_sources(exp.alignment, exp.model_location, exp.model, exp.datasets)
        if exp.alignment.enabled
        else Sources([exp.model_location], dict.fromkeys(exp.datasets, 0))
    )
    foundations = [zeroshot_path(location, exp.model) for location in sources.locations]
    fts = [finetuned_path(sources.location(d), exp.model, d) for d in exp.datasets]
    _check_files(fts)
    zs = foundations[0]
    if (
        not zs.is_file() and exp.model in MODELS and not exp.alignment.enabled
    ):  # like the paper's code: theta_0 saved from the openai weights
        log.info("%s missing: saving the pre-trained %s image encoder there", zs, exp.model)
        weights = exp.pretrained_weights or "openai"
        dist.main_first(lambda: save_zeroshot_encoder(exp.model, exp.model_location, pretrained=weights))  # kept once saved
    _check_files(foundations)
    finetuned_acc, ft_sources = {}, []
    for index, location in enumerate(sources.locations):  # each expert's accuracy from its foundation's tables
        group = [d for d in exp.datasets if sources.foundation_of[d] == index]
        if group:
            found, used = finetuned_accuracies(exp.model, group, exp.single_task_dir, location)
            finetuned_acc.update(found)
            ft_sources += [u for u in used if u not in ft_sources]

    # masks needed up front (fail before any expensive work)
    mask_file = exp.mask_path()
    paper_settings = exp.precision == "fp32" and not exp.datasets_tag() + exp.variant and exp.mask_settings().get("k", 100) == 100
    released = released_mask_paths(exp.model_location, exp.model, exp.num_tasks, exp.use_ties, exp.ties_agg) if paper_settings else []
    needs_masks = exp.load_mask or any(exp.method_spec.needs_masks(exp.merge_params(device, c)) for c in exp.combinations)
    if needs_masks and not (mask_file.is_file() or any(p.is_file() for p in released)):
        raise ConfigError(
            f"TALL masks not found at {mask_file}: run method=tall_mask first (with the same model, tasks, base vector and precision)"
        )

    read = [*foundations, *fts, *([mask_file] if needs_masks else []), *map(Path, ft_sources)]
    if dist.is_main:  # outputs checked before the work (a split cache is checked before it is built)
        for chosen in exp.combinations:
            check_output(exp.results_path(chosen), read, label="results")
            if exp.correction.enabled:
                check_output(_corrections_folder(exp.results_path(chosen)), read, folder=True, label="corrections")
        check_output(exp.journal_path(), read, label="journal")
    encoder = ImageEncoder(exp.model, pretrained=None)
    alignment_record = None
    head_perms: dict[str, Any] = {}
    if exp.alignment.enabled:
        from tallmasks.non_local.experiment import aligned_checkpoints, cache_key, vit_heads

        key = cache_key([[file_signature(p) for p in foundations], exp.alignment.max_iter, exp.alignment.seed, exp.alignment.embedding])
        cache_file = exp.cache_dir / "alignment" / exp.model / f"{key}.safetensors"
        if dist.is_main:
            check_output(cache_file, read, label="permutation cache")
        theta0, experts, alignment_record, head_perms = dist.main_first(
            lambda: aligned_checkpoints(sources, foundations, fts, exp.datasets, vit_heads(encoder), exp.alignment, cache_file, device)
        )
        cs = CheckpointSet(theta0, experts, names=exp.datasets)
    else:
        cs = CheckpointSet(zs, fts, names=exp.datasets)
    cs.progress = dist.is_main
    if dist.is_main and exp.method_spec.saves_masks and not exp.load_mask:
        for chosen in exp.combinations:
            check_output(exp.mask_path(chosen), read, expected_bytes=exp.num_tasks * (cs.num_float_params + 7) // 8, label="TALL masks")
    evaluator = Evaluator(encoder, cs.pretrained, device, exp.precision, exp.batch_size, dist)

    # heads and preprocessed splits: rank 0 builds what is missing, the others wait and read
    data: dict[tuple[str, str], SplitData] = {}
    calibration: dict[str, SplitData] = {}

    def prepare(build: bool) -> None:
        for dataset in progress(exp.datasets, desc="heads and data", disable=not build, leave=False):
            head = get_classification_head(
                exp.model, dataset, sources.location(dataset), device="cpu", pretrained=exp.pretrained_weights or "openai"
            )
            if dataset in head_perms:  # the expert's output embedding was permuted: so is its head's input
                from tallmasks.non_local.permutation import permute_head

                with torch.no_grad():
                    head.weight.copy_(permute_head(head.weight, head_perms[dataset]))
            evaluator.set_head(dataset, head)
            for split in ("val", "test"):
                data[(dataset, split)] = load_or_build_split(
                    lambda d=dataset, s=split: load_split(d, s, exp.data_location),
                    dataset,
                    split,
                    exp.cache_dir,
                    encoder.image_size,
                    encoder.val_preprocess,
                    exp.num_workers,
                    build=build,
                )
        if exp.correction.enabled:
            from tallmasks.non_local.experiment import load_calibration_images

            calibration.update(
                load_calibration_images(
                    exp.datasets,
                    exp.correction,
                    exp.data_location,
                    exp.cache_dir,
                    encoder.image_size,
                    encoder.val_preprocess,
                    exp.num_workers,
                    build,
                    load_or_build_split,
                )
            )

    dist.main_first(lambda: prepare(dist.is_main))
    _keep_on_device(data, device, exp.device_cache_gb)
    corrections = None
    if exp.correction.enabled:
        from tallmasks.non_local.experiment import CorrectionRun

        corrections = CorrectionRun(exp.correction, evaluator, cs, {d: part.images for d, part in calibration.items()}, dist)
        log.info("%s: measuring the experts' activation statistics", exp.correction.name)
        corrections.measure_experts()

    # rank 0 first: a released .npy is converted (and saved) once
    masks = dist.main_first(lambda: load_tall_masks(cs, mask_file, released, exp.mask_settings())) if needs_masks else None
    from tallmasks.models import head_path

    inputs = [*foundations, *fts, *(head_path(sources.location(d), exp.model, d) for d in exp.datasets)]
    inputs += [mask_file] if needs_masks else []
    identities = {f"{d}/{split}": part.identity for (d, split), part in data.items()}
    identities.update({f"{d}/calibration": part.identity for d, part in calibration.items()})
    run_key = dist.broadcast_object(exp.run_key(inputs, identities) if dist.is_main else None)
    journal = Journal(exp.journal_path(), run_key, writer=dist.is_main)
    dist.barrier()
    if len(journal):
        log.info("resuming: %d finished evaluations in %s", len(journal), journal.path)
    run = _init_wandb(exp, dist)
    counter = {"evaluated": 0, "reused": 0}

    def accuracy(setting: str, dataset: str, split: str, apply: Callable[[], None]) -> float:
        done = journal.get(setting, dataset, split)
        if done is not None:
            counter["reused"] += 1
            return done["correct"] / done["total"]
        apply()
        with corrections.applied(dataset, split) if corrections is not None else contextlib.nullcontext():
            correct, total = evaluator.count_correct(dataset, data[(dataset, split)])
        journal.record(setting, dataset, split, correct, total)
        counter["evaluated"] += 1
        return correct / total

    out: dict[str, Any] = {
        "model": exp.model,
        "method": exp.method,
        "datasets": exp.datasets,
        "num_tasks": exp.num_tasks,
        "precision": exp.precision,
        "finetuned_accuracies": {k: finetuned_acc[k] for k in sorted(finetuned_acc)},
        "finetuned_accuracies_source": ft_sources,
    }
    if alignment_record is not None:
        out["alignment"] = alignment_record
    ctx = _Context(exp, cs, evaluator, accuracy, finetuned_acc, dist, masks)
    best: _Trial | None = None
    vals: dict[str, dict] = {}
    for combination in progress(exp.combinations, desc="grid on validation", disable=len(exp.combinations) == 1 or not dist.is_main):
        params = exp.merge_params(device, combination)
        if exp.method_spec.needs_masks(params):
            params["masks"] = masks
        log.info("merging with %s%s", exp.method_name, f" ({_grid_label(combination)})" if combination else "")
        vector = merge(cs, exp.method_name, **params)
        evaluator.load_vector(vector)
        if corrections is not None:
            corrections.forget()  # calibrated on another merged vector
        trial = (
            _select_per_task(ctx, combination, vector, params)
            if exp.method_spec.task_models
            else _select_alpha(ctx, combination, vector, params)
        )
        for label, metrics in trial.val.items():
            vals[_grid_key(combination, label)] = metrics
        if best is None or trial.score > best.score:  # ties go to the first combination
            best = trial
        del vector
    assert best is not None
    if len(exp.combinations) > 1:
        evaluator.load_vector(best.vector)
        if corrections is not None:
            corrections.forget()
    out["selection"] = {**best.selection, **best.combination}
    out["val"] = vals
    out["val_best"] = best.val_best
    out["test"] = best.finish()
    out.update(best.extra)
    info = getattr(best.vector, "info", None)
    if info:
        out["merge_info"] = dict(info)
    results_path = exp.results_path(best.combination)
    out["per_task"] = {d: {"top1": out["test"][f"{d}:top1"], "normalized_top1": out["test"][f"{d}:normalized_top1"]} for d in exp.datasets}
    out["avg_top1"] = out["test"]["avg_top1"]
    out["avg_normalized_top1"] = out["test"]["avg_normalized_top1"]
    out["evaluations"] = dict(counter)
    out["seconds"] = round(time.perf_counter() - start, 2)
    if corrections is not None:
        out["correction"] = corrections.record()
        if dist.is_main:
            out["correction"]["files"] = corrections.save(_corrections_folder(results_path), {"model": exp.model})
    if dist.is_main:
        atomic_write_json(results_path, out)
        log.info(
            "test: avg top1 %.2f%%, avg normalized %.2f%% -> %s", 100 * out["avg_top1"], 100 * out["avg_normalized_top1"], results_path
        )
    out["results_path"] = str(results_path)
    out["rank"] = dist.rank
    if run is not None:
        run.log({f"test/{k}": v for k, v in out["test"].items()})
        run.finish(quiet=True)
    return out


def _corrections_folder(results_path: Path) -> Path:
    """Where the per-task corrections used on test are saved: beside the results, ``<name>.corrections``."""
    return results_path.with_name(results_path.stem + ".corrections")


def _grid_label(combination: dict[str, Any]) -> str:
    return ",".join(f"{key}={_value_text(value)}" for key, value in combination.items())


def _grid_key(combination: dict[str, Any], label: str) -> str:
    """A validation setting's name: its label, after the grid combination when there is one."""
    return f"{_grid_label(combination)}|{label}" if combination else label


@dataclass
class _Context:
    """What the selection of one merged vector needs from the run."""

    exp: Experiment
    cs: Any
    evaluator: Evaluator
    accuracy: Callable[[str, str, str, Callable[[], None]], float]
    finetuned_acc: dict[str, float]
    dist: DistInfo
    saved_masks: Any


@dataclass
class _Trial:
    """One merged vector with its coefficients chosen on validation; ``finish()`` evaluates it on test."""

    combination: dict[str, Any]
    vector: Any
    score: float
    val: dict[str, dict]
    val_best: dict
    selection: dict
    finish: Callable[[], dict]
    extra: dict = field(default_factory=dict)


def _select_alpha(ctx: _Context, combination: dict[str, Any], vector: Any, params: dict) -> _Trial:
    """The coefficient alpha chosen on validation for theta_0 + alpha * tau."""
    from tallmasks.merging import alpha_candidates

    exp, evaluator, accuracy = ctx.exp, ctx.evaluator, ctx.accuracy
    alphas = alpha_candidates(exp.method_name, exp.n_eval_points, exp.num_tasks, exp.specify_lambda, params)
    prefix = _grid_key(combination, "")
    val: dict[float, dict] = {}
    for alpha in progress(alphas, desc="alpha on validation", disable=not ctx.dist.is_main, leave=not combination):
        apply = lambda a=alpha: evaluator.set_weights(a, tag="alpha")  # noqa: E731
        top1 = {d: accuracy(f"{prefix}alpha={alpha:.6g}", d, "val", apply) for d in exp.datasets}
        val[alpha] = average_normalized(top1, ctx.finetuned_acc, suffix="Val")
    best = select_alpha(val)

    def finish() -> dict:
        apply = lambda: evaluator.set_weights(best, tag="alpha")  # noqa: E731
        top1 = {d: accuracy(f"{prefix}alpha={best:.6g}", d, "test", apply) for d in exp.datasets}
        return average_normalized(top1, ctx.finetuned_acc)

    labelled = {f"{a:.6g}": m for a, m in val.items()}
    return _Trial(combination, vector, val[best]["avg_normalized_top1"], labelled, val[best], {"alpha": best}, finish)


def _select_per_task(ctx: _Context, combination: dict[str, Any], vector: Any, params: dict) -> _Trial:
    """Per-task models theta_0 + scale_t * (m_t * tau): each task's setting (TALL's lambda) chosen on its
    own validation split; the chosen masks are built once more for every task and evaluated on test."""
    from tallmasks.merging.per_task import TaskModels, task_models

    exp, cs, evaluator, accuracy, dist = ctx.exp, ctx.cs, ctx.evaluator, ctx.accuracy, ctx.dist
    if exp.load_mask:
        lambdas = dict((ctx.saved_masks.info or {}).get("lambdas", {}))
        models = TaskModels.fixed(ctx.saved_masks, "loaded_mask", lambda chosen: {"lambdas": {d: lambdas.get(d) for d in exp.datasets}})
    else:
        models = task_models(exp.method_spec, cs, vector, params)
    prefix = _grid_key(combination, "")
    val_top1: dict[str, dict[str, float]] = {}
    steps = [(label, t, d) for label in models.choices for t, d in enumerate(exp.datasets)]
    for label, t, d in progress(steps, desc="per-task models on validation", disable=not dist.is_main, leave=not combination):

        def apply(label=label, t=t, d=d) -> None:
            evaluator.set_weights(models.scale(t), models.mask(t, models.choices[label]), tag=(prefix, "task", d, label))

        val_top1.setdefault(label, {})[d] = accuracy(f"{prefix}mask={label}", d, "val", apply)
    chosen = select_per_task(val_top1, exp.datasets)
    val = {label: average_normalized(v, ctx.finetuned_acc, suffix="Val") for label, v in val_top1.items()}
    val_best = average_normalized({d: val_top1[chosen[d]][d] for d in exp.datasets}, ctx.finetuned_acc, suffix="Val")
    extra: dict[str, Any] = {}

    def finish() -> dict:
        masks = models.masks([models.choices[chosen[d]] for d in exp.datasets])
        if exp.method_spec.saves_masks and not exp.load_mask:
            settings = exp.mask_settings(combination)
            masks.info.update(
                {
                    "use_ties": settings.get("use_ties", False),
                    "ties_agg": settings.get("ties_agg", "sum"),
                    "model": exp.model,
                    "settings": settings,
                }
            )
            mask_file = exp.mask_path(combination)
            if dist.is_main:
                masks.save(mask_file)
                log.info("saved the chosen TALL masks to %s", mask_file)
            extra["mask_path"] = str(mask_file)
        top1 = {}
        for t, d in enumerate(exp.datasets):
            apply = lambda t=t, d=d: evaluator.set_weights(models.scale(t), masks.get(d), tag=(prefix, "final", d))  # noqa: E731
            top1[d] = accuracy(f"{prefix}mask={chosen[d]}", d, "test", apply)
        extra["agreement"] = masks.agreement()  # weights switched on by exactly 0, 1, ..., T task masks
        return average_normalized(top1, ctx.finetuned_acc)

    selection = dict(models.describe(chosen))
    if models.scales is not None:
        selection["scales"] = {d: models.scale(t) for t, d in enumerate(exp.datasets)}
    return _Trial(combination, vector, val_best["avg_normalized_top1"], val, val_best, selection, finish, extra)


def _keep_on_device(data: dict, device: torch.device, budget_gb: float | None) -> None:
    """On CUDA, keep as many cached splits resident on the device as the budget allows."""
    if device.type != "cuda":
        return
    if budget_gb is None:
        free, _total = torch.cuda.mem_get_info(device)
        budget = 0.4 * free
    else:
        budget = budget_gb * 2**30
    used = 0
    for key, split in data.items():
        size = split.images.numel() * split.images.element_size()
        if used + size <= budget:
            data[key] = split.to(device)
            used += size


def _error(exc: TallmasksError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _run_and_report(cfg: Any) -> int:
    """One process's share of main.py: run, print the table on rank 0, one error line on bad input."""
    from tallmasks.report.tables import format_result

    try:
        results = run_experiment(cfg)
    except TallmasksError as exc:
        return _error(exc)
    if results.get("rank", 0) == 0:
        log.info("\n%s", format_result(results))
    return 0


def _spawned_rank(cfg: Any) -> None:
    code = _run_and_report(cfg)
    if code:
        raise SystemExit(code)


def _launch_settings(cfg: Any) -> tuple[int, int | None]:
    """(world_size, port) of a main.py config, validated with the whole config; the port must be free."""
    settings = validate_config(cfg).main
    if settings.world_size > 1:
        check_port(settings.port)
    return settings.world_size, settings.port


def run_main(cfg: Any) -> int:
    """main.py's entry: one process, one torchrun rank, or ``world_size`` local ranks spawned here
    (the paper's ``world_size``/``port`` fields; gloo on CPU, nccl on GPUs). Returns the exit code."""
    if under_launcher():
        return _run_and_report(cfg)
    try:
        world_size, port = _launch_settings(cfg)
    except TallmasksError as exc:
        return _error(exc)
    if world_size == 1:
        return _run_and_report(cfg)
    import torch.multiprocessing as mp

    log.info("spawning %d ranks", world_size)
    try:
        spawn_ranks(_spawned_rank, world_size, cfg, port=port)
    except mp.ProcessExitedException as exc:
        return int(exc.exit_code) if exc.exit_code and exc.exit_code > 0 else 1
    return 0
