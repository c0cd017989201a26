"""The offline non-local merging experiment on the demo's tasks (``python -m tallmasks.demo --nonlocal``).

Two demo foundations pre-trained from different seeds (the demo's :func:`~tallmasks.demo.local.pretrain_foundation`
with its :class:`~tallmasks.demo.local.PretrainSettings`), experts fine-tuned from each with the demo's
:func:`~tallmasks.demo.local.finetune_experts` (the first half of the tasks from the reference foundation, the
second half from the other), merged by the experiment runner (main.py's code path: alpha and lambda chosen
on validation, results on test) with no alignment, weight-matching alignment, alignment + REPAIR and
alignment + TACT; the local setting (every expert from the reference foundation) and a long fine-tuning
regime, each with and without TACT; TACT accuracy against the number of calibration images; and, per
correction site, the merged model's activation std over the experts' before and after TACT.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallmasks.core.errors import ConfigError, TallmasksError

log = logging.getLogger("tallmasks.demo.nonlocal")

#: the runner methods the experiment can run (tall_mask_ties is tall_mask over TIES)
MERGE_METHODS = ("sum", "ties", "tall_mask", "seed_ties_tall")
#: what it runs by default: the merges of the local demo and the non-local seed's own (seed_ties_tall)
DEFAULT_METHODS = ("sum", "ties", "tall_mask", "tall_mask_ties", "seed_ties_tall")
NONLOCAL_VARIANTS = ("none", "align", "align_repair", "align_repair_seed_code", "align_tact")
DEFAULT_OUTPUT = Path("results/nonlocal")
ARCHITECTURES = ("vit", "cnn")
#: per architecture: the results file and the variance-collapse figure
RESULTS_NAMES = {"vit": "nonlocal.json", "cnn": "nonlocal_cnn.json"}
FIGURE_NAMES = {"vit": "nonlocal_variance_collapse.png", "cnn": "nonlocal_cnn_variance_collapse.png"}
RESULTS_NAME, FIGURE_NAME = RESULTS_NAMES["vit"], FIGURE_NAMES["vit"]
#: the CNN setting's experts: the seed's linear probe, then fine-tuning with the head trained too
CNN_PROBE_STEPS = 50
#: the CNN setting's calibration-size tables unless given: without the 1,000-image cells, which took 10 of
#: its 33 minutes in the first run and changed TA + TACT by under a point (1,000: 56.3, 200: 55.4 non-local)
CNN_CALIBRATION_SIZES, CNN_AUGMENTED_SIZES = (20, 50, 200), (200,)


@dataclass(frozen=True)
class NonLocalSettings:
    """What the non-local experiment adds to a :class:`~tallmasks.demo.local.DemoConfig`."""

    other_seed: int = 1  # pre-training seed of the second foundation
    methods: tuple[str, ...] = DEFAULT_METHODS
    tact_images: int = 200  # per task, capped by the training split
    repair_images: int = 100  # per task, pooled over the tasks
    calibration_sizes: tuple[int, ...] = (20, 50, 200, 1000)
    calibration_methods: tuple[str, ...] = ("sum",)
    augmented_sizes: tuple[int, ...] = (200, 1000)  # the same table with augmented views (the seed's augmentation)
    long_steps_factor: float = 1.0  # the long regime: the demo's fine-tuning steps (and warm-up) times this
    long_lr_factor: float = 10.0  # ... and its learning rate times this
    max_iter: int = 100  # weight matching's iteration cap
    alpha_points: int | None = 10  # main.py's n_eval_points (alphas 0.2, 0.4, ..., 1.0); None: the demo's
    embedding: bool = True  # the output embedding permuted with the heads, and corrected by TACT and REPAIR
    architecture: str = "vit"  # vit: the demo CLIP; cnn: its VGG-style tower (DEMO_CNN_MODEL) with trained heads
    ablation_methods: tuple[str, ...] = ("seed_ties_tall",)  # the output embedding's two changes measured apart

    def check(self, cfg: Any) -> None:
        """One-line errors for settings the experiment cannot run."""
        from tallmasks.demo.local import method_run

        if len(cfg.task_names()) < 2:
            raise ConfigError("the non-local experiment needs at least 2 tasks (half from each foundation)")
        if self.other_seed == cfg.pretrain.seed:
            raise ConfigError(f"--other-seed must differ from the reference foundation's seed ({cfg.pretrain.seed})")
        for name in (*self.methods, *self.calibration_methods, *self.ablation_methods):
            if method_run(name)[0] not in MERGE_METHODS:
                raise ConfigError(f"non-local methods are {', '.join(MERGE_METHODS)}, got {name!r}")
        for label, value in (
            ("--tact-images", self.tact_images),
            ("--repair-images", self.repair_images),
            *(("--calibration-sizes", n) for n in self.calibration_sizes),
            *(("--augmented-sizes", n) for n in self.augmented_sizes),
        ):
            if value < 1:
                raise ConfigError(f"{label} must be >= 1, got {value}")
        for label, value in (("--long-steps-factor", self.long_steps_factor), ("--long-lr-factor", self.long_lr_factor)):
            if not value > 0:
                raise ConfigError(f"{label} must be > 0, got {value}")
        if self.alpha_points is not None and self.alpha_points < 2:
            raise ConfigError(f"--alpha-points must be >= 2, got {self.alpha_points}")
        if self.max_iter < 1:
            raise ConfigError(f"--max-iter must be >= 1, got {self.max_iter}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"--architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")

    def demo_config(self, cfg: Any) -> Any:
        """``cfg`` for this architecture: the CNN setting swaps in the VGG tower (same pre-training) and
        experts with trained heads (a linear probe of CNN_PROBE_STEPS, then the demo's fine-tuning)."""
        if self.architecture == "vit":
            return cfg
        from tallmasks.models import DEMO_CNN_MODEL

        probe = min(CNN_PROBE_STEPS, cfg.finetune.steps)
        return replace(
            cfg,
            pretrain=replace(cfg.pretrain, model=DEMO_CNN_MODEL),
            finetune=replace(cfg.finetune, train_head=True, probe_steps=probe),
        )

    def long_finetune(self, base: Any) -> Any:
        """The long fine-tuning regime: the demo's :class:`~tallmasks.demo.local.FinetuneSettings` stretched."""
        return replace(
            base,
            steps=max(1, round(base.steps * self.long_steps_factor)),
            warmup_steps=round(base.warmup_steps * self.long_steps_factor),
            lr=base.lr * self.long_lr_factor,
        )


# ---------------------------------------------------------------------------------------------
# checkpoints


def _accuracy_file(location: Path, model: str) -> Path:
    from tallmasks.eval.selection import FT_FILE

    return location / model / FT_FILE


def unaligned_location(cache_dir: Path, locations: Sequence[Path], foundation_of: dict[str, int], model: str) -> Path:
    """A checkpoint folder (released layout) for merging without alignment: theta_0 = the mean of the
    foundations as they are, task t's expert, head and fine-tuned accuracies from its own foundation."""
    from tallmasks.demo.local import fingerprint
    from tallmasks.eval import read_json
    from tallmasks.eval.results import atomic_write_json
    from tallmasks.io.checkpoints import load_state_dict, save_state_dict
    from tallmasks.models import finetuned_path, head_path, zeroshot_path

    sources = [zeroshot_path(loc, model) for loc in locations]
    key = fingerprint({"foundations": [str(p.resolve()) for p in sources], "experts": foundation_of})
    location = Path(cache_dir) / f"nonlocal-unaligned-{key}" / "checkpoints"
    theta0 = zeroshot_path(location, model)
    if not theta0.is_file():
        states = [load_state_dict(p) for p in sources]
        mean = {
            k: sum(s[k].float() for s in states) / len(states) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0].keys()
        }
        save_state_dict({k: v.to(states[0][k].dtype) for k, v in mean.items()}, theta0)
    table: dict[str, float] = {}
    for task, index in foundation_of.items():
        for source, target in (
            (finetuned_path(locations[index], model, task), finetuned_path(location, model, task)),
            (head_path(locations[index], model, task), head_path(location, model, task)),
        ):
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        own = read_json(_accuracy_file(locations[index], model))
        table.update({key: own[key] for key in (task, task + "Val")})
    atomic_write_json(_accuracy_file(location, model), dict(sorted(table.items())))
    return location


def expert_distance(location: Path, tasks: Sequence[str], model: str) -> float:
    """Mean over tasks of ||theta_t - theta_0|| / ||theta_0|| (floating-point weights): how far the experts moved."""
    from tallmasks.io.checkpoints import load_state_dict
    from tallmasks.models import finetuned_path, zeroshot_path

    theta0 = load_state_dict(zeroshot_path(location, model))
    keys = [k for k in theta0.keys() if theta0[k].is_floating_point()]
    base = math.sqrt(sum(float(theta0[k].double().pow(2).sum()) for k in keys))
    out = []
    for task in tasks:
        expert = load_state_dict(finetuned_path(location, model, task))
        out.append(math.sqrt(sum(float((expert[k].double() - theta0[k].double()).pow(2).sum()) for k in keys)) / base)
    return float(np.mean(out))


# ---------------------------------------------------------------------------------------------
# runs through the experiment runner


class Runs:
    """main.py runs of the demo's config on given checkpoints, each run once per experiment."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.done: dict[tuple, dict[str, Any]] = {}

    def __call__(self, location: Path, name: str, extra: Sequence[str] = ()) -> dict[str, Any]:
        from tallmasks.demo.local import compose_config, method_run
        from tallmasks.experiments.runner import run_experiment

        key = (str(location), name, tuple(extra))
        if key not in self.done:
            method, overrides = method_run(name)
            log.info("%s %s", name, " ".join(extra) or "(plain)")
            self.done[key] = run_experiment(compose_config(self.cfg, location, method, overrides, extra))
        return self.done[key]


def alignment_overrides(other: Path, foundation_of: Sequence[int], max_iter: int, embedding: bool = True) -> list[str]:
    """main.py overrides aligning the other foundation (and its experts) to model_location's."""
    from tallmasks.demo.local import quote

    return [
        "alignment=weight_matching",
        f"alignment.foundations=[{quote(other.resolve())}]",
        "alignment.assignment=[" + ",".join(map(str, foundation_of)) + "]",
        f"alignment.max_iter={max_iter}",
        f"alignment.embedding={str(embedding).lower()}",
    ]


def correction_overrides(name: str, num_images: int, embedding: bool = True, rule: str | None = None, augment: bool = False) -> list[str]:
    out = [f"correction={name}", f"correction.num_images={num_images}", f"correction.embedding={str(embedding).lower()}"]
    return out + ([f"correction.rule={rule}"] if rule else []) + (["correction.augment=true"] if augment else [])


def _record(result: dict[str, Any]) -> dict[str, Any]:
    keep = {k: result[k] for k in ("avg_top1", "avg_normalized_top1", "selection", "results_path", "seconds") if k in result}
    keep["val_avg_normalized_top1"] = result["val_best"]["avg_normalized_top1"] if "val_best" in result else None
    for key in ("alignment", "correction"):
        if key in result:
            keep[key] = {k: v for k, v in result[key].items() if k != "files"}
    return keep


# ---------------------------------------------------------------------------------------------
# variance collapse


def split_images(cfg: Any, location: Path, tasks: Sequence[str], num_images: int | None = None) -> dict[str, torch.Tensor]:
    """Per task, its TACT calibration images (``num_images`` of its training part) or, with None, its Val
    images; from the runner's split cache."""
    from tallmasks.datasets import load_split
    from tallmasks.demo.local import data_cache
    from tallmasks.eval import load_or_build_split
    from tallmasks.models import ImageEncoder
    from tallmasks.non_local.experiment import calibration_split, calibration_split_name

    encoder = ImageEncoder(cfg.model, pretrained=None)
    out = {}
    for task in tasks:
        if num_images is None:
            load, split = (lambda t=task: load_split(t, "val", location)), "val"
        else:
            load, split = calibration_split(task, num_images, location), calibration_split_name(num_images)
        out[task] = load_or_build_split(load, task, split, data_cache(cfg), encoder.image_size, encoder.val_preprocess, 0).images
    return out


def variance_collapse(
    result: dict[str, Any],
    location: Path,
    tasks: Sequence[str],
    calibration: dict[str, torch.Tensor],
    measure: dict[str, torch.Tensor],
    batch_size: int,
    embedding: bool,
    model: str,
) -> dict[str, Any]:
    """Per site, the TA-merged model's activation std over each expert's on its task's ``measure`` images (mean
    over channels), before and after TACT calibrated on its ``calibration`` images; ``result`` is the TA run on
    the checkpoints at ``location`` (its alpha, chosen on validation without correction, and its alignment)."""
    from tallmasks.eval.evaluator import Evaluator
    from tallmasks.merging import CheckpointSet, merge
    from tallmasks.models import ImageEncoder, finetuned_path, zeroshot_path
    from tallmasks.non_local import Corrector, std_ratios, tact

    encoder = ImageEncoder(model, pretrained=None)
    if "alignment" in result:
        from tallmasks.non_local.experiment import AlignmentSettings, Sources, aligned_checkpoints, vit_heads

        record = result["alignment"]
        locations = [location, *map(Path, record["foundations"])]
        sources = Sources(locations, dict(record["assignment"]))
        settings = AlignmentSettings(
            "weight_matching", tuple(record["foundations"]), None, record["max_iter"], record["seed"], record.get("embedding", False)
        )
        theta0, experts, _, _ = aligned_checkpoints(
            sources,
            [zeroshot_path(loc, model) for loc in locations],
            [finetuned_path(sources.location(t), model, t) for t in tasks],
            tasks,
            vit_heads(encoder),
            settings,
            Path(record["permutation_file"]),
        )
        cs = CheckpointSet(theta0, experts, names=list(tasks))
    else:
        cs = CheckpointSet(zeroshot_path(location, model), [finetuned_path(location, model, t) for t in tasks], names=list(tasks))
    evaluator = Evaluator(encoder, cs.pretrained, "cpu", "fp32", batch_size)
    evaluator.load_vector(merge(cs, "sum"))
    evaluator.set_weights(result["selection"]["alpha"])
    merged = {k: v.detach().clone() for k, v in evaluator.encoder.state_dict().items()}
    expert_states = {t: cs.finetuned[i] for i, t in enumerate(tasks)}
    corrector = Corrector(evaluator.encoder, embedding=embedding)
    try:
        tact(evaluator.encoder, merged, expert_states, calibration, batch_size, evaluator.normalize)
        ratios = std_ratios(evaluator.encoder, merged, expert_states, measure, batch_size, evaluator.normalize)
        sites = [site.name for site in corrector.sites]
    finally:
        corrector.remove()
    return {
        "sites": sites,
        "before": {s: float(np.mean([ratios[t]["before"][s] for t in tasks])) for s in sites},
        "after": {s: float(np.mean([ratios[t]["after"][s] for t in tasks])) for s in sites},
        "per_task": ratios,
        "alpha": result["selection"]["alpha"],
    }


def plot_variance_collapse(collapse: dict[str, dict[str, Any]], path: Path, architecture: str = "vit") -> Path:
    """Std ratio per site (in depth order) for each setting, before (solid) and after TACT (dashed); PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tallmasks.io.checkpoints import atomic_path

    fig, ax = plt.subplots(figsize=(9.5, 3.6), dpi=120)
    for index, (label, entry) in enumerate(collapse.items()):
        color = f"C{index}"
        sites = entry["sites"]
        ax.plot(range(len(sites)), [entry["before"][s] for s in sites], "-o", color=color, markersize=3, label=f"{label}")
        ax.plot(range(len(sites)), [entry["after"][s] for s in sites], "--", color=color, linewidth=1, label=f"{label} + TACT")
    first = next(iter(collapse.values()))["sites"]
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(first)))
    ax.set_xticklabels(site_labels(first, architecture), rotation=90, fontsize=6)
    ax.set_ylabel("std merged / std expert")
    tower = "ViT" if architecture == "vit" else "VGG-style CNN"
    ax.set_title(f"Variance collapse per correction site, {tower} (TA; Val images; mean over tasks and channels)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def site_labels(sites: Sequence[str], architecture: str = "vit") -> list[str]:
    """Short names of correction sites: the ViT's by block; the demo VGG's in the seed's words (conv<i> after
    each convolution's norm, dense1, dense2, embedding)."""
    if architecture != "cnn":
        return [_short_site(s) for s in sites]
    convs = len(sites) - 3
    return [f"conv{i + 1}" for i in range(convs)] + ["dense1", "dense2", "embedding"]


def _short_site(name: str) -> str:
    if name.endswith("visual:out"):
        return "embedding"
    short = name.replace("model.visual.", "").replace("transformer.resblocks.", "b")
    for long_form, word in (
        (".attn:context", " attn"),
        (".ln_2:out", " ln_2"),
        (".mlp.c_fc:out", " mlp"),
        (":out", " out"),
        (":in", " in"),
    ):
        short = short.replace(long_form, word)
    return short


# ---------------------------------------------------------------------------------------------
# the experiment


def run_nonlocal(cfg: Any, settings: NonLocalSettings = NonLocalSettings()) -> dict[str, Any]:
    """Build both foundations and their experts (cached), run every merge, write ``nonlocal.json`` and the
    variance-collapse figure into ``cfg.output_dir``; returns the results."""
    from tallmasks.io.guard import check_output

    settings.check(cfg)
    cfg = settings.demo_config(cfg)
    check_output(cfg.output_dir, folder=True, label="--output-dir")
    check_output(cfg.cache_dir, folder=True, label="--cache-dir")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _run_nonlocal(cfg, settings)
    finally:
        torch.set_num_threads(previous_threads)


def _run_nonlocal(cfg: Any, settings: NonLocalSettings) -> dict[str, Any]:
    from tallmasks.demo.local import finetune_experts, pretrain_foundation, single_task_accuracies
    from tallmasks.eval.results import atomic_write_json

    start = time.perf_counter()
    if settings.alpha_points is not None:
        cfg = replace(cfg, n_eval_points=settings.alpha_points)
    tasks = cfg.task_names()
    half = len(tasks) // 2
    first, second = tasks[:half], tasks[half:]
    foundation_of = [0] * len(first) + [1] * len(second)
    reference = pretrain_foundation(cfg.pretrain, cfg.cache_dir)
    other = pretrain_foundation(replace(cfg.pretrain, seed=settings.other_seed), cfg.cache_dir)
    long_ft = settings.long_finetune(cfg.finetune)
    local = finetune_experts(reference, tasks, cfg.finetune, workers=cfg.workers)
    far = finetune_experts(other, second, cfg.finetune, workers=cfg.workers)
    long = finetune_experts(reference, tasks, long_ft, workers=cfg.workers)
    single = {
        "local": single_task_accuracies(cfg, local),
        "other": single_task_accuracies(replace(cfg, tasks=list(second)), far),
        "long": single_task_accuracies(cfg, long),
    }
    unaligned = unaligned_location(Path(cfg.cache_dir), [local, far], dict(zip(tasks, foundation_of)), cfg.model)
    built = time.perf_counter() - start
    log.info("foundations and experts ready in %.0fs", built)

    runs = Runs(cfg)
    align = alignment_overrides(far, foundation_of, settings.max_iter, settings.embedding)
    tact = correction_overrides("tact", settings.tact_images, settings.embedding)
    repair = correction_overrides("repair", settings.repair_images, settings.embedding)
    repair_seed = correction_overrides("repair", settings.repair_images, settings.embedding, rule="seed_code")
    grid = {
        "nonlocal": {
            "none": (unaligned, []),
            "align": (local, align),
            "align_repair": (local, align + repair),
            "align_repair_seed_code": (local, align + repair_seed),
            "align_tact": (local, align + tact),
        },
        "local": {"none": (local, []), "tact": (local, tact)},
        "long": {"none": (long, []), "tact": (long, tact)},
    }
    out: dict[str, Any] = {setting: {m: {} for m in settings.methods} for setting in grid}
    records: dict[str, Any] = {}
    for setting, variants in grid.items():
        for method in settings.methods:
            for variant, (location, extra) in variants.items():
                result = runs(location, method, extra)
                out[setting][method][variant] = result["avg_normalized_top1"]
                records[f"{setting}/{method}/{variant}"] = _record(result)

    zeroshot = {}  # theta_0 itself with each task's zero-shot head: how good a starting point each merge has
    for label, (location, extra) in (("nonlocal_none", (unaligned, [])), ("nonlocal_align", (local, align)), ("local", (local, []))):
        result = runs(location, "zeroshot", extra)
        zeroshot[label] = result["avg_normalized_top1"]
        records[f"zeroshot/{label}"] = _record(result)

    def calibration_sweep(sizes: Sequence[int], augment: bool, label: str) -> dict[str, Any]:
        """{setting: {method: {n: TACT's normalized accuracy with n calibration images (views) per task}}}."""
        out: dict[str, Any] = {}
        for setting, (location, extra) in (("nonlocal", (local, align)), ("local", (local, []))):
            out[setting] = {}
            for method in settings.calibration_methods:
                out[setting][method] = {}
                for n in sizes:
                    result = runs(location, method, extra + correction_overrides("tact", n, settings.embedding, augment=augment))
                    out[setting][method][str(n)] = result["avg_normalized_top1"]
                    records[f"{label}/{setting}/{method}/{n}"] = _record(result)
        return out

    # the output embedding's two changes apart: permuted with the heads by the alignment or not, corrected by
    # TACT or not (the CNN's projection is always a correction site, as in the seed's VGG: only the alignment varies)
    ablation: dict[str, Any] = {}
    corrections = ("none", "plain", "embedding") if settings.architecture == "vit" else ("none", "embedding")
    for method in settings.ablation_methods:
        ablation[method] = {}
        for aligned in ("plain", "embedding"):
            for corrected in corrections:
                extra = alignment_overrides(far, foundation_of, settings.max_iter, aligned == "embedding")
                if corrected != "none":
                    extra += correction_overrides("tact", settings.tact_images, corrected == "embedding")
                result = runs(local, method, extra)
                ablation[method][f"{aligned}+{corrected}"] = result["avg_normalized_top1"]
                records[f"embedding_ablation/{method}/{aligned}+{corrected}"] = _record(result)

    calibration: dict[str, Any] = {"sizes": list(settings.calibration_sizes)}
    calibration.update(calibration_sweep(settings.calibration_sizes, False, "calibration"))
    calibration["augmented_sizes"] = list(settings.augmented_sizes)
    calibration["augmented"] = calibration_sweep(settings.augmented_sizes, True, "calibration_augmented")
    train_size = {t: len(v) for t, v in split_images(cfg, local, tasks, max(settings.calibration_sizes)).items()}
    calibration["images_used"] = {str(n): min(n, min(train_size.values())) for n in settings.calibration_sizes}

    images, val = split_images(cfg, local, tasks, settings.tact_images), split_images(cfg, local, tasks)
    collapse = {}
    batch_size = 256
    for label, (location, extra) in (
        ("non-local", (unaligned, [])),
        ("non-local aligned", (local, align)),
        ("local", (local, [])),
        ("long fine-tuning", (long, [])),
    ):
        result = runs(location, "sum", extra)
        collapse[label] = variance_collapse(result, location, tasks, images, val, batch_size, settings.embedding, cfg.model)
    figure = plot_variance_collapse(collapse, Path(cfg.output_dir) / FIGURE_NAMES[settings.architecture], settings.architecture)

    summary = {
        **out,
        "zeroshot": zeroshot,
        "embedding_ablation": ablation,
        "calibration_size": calibration,
        "std_ratio": {k: {kk: v[kk] for kk in ("sites", "before", "after", "alpha")} for k, v in collapse.items()},
        "std_ratio_per_task": {k: v["per_task"] for k, v in collapse.items()},
        "std_ratio_images": {
            "calibration": f"{settings.tact_images} training images per task (capped by the split)",
            "measured": "each task's Val split",
        },
        "finetuned_avg_top1": {
            "local": float(np.mean([single["local"][t] for t in tasks])),
            "nonlocal": float(np.mean([single["local"][t] for t in first] + [single["other"][t] for t in second])),
            "long": float(np.mean([single["long"][t] for t in tasks])),
        },
        "expert_distance": {
            "demo": expert_distance(local, tasks, cfg.model),
            "long": expert_distance(long, tasks, cfg.model),
            "other_foundation": expert_distance(far, second, cfg.model),
        },
        "foundations": {
            "reference": {"seed": cfg.pretrain.seed, "fingerprint": cfg.pretrain.fingerprint(), "tasks": first},
            "other": {
                "seed": settings.other_seed,
                "fingerprint": replace(cfg.pretrain, seed=settings.other_seed).fingerprint(),
                "tasks": second,
            },
        },
        "tasks": tasks,
        "architecture": settings.architecture,
        "model": cfg.model,
        "checkpoints": {"local": str(local), "other": str(far), "long": str(long), "unaligned": str(unaligned)},
        "runs": records,
        "settings": {
            "nonlocal": json.loads(json.dumps(asdict(settings))),
            "demo": json.loads(json.dumps(asdict(cfg), default=str)),
            "long_finetune": asdict(long_ft),
        },
        "figure": str(figure),
        "seconds": {"checkpoints": round(built, 1), "total": round(time.perf_counter() - start, 1)},
    }
    path = Path(cfg.output_dir) / RESULTS_NAMES[settings.architecture]
    summary = relative_paths(summary, Path.cwd())
    atomic_write_json(path, summary)
    log.info("non-local experiment finished in %.0fs; results in %s", time.perf_counter() - start, path)
    return summary


def relative_paths(value: Any, root: Path) -> Any:
    """``value`` (JSON-like) with every string path under ``root`` made relative to it: results that can be
    committed and read on another machine."""
    prefix = str(Path(root).resolve()) + "/"
    if isinstance(value, str):
        return value[len(prefix) :] if value.startswith(prefix) else value
    if isinstance(value, dict):
        return {k: relative_paths(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, root) for v in value]
    return value


#: what each method of the experiment merges (the markdown tables' row labels)
MERGE_LABELS = {
    "sum": "TA (`sum`, alpha on Val)",
    "ties": "TIES (`ties`, top 20%, alpha on Val)",
    "tall_mask": "TALL masks over TA (`tall_mask`, lambda per task on Val)",
    "tall_mask_ties": "TALL masks over TIES (`tall_mask_ties`)",
    "seed_ties_tall": "the seed's merge (`seed_ties_tall`: per-tensor TIES top 50% with its mean, TALL masks at lambda 1, no alpha)",
}


def format_tables(summary: dict[str, Any], fmt: str = "text") -> str:
    """The experiment's tables (normalized accuracy, %) as aligned text or, with ``fmt`` markdown, as the
    docs' tables (rows labelled with the merge they run, and the per-site std ratios)."""
    from tallmasks.report.tables import render_table

    markdown = fmt == "markdown"

    def label(method: str) -> str:
        return MERGE_LABELS.get(method, method) if markdown else method

    def titled(title: str, table: str) -> str:
        return (f"**{title}**\n\n" if markdown else f"{title}\n") + table

    parts = []
    for setting, variants in (("nonlocal", NONLOCAL_VARIANTS), ("local", ("none", "tact")), ("long", ("none", "tact"))):
        rows = [[label(m), *(100 * summary[setting][m][v] for v in variants)] for m in summary[setting]]
        parts.append(titled(f"{setting} (normalized accuracy, %)", render_table(["method", *variants], rows, fmt)))
    zeroshot = [["zeroshot", *(100 * v for v in summary["zeroshot"].values())]]
    parts.append(titled("zero-shot theta_0 (normalized accuracy, %)", render_table(["", *summary["zeroshot"]], zeroshot, fmt)))
    ablation = summary.get("embedding_ablation", {})
    if ablation:
        cells = list(next(iter(ablation.values())))
        rows = [[label(m), *(100 * ablation[m][c] for c in cells)] for m in ablation]
        title = "output embedding, alignment+correction: plain or embedding (normalized accuracy, %)"
        parts.append(titled(title, render_table(["", *cells], rows, fmt)))
    calibration = summary["calibration_size"]
    for title, sweep, sizes in (
        ("TACT, images per task", calibration, calibration["sizes"]),
        ("TACT, augmented views per task", calibration.get("augmented", {}), calibration.get("augmented_sizes", [])),
    ):
        rows = [
            [f"{setting} {m}", *(100 * sweep[setting][m][str(n)] for n in sizes)]
            for setting in ("nonlocal", "local")
            for m in sweep.get(setting, {})
        ]
        if rows:
            parts.append(titled(f"{title} (normalized accuracy, %)", render_table(["", *map(str, sizes)], rows, fmt)))
    if markdown and summary.get("std_ratio"):
        ratios = summary["std_ratio"]
        sites = next(iter(ratios.values()))["sites"]
        rows = [[setting, *(f"{entry['before'][s]:.2f}" for s in sites)] for setting, entry in ratios.items()]
        table = render_table(["site", *site_labels(sites, summary.get("architecture", "vit"))], rows, fmt)
        after = [v for entry in ratios.values() for v in entry["after"].values()]
        parts.append(titled(f"std merged / std expert per site, before TACT (after: {min(after):.2f}-{max(after):.2f})", table))
    return "\n\n".join(parts)


def tables_main(argv: Sequence[str] | None = None) -> int:
    """``python -m tallmasks.demo.non_local RESULTS.json [--format markdown|text]``: the tables of a results file."""
    from tallmasks.eval import read_json

    parser = argparse.ArgumentParser(prog="python -m tallmasks.demo.non_local", description="the tables of a non-local results file")
    parser.add_argument("results", type=Path, help="results/nonlocal/nonlocal.json or nonlocal_cnn.json")
    parser.add_argument("--format", choices=("markdown", "text"), default="markdown")
    args = parser.parse_args(argv)
    try:
        print(format_tables(read_json(args.results), args.format))
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: {args.results}: not a non-local results file (no {exc})", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, NonLocalSettings]:
    """The demo's options (``--quick``, ``--seed`` of the reference foundation, ``--cache-dir`` ...) and the experiment's."""
    from tallmasks.demo.local import parse_args as demo_args

    defaults = NonLocalSettings()
    parser = argparse.ArgumentParser(
        prog="python -m tallmasks.demo --nonlocal",
        description=__doc__.splitlines()[0],
        epilog="The demo's options apply too (--quick, --seed, --num-tasks, --tasks, --cache-dir, --output-dir, --threads, --workers).",
    )
    parser.add_argument("--other-seed", type=int, default=defaults.other_seed, help="pre-training seed of the second foundation (1)")
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods), help=f"merging methods ({' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--tact-images", type=int, default=defaults.tact_images, help="TACT images per task (200, capped by the split)")
    parser.add_argument("--repair-images", type=int, default=defaults.repair_images, help="REPAIR images per task, pooled (100)")
    parser.add_argument(
        "--calibration-sizes",
        type=int,
        nargs="+",
        default=None,
        help="TACT images per task for the calibration-size table (20 50 200 1000; cnn: 20 50 200)",
    )
    parser.add_argument("--calibration-methods", nargs="+", default=list(defaults.calibration_methods), help="methods of that table (sum)")
    parser.add_argument(
        "--ablation-methods",
        nargs="*",
        default=list(defaults.ablation_methods),
        help="methods of the output-embedding ablation: alignment and TACT with and without it (seed_ties_tall; none: skip)",
    )
    parser.add_argument(
        "--augmented-sizes",
        type=int,
        nargs="*",
        default=None,
        help="augmented views per task for the same table with the seed's augmentation (200 1000; cnn: 200; none: skip)",
    )
    parser.add_argument("--long-steps-factor", type=float, default=defaults.long_steps_factor, help="long regime: fine-tuning steps x (1)")
    parser.add_argument("--long-lr-factor", type=float, default=defaults.long_lr_factor, help="long regime: learning rate x (10)")
    parser.add_argument("--max-iter", type=int, default=defaults.max_iter, help="weight matching's iteration cap (100)")
    parser.add_argument(
        "--alpha-points", type=int, default=defaults.alpha_points, help="main.py's n_eval_points for every run (10: alphas 0.2 ... 1.0)"
    )
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default=defaults.architecture,
        help="vit: the demo CLIP (results/nonlocal/nonlocal.json); cnn: its VGG-style tower with trained heads (nonlocal_cnn.json)",
    )
    parser.add_argument(
        "--no-embedding",
        action="store_true",
        help="leave the output embedding as it is: not permuted with the heads, not corrected (the earlier experiment)",
    )
    args, rest = parser.parse_known_args(argv)
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in rest):
        rest = [*rest, "--output-dir", str(DEFAULT_OUTPUT)]
    configs = demo_args(rest)
    if len(configs) != 1:
        raise ConfigError("--nonlocal takes one --seed (the reference foundation's); --other-seed names the second")
    cnn = args.architecture == "cnn"
    if args.calibration_sizes is None:
        args.calibration_sizes = CNN_CALIBRATION_SIZES if cnn else defaults.calibration_sizes
    if args.augmented_sizes is None:
        args.augmented_sizes = CNN_AUGMENTED_SIZES if cnn else defaults.augmented_sizes
    settings = NonLocalSettings(
        args.other_seed,
        tuple(args.methods),
        args.tact_images,
        args.repair_images,
        tuple(args.calibration_sizes),
        tuple(args.calibration_methods),
        tuple(args.augmented_sizes),
        args.long_steps_factor,
        args.long_lr_factor,
        args.max_iter,
        args.alpha_points,
        not args.no_embedding,
        args.architecture,
        tuple(args.ablation_methods),
    )
    return configs[0], settings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment and print its tables (logging is set up by the demo's main)."""
    try:
        cfg, settings = parse_args(argv)
        summary = run_nonlocal(cfg, settings)
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_tables(summary))
    return 0


if __name__ == "__main__":
    sys.exit(tables_main())
