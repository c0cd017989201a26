"""Fine-tuning one image encoder per dataset with the paper's protocol (single process or DDP).

Protocol: frozen zero-shot head, cross-entropy, AdamW (lr 1e-5, weight decay 0.1) over the encoder,
linear warm-up then cosine decay, gradient clipping at 1.0, batch 128 (ViT-L-14: 64 x 2 accumulation
steps), the paper's epoch count per dataset, trained on the train part of the Val split. Writes
``<loc>/<model>/<Dataset>Val/nonlinear_zeroshot.pt`` and ``nonlinear_finetuned.pt`` (state dicts, keys
``model.*``), skips datasets already done and resumes from its periodic checkpoints.

``train_head`` (``--train-head``): the head's weight is trained with the encoder (the non-local seed's
experts, which carry their own heads) and saved over the location's head of the dataset when done.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.core.precision import PRECISIONS, check_precision, set_backend
from tallmasks.core.progress import progress
from tallmasks.eval.distributed import check_device, check_world_size, resolve_device, spawn_ranks, under_launcher
from tallmasks.io.checkpoints import atomic_path, save_state_dict
from tallmasks.io.guard import check_output
from tallmasks.models.paths import dataset_zeroshot_path, finetuned_path, head_path, val_name, zeroshot_path

log = logging.getLogger(__name__)

EPOCHS: dict[str, int] = {
    "Cars": 35,
    "DTD": 76,
    "EuroSAT": 12,
    "GTSRB": 11,
    "MNIST": 5,
    "RESISC45": 15,
    "SUN397": 14,
    "SVHN": 4,
    "CIFAR10": 6,
    "CIFAR100": 6,
    "STL10": 60,
    "Food101": 4,
    "Flowers102": 147,
    "FER2013": 10,
    "PCAM": 1,
    "OxfordIIITPet": 82,
    "RenderedSST2": 39,
    "EMNIST": 2,
    "FashionMNIST": 5,
    "KMNIST": 5,
}
"""The paper's number of fine-tuning epochs per dataset."""

STATE_NAME = "finetune_state.pt"


@dataclass
class FinetuneConfig:
    """Hyperparameters and locations of one fine-tuning run (one model, one dataset)."""

    model_name: str = "ViT-B-32"
    dataset: str = "MNIST"
    model_location: str = "models/checkpoints"
    data_location: str = "~/data"
    pretrained: str | None = "openai"
    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int | None = None  # global batch; None: 128 (ViT-L-14: 64)
    grad_accum: int | None = None  # None: 1 (ViT-L-14: 2)
    warmup_steps: int = 500
    clip_grad: float = 1.0
    epochs: int | None = None  # None: the paper's count for the dataset
    checkpoint_every: int = 1000  # optimizer steps between resumable checkpoints; 0 disables
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | paper | tf32 | bf16 (tallmasks.core.precision)
    max_steps: int | None = None  # cap on optimizer steps (short runs, tests)
    wandb_mode: str = "disabled"  # disabled | online | offline
    wandb_project: str = "tallmasks"
    train_head: bool = False  # train the head's weight too; it replaces the location's head of the dataset

    def resolved(self) -> FinetuneConfig:
        """A copy with model-dependent defaults filled in and values checked."""
        large = self.model_name == "ViT-L-14"
        cfg = dataclasses.replace(
            self,
            batch_size=self.batch_size if self.batch_size is not None else (64 if large else 128),
            grad_accum=self.grad_accum if self.grad_accum is not None else (2 if large else 1),
            epochs=self.epochs if self.epochs is not None else _paper_epochs(self.dataset),
        )
        _check(cfg)
        return cfg


def _paper_epochs(dataset: str) -> int:
    name = dataset[:-3] if dataset.endswith("Val") else dataset
    if name not in EPOCHS:
        raise ConfigError(f"no epoch count known for dataset {name!r}; pass epochs explicitly")
    return EPOCHS[name]


def _check(cfg: FinetuneConfig) -> None:
    positive = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "epochs": cfg.epochs}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.weight_decay < 0 or cfg.warmup_steps < 0 or cfg.clip_grad < 0 or cfg.checkpoint_every < 0:
        raise ConfigError("weight_decay, warmup_steps, clip_grad and checkpoint_every must be >= 0")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {cfg.max_steps!r}")
    check_precision(cfg.precision)
    if cfg.wandb_mode not in ("disabled", "online", "offline"):
        raise ConfigError(f"wandb_mode must be disabled, online or offline, got {cfg.wandb_mode!r}")
    check_device(cfg.device, "device")


def cosine_lr(base_lr: float, warmup: int, total: int, step: int) -> float:
    """lr * (step+1)/warmup during warm-up, then 0.5 * (1 + cos(pi * e / es)) * lr."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


class _Preprocessed(Dataset):
    """Applies the encoder's preprocessing to PIL images; tensors pass through."""

    def __init__(self, base: Dataset, transform: Callable | None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        if self.transform is not None and not isinstance(image, torch.Tensor):
            image = self.transform(image)
        return image, int(label)


class _ResumableSampler(Sampler[int]):
    """The DistributedSampler order of one epoch, starting ``skip`` samples in (to resume mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip :])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(device: torch.device) -> bool:
    """Join the process group described by RANK/WORLD_SIZE (torchrun or our spawner); True if we created it."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return True


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = check_precision(precision).autocast
    if dtype is not None:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def _start_wandb(cfg: FinetuneConfig) -> Any:
    if cfg.wandb_mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"wandb_mode={cfg.wandb_mode} needs the wandb package (pip install 'tallmasks[wandb]')") from None
    return wandb.init(
        project=cfg.wandb_project,
        mode=cfg.wandb_mode,
        name=f"finetune-{cfg.model_name}-{val_name(cfg.dataset)}",
        config=dataclasses.asdict(cfg),
    )


def state_path(model_location: str | Path, model_name: str, dataset: str) -> Path:
    """The resumable checkpoint beside the fine-tuned file (removed when training ends)."""
    return finetuned_path(model_location, model_name, dataset).with_name(STATE_NAME)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable resume checkpoint ({str(exc).splitlines()[0]}); delete it to restart") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "epoch", "batch"} <= set(state):
        raise CheckpointError(f"{path}: not a resume checkpoint of finetune; delete it to restart")
    return state


def finetune(
    cfg: FinetuneConfig,
    encoder: torch.nn.Module | None = None,
    train_dataset: Dataset | None = None,
    head: torch.nn.Module | None = None,
    clip_model: Any = None,
    callback: Callable[[int, float], None] | None = None,
) -> Path:
    """Fine-tune the image encoder of ``cfg.model_name`` on ``cfg.dataset``; returns the fine-tuned file.

    ``encoder`` replaces creating ImageEncoder(model_name, pretrained); ``train_dataset`` replaces
    load_split(dataset, "train", data_location) (items: (PIL image or tensor, label)); ``head`` replaces the
    zero-shot head (else get_classification_head, with ``clip_model``'s text tower when not cached);
    ``callback(step, loss)`` runs on rank 0 after every optimizer step. Under torchrun (or
    :func:`launch`) the RANK/WORLD_SIZE environment makes it data-parallel; rank 0 alone writes.
    """
    cfg = cfg.resolved()
    out = finetuned_path(cfg.model_location, cfg.model_name, cfg.dataset)
    if out.is_file():
        log.info("%s: already fine-tuned (%s), skipping", val_name(cfg.dataset), out)
        return out
    _, _, local_rank = _dist_info()
    device = resolve_device(cfg.device, local_rank)
    owns_group = _init_distributed(device)
    try:
        return _run(cfg, out, device, encoder, train_dataset, head, clip_model, callback)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _prepare_model(
    cfg: FinetuneConfig, encoder: torch.nn.Module | None, head: torch.nn.Module | None, clip_model: Any, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    from tallmasks.models import ImageEncoder, get_classification_head

    if encoder is None:
        encoder = ImageEncoder(cfg.model_name, pretrained=cfg.pretrained, keep_lang=True)
        if clip_model is None:
            clip_model = encoder.model
    elif clip_model is None and hasattr(getattr(encoder, "model", None), "transformer"):
        clip_model = encoder.model
    if head is None:
        head = get_classification_head(cfg.model_name, cfg.dataset, cfg.model_location, device=device, clip_model=clip_model)
    inner = getattr(encoder, "model", None)
    if inner is not None and hasattr(inner, "transformer"):
        delattr(inner, "transformer")  # the image encoder alone is trained and saved
    return encoder, head


def _run(
    cfg: FinetuneConfig,
    out: Path,
    device: torch.device,
    encoder: torch.nn.Module | None,
    train_dataset: Dataset | None,
    head: torch.nn.Module | None,
    clip_model: Any,
    callback: Callable[[int, float], None] | None,
) -> Path:
    from tallmasks.models import ImageClassifier

    rank, world_size, _ = _dist_info()
    main = rank == 0
    torch.manual_seed(cfg.seed)
    set_backend(cfg.precision)

    if main:  # the outputs' location checked before the work: writable, and room for them
        check_output(out, label="fine-tuned checkpoint")
    encoder, head = _prepare_model(cfg, encoder, head, clip_model, device)
    if main:
        model_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
        copies = 2 + (3 if cfg.checkpoint_every else 0)  # zero-shot, fine-tuned, resume state (weights + Adam moments)
        check_output(out, expected_bytes=copies * model_bytes, label="fine-tuned checkpoint")
    if train_dataset is None:
        from tallmasks.datasets import load_split

        train_dataset = load_split(cfg.dataset, "train", cfg.data_location)
    data = _Preprocessed(train_dataset, getattr(encoder, "train_preprocess", None))
    if len(data) == 0:
        raise ConfigError(f"{val_name(cfg.dataset)}: the training set is empty")

    # The zero-shot encoder, saved before any update (also as the model's shared theta_0 if absent).
    if main:
        zs_state = _cpu_state(encoder)
        for path in (
            dataset_zeroshot_path(cfg.model_location, cfg.model_name, cfg.dataset),
            zeroshot_path(cfg.model_location, cfg.model_name),
        ):
            if not path.is_file():
                save_state_dict(zs_state, path)
        del zs_state

    model = ImageClassifier(encoder, head)
    model.freeze_head()
    if cfg.train_head:  # the weight only: the head's bias stays zero, as the seed's heads have none
        model.classification_head.weight.requires_grad_(True)
    model.to(device)
    params = [p for p in model.image_encoder.parameters() if p.requires_grad]
    params += [p for p in model.classification_head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    per_rank_batch = max(cfg.batch_size // world_size, 1)
    # Like the paper: one DistributedSampler (seed 0) whose epoch is never advanced, so every epoch sees
    # the same order; exactly cfg.epochs passes; an optimizer step after every grad_accum micro-batches
    # (a remainder at an epoch's end carries into the next epoch's first step); the schedule's step is
    # i // accum + epoch * batches // accum over epochs * batches // accum steps.
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    batches_per_epoch = math.ceil(len(sampler) / per_rank_batch)
    if batches_per_epoch < cfg.grad_accum:
        raise ConfigError(f"{val_name(cfg.dataset)}: {batches_per_epoch} batches per epoch, fewer than grad_accum={cfg.grad_accum}")
    schedule_steps = max(cfg.epochs * batches_per_epoch // cfg.grad_accum, 1)
    planned = cfg.epochs * (batches_per_epoch // cfg.grad_accum)
    if cfg.max_steps is not None:
        schedule_steps = min(schedule_steps, cfg.max_steps)
        planned = min(planned, cfg.max_steps)

    resume = state_path(cfg.model_location, cfg.model_name, cfg.dataset)
    updates, start_epoch, start_batch = 0, 0, 0
    if resume.is_file():
        state = _load_state(resume)
        model.image_encoder.load_state_dict(state["model"])
        if cfg.train_head:
            if "head" not in state:
                raise CheckpointError(f"{resume}: a resume state without the head, from a run that did not train it")
            model.classification_head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        updates, start_epoch, start_batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        log.info("%s: resuming after step %d (%s)", val_name(cfg.dataset), updates, resume)
    _barrier()

    ddp_model: torch.nn.Module = model
    if world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    run = _start_wandb(cfg) if main else None
    loss_fn = torch.nn.CrossEntropyLoss()
    bar = progress(total=planned, initial=updates, desc=f"finetune {val_name(cfg.dataset)}", disable=not main, leave=False)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if updates >= planned:
            break
        skip = start_batch if epoch == start_epoch else 0
        loader = DataLoader(
            data,
            batch_size=per_rank_batch,
            sampler=_ResumableSampler(sampler, skip * per_rank_batch),
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        for i, (images, labels) in enumerate(loader, start=skip):
            if updates >= planned:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            steps_now = (i + 1) % cfg.grad_accum == 0
            sync = contextlib.nullcontext() if steps_now or world_size == 1 else ddp_model.no_sync()
            with sync:
                with _autocast(device, cfg.precision):
                    logits = ddp_model(images)
                loss = loss_fn(logits.float(), labels)
                # Like the paper: micro-batch losses are summed over accumulation steps (Adam is scale-free).
                loss.backward()
            if not steps_now:
                continue
            lr = cosine_lr(cfg.lr, cfg.warmup_steps, schedule_steps, i // cfg.grad_accum + epoch * batches_per_epoch // cfg.grad_accum)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            if main:
                loss_value = float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if run is not None:
                    run.log({f"{val_name(cfg.dataset)}/train/loss": loss_value, "train/lr": lr}, step=updates)
                if cfg.checkpoint_every and updates % cfg.checkpoint_every == 0 and updates < planned:
                    head_state = model.classification_head if cfg.train_head else None
                    _save_resume(resume, model.image_encoder, optimizer, (updates, epoch, i + 1), cfg, head_state)
                if callback is not None:
                    callback(updates, loss_value)
    bar.close()

    if main:
        if cfg.train_head:  # before the encoder: a finished expert always has its trained head beside it
            model.classification_head.cpu().save(head_path(cfg.model_location, cfg.model_name, cfg.dataset))
        save_state_dict(_cpu_state(model.image_encoder), out)
        resume.unlink(missing_ok=True)
        log.info("%s: fine-tuned encoder saved to %s", val_name(cfg.dataset), out)
        if run is not None:
            run.finish()
    _barrier()
    return out


def _save_resume(
    path: Path,
    encoder: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    position: tuple[int, int, int],
    cfg: FinetuneConfig,
    head: torch.nn.Module | None = None,
) -> None:
    """Save right after an optimizer step: position = (optimizer steps, epoch, next batch of that epoch)."""
    step, epoch, batch = position
    state = {
        "model": _cpu_state(encoder),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "batch": batch,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (str, int, float, type(None)))},
    }
    if head is not None:
        state["head"] = _cpu_state(head)
    with atomic_path(path) as tmp:
        torch.save(state, str(tmp))


def _finetune_private_copy(cfg: FinetuneConfig, kwargs: dict[str, Any]) -> None:
    # Tensors passed through mp.spawn share memory with the parent and the other ranks: train a private copy.
    finetune(cfg, **copy.deepcopy(kwargs))


def launch(cfg: FinetuneConfig, world_size: int = 1, force_world_size: bool = False, **kwargs: Any) -> Path:
    """Run :func:`finetune` in-process (world_size 1, or already under torchrun) or in ``world_size``
    spawned processes on a free local port (gloo on CPU, nccl on GPU; more CPU ranks than cores only with
    ``force_world_size``). kwargs go to finetune and must pickle."""
    check_world_size(world_size, cfg.device, force=force_world_size)
    out = finetuned_path(cfg.model_location, cfg.model_name, cfg.dataset)
    if world_size == 1 or under_launcher():
        return finetune(cfg, **kwargs)
    if out.is_file():
        log.info("%s: already fine-tuned (%s), skipping", val_name(cfg.dataset), out)
        return out
    spawn_ranks(_finetune_private_copy, world_size, cfg, kwargs)
    if not out.is_file():
        raise CheckpointError(f"{out}: fine-tuning processes ended without writing it")
    return out


def finetune_datasets(base: FinetuneConfig, datasets: Sequence[str], world_size: int = 1, force_world_size: bool = False) -> list[Path]:
    """Fine-tune ``base.model_name`` on each dataset in turn (done ones are skipped)."""
    paths = []
    for name in datasets:
        cfg = dataclasses.replace(base, dataset=name)
        log.info("fine-tuning %s on %s", cfg.model_name, val_name(name))
        paths.append(launch(cfg, world_size, force_world_size))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a CLIP image encoder on each dataset with the paper's protocol "
        "(frozen zero-shot head, AdamW, cosine schedule, per-dataset epochs).",
    )
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14)")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names (default: all 20)")
    parser.add_argument("--model-location", default="models/checkpoints", help="root of the checkpoint layout")
    parser.add_argument("--data-location", default="~/data", help="root of the prepared datasets")
    parser.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or weights file")
    parser.add_argument("--world-size", type=int, default=1, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--force-world-size", action="store_true", help="allow more CPU processes than cores")
    parser.add_argument("--epochs", type=int, default=None, help="override the paper's per-dataset epochs")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 128; ViT-L-14: 64)")
    parser.add_argument("--grad-accum", type=int, default=None, help="accumulation steps (default 1; ViT-L-14: 2)")
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between resumable checkpoints (0: off)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each dataset after this many steps")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--train-head", action="store_true", help="train the head's weight too (saved over the location's head)")
    parser.add_argument("--wandb", default="disabled", choices=("disabled", "online", "offline"), dest="wandb_mode")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of finetune.py: errors print one line and exit 2."""
    import sys

    from tallmasks.core.errors import TallmasksError

    args = build_parser().parse_args(argv)
    rank, _, _ = _dist_info()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from tallmasks.datasets import resolve_datasets
        from tallmasks.models import known_models

        if args.model not in known_models():
            raise ConfigError(f"unknown model {args.model!r}")
        datasets = resolve_datasets(names=args.datasets) if args.datasets else resolve_datasets()
        base = FinetuneConfig(
            model_name=args.model,
            model_location=os.path.expanduser(args.model_location),
            data_location=os.path.expanduser(args.data_location),
            pretrained=None if args.pretrained in ("", "none", "None") else args.pretrained,
            lr=args.lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            warmup_steps=args.warmup_steps,
            epochs=args.epochs,
            checkpoint_every=args.checkpoint_every,
            num_workers=args.num_workers,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            max_steps=args.max_steps,
            wandb_mode=args.wandb_mode,
            train_head=args.train_head,
        )
        for name in datasets:  # check every dataset's settings and output before the first long run
            dataclasses.replace(base, dataset=name).resolved()
            if rank == 0:
                check_output(finetuned_path(base.model_location, base.model_name, name), label="fine-tuned checkpoint")
        if not under_launcher():
            check_world_size(args.world_size, base.device, force=args.force_world_size)
        paths = finetune_datasets(base, datasets, world_size=args.world_size, force_world_size=args.force_world_size)
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        log.info("done: %d fine-tuned encoders under %s", len(paths), Path(args.model_location, args.model))
    return 0
