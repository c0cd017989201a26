"""Checkpoint pools the field shares: Hugging Face ``transformers`` CLIP checkpoints (a base model and one
fine-tuned model per task, as in FusionBench's pools ``tanganke/clip-vit-base-patch32_<task>`` over
``openai/clip-vit-base-patch32``), described by a YAML file (config/pool/*.yaml):

    model: ViT-B-32                      # our open_clip model of the same architecture
    pool:
      name: clip-vit-base-patch32_TA8
      base: openai/clip-vit-base-patch32 # a CLIPModel: hub repository id (owner/name[@revision]) or local path
      tasks: {SUN397: tanganke/clip-vit-base-patch32_sun397, ...}   # our dataset names or FusionBench's

``prepare_pool`` fetches each checkpoint (huggingface_hub, or a local file or folder), maps it onto our
open_clip image encoder (models.hf_clip) and writes it once in the released layout under
``<model_location>/hf/<name>/<model>/``, where main.py and ``tallmasks`` read it like the paper's files.
A task checkpoint that is a CLIPVisionModel lacks the projection and the text-side entries of the image
encoder's state dict: it takes them from the base (their task vector is 0). Zero-shot heads come from
the base's own text tower.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tallmasks.core.errors import CheckpointError, ConfigError, TallmasksError

log = logging.getLogger(__name__)

#: FusionBench's dataset names -> ours (its TALL20 task emnist_letters is EMNIST letters, our EMNIST is digits)
FUSIONBENCH_TASKS: dict[str, str] = {
    "sun397": "SUN397",
    "stanford-cars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers102",
    "pcam": "PCAM",
    "fer2013": "FER2013",
    "oxford-iiit-pet": "OxfordIIITPet",
    "stl10": "STL10",
    "cifar100": "CIFAR100",
    "cifar10": "CIFAR10",
    "food101": "Food101",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "rendered-sst2": "RenderedSST2",
}
#: FusionBench's eight-task order (the task arithmetic paper's eight tasks), in our names
FUSIONBENCH_TA8: list[str] = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
_UNMATCHED = {"emnist_letters": "EMNIST letters", "emnist_mnist": "EMNIST's mnist split"}

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
HUB_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SOURCES_FILE = ".pool_sources.json"
POOL_ROOT = "hf"
REPO_ROOT = Path(__file__).resolve().parents[2]


def dataset_name(name: str) -> str:
    """Our name of a dataset given by our name or FusionBench's."""
    from tallmasks.datasets import canonical_name

    key = str(name)
    if key in _UNMATCHED:
        raise ConfigError(f"pool task {key!r} ({_UNMATCHED[key]}) has no counterpart here (our EMNIST is the digits split)")
    return canonical_name(FUSIONBENCH_TASKS.get(key, key))


@dataclass(frozen=True)
class Pool:
    """A base checkpoint and one fine-tuned checkpoint per task (sources: hub ids or local paths)."""

    name: str
    model: str
    base: str
    tasks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping | None, model: str | None = None) -> Pool:
        """A pool from its YAML description (``pool:`` of the config); ``model`` from the top level."""
        if not isinstance(data, Mapping):
            raise ConfigError("model_source=hf needs a pool: pool=NAME (config/pool/NAME.yaml) or pool.base / pool.tasks")
        model = data.get("model", model)
        base, tasks = data.get("base"), data.get("tasks")
        if not model or not isinstance(base, str) or not base:
            raise ConfigError("a pool needs a model (our open_clip name) and a base checkpoint (pool.base)")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError("a pool needs its task checkpoints: pool.tasks, a mapping of dataset name to checkpoint")
        resolved: dict[str, str] = {}
        for task, source in tasks.items():
            ours = dataset_name(task)
            if ours in resolved:
                raise ConfigError(f"pool task {task!r} repeats {ours}")
            if not isinstance(source, str) or not source:
                raise ConfigError(f"pool task {task!r}: expected a hub repository id or a path, got {source!r}")
            resolved[ours] = source
        name = str(data.get("name") or Path(base).name)
        if not re.fullmatch(r"[\w.-]+", name):
            raise ConfigError(f"pool name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        return cls(name, str(model), base, resolved)

    def select(self, names: Sequence[str] | None = None, num_tasks: int | None = None) -> list[str]:
        """The tasks of a run: ``names`` (each in the pool), else the pool's first ``num_tasks`` (all of
        them when the pool has fewer, or when num_tasks is None)."""
        order = list(self.tasks)
        if names:
            chosen = [dataset_name(n) for n in names]
            missing = [n for n in chosen if n not in self.tasks]
            if missing:
                raise ConfigError(f"dataset {missing[0]} is not in pool {self.name} ({', '.join(order)})")
            return chosen
        if num_tasks is None:
            return order
        if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or int(num_tasks) < 1:
            raise ConfigError(f"num_tasks must be a positive integer, got {num_tasks!r}")
        return order[: int(num_tasks)]


def load_pool(name_or_path: str | Path, config_dirs: Sequence[Path] = ()) -> Pool:
    """A pool from a YAML file, given by path or by name (config/pool/<name>.yaml)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        folders = [*config_dirs, Path.cwd() / "config", REPO_ROOT / "config"]
        candidates = [folder / "pool" / f"{name_or_path}.yaml" for folder in folders]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ConfigError(f"pool {name_or_path!r}: no such file, nor {candidates[1]}")
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        raise ConfigError(f"{path}: not a readable pool description ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pool description is a mapping with 'model' and 'pool'")
    return Pool.from_mapping(data.get("pool"), data.get("model"))


# ---------------------------------------------------------------------------------------------
# fetching


def fetch(source: str) -> Path:
    """A checkpoint file or folder: a local path as is, else downloaded from the Hugging Face hub."""
    local = Path(source).expanduser()
    if local.exists():
        return local
    if not HUB_ID.fullmatch(source):
        raise CheckpointError(f"{source}: no such file or folder, and not a Hugging Face repository id (owner/name[@revision])")
    repo, _, revision = source.partition("@")
    return _fetch_hub(repo, revision or None)


def _error_kind(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _fetch_hub(repo: str, revision: str | None) -> Path:
    """The weights of a hub repository (safetensors, sharded safetensors, else pytorch_model.bin), cached."""
    from huggingface_hub import hf_hub_download

    from tallmasks.experiments.download import explain_network_error

    not_cached: BaseException | None = None  # a file neither in the local cache nor reachable
    for filename in HUB_WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision))
            if filename.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
                for shard in shards:
                    hf_hub_download(repo, shard, revision=revision)
            return path
        except Exception as exc:  # hub, network and file errors of many types
            kinds = _error_kind(exc)
            if "LocalEntryNotFoundError" in kinds:
                not_cached = exc
            elif not kinds & {"EntryNotFoundError", "RemoteEntryNotFoundError"}:
                raise TallmasksError(f"{repo}: {explain_network_error(exc, 'hf', repo=repo)}") from None
    if not_cached is not None:
        raise TallmasksError(f"{repo}: {explain_network_error(not_cached, 'hf', repo=repo)}")
    raise CheckpointError(f"{repo}: no weights on the hub ({', '.join(HUB_WEIGHT_FILES)})")


# ---------------------------------------------------------------------------------------------
# materializing in the released layout


def pool_root(model_location: str | Path, pool: Pool) -> Path:
    """Where a pool's converted checkpoints live: <model_location>/hf/<pool name>."""
    return Path(model_location).expanduser() / POOL_ROOT / pool.name


def _source_signature(source: str) -> list:
    local = Path(source).expanduser()
    if not local.exists():
        return [source]
    from tallmasks.io.checkpoints import load_state_dict

    files = load_state_dict(local).files
    return [source, *[[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def _mapped(source: str) -> dict[str, torch.Tensor]:
    from tallmasks.io.checkpoints import load_state_dict, materialize
    from tallmasks.models.hf_clip import hf_to_open_clip

    path = fetch(source)
    try:
        return hf_to_open_clip(materialize(load_state_dict(path)))
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def _fit(
    mapped: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    model: str,
    fallback: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The image encoder's state dict from a mapped checkpoint (missing entries from ``fallback``)."""
    state: dict[str, torch.Tensor] = {}
    borrowed = 0
    for key, reference in expected.items():
        value = mapped.get(key)
        if value is None:
            if fallback is None:
                raise CheckpointError(
                    f"{source}: lacks {key!r}; the base of a pool must be a full CLIPModel checkpoint (with "
                    "visual_projection and the text embeddings), e.g. openai/clip-vit-base-patch32"
                )
            value, borrowed = fallback[key], borrowed + 1
        if tuple(value.shape) != tuple(reference.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {list(value.shape)}, the {model} image encoder expects {list(reference.shape)}"
            )
        state[key] = value.to(reference.dtype)
    extra = sorted(k for k in mapped if k not in expected and not k.startswith("model.transformer."))
    if extra:
        raise CheckpointError(f"{source}: {extra[0]!r} does not fit the {model} image encoder")
    if borrowed:
        log.info("%s: %d entries (projection, text side) taken from the base", source, borrowed)
    return state


def prepare_pool(pool: Pool, model_location: str | Path, datasets: Sequence[str] | None = None, heads: bool = True) -> Path:
    """Convert the pool's checkpoints (those not converted yet) into the released layout under
    pool_root(); build the zero-shot heads of ``datasets`` from the base's text tower; return the root."""
    from tallmasks.io.checkpoints import atomic_path, save_state_dict
    from tallmasks.models import ImageEncoder, finetuned_path, get_classification_head, head_path, zeroshot_path

    root = pool_root(model_location, pool)
    datasets = list(pool.tasks) if datasets is None else list(datasets)
    targets = {zeroshot_path(root, pool.model): pool.base}
    targets.update({finetuned_path(root, pool.model, d): pool.tasks[d] for d in datasets})
    stamps_path = root / pool.model / SOURCES_FILE
    try:
        stamps = json.loads(stamps_path.read_text())
    except (OSError, ValueError):
        stamps = {}
    todo = {}
    for path, source in targets.items():
        rel = str(path.relative_to(root / pool.model))
        if not (path.is_file() and stamps.get(rel) == _source_signature(source)):
            todo[path] = source
    missing_heads = heads and any(not head_path(root, pool.model, d).is_file() for d in datasets)
    if not todo and not missing_heads:
        return root
    base_mapped = _mapped(pool.base)
    expected = ImageEncoder(pool.model, pretrained=None).state_dict()
    base = _fit(base_mapped, expected, pool.base, pool.model)
    for path, source in todo.items():
        log.info("converting %s -> %s", source, path)
        is_base = path == zeroshot_path(root, pool.model)
        state = base if is_base else _fit(_mapped(source), expected, source, pool.model, fallback=base)
        save_state_dict(state, path)
        stamps[str(path.relative_to(root / pool.model))] = _source_signature(source)
        with atomic_path(stamps_path) as tmp:
            tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True))
    if missing_heads:
        from tallmasks.models import create_clip

        clip = create_clip(pool.model, pretrained=None)
        wanted = clip.state_dict()
        text_side = {k[len("model.") :]: v for k, v in base_mapped.items()}
        missing = sorted(k for k in wanted if k not in text_side)
        if missing:
            raise CheckpointError(f"{pool.base}: lacks {missing[0]!r} of the text tower that builds the zero-shot heads")
        clip.load_state_dict({k: text_side[k].to(wanted[k].dtype) for k in wanted})
        for dataset in datasets:
            get_classification_head(pool.model, dataset, root, clip_model=clip)
    return root


def ensure_finetuned_accuracies(root: Path, model: str, datasets: Sequence[str], dist=None, **evaluation) -> None:
    """Measure the fine-tuned accuracy (val and test) of the pool's tasks that its table lacks (every rank
    takes part; rank 0 writes the table)."""
    from tallmasks.eval.distributed import DistInfo
    from tallmasks.eval.results import read_json
    from tallmasks.eval.selection import FT_FILE
    from tallmasks.eval.single_task import evaluate_single_task

    dist = dist or DistInfo()
    table_path = root / model / FT_FILE
    table = read_json(table_path) if table_path.is_file() else {}
    missing = dist.broadcast_object([d for d in datasets if d not in table or d + "Val" not in table])
    if missing:
        log.info("measuring the fine-tuned accuracy of %s (pool checkpoints)", ", ".join(missing))
        evaluate_single_task(model, "standard", missing, model_location=root, output_dir=root, **evaluation)
        dist.barrier()
