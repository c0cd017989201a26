"""main.py's ``correction`` and ``alignment`` config groups: settings, checkpoints of several foundations,
calibration images, and the per-setting calibration of the evaluated model.

    python main.py method=ties correction=tact correction.num_images=2000
    python main.py method=sum alignment=weight_matching alignment.foundations=[models/other/checkpoints]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.core.params import GroupSettings, NonNegative, NonNegativeInt, PositiveInt
from tallmasks.eval.evaluator import precision_context
from tallmasks.non_local.correction import Correction, Corrector, Statistics, repair_target, save_correction

log = logging.getLogger(__name__)

CALIBRATION_SEED = 0


class _Choice:
    name: str

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass(frozen=True)
class CorrectionSettings(_Choice):
    """``correction.*``: none, tact (per task) or repair (shared); images per task; variance epsilon."""

    name: str = "none"
    num_images: int = 2000
    eps: float = 0.0
    rule: str = "mean_std"  # REPAIR's rule for the target std (correction.REPAIR_RULES)
    embedding: bool = False  # ViT: also correct the output embedding (sites.vit_sites)
    augment: bool = False  # TACT: calibrate on augmented views of the training images (AugmentedViews)

    @classmethod
    def of(cls, group: GroupSettings | None) -> CorrectionSettings:
        """The settings of a validated ``correction`` group (none when absent)."""
        return cls() if group is None or group.name == "none" else cls(group.name, **group.params)

    @property
    def tag(self) -> str:
        """Results-name suffix: ``_tact2000`` (``_eps<e>`` when set), empty without correction."""
        if not self.enabled:
            return ""
        suffix = f"_{self.name}{self.num_images}" + (f"_eps{self.eps:g}" if self.eps else "")
        suffix += "" if self.rule == "mean_std" else f"_{self.rule}"
        return suffix + ("_embedding" if self.embedding else "") + ("_aug" if self.augment else "")

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlignmentSettings(_Choice):
    """``alignment.*``: other foundations' model locations (``model_location`` is the reference), which
    foundation each task's expert comes from, and weight matching's iteration cap and seed."""

    name: str = "none"
    foundations: tuple[str, ...] = ()
    assignment: tuple[int, ...] | None = None
    max_iter: int = 100
    seed: int = 0
    embedding: bool = True  # the output embedding (proj's columns) permuted, with the heads of the permuted experts

    @classmethod
    def of(cls, group: GroupSettings | None) -> AlignmentSettings:
        """The settings of a validated ``alignment`` group (none when absent)."""
        if group is None or group.name == "none":
            return cls()
        params = group.params
        if not params["foundations"]:
            raise ConfigError("alignment=weight_matching needs alignment.foundations: the model locations of the other foundations")
        assignment = None if params["assignment"] is None else tuple(params["assignment"])
        foundations = tuple(str(f) for f in params["foundations"])
        return cls(group.name, foundations, assignment, params["max_iter"], params["seed"], bool(params["embedding"]))

    @property
    def locations(self) -> tuple[Path, ...]:
        return tuple(Path(os.path.expanduser(f)).resolve() for f in self.foundations)

    @property
    def tag(self) -> str:
        """Results-name suffix: ``_wm<hash of the foundations, assignment, max_iter, seed>``."""
        if not self.enabled:
            return ""
        text = json.dumps([list(map(str, self.locations)), self.assignment, self.max_iter, self.seed, self.embedding])
        return "_wm" + hashlib.sha1(text.encode()).hexdigest()[:8]

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "foundations": [str(p) for p in self.locations],
            "assignment": list(self.assignment) if self.assignment is not None else None,
            "max_iter": self.max_iter,
            "seed": self.seed,
            "embedding": self.embedding,
        }


# the config groups' choices: their keyword-only parameters are the fields that tallmasks.core.params validates


def no_correction() -> None:
    """No correction of activation statistics."""


def tact_correction(*, num_images: PositiveInt = 2000, eps: NonNegative = 0.0, embedding: bool = False, augment: bool = False) -> None:
    """TACT: each task's merged model corrected towards its expert on ``num_images`` images of the task
    (``embedding``: a ViT's output embedding corrected too; ``augment``: augmented views of them)."""


def repair_correction(
    *, num_images: PositiveInt = 1000, eps: NonNegative = 0.0, rule: Literal["mean_std", "seed_code"] = "mean_std", embedding: bool = False
) -> None:
    """REPAIR: one correction towards the experts' mean statistics on ``num_images`` images per task, pooled
    (``rule`` seed_code: the non-local seed code's combination of the stds, to show what it changes)."""


def no_alignment() -> None:
    """Every expert fine-tuned from the foundation at model_location."""


def weight_matching_alignment(
    *,
    foundations: Sequence[str] = (),
    assignment: Optional[list[NonNegativeInt]] = None,
    max_iter: PositiveInt = 100,
    seed: NonNegativeInt = 0,
    embedding: bool = True,
) -> None:
    """Other foundations aligned to model_location's by weight matching; experts permuted likewise
    (``embedding``: the output embedding too, with the heads of the permuted experts)."""


CORRECTION_CHOICES: dict[str, Callable] = {"none": no_correction, "tact": tact_correction, "repair": repair_correction}
ALIGNMENT_CHOICES: dict[str, Callable] = {"none": no_alignment, "weight_matching": weight_matching_alignment}


def correction_choice(name: str) -> Callable:
    if name not in CORRECTION_CHOICES:
        raise ConfigError(f"correction must be one of {', '.join(CORRECTION_CHOICES)}, got {name!r}")
    return CORRECTION_CHOICES[name]


def alignment_choice(name: str) -> Callable:
    if name not in ALIGNMENT_CHOICES:
        raise ConfigError(f"alignment must be one of {', '.join(ALIGNMENT_CHOICES)}, got {name!r}")
    return ALIGNMENT_CHOICES[name]


# ---------------------------------------------------------------------------------------------
# checkpoints from several foundations


@dataclass
class Sources:
    """Where each foundation and each task's expert (and head) live."""

    locations: list[Path]  # per foundation; the first is the reference (model_location)
    foundation_of: dict[str, int]  # dataset -> foundation index

    def location(self, dataset: str) -> Path:
        return self.locations[self.foundation_of[dataset]]


def resolve_sources(settings: AlignmentSettings, model_location: Path, model: str, datasets: Sequence[str]) -> Sources:
    """The foundation of every task: ``alignment.assignment``, else the one location holding its expert."""
    from tallmasks.models import finetuned_path

    locations = [Path(model_location), *settings.locations]
    if settings.assignment is not None:
        if len(settings.assignment) != len(datasets):
            raise ConfigError(f"alignment.assignment has {len(settings.assignment)} entries for {len(datasets)} tasks")
        for index in settings.assignment:
            if index >= len(locations):
                raise ConfigError(f"alignment.assignment: foundation {index} does not exist (0 = model_location, 1..{len(locations) - 1})")
        return Sources(locations, dict(zip(datasets, settings.assignment)))
    foundation_of = {}
    for dataset in datasets:
        found = [i for i, loc in enumerate(locations) if finetuned_path(loc, model, dataset).is_file()]
        if not found:
            raise CheckpointError(
                f"{finetuned_path(locations[0], model, dataset)}: checkpoint not found under any foundation "
                f"({', '.join(map(str, locations))})"
            )
        if len(found) > 1:
            raise ConfigError(
                f"the expert of {dataset} exists under several foundations "
                f"({', '.join(str(locations[i]) for i in found)}): set alignment.assignment"
            )
        foundation_of[dataset] = found[0]
    return Sources(locations, foundation_of)


def vit_heads(encoder: torch.nn.Module) -> int | None:
    """Attention heads per block of the open_clip ViT inside ``encoder``; None for the demo VGG (a chain of
    layers, :func:`~tallmasks.non_local.permutation.mlp_spec`)."""
    from tallmasks.models.vgg import DemoVGG
    from tallmasks.non_local.sites import find_vision_transformer

    path = find_vision_transformer(encoder)
    if path is None:
        if any(isinstance(m, DemoVGG) for m in encoder.modules()):
            return None
        raise ConfigError("alignment supports open_clip VisionTransformer image encoders and the demo VGG only")
    return int(encoder.get_submodule(path).transformer.resblocks[0].attn.num_heads)


#: where the image tower's keys start in an ImageEncoder's state dict
VISUAL_PREFIX = "model.visual."


def visual_spec(state: Mapping[str, torch.Tensor], heads: int | None, embedding: bool) -> Any:
    """The permutation spec of an image encoder's state dict: open_clip's ViT (``heads`` per block), or with
    ``heads`` None the demo VGG's chain of layers; ``embedding``: the output embedding is a group too."""
    from tallmasks.non_local.permutation import mlp_spec, vit_spec

    if heads is None:
        spec = mlp_spec(state, prefix=VISUAL_PREFIX, embedding=embedding)
        spec.check(state)
        return spec
    return vit_spec(state, heads, embedding=embedding)


def aligned_checkpoints(
    sources: Sources,
    zeroshot: Sequence[Path],
    experts: Sequence[Path],
    datasets: Sequence[str],
    heads: int | None,
    settings: AlignmentSettings,
    cache_file: Path | None,
    device: torch.device | str = "cpu",
) -> tuple[Mapping[str, torch.Tensor], list[Mapping[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(theta_0 = mean of the aligned foundations, the permuted experts, a record, each task's permutation
    of its foundation), with each foundation's permutation to the reference cached in ``cache_file`` (one
    safetensors file per run identity); a task's heads go through ``permute_head`` with its permutation."""
    from tallmasks.io.checkpoints import load_state_dict, materialize, require_finite
    from tallmasks.non_local.permutation import PermutedStateDict
    from tallmasks.non_local.weight_matching import MeanStateDict, align_foundations, load_permutation, save_permutation

    foundations = [load_state_dict(path) for path in zeroshot]
    spec = visual_spec(foundations[0], heads, settings.embedding)
    known: list = [None] * len(foundations)
    if cache_file is not None and cache_file.is_file():
        saved = load_permutation(cache_file)
        for i in range(1, len(foundations)):
            known[i] = {g[len(f"{i}/") :]: p for g, p in saved.items() if g.startswith(f"{i}/")}
        log.info("permutations read from %s", cache_file)
    needed = any(p is None for p in known[1:])
    loaded = [materialize(f) if needed and (i == 0 or known[i] is None) else f for i, f in enumerate(foundations)]
    for path, state, foundation in zip(zeroshot, loaded, foundations):
        if state is not foundation:  # read whole for weight matching, which needs finite weights
            require_finite(state, path)
    collection = align_foundations(
        spec,
        loaded,
        [load_state_dict(p) for p in experts],
        [sources.foundation_of[d] for d in datasets],
        max_iter=settings.max_iter,
        seed=settings.seed,
        perms=known,
        device=device,
    )
    del loaded
    theta0 = MeanStateDict([PermutedStateDict(f, spec, p) if i else f for i, (f, p) in enumerate(zip(foundations, collection.perms))])
    if cache_file is not None and not cache_file.is_file():
        flat = {f"{i}/{g}": p for i, perm in enumerate(collection.perms) if i for g, p in perm.items()}
        save_permutation(flat, cache_file)
    record = settings.record()
    record["iterations"] = [r.iterations if r is not None else None for r in collection.results]
    record["objective"] = [[r.objective[0], r.objective[-1]] if r is not None else None for r in collection.results]
    record["assignment"] = {d: sources.foundation_of[d] for d in datasets}
    record["permutation_file"] = str(cache_file) if cache_file is not None else None
    perm_of = {d: collection.perms[sources.foundation_of[d]] for d in datasets}
    return theta0, collection.experts, record, perm_of


def cache_key(parts: Any) -> str:
    """A short hash of a JSON-able description of the inputs a cached file depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# calibration images


#: the seed's training augmentation of TACT's calibration images: a random crop of 5-100% of the area
#: (aspect ratio 3/4-4/3) resized back to the image's size, then a horizontal flip with probability 1/2
AUGMENT_SCALE = (0.05, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)


class AugmentedViews(torch.utils.data.Dataset):
    """``num_images`` augmented views of ``base``'s images, view i of image i mod len(base), each drawn
    from its own seed (the same views in every process and run)."""

    def __init__(self, base, num_images: int, seed: int):
        self.base, self.num_images, self.seed = base, int(num_images), int(seed)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        from torchvision import transforms as T
        from torchvision.transforms import functional as TF

        image, label = self.base[index % len(self.base)]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_003 + index)  # the CPU generator only
            top, left, height, width = T.RandomResizedCrop.get_params(image, list(AUGMENT_SCALE), list(AUGMENT_RATIO))
            flip = bool(torch.rand(()) < 0.5)
        size = [image.height, image.width]
        view = TF.resized_crop(image, top, left, height, width, size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        return (TF.hflip(view) if flip else view), label


def calibration_split(dataset: str, num_images: int, data_location: Path, seed: int = CALIBRATION_SEED, augment: bool = False):
    """A loader of ``num_images`` images drawn (seeded) from the training part of ``dataset`` (the part the
    experts were fine-tuned on; never the Val or test parts). Labels are kept but never used. ``augment``:
    ``num_images`` augmented views (:class:`AugmentedViews`, as many as asked even beyond the training part)
    of the training images in a seeded order."""
    from torch.utils.data import Subset

    from tallmasks.datasets import load_split

    def load():
        base = load_split(dataset, "train", data_location)
        n = len(base)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if augment:
            return AugmentedViews(Subset(base, order.tolist()), num_images, seed)
        if num_images >= n:
            return base
        return Subset(base, order[:num_images].tolist())

    return load


def calibration_split_name(num_images: int, seed: int = CALIBRATION_SEED, augment: bool = False) -> str:
    return f"train_calibration{num_images}_seed{seed}" + ("_augmented" if augment else "")


# ---------------------------------------------------------------------------------------------
# the runner's side


class CorrectionRun:
    """Calibrates the evaluator's model for every weight setting it evaluates and switches corrections per task.

    Expert statistics are measured once (rank 0). A correction is keyed by the evaluator's weight setting
    (and the task, for TACT), calibrated on first use by rank 0 and broadcast to the other ranks.
    """

    def __init__(self, settings: CorrectionSettings, evaluator, checkpoints, images: Mapping[str, torch.Tensor], dist):
        self.settings = settings
        self.evaluator = evaluator
        self.cs = checkpoints
        self.images = dict(images)
        self.dist = dist
        self.corrector = Corrector(evaluator.encoder, embedding=settings.embedding)
        self.targets: dict[str, Statistics] = {}
        self.cache: dict[Any, Correction] = {}
        self.used_for_test: dict[str, Correction] = {}
        self.calibrations = 0
        self._pooled: torch.Tensor | None = None

    def _inputs(self, dataset: str) -> torch.Tensor:
        """TACT: the task's own images; REPAIR: every task's images pooled (built once)."""
        if self.settings.name == "tact":
            return self.images[dataset]
        if self._pooled is None:
            self._pooled = torch.cat([self.images[d] for d in self.cs.names])
        return self._pooled

    def measure_experts(self) -> None:
        """The targets: each expert on its task's images (TACT), or REPAIR's mean over experts on pooled images."""
        if not self.dist.is_main:
            return
        from tallmasks.core.progress import progress

        stats = {}
        for index, dataset in enumerate(progress(self.cs.names, desc="expert statistics", leave=False)):
            self.evaluator.load_state(self.cs.finetuned[index])
            stats[dataset] = self._statistics(self._inputs(dataset))
        if self.settings.name == "tact":
            self.targets = stats
        else:
            shared = repair_target([stats[d] for d in self.cs.names], rule=self.settings.rule)
            self.targets = dict.fromkeys(self.cs.names, shared)

    def _statistics(self, images: torch.Tensor) -> Statistics:
        with precision_context("fp32", self.evaluator.device):
            return self.corrector.statistics(images, batch_size=self.evaluator.batch_size, preprocess=self.evaluator.normalize)

    def forget(self) -> None:
        """A new merged vector is loaded: the calibrations of the previous one no longer apply."""
        self.cache.clear()

    def _key(self, dataset: str) -> Any:
        setting = self.evaluator.setting
        if setting is None:
            return None
        return (setting, dataset) if self.settings.name == "tact" else (setting,)

    @contextlib.contextmanager
    def applied(self, dataset: str, split: str) -> Iterator[None]:
        """Inside the block the evaluator's model carries ``dataset``'s correction of its current weights."""
        key = self._key(dataset)
        corr = self.cache.get(key) if key is not None else None
        if corr is None:
            corr = self._calibrate(dataset) if self.dist.is_main else None
            corr = self.dist.broadcast_object(corr)
            if key is not None:
                self.cache[key] = corr
        self.corrector.corrections[dataset] = corr
        if split == "test":
            self.used_for_test[dataset] = corr
        with self.corrector.use(dataset):
            yield

    def _calibrate(self, dataset: str) -> Correction:
        self.calibrations += 1
        with precision_context("fp32", self.evaluator.device):  # statistics in exact float32, whatever the evaluation's precision
            corr = self.corrector.calibrate(
                dataset,
                self._inputs(dataset),
                self.targets[dataset],
                self.evaluator.batch_size,
                self.evaluator.normalize,
                self.settings.eps,
            )
        return {site: (scale.cpu(), shift.cpu()) for site, (scale, shift) in corr.items()}

    def save(self, folder: Path, metadata: Mapping[str, str]) -> dict[str, str]:
        """Save the corrections the test evaluations used, one small safetensors file per task."""
        paths = {}
        for dataset, corr in self.used_for_test.items():
            path = folder / f"{dataset}.safetensors"
            save_correction(path, corr, {**metadata, "task": dataset, "correction": self.settings.name})
            paths[dataset] = str(path)
        return paths

    def record(self) -> dict[str, Any]:
        return {**self.settings.record(), "sites": len(self.corrector.sites), "calibrations": self.calibrations}


def load_calibration_images(
    datasets: Sequence[str],
    settings: CorrectionSettings,
    data_location: Path,
    cache_dir: Path,
    image_size: int,
    val_preprocess: Any,
    num_workers: int,
    build: bool,
    load_or_build: Callable,
) -> dict[str, Any]:
    """Per task, ``num_images`` preprocessed (uint8) images of its training part, cached like the eval splits."""
    return {
        dataset: load_or_build(
            calibration_split(dataset, settings.num_images, data_location, augment=settings.augment),
            dataset,
            calibration_split_name(settings.num_images, augment=settings.augment),
            cache_dir,
            image_size,
            val_preprocess,
            num_workers,
            build=build,
        )
        for dataset in datasets
    }
