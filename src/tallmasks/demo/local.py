"""The offline demo (``make demo``): pre-train a small CLIP on procedurally generated scenes, fine-tune one
expert per task, merge them with every method through the experiment runner, and report.

Everything runs for real on CPU without network: the demo model is an open_clip CLIP with a small custom
config (``tallmasks-demo``) and the bundled tokenizer; the tasks are ``tallmasks.datasets.scenes``
(8 / 14 / 20 tasks: the first ones of one ordered list). The building blocks are reusable and cached by
their settings: :func:`pretrain_foundation` (a foundation model for a :class:`PretrainSettings`, e.g. a seed)
and :func:`finetune_experts` (experts fine-tuned from a foundation with :class:`FinetuneSettings`). Neither
depends on how many tasks are merged, so the 8, 14 and 20-task runs share their experts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallmasks.core.errors import ConfigError, TallmasksError
from tallmasks.core.progress import progress
from tallmasks.datasets.scenes import CaptionStyle
from tallmasks.eval.results import atomic_write_json
from tallmasks.io.checkpoints import load_state_dict, save_state_dict
from tallmasks.models.encoder import DEMO_MODEL

log = logging.getLogger("tallmasks.demo")

# summary name -> (runner method, method overrides): the single table of what the demo runs
METHOD_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "zeroshot": ("zeroshot", {}),
    "average": ("average", {}),
    "sum": ("sum", {}),
    "ties": ("ties", {}),
    "tall_mask": ("tall_mask", {"use_ties": False}),
    "tall_mask_ties": ("tall_mask", {"use_ties": True}),
    "consensus": ("consensus", {"use_ties": False}),
    "consensus_ties": ("consensus", {"use_ties": True}),
    "mag_masking": ("mag_masking", {}),
}
#: the paper's methods: what ``make demo`` runs
PAPER_METHODS: list[str] = list(METHOD_RUNS)
#: the later methods, run with their registered defaults (``--methods all`` adds them)
LATER_METHODS: list[str] = [
    "lines",
    "tsv",
    "iso_c",
    "iso_cts",
    "emr",
    "dare",
    "breadcrumbs",
    "magmax",
    "model_stock",
    "pcb",
    "cart",
    "wudi",
]
SUMMARY_METHODS: list[str] = [*PAPER_METHODS, "finetuned"]
ALL_METHODS: list[str] = [*PAPER_METHODS, *LATER_METHODS, "finetuned"]
DEFAULT_NUM_TASKS = 8
REPO_ROOT = Path(__file__).resolve().parents[2]


def _default_workers() -> int:
    """Experts fine-tuned at a time by default: one per core this process may use, at most 2."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _model_config_text(model: str | None = None) -> str:
    """The demo model's config (the open_clip JSON; the VGG tower described after it)."""
    from tallmasks.models.encoder import CONFIG_DIR, DEMO_CNN_MODEL

    text = (CONFIG_DIR / f"{DEMO_MODEL}.json").read_text()
    if model == DEMO_CNN_MODEL:
        from tallmasks.models.vgg import DemoVGG

        text += "\nimage tower: " + DemoVGG.describe()
    return text


@dataclass(frozen=True)
class PretrainSettings:
    """Contrastive pre-training of a demo foundation model; ``data_seed`` (default: ``seed``) orders the data."""

    seed: int = 0
    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    images_per_task: int = 1000
    captions: CaptionStyle = field(default_factory=CaptionStyle)
    data_seed: int | None = None
    model: str = DEMO_MODEL  # the ViT, or DEMO_CNN_MODEL (the VGG tower)

    def fingerprint(self) -> str:
        """Short hash of everything the foundation depends on (settings, model config, task suite)."""
        from tallmasks.datasets import scenes

        payload = asdict(self)
        if self.model == DEMO_MODEL:  # the ViT's hashes from before the field existed
            del payload["model"]
        return fingerprint({**payload, "model_config": _model_config_text(self.model), "suite": scenes.suite_fingerprint()})


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning of each expert (the loop of finetune.py); task t uses seed ``seed`` + its place in the suite."""

    steps: int = 100
    batch_size: int = 128
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    seed: int = 0
    train_head: bool = False  # train each expert's head with it (the non-local seed's experts), else frozen zero-shot
    probe_steps: int = 0  # with train_head: linear-probe steps (head only, AdamW at probe_lr) before fine-tuning
    probe_lr: float = 1e-2

    def fingerprint(self) -> str:
        payload = asdict(self)
        if not self.train_head:  # the frozen-head profiles' hashes from before these fields existed
            for key in ("train_head", "probe_steps", "probe_lr"):
                del payload[key]
        return fingerprint(payload)


#: fine-tuning profiles (``--profile``). ``fast``: ``make demo``'s 100 short steps. ``paper``: the paper's
#: protocol (about 2,000 iterations, AdamW at lr 1e-5 with weight decay 0.1, 500 warm-up steps, then
#: cosine decay) at batch 32 instead of 128: 2,000 x 32 images are 47 passes over a demo task's 1,350
#: training images, inside the paper's range of epochs (4 to 76 per dataset), at a quarter of the compute.
PROFILES: dict[str, FinetuneSettings] = {
    "fast": FinetuneSettings(),
    "paper": FinetuneSettings(steps=2000, batch_size=32, lr=1e-5, warmup_steps=500, weight_decay=0.1),
}
#: where each profile writes its summaries by default
PROFILE_OUTPUT: dict[str, Path] = {"fast": Path("results/demo"), "paper": Path("results/demo-paper")}


@dataclass
class DemoConfig:
    """Sizes, hyperparameters and locations of one demo run."""

    cache_dir: Path = Path(".demo_cache")
    output_dir: Path = Path("results/demo")
    num_tasks: int = DEFAULT_NUM_TASKS
    tasks: list[str] | None = None  # explicit task names (override num_tasks)
    methods: list[str] = field(default_factory=lambda: list(SUMMARY_METHODS))
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    profile: str = "fast"  # the name of ``finetune``'s profile in PROFILES (a label in the summary)
    n_eval_points: int = 21
    threads: int = 1  # one thread: small matrices gain little from two, and lose much when a core is busy
    workers: int = 1  # experts fine-tuned at a time, each in its own process (the command line: the cores, at most 2)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Tiny settings for smoke tests: a few steps, a small pre-training pool."""
        base = cls(
            pretrain=PretrainSettings(steps=4, batch_size=32, images_per_task=16),
            finetune=FinetuneSettings(steps=3, batch_size=32, warmup_steps=1),
            n_eval_points=4,
        )
        return replace(base, **overrides)

    @property
    def model(self) -> str:
        """The demo model of this run (its foundation's)."""
        return self.pretrain.model

    def task_names(self) -> list[str]:
        """The tasks of this run: ``tasks`` if given, else the first ``num_tasks`` of the suite."""
        from tallmasks.datasets import DEMO_DATASETS, ensure_names

        if self.tasks:
            return ensure_names(self.tasks)
        if not 1 <= int(self.num_tasks) <= len(DEMO_DATASETS):
            raise ConfigError(f"--num-tasks must be from 1 to {len(DEMO_DATASETS)}, got {self.num_tasks}")
        return list(DEMO_DATASETS[: int(self.num_tasks)])

    def summary_name(self) -> str:
        """summary.json for the default run, else summary_<N>tasks[_seed<S>].json."""
        tasks = self.task_names()
        suffix = "" if tasks == self.default_tasks() else f"_{len(tasks)}tasks"
        if self.tasks and tasks != _suite_prefix(len(tasks)):
            suffix += "_" + hashlib.sha1(",".join(tasks).encode()).hexdigest()[:8]
        suffix += "" if self.pretrain.seed == 0 else f"_seed{self.pretrain.seed}"
        return f"summary{suffix}.json"

    @staticmethod
    def default_tasks() -> list[str]:
        return _suite_prefix(DEFAULT_NUM_TASKS)


def _suite_prefix(n: int) -> list[str]:
    from tallmasks.datasets import DEMO_DATASETS

    return list(DEMO_DATASETS[:n])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# pre-training


class PretrainingData:
    """Scenes of every task of the suite (the pre-training pools, disjoint from all task splits) with their
    facts; captions are written afresh for every batch (partial and noisy, see scenes.CaptionStyle)."""

    def __init__(self, tokenizer: Any, mean: Sequence[float], std: Sequence[float], images_per_task: int, style: CaptionStyle):
        from tallmasks.datasets import scenes

        images, facts = [], []
        for task in progress(scenes.DEMO_DATASETS, desc="pre-training scenes", leave=False):
            pool_images, _, pool_facts = scenes.task_pool(task, "pretrain", images_per_task)
            images.append(pool_images)
            facts.extend(pool_facts)
        pixels = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 255.0
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = (pixels - mean_t) / std_t
        self.facts = facts
        self.style = style
        self.tokenizer = tokenizer
        self._tokens: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.facts)

    def captions(self, indices: Sequence[int], rng: np.random.Generator) -> list[str]:
        from tallmasks.datasets.scenes import caption

        return [caption(self.facts[i], rng, self.style) for i in indices]

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._tokens]
        if missing:
            for text, row in zip(missing, self.tokenizer(missing)):
                self._tokens[text] = row
        return torch.stack([self._tokens[c] for c in captions])


def contrastive_loss(clip: Any, images: torch.Tensor, captions: Sequence[str], data: PretrainingData) -> torch.Tensor:
    """Symmetric CLIP loss where images sharing a caption are all positives of that caption."""
    unique = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(unique)}
    target = torch.tensor([index[c] for c in captions], dtype=torch.long)
    image_features = clip.encode_image(images, normalize=True)
    text_features = clip.encode_text(data.tokens(unique), normalize=True)
    logits = clip.logit_scale.exp() * image_features @ text_features.T  # images x unique captions
    image_to_text = torch.nn.functional.cross_entropy(logits, target)
    positives = (target[None, :] == torch.arange(len(unique))[:, None]).float()
    positives = positives / positives.sum(dim=1, keepdim=True)
    text_to_image = -(positives * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def pretrain(clip: Any, data: PretrainingData, steps: int, batch_size: int, lr: float, seed: int = 0) -> list[float]:
    """Contrastive pre-training of both towers (AdamW, one-cycle schedule); returns the loss per step.
    ``seed`` draws the batches and the captions."""
    clip.train()
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    bar = progress(range(steps), desc="pre-training", unit="step", leave=False, dynamic_ncols=True)
    for _ in bar:
        indices = torch.randint(len(data), (batch_size,), generator=generator)
        loss = contrastive_loss(clip, data.images[indices], data.captions(indices.tolist(), rng), data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    clip.eval()
    return losses


@dataclass
class Foundation:
    """A pre-trained demo CLIP (both towers) and the folder that caches it and everything built from it."""

    settings: PretrainSettings
    clip: Any
    directory: Path


def pretrain_foundation(settings: PretrainSettings, cache_dir: str | Path = ".demo_cache") -> Foundation:
    """The foundation model for ``settings``: from ``<cache_dir>/foundation-<fingerprint>`` or pre-trained now and cached."""
    from tallmasks.models import create_clip, get_tokenizer

    directory = Path(cache_dir) / f"foundation-{settings.fingerprint()}"
    path = directory / "clip.safetensors"
    _seed_everything(settings.seed)
    clip = create_clip(settings.model, pretrained=None)
    if path.is_file():
        clip.load_state_dict(dict(load_state_dict(path).items()))
        clip.eval()
        log.info("foundation (seed %d): cached at %s", settings.seed, path)
        return Foundation(settings, clip, directory)
    data = PretrainingData(
        get_tokenizer(settings.model),
        clip.visual.preprocess_cfg["mean"],
        clip.visual.preprocess_cfg["std"],
        settings.images_per_task,
        settings.captions,
    )
    start = time.perf_counter()
    data_seed = settings.seed if settings.data_seed is None else settings.data_seed
    losses = pretrain(clip, data, settings.steps, settings.batch_size, settings.lr, data_seed)
    if losses:
        log.info(
            "pre-trained (seed %d) %d steps in %.0fs (loss %.3f -> %.3f)",
            settings.seed,
            len(losses),
            time.perf_counter() - start,
            losses[0],
            float(np.mean(losses[-10:])),
        )
    save_state_dict(clip.state_dict(), path)
    atomic_write_json(directory / "settings.json", json.loads(json.dumps(asdict(settings), default=str)))
    return Foundation(settings, clip, directory)


# ---------------------------------------------------------------------------------------------
# zero-shot checkpoint, heads, experts


def image_encoder_from(clip: Any, model: str) -> Any:
    """An ImageEncoder of the demo model ``model`` carrying ``clip``'s weights (text transformer dropped)."""
    from tallmasks.models import ImageEncoder

    encoder = ImageEncoder(model, pretrained=None)
    source = clip.state_dict()
    target = encoder.model.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise TallmasksError(f"pre-trained demo model lacks {missing[0]!r}")
    encoder.model.load_state_dict({k: source[k] for k in target})
    return encoder.eval()


def experts_location(foundation: Foundation, settings: FinetuneSettings) -> Path:
    """The checkpoint folder (released layout) of the experts fine-tuned from ``foundation`` with ``settings``."""
    return foundation.directory / f"experts-{settings.fingerprint()}" / "checkpoints"


def finetune_experts(foundation: Foundation, tasks: Sequence[str], settings: FinetuneSettings, workers: int = 1) -> Path:
    """Fine-tune one expert per task from ``foundation`` (each cached; the loop of finetune.py); returns the
    checkpoint folder, which also holds theta_0 and the zero-shot heads.

    ``workers`` > 1 fine-tunes that many experts at a time, each in its own process with one thread; every
    expert depends only on its task and ``settings`` (its seed included), so the checkpoints are the same
    bits as one after the other."""
    from tallmasks.models import finetuned_path, get_classification_head, zeroshot_path

    model = foundation.settings.model
    location = experts_location(foundation, settings)
    theta0 = zeroshot_path(location, model)
    if not theta0.is_file():
        save_state_dict(image_encoder_from(foundation.clip, model).state_dict(), theta0)
    atomic_write_json(location.parent / "settings.json", asdict(settings))
    todo = []
    for task in tasks:
        if not finetuned_path(location, model, task).is_file():
            get_classification_head(model, task, location, clip_model=foundation.clip)  # built once, cached (trained heads: replaced)
            todo.append(task)
    workers = max(1, min(int(workers), len(todo)))
    if workers == 1:
        for task in todo:
            _finetune_expert(foundation.clip, task, settings, location, model)
        return location
    clip_file = str(foundation.directory / "clip.safetensors")
    with progress(total=len(todo), desc=f"experts ({workers} processes)", unit="expert", leave=False) as bar:
        calls = [(clip_file, task, settings, str(location), model) for task in todo]
        _in_processes(_finetune_expert_in_worker, calls, todo, workers, bar)
    return location


def _finetune_expert(clip: Any, task: str, settings: FinetuneSettings, location: Path, model: str) -> Path:
    """One expert: the task's train split, its cached zero-shot head, the loop of finetune.py (with
    ``settings.train_head``: a linear probe of ``probe_steps``, then the head trained with the encoder)."""
    from tallmasks.datasets import DEMO_DATASETS, load_split
    from tallmasks.experiments.finetuning import FinetuneConfig, finetune
    from tallmasks.models import get_classification_head

    head = get_classification_head(model, task, location, clip_model=clip)
    train = load_split(task, "train", location)
    encoder = image_encoder_from(clip, model)
    seed = settings.seed + DEMO_DATASETS.index(task)
    if settings.train_head and settings.probe_steps:
        linear_probe(encoder, head, train, settings, seed)
    batches_per_epoch = math.ceil(len(train) / settings.batch_size)
    ft_cfg = FinetuneConfig(
        model_name=model,
        dataset=task,
        model_location=str(location),
        data_location=str(location),
        pretrained=None,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        warmup_steps=settings.warmup_steps,
        epochs=max(1, math.ceil(settings.steps / batches_per_epoch)),
        max_steps=settings.steps,
        checkpoint_every=0,
        num_workers=0,
        seed=seed,
        device="cpu",
        train_head=settings.train_head,
    )
    return finetune(ft_cfg, encoder=encoder, train_dataset=train, head=head)


def linear_probe(encoder: Any, head: Any, train: Any, settings: FinetuneSettings, seed: int) -> None:
    """Train ``head``'s weight (in place) on the frozen ``encoder``'s features of ``train`` (preprocessed as
    fine-tuning preprocesses them, once, with the augmentation seeded by ``seed``): ``settings.probe_steps`` AdamW steps at ``probe_lr`` (no weight
    decay) on batches of ``settings.batch_size``, the first stage of the seed's linear probe + fine-tuning."""
    preprocess = encoder.train_preprocess
    with torch.random.fork_rng(devices=[]):  # the augmentation's draws depend on the seed alone, not on what ran before
        torch.manual_seed(seed)
        images = torch.stack([preprocess(train[i][0]) for i in range(len(train))])
    labels = torch.tensor([int(train[i][1]) for i in range(len(train))])
    encoder.eval()
    with torch.no_grad():
        features = torch.cat([encoder(images[i : i + 512]) for i in range(0, len(images), 512)])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([head.weight], lr=settings.probe_lr, weight_decay=0.0)
    for _ in range(settings.probe_steps):
        batch = torch.randint(len(features), (min(settings.batch_size, len(features)),), generator=generator)
        loss = torch.nn.functional.cross_entropy(head(features[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.weight.grad = None


def _quiet_worker() -> None:
    """A worker process: one thread, no progress bars of its own (the parent counts what is done)."""
    import os

    torch.set_num_threads(1)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the worker); errors travel back as exceptions


def _finetune_expert_in_worker(clip_file: str, task: str, settings: FinetuneSettings, location: str, model: str) -> str:
    from tallmasks.models import create_clip

    clip = create_clip(model, pretrained=None)
    clip.load_state_dict(dict(load_state_dict(clip_file).items()))
    clip.eval()
    return str(_finetune_expert(clip, task, settings, Path(location), model))


# ---------------------------------------------------------------------------------------------
# summary, table, plot


def method_summary(per_task_top1: dict[str, float], finetuned_top1: dict[str, float], tasks: Sequence[str]) -> dict[str, Any]:
    """{"avg_top1", "avg_normalized_top1", "per_task": {task: {"top1", "normalized_top1"}}} (fractions in [0, 1])."""
    per_task = {}
    for task in tasks:
        top1 = float(per_task_top1[task])
        per_task[task] = {"top1": top1, "normalized_top1": top1 / float(finetuned_top1[task])}
    return {
        "avg_top1": float(np.mean([v["top1"] for v in per_task.values()])),
        "avg_normalized_top1": float(np.mean([v["normalized_top1"] for v in per_task.values()])),
        "per_task": per_task,
    }


def format_table(summary: dict[str, Any], tasks: Sequence[str]) -> str:
    """Method x task table of test accuracy (%), with normalized accuracy in the last column (the report's table code)."""
    from tallmasks.report.tables import summary_table

    return summary_table(summary, tasks)


def format_seed_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Average and normalized test accuracy (%) of each method: mean over the summaries, with min-max spread."""
    from tallmasks.report.tables import render_table

    seeds = [s["seeds"]["pretrain"] for s in summaries]
    rows = []
    for name in summaries[0]["methods"]:
        avg = [100 * s["methods"][name]["avg_top1"] for s in summaries]
        norm = [100 * s["methods"][name]["avg_normalized_top1"] for s in summaries]
        rows.append([name, float(np.mean(avg)), float(np.mean(norm)), f"{min(norm):.1f}-{max(norm):.1f}"])
    return f"pre-training seeds {seeds}\n" + render_table(["method", "avg (mean)", "norm. (mean)", "norm. min-max"], rows, "text")


def agreement_profile(masks: Any, prefix: str = "model.visual.") -> list[int]:
    """How many weights under ``prefix`` are switched on by exactly 0, 1, ..., T task masks."""
    counts = torch.zeros(len(masks.names) + 1, dtype=torch.int64)
    per_task = [masks.get(name) for name in masks.names]
    for key in masks.layout.keys:
        if not key.startswith(prefix):
            continue
        total = sum(m[key].reshape(-1).to(torch.int64) for m in per_task)
        counts += torch.bincount(total, minlength=len(masks.names) + 1)
    return [int(v) for v in counts]


def plot_agreement(profile: Sequence[int], path: Path, title: str) -> Path:
    """Bar chart of the agreement profile (share of weights per number of tasks), PNG, atomic."""
    from tallmasks.report.plots import plot_agreement as _plot

    return _plot(profile, path, title=title)


# ---------------------------------------------------------------------------------------------
# evaluation through the experiment runner's code path


def data_cache(cfg: DemoConfig) -> Path:
    """Preprocessed val/test splits: the scenes do not depend on the model, so every run shares them."""
    return Path(cfg.cache_dir) / "eval_data"


def single_task_accuracies(cfg: DemoConfig, location: Path) -> dict[str, float]:
    """Fine-tuned top-1 of every task on val ("<Task>Val") and test ("<Task>"), with the runner's evaluator.

    Kept in ``<location>/<model>/nonlinear_ft_accuracies.json`` (where the runner looks for the accuracies
    it normalizes by); only tasks missing there are evaluated.
    """
    from tallmasks.datasets import load_split
    from tallmasks.eval import Evaluator, load_or_build_split, read_json
    from tallmasks.eval.selection import FT_FILE
    from tallmasks.models import ImageEncoder, finetuned_path, get_classification_head

    model = cfg.model
    path = location / model / FT_FILE
    table: dict[str, float] = dict(read_json(path)) if path.is_file() else {}
    missing = [t for t in cfg.task_names() if not (t in table and t + "Val" in table)]
    if not missing:
        return table
    encoder = ImageEncoder(model, pretrained=None)
    for task in progress(missing, desc="fine-tuned accuracy", leave=False):
        evaluator = Evaluator(encoder, load_state_dict(finetuned_path(location, model, task)), "cpu", "fp32", 512)
        evaluator.set_head(task, get_classification_head(model, task, location))
        for split, key in (("val", task + "Val"), ("test", task)):
            data = load_or_build_split(
                lambda s=split, t=task: load_split(t, s, location),
                task,
                split,
                data_cache(cfg),
                encoder.image_size,
                encoder.val_preprocess,
                0,
            )
            correct, total = evaluator.count_correct(task, data)
            table[key] = correct / total
    atomic_write_json(path, dict(sorted(table.items())))
    return table


def quote(value: Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(cfg: DemoConfig, location: Path, method: str, method_overrides: dict[str, Any], extra: Sequence[str] = ()) -> Any:
    """The main.py config of one demo experiment on the experts at ``location``, composed by Hydra (``extra``: more overrides)."""
    from hydra import compose, initialize_config_dir

    candidates = [REPO_ROOT / "config", Path.cwd() / "config"]
    config_dir = next((c for c in candidates if (c / "config.yaml").is_file()), None)
    if config_dir is None:
        raise ConfigError(f"{candidates[-1]}: main.py's Hydra config folder not found (run the demo from a clone of the repository)")
    config_dir = config_dir.resolve()
    overrides = [
        f"model={cfg.model}",
        f"method={method}",
        "DATASETS=[" + ",".join(cfg.task_names()) + "]",
        f"n_eval_points={cfg.n_eval_points}",
        f"model_location={quote(location.resolve())}",
        f"data_location={quote(location.resolve())}",
        f"cache_dir={quote(data_cache(cfg).resolve())}",
        f"results_dir={quote((location.parent / 'results').resolve())}",
        f"single_task_dir={quote((location.parent / 'single_task').resolve())}",
        "device=cpu",
        "num_workers=0",
        "wandb.mode=disabled",
    ]
    overrides += [f"method.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in method_overrides.items()]
    overrides += list(extra)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def method_run(name: str) -> tuple[str, dict[str, Any]]:
    """(runner method, overrides) of a summary name: METHOD_RUNS, else a registered method with its defaults."""
    from tallmasks.merging import METHODS

    if name in METHOD_RUNS:
        return METHOD_RUNS[name]
    if name in METHODS:
        return name, {}
    choices = sorted(set(SUMMARY_METHODS) | set(METHODS))
    raise ConfigError(f"unknown demo method {name!r}; choose from {', '.join(choices)}")


def run_methods(cfg: DemoConfig, location: Path) -> dict[str, dict[str, Any]]:
    """Every merging method through run_experiment (the code path of main.py); results by summary name.

    One after the other, in this process: in two worker processes they took longer (49 s against 42 s for
    the 9 methods on 8 tasks, and no less on 20) and twice the memory."""
    from tallmasks.experiments.runner import run_experiment

    wanted = [m for m in cfg.methods if m != "finetuned"]
    # TALL masks first: consensus reads the masks they save
    order = sorted(wanted, key=lambda m: (method_run(m)[0] != "tall_mask", wanted.index(m)))
    out = {}
    for name in progress(order, desc="methods", leave=False):
        method, overrides = method_run(name)
        log.info("method %s", name)
        out[name] = run_experiment(compose_config(cfg, location, method, overrides))
    return {name: out[name] for name in wanted}


def _in_processes(function: Any, calls: Sequence[tuple], labels: Sequence[str], workers: int, bar: Any) -> None:
    """``function(*call)`` for every call, ``workers`` spawned processes at a time (one thread each, no
    progress bars of their own; ``bar`` counts the calls done). The first failure cancels what has not
    started and is raised; ``labels`` name the calls in the error of a worker that died."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # no inherited threads or torch state
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker) as pool:
        futures = {pool.submit(function, *call): label for call, label in zip(calls, labels)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    raise TallmasksError(
                        f"a worker process for {futures[future]} died (out of memory, killed, or a script that starts "
                        'the demo without an `if __name__ == "__main__":` guard, which spawned workers re-run); '
                        "use workers=1 (--workers 1) to stay in one process"
                    ) from None
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                bar.update(1)


# ---------------------------------------------------------------------------------------------
# the whole demo


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Pre-train, fine-tune, evaluate every method, write the summary and the agreement plot; returns the summary."""
    for name in cfg.methods:
        if name != "finetuned":
            method_run(name)
    cfg.task_names()
    from tallmasks.io.guard import check_output

    check_output(cfg.output_dir, folder=True, label="--output-dir")  # both writable before any work
    check_output(cfg.cache_dir, folder=True, label="--cache-dir")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from tallmasks.masks import MaskSet

    tasks = cfg.task_names()
    start = time.perf_counter()
    foundation = pretrain_foundation(cfg.pretrain, cfg.cache_dir)
    location = finetune_experts(foundation, tasks, cfg.finetune, workers=cfg.workers)
    log.info("checkpoints ready in %.0fs (%s)", time.perf_counter() - start, location)
    single = single_task_accuracies(cfg, location)
    runs = run_methods(cfg, location)

    finetuned_test = {t: single[t] for t in tasks}
    methods: dict[str, Any] = {}
    for name in cfg.methods:
        if name == "finetuned":
            methods[name] = method_summary(finetuned_test, finetuned_test, tasks)
        else:
            methods[name] = method_summary({t: runs[name]["per_task"][t]["top1"] for t in tasks}, finetuned_test, tasks)
    summary = {
        "methods": methods,
        "tasks": tasks,
        "model": cfg.model,
        "seeds": {"pretrain": cfg.pretrain.seed, "finetune": cfg.finetune.seed},
        "profile": cfg.profile,
        "selection": {name: runs[name].get("selection") for name in runs},
        "validation_avg_normalized_top1": {name: runs[name]["val_best"]["avg_normalized_top1"] for name in runs},
        "settings": json.loads(json.dumps(asdict(cfg), default=str)),
        "checkpoints": str(location),
    }
    output = Path(cfg.output_dir)
    name = cfg.summary_name()
    mask_file = Path(runs["tall_mask"]["mask_path"]) if "mask_path" in runs.get("tall_mask", {}) else None
    if mask_file is not None and not mask_file.is_file():
        mask_file = None
    if mask_file is not None:  # written by the tall_mask run
        profile = agreement_profile(MaskSet.load(mask_file))
        plot_name = name.replace("summary", "mask_agreement").replace(".json", ".png")
        plot_agreement(profile, output / plot_name, f"TALL-mask agreement, {len(tasks)} demo tasks (image tower)")
        summary["mask_agreement"] = {"tasks_per_weight": list(range(len(profile))), "weights": profile}
    if len(tasks) > 1:
        from tallmasks.demo.shape import task_vector_shape

        summary["task_vectors"] = task_vector_shape(location, cfg.model, tasks, mask_file)
    atomic_write_json(output / name, summary)
    log.info("demo finished in %.0fs; results in %s", time.perf_counter() - start, output / name)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> list[DemoConfig]:
    """One DemoConfig per pre-training seed given."""
    parser = argparse.ArgumentParser(prog="python -m tallmasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=DEFAULT_NUM_TASKS, help="the first N tasks of the suite (8, 14, 20)")
    parser.add_argument("--tasks", nargs="+", default=None, help="explicit task names (override --num-tasks)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="pre-training seed(s); several: a table over seeds")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"summary names or registered methods, or 'all' (every method of the project; default: {' '.join(SUMMARY_METHODS)})",
    )
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="fast",
        help="fine-tuning of the experts: fast (make demo: 100 steps at lr 1e-4) or paper (the paper's protocol: "
        "2,000 steps at lr 1e-5, weight decay 0.1, 500 warm-up steps, cosine; batch 32)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".demo_cache"), help="cached models and evaluations")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="summaries and plots (default: results/demo, with --profile paper results/demo-paper)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run, not meaningful numbers)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"experts fine-tuned at a time, one process each (default {_default_workers()}: the cores, at most 2)",
    )
    parser.add_argument("--nonlocal", action="store_true", help="the non-local merging experiment (its options: --nonlocal --help)")
    args = parser.parse_args(argv)
    make = DemoConfig.quick if args.quick else DemoConfig
    output_dir = args.output_dir if args.output_dir is not None else PROFILE_OUTPUT[args.profile]
    base = make(cache_dir=args.cache_dir, output_dir=output_dir, num_tasks=args.num_tasks, tasks=args.tasks, threads=args.threads)
    if args.profile != "fast":
        finetune = PROFILES[args.profile]
        if args.quick:  # the profile's learning rates and schedule shape on the smoke run's few steps
            finetune = replace(
                finetune, steps=base.finetune.steps, batch_size=base.finetune.batch_size, warmup_steps=base.finetune.warmup_steps
            )
        base = replace(base, finetune=finetune, profile=args.profile)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    base.workers = args.workers or (1 if args.quick else _default_workers())
    if args.methods:
        base.methods = list(ALL_METHODS) if args.methods == ["all"] else list(args.methods)
    return [replace(base, pretrain=replace(base.pretrain, seed=seed)) for seed in dict.fromkeys(args.seed)]


def main(argv: Sequence[str] | None = None) -> int:
    """The local demo (``python -m tallmasks.demo``): run, print the tables; 2 on a bad setting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summaries = [run_demo(cfg) for cfg in parse_args(argv)]
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for summary in summaries:
        print(f"pre-training seed {summary['seeds']['pretrain']}:")
        print(format_table(summary, summary["tasks"]))
    if len(summaries) > 1:
        print(format_seed_table(summaries))
    return 0
