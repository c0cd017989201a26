"""The experiment runner behind ``main.py``: load, merge, choose alpha or lambda on validation,
evaluate on test, record.

Call it from Python with a composed Hydra config::

    from hydra import compose, initialize_config_dir
    from tallmasks.eval.runner import run_experiment

    with initialize_config_dir(config_dir="/abs/path/to/config", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=ViT-B-32", "method=ties"])
    results = run_experiment(cfg)   # dict; results["results_path"] is the JSON written
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tallmasks.errors import CheckpointError, ConfigError, TallmasksError
from tallmasks.eval.cache import SplitData, default_num_workers, load_or_build_split
from tallmasks.eval.distributed import DistInfo, check_world_size, init_distributed, spawn_ranks, under_launcher
from tallmasks.eval.evaluator import PRECISIONS, Evaluator
from tallmasks.eval.results import Journal, atomic_write_json
from tallmasks.eval.selection import average_normalized, finetuned_accuracies, select_alpha, select_per_task
from tallmasks.models.paths import mask_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# configuration helpers


def _none(value: Any) -> Any:
    """Hydra/paper configs write None as the string "None"."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null", "none")):
        return None
    return value


def _plain(cfg: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return json.loads(json.dumps(dict(cfg), default=str))


def _datasets_field(value: Any) -> list[str] | None:
    value = _none(value)
    if value is None:
        return None
    if isinstance(value, str):
        names = [p.strip() for p in value.strip("[]").split(",") if p.strip()]
        return names or None
    return [str(v) for v in value] or None


def tall_mask_path(model_location: str | Path, model: str, num_tasks: int, use_ties: bool, ties_agg: str = "sum") -> Path:
    """The one path where method=tall_mask saves its chosen masks and load_mask/consensus read them."""
    suffix = f"_use_ties_{ties_agg}" if use_ties else ""
    return mask_dir(model_location) / model / f"TALL_mask_{int(num_tasks)}task{suffix}.safetensors"


def released_mask_paths(model_location: str | Path, model: str, num_tasks: int, use_ties: bool, ties_agg: str = "sum") -> list[Path]:
    """Released ``.npy`` names accepted as a fallback (converted on first use)."""
    folder = mask_dir(model_location) / model
    if use_ties:
        return [folder / f"TALL_mask_{num_tasks}task_use_ties_{ties_agg}.npy", folder / f"TALL_mask_{num_tasks}task_use_ties.npy"]
    return [folder / f"TALL_mask_{num_tasks}task.npy"]


def load_tall_masks(cs, path: Path, released: list[Path]):
    """Our saved MaskSet, else a released .npy converted (and saved at ``path``); else a one-line error."""
    from tallmasks.masks import Layout, MaskSet

    if path.is_file():
        return MaskSet.load(path).subset(cs.names)
    for candidate in released:
        if candidate.is_file():
            from tallmasks.released import load_released_masks

            packed = load_released_masks(candidate)
            masks = MaskSet.from_packed(packed, Layout.of(cs), {"kind": "tall", "source": str(candidate)})
            masks = masks.subset(cs.names)
            masks.save(path)
            log.info("converted released masks %s -> %s", candidate, path)
            return masks
    raise ConfigError(f"TALL masks not found at {path}: run method=tall_mask first (with the same model, tasks and use_ties)")


# ---------------------------------------------------------------------------------------------
# the experiment


class Experiment:
    """One run of main.py: settings, checkpoints, evaluator, journal."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.raw = _plain(cfg)
        c = self.raw
        from tallmasks.datasets import resolve_datasets

        self.model: str = str(c.get("model", "ViT-B-32"))
        names = _datasets_field(c.get("DATASETS"))
        num_tasks = _none(c.get("num_tasks"))
        self.datasets: list[str] = resolve_datasets(None if names else (int(num_tasks) if num_tasks is not None else None), names)
        self.num_tasks = len(self.datasets)
        method = dict(c.get("method") or {})
        if "name" not in method:
            raise ConfigError("method.name is missing (choose a method: method=sum, ties, tall_mask, consensus, ...)")
        self.method_name: str = str(method["name"])
        self.method = method
        from tallmasks.merging import get_method, grid_combinations

        self.method_spec = get_method(self.method_name)
        self.grid: dict[str, list] = {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in (method.get("grid") or {}).items()}
        self.combinations: list[dict[str, Any]] = grid_combinations(self.method_name, self.grid)
        self.n_eval_points = int(c.get("n_eval_points", 21))
        self.specify_lambda = _none(c.get("specify_lambda"))
        self.model_location = Path(os.path.expanduser(str(c.get("model_location", "models/checkpoints"))))
        self.data_location = Path(os.path.expanduser(str(c.get("data_location", "~/data"))))
        cache = _none(c.get("cache_dir"))
        self.cache_dir = Path(os.path.expanduser(str(cache))) if cache else self.data_location / ".tallmasks_cache"
        self.results_dir = Path(os.path.expanduser(str(c.get("results_dir", "results/merging"))))
        self.single_task_dir = Path(os.path.expanduser(str(c.get("single_task_dir", "results/single_task"))))
        self.batch_size = int(c.get("batch_size", 512))
        self.precision = str(c.get("precision", "fp32"))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        workers = _none(c.get("num_workers"))
        self.num_workers = default_num_workers() if workers is None else int(workers)
        budget = _none(c.get("device_cache_gb"))
        self.device_cache_gb = None if budget is None else float(budget)
        self.wandb = dict(c.get("wandb") or {})
        self.device_name = str(c.get("device", "auto"))
        self.full_name = str(method.get("full_name") or f"{self.method_name}_k={method.get('k')}")
        self.load_mask = bool(method.get("load_mask", False))
        self.use_ties = bool(method.get("use_ties", False))
        self.ties_agg = str(method.get("ties_agg") or "sum")

    # -- names ----------------------------------------------------------------------------------

    def merge_params(self, device: torch.device, combination: dict[str, Any] | None = None) -> dict:
        """The method's hyperparameters from the config, with one grid combination applied."""
        accepted = set(self.method_spec.defaults)
        params = {k: v for k, v in self.method.items() if k in accepted and k != "device"}
        params.update(combination or {})
        if "device" in accepted:
            params["device"] = str(device)
        return params

    def grid_tag(self) -> str:
        """``_grid-<name>=<values>...`` for a non-empty grid (a hash when long); empty otherwise."""
        if not self.grid:
            return ""
        text = "-".join(f"{name}=" + ",".join(_label(v) for v in values) for name, values in self.grid.items())
        if len(text) > 80:
            text = hashlib.sha1(text.encode()).hexdigest()[:8]
        return "_grid-" + text

    def chosen_full_name(self, chosen: dict[str, Any]) -> str:
        """The method's full name with grid-chosen values: the config's ``full_name`` resolved with them
        (or, where it does not mention them, the values appended)."""
        if not chosen:
            return self.full_name
        name = None
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(self.cfg, DictConfig):
                cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=False))
                for key, value in chosen.items():
                    cfg.method[key] = value
                name = OmegaConf.to_container(cfg, resolve=True)["method"].get("full_name")
        except ImportError:  # pragma: no cover
            pass
        if name and str(name) != self.full_name:
            return str(name)
        return self.full_name + "".join(f"_{key}={_label(value)}" for key, value in chosen.items())

    def journal_path(self) -> Path:
        return self.results_path().with_suffix(".journal.json")

    def results_path(self, chosen: dict[str, Any] | None = None) -> Path:
        if self.method_name == "tall_mask":
            suffix = "_tall_mask_ties" if self.use_ties else "_tall_mask_ta"
            suffix += "_loaded" if self.load_mask else ""
        elif self.method_name == "mag_masking":
            suffix = "_mag_mask"
        elif self.method_name == "consensus":
            suffix = f"_k_{self.method.get('prun_thre_k')}_{'ties' if self.use_ties else 'ta'}"
        else:
            suffix = ""
        from tallmasks.datasets import ALL_DATASETS

        tag = ""
        if self.datasets != ALL_DATASETS[: self.num_tasks]:
            tag = "_" + hashlib.sha1(",".join(self.datasets).encode()).hexdigest()[:8]
        extra = "" if self.specify_lambda is None else f"_alpha={self.specify_lambda}"
        extra += "" if self.n_eval_points == 21 else f"_n{self.n_eval_points}"
        extra += "" if self.precision == "fp32" else f"_{self.precision}"
        extra += self.grid_tag()
        full_name = self.chosen_full_name(chosen or {})
        name = f"{self.model}_{self.num_tasks}tasks_{full_name}{suffix}{tag}{extra}.json"
        return self.results_dir / name.replace("/", "-")

    def run_key(self, inputs: list[Path] = ()) -> dict:
        """What a finished evaluation depends on; ``inputs`` (checkpoints, masks read) by size and mtime."""
        return {
            "inputs": [_file_signature(path) for path in inputs],
            "model": self.model,
            "datasets": self.datasets,
            "method": {k: v for k, v in self.method.items() if k != "full_name"},
            "n_eval_points": self.n_eval_points,
            "specify_lambda": self.specify_lambda,
            "precision": self.precision,
            "model_location": str(self.model_location.resolve()),
        }


def _label(value: Any) -> str:
    """A hyperparameter value as written in setting labels and file names."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _check_files(paths: list[Path]) -> None:
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found (download it with download_checkpoints.py or fine-tune with finetune.py)")


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
    from tallmasks.merging import CheckpointSet, alpha_candidates, merge
    from tallmasks.models import (
        MODELS,
        ImageEncoder,
        finetuned_path,
        get_classification_head,
        save_zeroshot_encoder,
        zeroshot_path,
    )

    log.info("%s on %s: %d tasks (%s), device %s, precision %s", exp.full_name, exp.model, exp.num_tasks,
             ", ".join(exp.datasets), device, exp.precision)
    zs = zeroshot_path(exp.model_location, exp.model)
    fts = [finetuned_path(exp.model_location, exp.model, d) for d in exp.datasets]
    _check_files(fts)
    if not zs.is_file() and exp.model in MODELS:  # like the paper's code: theta_0 saved from the openai weights
        log.info("%s missing: saving the pre-trained %s image encoder there", zs, exp.model)
        dist.main_first(lambda: save_zeroshot_encoder(exp.model, exp.model_location))  # kept once saved
    _check_files([zs])
    finetuned_acc, ft_sources = finetuned_accuracies(exp.model, exp.datasets, exp.single_task_dir, exp.model_location)

    # masks needed up front (fail before any expensive work)
    mask_file = tall_mask_path(exp.model_location, exp.model, exp.num_tasks, exp.use_ties, exp.ties_agg)
    released = released_mask_paths(exp.model_location, exp.model, exp.num_tasks, exp.use_ties, exp.ties_agg)
    needs_masks = exp.load_mask or any(exp.method_spec.needs_masks(exp.merge_params(device, c)) for c in exp.combinations)
    if needs_masks and not (mask_file.is_file() or any(p.is_file() for p in released)):
        raise ConfigError(f"TALL masks not found at {mask_file}: run method=tall_mask first (with the same model, tasks and use_ties)")

    cs = CheckpointSet(zs, fts, names=exp.datasets)
    cs.progress = dist.is_main
    encoder = ImageEncoder(exp.model, pretrained=None)
    evaluator = Evaluator(encoder, cs.pretrained, device, exp.precision, exp.batch_size, dist)

    # heads and preprocessed splits: rank 0 builds what is missing, the others wait and read
    data: dict[tuple[str, str], SplitData] = {}

    def prepare(build: bool) -> None:
        for dataset in tqdm(exp.datasets, desc="heads and data", disable=not build, leave=False):
            head = get_classification_head(exp.model, dataset, exp.model_location, device="cpu")
            evaluator.set_head(dataset, head)
            for split in ("val", "test"):
                data[(dataset, split)] = load_or_build_split(
                    lambda d=dataset, s=split: load_split(d, s, exp.data_location), dataset, split, exp.cache_dir,
                    encoder.image_size, encoder.val_preprocess, exp.num_workers, build=build,
                )

    dist.main_first(lambda: prepare(dist.is_main))
    _keep_on_device(data, device, exp.device_cache_gb)

    # rank 0 first: a released .npy is converted (and saved) once
    masks = dist.main_first(lambda: load_tall_masks(cs, mask_file, released)) if needs_masks else None
    inputs = [zs, *fts] + ([mask_file] if needs_masks else [])
    run_key = dist.broadcast_object(exp.run_key(inputs) if dist.is_main else None)
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
    ctx = _Context(exp, cs, evaluator, accuracy, finetuned_acc, dist, masks, mask_file)
    best: _Trial | None = None
    vals: dict[str, dict] = {}
    for combination in tqdm(exp.combinations, desc="grid on validation", disable=len(exp.combinations) == 1 or not dist.is_main):
        params = exp.merge_params(device, combination)
        if exp.method_spec.needs_masks(params):
            params["masks"] = masks
        log.info("merging with %s%s", exp.method_name, f" ({_grid_label(combination)})" if combination else "")
        vector = merge(cs, exp.method_name, **params)
        evaluator.load_vector(vector)
        trial = _select_per_task(ctx, combination, vector, params) if exp.method_spec.task_models else _select_alpha(ctx, combination, vector, params)
        for label, metrics in trial.val.items():
            vals[_grid_key(combination, label)] = metrics
        if best is None or trial.score > best.score:  # ties go to the first combination
            best = trial
        del vector
    assert best is not None
    if len(exp.combinations) > 1:
        evaluator.load_vector(best.vector)
    out["selection"] = {**best.selection, **best.combination}
    out["val"] = vals
    out["val_best"] = best.val_best
    out["test"] = best.finish()
    out.update(best.extra)
    info = getattr(best.vector, "info", None)
    if info:
        out["merge_info"] = dict(info)
    results_path = exp.results_path(best.combination)
    out["per_task"] = {
        d: {"top1": out["test"][f"{d}:top1"], "normalized_top1": out["test"][f"{d}:normalized_top1"]} for d in exp.datasets
    }
    out["avg_top1"] = out["test"]["avg_top1"]
    out["avg_normalized_top1"] = out["test"]["avg_normalized_top1"]
    out["evaluations"] = dict(counter)
    out["seconds"] = round(time.perf_counter() - start, 2)
    if dist.is_main:
        atomic_write_json(results_path, out)
        log.info("test: avg top1 %.2f%%, avg normalized %.2f%% -> %s", 100 * out["avg_top1"], 100 * out["avg_normalized_top1"], results_path)
    out["results_path"] = str(results_path)
    out["rank"] = dist.rank
    if run is not None:
        run.log({f"test/{k}": v for k, v in out["test"].items()})
        run.finish(quiet=True)
    return out


def _grid_label(combination: dict[str, Any]) -> str:
    return ",".join(f"{key}={_label(value)}" for key, value in combination.items())


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
    mask_file: Path


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
    for alpha in tqdm(alphas, desc="alpha on validation", disable=not ctx.dist.is_main, leave=not combination):
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
    for label, t, d in tqdm(steps, desc="per-task models on validation", disable=not dist.is_main, leave=not combination):

        def apply(label=label, t=t, d=d) -> None:
            evaluator.set_weights(models.scale(t), models.mask(t, models.choices[label]), tag=(prefix, "task", d, label))

        val_top1.setdefault(label, {})[d] = accuracy(f"{prefix}mask={label}", d, "val", apply)
    chosen = select_per_task(val_top1, exp.datasets)
    val = {label: average_normalized(v, ctx.finetuned_acc, suffix="Val") for label, v in val_top1.items()}
    val_best = average_normalized({d: val_top1[chosen[d]][d] for d in exp.datasets}, ctx.finetuned_acc, suffix="Val")
    extra: dict[str, Any] = {}

    def finish() -> dict:
        masks = models.masks([models.choices[chosen[d]] for d in exp.datasets])
        if models.shared and not exp.load_mask:
            masks.info.update({"use_ties": exp.use_ties, "ties_agg": exp.ties_agg, "model": exp.model})
            if dist.is_main:
                masks.save(ctx.mask_file)
                log.info("saved the chosen TALL masks to %s", ctx.mask_file)
            extra["mask_path"] = str(ctx.mask_file)
        top1 = {}
        for t, d in enumerate(exp.datasets):
            apply = lambda t=t, d=d: evaluator.set_weights(models.scale(t), masks.get(d), tag=(prefix, "final", d))  # noqa: E731
            top1[d] = accuracy(f"{prefix}mask={chosen[d]}", d, "test", apply)
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
    from tallmasks.reporting import format_result

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


def _launch_settings(raw: dict) -> tuple[int, int | None]:
    """(world_size, port) of a main.py config, checked."""
    try:
        world_size = _none(raw.get("world_size"))
        world_size = 1 if world_size is None else int(world_size)
        port = _none(raw.get("port"))
        port = int(port) if port is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"world_size and port must be integers, got {raw.get('world_size')!r}, {raw.get('port')!r}") from None
    check_world_size(world_size, str(raw.get("device", "auto")))
    return world_size, port


def run_main(cfg: Any) -> int:
    """main.py's entry: one process, one torchrun rank, or ``world_size`` local ranks spawned here
    (the paper's ``world_size``/``port`` fields; gloo on CPU, nccl on GPUs). Returns the exit code."""
    if under_launcher():
        return _run_and_report(cfg)
    try:
        world_size, port = _launch_settings(_plain(cfg))
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
