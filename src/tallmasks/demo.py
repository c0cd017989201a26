"""The offline demo (``make demo``): pre-train a tiny CLIP on scikit-learn's digits, fine-tune eight
tasks, merge them with every method through the experiment runner, and report.

Everything runs for real on CPU without network: the demo model is an open_clip CLIP with a tiny
custom config (``tallmasks-demo``) and the bundled tokenizer; the tasks are ``tallmasks.datasets.digits``.
Steps whose outputs exist under the cache folder are skipped, so a second run is much faster.
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
from tqdm.auto import tqdm

from tallmasks.checkpoints import load_state_dict, save_state_dict
from tallmasks.errors import ConfigError, TallmasksError

log = logging.getLogger("tallmasks.demo")

# summary name -> (runner method, method overrides)
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
SUMMARY_METHODS: list[str] = [*METHOD_RUNS, "finetuned"]
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Sizes, hyperparameters and locations of one demo run."""

    cache_dir: Path = Path(".demo_cache")
    output_dir: Path = Path("results/demo")
    tasks: list[str] | None = None  # None: all eight demo tasks
    methods: list[str] = field(default_factory=lambda: list(SUMMARY_METHODS))
    pretrain_steps: int = 300
    pretrain_batch_size: int = 256
    pretrain_lr: float = 2e-3
    finetune_steps: int = 100
    finetune_batch_size: int = 128
    finetune_lr: float = 1e-4
    finetune_warmup_steps: int = 10
    n_eval_points: int = 21
    seed: int = 0
    threads: int = 1  # one thread: tiny matrices gain little from two, and lose much when a core is busy

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Tiny settings for smoke tests: two tasks, a few steps."""
        base = cls(
            tasks=None,
            pretrain_steps=4,
            pretrain_batch_size=32,
            finetune_steps=3,
            finetune_batch_size=32,
            finetune_warmup_steps=1,
            n_eval_points=4,
        )
        return replace(base, **overrides)

    def task_names(self) -> list[str]:
        from tallmasks.datasets import DEMO_DATASETS, ensure_names

        return list(DEMO_DATASETS) if not self.tasks else ensure_names(self.tasks)

    def fingerprint(self, part: str) -> str:
        """Short hash of the settings that determine the cached artifacts of ``part`` ("pretrain"/"finetune")."""
        from tallmasks.datasets import digits

        keys = ["pretrain_steps", "pretrain_batch_size", "pretrain_lr", "seed"]
        if part == "finetune":
            keys += ["finetune_steps", "finetune_batch_size", "finetune_lr", "finetune_warmup_steps"]
        payload = {k: getattr(self, k) for k in keys}
        payload["image_size"] = digits.DEMO_IMAGE_SIZE
        payload["model_config"] = _model_config_text()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_dir(self) -> Path:
        """Everything cached for these settings (checkpoints, heads, runner results)."""
        return Path(self.cache_dir) / f"run-{self.fingerprint('finetune')}"

    @property
    def model_location(self) -> Path:
        return self.run_dir / "checkpoints"


def _model_config_text() -> str:
    from tallmasks.models.encoder import CONFIG_DIR, DEMO_MODEL

    return (CONFIG_DIR / f"{DEMO_MODEL}.json").read_text()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# pre-training


class PretrainingData:
    """Image-caption pairs for contrastive pre-training, from the digits' pre-training pool.

    Every pool image appears under every view; a caption describes the digit through the class name of
    a randomly drawn task and one of that task's prompt templates, so the text tower learns every
    class name of every task (and none of the task splits is seen).
    """

    def __init__(self, tokenizer: Any, mean: Sequence[float], std: Sequence[float]):
        from tallmasks.datasets import digits

        images8, labels = digits.pretraining_pool()
        rendered, digit_of = [], []
        for view in digits.VIEWS:
            for i, (image, digit) in enumerate(zip(images8, labels)):
                rendered.append(digits.render(image, view, key=10_000_000 + i))
                digit_of.append(int(digit))
        pixels = torch.from_numpy(np.stack(rendered)).permute(0, 3, 1, 2).float() / 255.0
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = (pixels - mean_t) / std_t
        self.digits = digit_of
        self.tasks = digits.DEMO_TASKS
        captions = sorted({t(c) for task in self.tasks for c in task.classnames for t in task.templates})
        self.caption_index = {c: i for i, c in enumerate(captions)}
        self.tokens = tokenizer(captions)

    def __len__(self) -> int:
        return len(self.digits)

    def caption_ids(self, indices: Sequence[int], rng: random.Random) -> torch.Tensor:
        out = []
        for index in indices:
            task = rng.choice(self.tasks)
            template = rng.choice(task.templates)
            out.append(self.caption_index[template(task.classnames[task.label(self.digits[index])])])
        return torch.tensor(out, dtype=torch.long)


def contrastive_loss(clip: Any, images: torch.Tensor, caption_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where images sharing a caption are all positives of that caption."""
    unique, target = torch.unique(caption_ids, return_inverse=True)
    image_features = clip.encode_image(images, normalize=True)
    text_features = clip.encode_text(tokens[unique], normalize=True)
    logits = clip.logit_scale.exp() * image_features @ text_features.T  # images x unique captions
    image_to_text = torch.nn.functional.cross_entropy(logits, target)
    positives = (target[None, :] == torch.arange(len(unique))[:, None]).float()
    positives = positives / positives.sum(dim=1, keepdim=True)
    text_to_image = -(positives * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def pretrain(clip: Any, data: PretrainingData, steps: int, batch_size: int, lr: float, seed: int = 0) -> list[float]:
    """Contrastive pre-training of both towers (AdamW, one-cycle schedule); returns the loss per step."""
    clip.train()
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    losses = []
    bar = tqdm(range(steps), desc="pre-training", unit="step", leave=False, dynamic_ncols=True)
    for _ in bar:
        indices = torch.randint(len(data), (batch_size,), generator=generator)
        loss = contrastive_loss(clip, data.images[indices], data.caption_ids(indices.tolist(), rng), data.tokens)
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


def pretrained_clip(cfg: DemoConfig) -> Any:
    """The pre-trained demo CLIP (both towers), from the cache or trained now and cached."""
    from tallmasks.models import DEMO_MODEL, create_clip
    import open_clip

    path = Path(cfg.cache_dir) / f"pretrain-{cfg.fingerprint('pretrain')}" / "clip.safetensors"
    _seed_everything(cfg.seed)
    clip = create_clip(DEMO_MODEL, pretrained=None)
    if path.is_file():
        clip.load_state_dict(dict(load_state_dict(path).items()))
        clip.eval()
        log.info("pre-trained model: cached at %s", path)
        return clip
    tokenizer = open_clip.get_tokenizer(DEMO_MODEL)
    data = PretrainingData(tokenizer, clip.visual.preprocess_cfg["mean"], clip.visual.preprocess_cfg["std"])
    start = time.perf_counter()
    losses = pretrain(clip, data, cfg.pretrain_steps, cfg.pretrain_batch_size, cfg.pretrain_lr, cfg.seed)
    if losses:
        log.info(
            "pre-trained %d steps in %.0fs (loss %.3f -> %.3f)",
            len(losses), time.perf_counter() - start, losses[0], float(np.mean(losses[-10:])),
        )
    save_state_dict(clip.state_dict(), path)
    return clip


# ---------------------------------------------------------------------------------------------
# zero-shot checkpoint, heads, fine-tuning


def image_encoder_from(clip: Any) -> Any:
    """An ImageEncoder of the demo model carrying ``clip``'s weights (text transformer dropped)."""
    from tallmasks.models import DEMO_MODEL, ImageEncoder

    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    source = clip.state_dict()
    target = encoder.model.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise TallmasksError(f"pre-trained demo model lacks {missing[0]!r}")
    encoder.model.load_state_dict({k: source[k] for k in target})
    return encoder.eval()


def prepare_zeroshot(cfg: DemoConfig, clip: Any) -> None:
    """Write the zero-shot encoder (theta_0) and every task's zero-shot head under the model location."""
    from tallmasks.models import DEMO_MODEL, get_classification_head, zeroshot_path

    path = zeroshot_path(cfg.model_location, DEMO_MODEL)
    if not path.is_file():
        save_state_dict(image_encoder_from(clip).state_dict(), path)
    for task in cfg.task_names():
        get_classification_head(DEMO_MODEL, task, cfg.model_location, clip_model=clip)


def finetune_tasks(cfg: DemoConfig, clip: Any) -> list[Path]:
    """Fine-tune the zero-shot encoder on every task with the fine-tuning loop of finetune.py."""
    from tallmasks.datasets import load_split
    from tallmasks.finetuning import FinetuneConfig, finetune
    from tallmasks.models import DEMO_MODEL, finetuned_path, get_classification_head

    paths = []
    for index, task in enumerate(cfg.task_names()):
        out = finetuned_path(cfg.model_location, DEMO_MODEL, task)
        if out.is_file():
            paths.append(out)
            continue
        train = load_split(task, "train", cfg.run_dir / "data")
        batches_per_epoch = math.ceil(len(train) / cfg.finetune_batch_size)
        ft_cfg = FinetuneConfig(
            model_name=DEMO_MODEL,
            dataset=task,
            model_location=str(cfg.model_location),
            data_location=str(cfg.run_dir / "data"),
            pretrained=None,
            lr=cfg.finetune_lr,
            batch_size=cfg.finetune_batch_size,
            warmup_steps=cfg.finetune_warmup_steps,
            epochs=max(1, math.ceil(cfg.finetune_steps / batches_per_epoch)),
            max_steps=cfg.finetune_steps,
            checkpoint_every=0,
            num_workers=0,
            seed=cfg.seed + index,
            device="cpu",
        )
        head = get_classification_head(DEMO_MODEL, task, cfg.model_location, clip_model=clip)
        paths.append(finetune(ft_cfg, encoder=image_encoder_from(clip), train_dataset=train, head=head))
    return paths


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
    """Method x task table of test accuracy (%), with normalized accuracy in the last column."""
    short = [t.removeprefix("Digits")[:8] for t in tasks]
    header = f"{'method':<15}" + "".join(f"{s:>9}" for s in short) + f"{'avg':>8}{'norm.':>8}"
    lines = [header, "-" * len(header)]
    for name, entry in summary["methods"].items():
        cells = "".join(f"{100 * entry['per_task'][t]['top1']:>9.1f}" for t in tasks)
        lines.append(f"{name:<15}{cells}{100 * entry['avg_top1']:>8.1f}{100 * entry['avg_normalized_top1']:>8.1f}")
    return "\n".join(lines)


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
    from tallmasks.plots import plot_agreement as _plot

    return _plot(profile, path, title=title)


# ---------------------------------------------------------------------------------------------
# evaluation through the experiment runner's code path


def _evaluation_cache(cfg: DemoConfig) -> Path:
    return cfg.run_dir / "eval_cache"


def single_task_accuracies(cfg: DemoConfig) -> dict[str, float]:
    """Fine-tuned top-1 of every task on val ("<Task>Val") and test ("<Task>"), with the runner's evaluator.

    Written to ``<model_location>/<model>/nonlinear_ft_accuracies.json`` (where the runner looks for
    the accuracies it normalizes by); reused when every task is already there.
    """
    from tallmasks.datasets import load_split
    from tallmasks.eval import Evaluator, atomic_write_json, load_or_build_split, read_json
    from tallmasks.eval.selection import FT_FILE
    from tallmasks.models import DEMO_MODEL, ImageEncoder, finetuned_path, get_classification_head

    path = cfg.model_location / DEMO_MODEL / FT_FILE
    table: dict[str, float] = dict(read_json(path)) if path.is_file() else {}
    tasks = cfg.task_names()
    if all(t in table and t + "Val" in table for t in tasks):
        return table
    encoder = ImageEncoder(DEMO_MODEL, pretrained=None)
    for task in tqdm(tasks, desc="fine-tuned accuracy", leave=False):
        evaluator = Evaluator(encoder, load_state_dict(finetuned_path(cfg.model_location, DEMO_MODEL, task)), "cpu", "fp32", 512)
        evaluator.set_head(task, get_classification_head(DEMO_MODEL, task, cfg.model_location))
        for split, key in (("val", task + "Val"), ("test", task)):
            data = load_or_build_split(
                lambda s=split: load_split(task, s, cfg.run_dir / "data"), task, split, _evaluation_cache(cfg),
                encoder.image_size, encoder.val_preprocess, 0,
            )
            correct, total = evaluator.count_correct(task, data)
            table[key] = correct / total
    atomic_write_json(path, dict(sorted(table.items())))
    return table


def _quote(value: Any) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose_config(cfg: DemoConfig, method: str, method_overrides: dict[str, Any]) -> Any:
    """The main.py config of one demo experiment, composed by Hydra from the repository's config folder."""
    from hydra import compose, initialize_config_dir
    from tallmasks.models import DEMO_MODEL

    candidates = [REPO_ROOT / "config", Path.cwd() / "config"]
    config_dir = next((c for c in candidates if (c / "config.yaml").is_file()), None)
    if config_dir is None:
        raise ConfigError(f"{candidates[-1]}: main.py's Hydra config folder not found (run the demo from a clone of the repository)")
    config_dir = config_dir.resolve()
    overrides = [
        f"model={DEMO_MODEL}",
        f"method={method}",
        "DATASETS=[" + ",".join(cfg.task_names()) + "]",
        f"n_eval_points={cfg.n_eval_points}",
        f"model_location={_quote(cfg.model_location.resolve())}",
        f"data_location={_quote((cfg.run_dir / 'data').resolve())}",
        f"cache_dir={_quote(_evaluation_cache(cfg).resolve())}",
        f"results_dir={_quote((cfg.run_dir / 'results').resolve())}",
        f"single_task_dir={_quote((cfg.run_dir / 'single_task').resolve())}",
        "device=cpu",
        "num_workers=0",
        "wandb.mode=disabled",
    ]
    overrides += [f"method.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in method_overrides.items()]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_methods(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Every merging method through run_experiment (the code path of main.py); results by summary name."""
    from tallmasks.eval.runner import run_experiment

    wanted = [m for m in cfg.methods if m in METHOD_RUNS]
    # TALL masks first: consensus reads the masks they save
    order = sorted(wanted, key=lambda m: (not m.startswith("tall_mask"), list(METHOD_RUNS).index(m)))
    out = {}
    for name in tqdm(order, desc="methods", leave=False):
        method, overrides = METHOD_RUNS[name]
        log.info("method %s", name)
        out[name] = run_experiment(compose_config(cfg, method, overrides))
    return out


# ---------------------------------------------------------------------------------------------
# the whole demo


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Pre-train, fine-tune, evaluate every method, write summary.json and the agreement plot; returns the summary."""
    unknown = [m for m in cfg.methods if m not in SUMMARY_METHODS]
    if unknown:
        raise ConfigError(f"unknown demo method {unknown[0]!r}; choose from {', '.join(SUMMARY_METHODS)}")
    from tallmasks.guard import check_output

    check_output(cfg.output_dir, folder=True, label="--output-dir")  # both writable before any work
    check_output(cfg.cache_dir, folder=True, label="--cache-dir")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    try:
        return _run_demo(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from tallmasks.eval import atomic_write_json
    from tallmasks.masks import MaskSet
    from tallmasks.models import DEMO_MODEL

    tasks = cfg.task_names()
    start = time.perf_counter()
    clip = pretrained_clip(cfg)
    prepare_zeroshot(cfg, clip)
    finetune_tasks(cfg, clip)
    log.info("checkpoints ready in %.0fs (%s)", time.perf_counter() - start, cfg.model_location)
    single = single_task_accuracies(cfg)
    runs = run_methods(cfg)

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
        "model": DEMO_MODEL,
        "selection": {name: runs[name].get("selection") for name in runs},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    }
    output = Path(cfg.output_dir)
    mask_file = Path(runs["tall_mask"]["mask_path"]) if "mask_path" in runs.get("tall_mask", {}) else None
    if mask_file is not None and mask_file.is_file():  # written by the tall_mask run
        profile = agreement_profile(MaskSet.load(mask_file))
        plot_agreement(profile, output / "mask_agreement.png", f"TALL-mask agreement, {len(tasks)} digit tasks (image tower)")
        summary["mask_agreement"] = {"tasks_per_weight": list(range(len(profile))), "weights": profile}
    atomic_write_json(output / "summary.json", summary)
    log.info("demo finished in %.0fs; results in %s", time.perf_counter() - start, output)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="python -m tallmasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(".demo_cache"), help="cached checkpoints and evaluations")
    parser.add_argument("--output-dir", type=Path, default=Path("results/demo"), help="summary.json and the plot")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the eight demo tasks")
    parser.add_argument("--methods", nargs="+", default=None, help=f"a subset of: {' '.join(SUMMARY_METHODS)}")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run, not meaningful numbers)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    make = DemoConfig.quick if args.quick else DemoConfig
    cfg = make(cache_dir=args.cache_dir, output_dir=args.output_dir, tasks=args.tasks, threads=args.threads)
    if args.methods:
        cfg.methods = list(args.methods)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tallmasks").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:  # the demo model is random-initialized on purpose
        handler.addFilter(lambda record: "No pretrained weights loaded" not in record.getMessage())
    try:
        cfg = parse_args(argv)
        summary = run_demo(cfg)
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary, summary["tasks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
