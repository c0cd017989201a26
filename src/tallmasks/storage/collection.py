"""Compress a collection of fine-tuned checkpoints to one merged vector plus one bit mask per task.

A compressed collection is a folder:

- ``merged.safetensors``: the multi-task vector tau_MTL (floating-point keys, the inputs' dtype);
- ``masks.safetensors``: one bit-packed mask per task (``MaskSet``);
- ``meta.json``: task names, how the masks were built (with the per-task scales of EMR-merging), the
  pre-trained checkpoint it refers to (path and SHA-256: theta_0 is referenced, not copied), and the
  collection's id, which both parts also record, so a part copied from another collection (or left by an
  interrupted rewrite) is refused.

Task t is rebuilt as theta_0 + scale_t * (m_t * tau_MTL), scale_t = 1 for TALL and magnitude masks.
That is the paper's scheme (``storage="packbits"``). The default, ``storage="coded"``, replaces the two
data files with ``coded.safetensors`` (``tallmasks.storage.coded``: masks entropy-coded jointly, the merged
vector only where some mask keeps a weight, the collection id in its metadata), losslessly; with
``values`` other than ``"float32"`` the coded file quantizes the merged vector (``tallmasks.storage.values``),
and meta.json's ``values`` field says so (``lossy``, the setting, and the largest error measured on the stored
values), so a lossy collection is never taken for a lossless one.

Every part records checksums of what it holds (``tallmasks.io.integrity``): each merged tensor, each mask,
each coded stream and header, and meta.json itself, with the size of every part. Every read path checks them
before the bytes are used, so a damaged collection is a one-line error naming the part, never a wrong model.
Collections written before checksums (format ``...-v1``) are still read, with a warning.

Writing a collection replaces only a previous collection's own files (meta.json last); a non-empty folder
that is not a collection is refused (its own stale temporaries apart, which are removed).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from tallmasks.algebra.task_vectors import CheckpointSet, apply_vector
from tallmasks.core.errors import CheckpointError, ConfigError
from tallmasks.core.schema import Any_, Bool, Int, List, Map, Null, Num, Obj, Str, check, names, optional, parse_json
from tallmasks.io.checkpoints import (
    LazyStateDict,
    atomic_path,
    checkpoint_size,
    load_state_dict,
    require_checkpoint,
    save_state_dict,
    sha256_file,
)
from tallmasks.io.guard import check_output, file_size, remove_stale_temporaries, require_file
from tallmasks.io.integrity import CHECKSUM_SCHEMA, CheckedStateDict, json_checksum, tensor_checksum
from tallmasks.masks import Layout, MaskSet
from tallmasks.merging import get_method, merge
from tallmasks.merging.per_task import mask_scales, task_models
from tallmasks.storage.coded import CODED_FORMAT, CODED_FORMATS, CODED_LOSSY_FORMAT, CodedFile, decode_task, write_coded
from tallmasks.storage.values import VALUE_SETTINGS, ValueCodec

log = logging.getLogger(__name__)

FORMAT = "tallmasks-compressed-v2"
STORAGES = {"packbits": FORMAT, "coded": CODED_FORMAT}
#: every format read, and its storage: the current ones, and those written before checksums
READ_FORMATS = {
    FORMAT: "packbits",
    CODED_FORMAT: "coded",
    CODED_LOSSY_FORMAT: "coded",  # quantized values: a name of its own, never read as a lossless collection
    "tallmasks-compressed-v1": "packbits",
    CODED_FORMATS[0]: "coded",
}
LEGACY_FORMATS = ("tallmasks-compressed-v1", CODED_FORMATS[0])
META_MAX_BYTES = 1 << 26
MAX_TASKS = 1024  # names in meta.json; a coded file holds at most 64
MERGED_FILE = "merged.safetensors"
MASKS_FILE = "masks.safetensors"
CODED_FILE = "coded.safetensors"
META_FILE = "meta.json"
PARTS = (MERGED_FILE, MASKS_FILE, META_FILE)
STORAGE_PARTS = {"packbits": PARTS, "coded": (CODED_FILE, META_FILE)}
DEFAULT_LAMBDA = 0.4

#: --masks kinds and the per-task methods that build them
MASK_METHODS = {"tall": "tall_mask", "magnitude": "mag_masking", "emr": "emr"}


#: meta.json: the fields the readers use (others, such as ``finetuned``, are kept as written)
META_SCHEMA = Obj(
    {
        "format": Str(max_len=64),
        "tasks": names(min_count=1, max_count=MAX_TASKS),
        "masks": Obj(
            {"kind": Str(max_len=64)},
            {
                "scales": optional(Map(Num(), max_len=MAX_TASKS)),
                "lambdas": Any_((Null(), List(optional(Num()), max_len=MAX_TASKS), Map(optional(Num()), max_len=MAX_TASKS))),
                "use_ties": Bool(),
                "k": Num(),
            },
        ),
        "num_params": Int(min=0, max=1 << 48),
        "pretrained": Obj({"path": Str(max_len=4096), "sha256": Str(max_len=64)}),
    },
    {
        "collection": Str(max_len=64),
        "model": optional(Str(max_len=256)),
        "parts": Map(Int(min=0), max_len=8),
        "check": CHECKSUM_SCHEMA,
        "values": Obj(
            {"setting": Str(max_len=16), "lossy": Bool()},
            {"block": Int(min=1), "prune_zeros": Bool(), "max_abs_error": Num(), "description": Str(max_len=256)},
        ),
    },
)


def _load_meta(path: Path) -> object:
    return parse_json(require_file(path, "collection metadata").read_bytes(), path, CheckpointError, max_bytes=META_MAX_BYTES)


def is_collection(path: Path) -> bool:
    """Whether ``path`` holds a readable collection's meta.json (see ``looks_like_collection``)."""
    try:
        meta = _load_meta(Path(path) / META_FILE)
    except (OSError, CheckpointError):
        return False
    return isinstance(meta, dict) and meta.get("format") in READ_FORMATS


def looks_like_collection(path: Path) -> bool:
    """Whether ``path`` is a folder with a meta.json: a collection to read (and to refuse in one line when it
    is damaged), not a folder of checkpoints."""
    return Path(path).is_dir() and (Path(path) / META_FILE).is_file()


def storage_of(meta: dict) -> str:
    """``"packbits"`` or ``"coded"``: the storage of a collection's (checked) meta.json."""
    return READ_FORMATS[meta["format"]]


def _check_out_dir(out_dir: Path, inputs: Sequence[str | Path], expected_bytes: int) -> None:
    check_output(out_dir, inputs, expected_bytes=expected_bytes, folder=True, label="--out")
    for part in {*PARTS, CODED_FILE}:  # temporaries of an interrupted compress: cleaned, as every write does
        remove_stale_temporaries(out_dir / part)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_collection(out_dir):
        raise CheckpointError(f"{out_dir}: folder is not empty and is not a compressed collection; choose another --out")
    for part in {*PARTS, CODED_FILE}:
        check_output(out_dir / part, inputs, label="--out")


def compress(
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    use_ties: bool = False,
    lambdas: float | Sequence[float] = DEFAULT_LAMBDA,
    masks: str = "tall",
    k: float = 10,
    device: str = "cpu",
    progress: bool = False,
    storage: str = "coded",
    masks_file: str | Path | None = None,
    model: str | None = None,
    values: str = "float32",
    prune_zeros: bool = False,
) -> dict:
    """Write a compressed collection to ``out_dir`` (each part atomically, meta.json last); returns its metadata.
    ``masks_file``: existing TALL masks (ours or a released ``.npy``) instead of building them; ``model``: a
    name recorded in meta.json; ``values``: how the coded storage keeps the merged vector (one of
    ``VALUE_SETTINGS``; float32 is exact); ``prune_zeros``: clear the mask bits where the stored value is zero."""
    out_dir = Path(out_dir).expanduser()
    if masks not in MASK_METHODS:
        raise ConfigError(f"masks must be one of {', '.join(MASK_METHODS)}, got {masks!r}")
    if storage not in STORAGES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if masks_file is not None and masks != "tall":
        raise ConfigError("masks_file holds TALL masks: it applies with masks='tall' only")
    if values not in VALUE_SETTINGS:
        raise ConfigError(f"values must be one of {', '.join(VALUE_SETTINGS)}, got {values!r}")
    if storage != "coded" and (values != "float32" or prune_zeros):
        raise ConfigError(
            f"values {values!r}{' and prune_zeros' if prune_zeros else ''} need storage 'coded' (packbits keeps the paper's float32)"
        )
    codec = ValueCodec(values)
    inputs = [require_checkpoint(pretrained), *(require_file(p) for p in finetuned)]
    size = checkpoint_size(pretrained)
    _check_out_dir(out_dir, inputs, size + len(inputs) * (size // 32 + 1) + 65536)
    cs = CheckpointSet(pretrained, list(finetuned), names)
    cs.progress = progress
    method = get_method(MASK_METHODS[masks])
    params = {"tall": {"use_ties": use_ties}, "magnitude": {"k": k}, "emr": {}}[masks]
    if masks == "tall":
        settings = [lambdas] * cs.num_tasks if isinstance(lambdas, (int, float)) else list(lambdas)
    else:
        settings = [None] * cs.num_tasks
    vector = merge(cs, method.name, device=device, **params)
    if masks_file is not None:
        mask_set = load_mask_file(masks_file, cs)
        mask_set.info["use_ties"] = use_ties
        mask_info: dict = {"kind": "tall", "use_ties": use_ties, "lambdas": mask_set.info.get("lambdas"), "source": str(masks_file)}
    else:
        mask_set = task_models(method, cs, vector, {**params, "device": device}).masks(settings)
        mask_info = {"kind": masks, **params}
        if masks == "tall":
            mask_info["lambdas"] = mask_set.info["lambdas"]
            mask_set.info["use_ties"] = use_ties
        elif masks == "magnitude":
            mask_info["k"] = float(k)
        else:
            mask_info["scales"] = mask_scales(mask_set)
    stored = {key: value.to(cs.dtypes[key]) for key, value in vector.items()}
    collection_id = uuid.uuid4().hex
    meta = {
        "format": CODED_LOSSY_FORMAT if codec.lossy else STORAGES[storage],
        "collection": collection_id,
        "model": model,
        "tasks": cs.names,
        "masks": mask_info,
        "num_params": cs.num_float_params,
        "pretrained": {"path": str(Path(pretrained).resolve()), "sha256": sha256_file(pretrained)},
        "finetuned": [str(Path(p).resolve()) for p in finetuned],
    }
    mask_set.info["collection"] = collection_id
    # a previous collection's meta.json stays until the new parts are in place: an interrupted rewrite is
    # still recognised as a collection (and replaced next time) but its parts' ids no longer match
    if storage == "coded":
        written: dict = {}
        write_coded(out_dir / CODED_FILE, mask_set, stored, progress=progress, values=codec, prune_zeros=prune_zeros, report=written)
        meta["values"] = {"setting": values, "lossy": codec.lossy, "prune_zeros": prune_zeros, "description": codec.describe()}
        if codec.bits:
            meta["values"]["block"] = codec.block
        if codec.lossy:
            meta["values"]["max_abs_error"] = written["max_abs_error"]
    else:
        checksums = json.dumps({key: tensor_checksum(value) for key, value in stored.items()}, sort_keys=True)
        save_state_dict(stored, out_dir / MERGED_FILE, metadata={"collection": collection_id, "checksums": checksums}, finite=True)
        mask_set.save(out_dir / MASKS_FILE)
    meta["parts"] = {part: (out_dir / part).stat().st_size for part in STORAGE_PARTS[storage] if part != META_FILE}
    meta["check"] = json_checksum(meta)
    with atomic_path(out_dir / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    for stale in {MERGED_FILE, MASKS_FILE, CODED_FILE} - set(STORAGE_PARTS[storage]):  # the other storage's parts
        (out_dir / stale).unlink(missing_ok=True)
    return meta


def values_of(meta: dict) -> dict:
    """meta.json's ``values`` field: how the merged vector is stored (collections without one: float32, exact)."""
    return meta.get("values") or {"setting": "float32", "lossy": False}


def read_meta(collection: str | Path) -> dict:
    """meta.json of a collection, checked: a one-line error when it is missing, not JSON, or does not match its
    schema or its checksum (the parts' sizes are checked when the parts are opened)."""
    collection = Path(collection).expanduser()
    if not collection.exists():
        raise CheckpointError(f"{collection}: no such compressed collection (expected a folder)")
    if not collection.is_dir():
        raise CheckpointError(f"{collection}: not a folder, expected a compressed collection")
    path = collection / META_FILE
    if not path.exists():
        raise CheckpointError(f"{collection}: not a compressed collection (no {META_FILE})")
    try:
        meta = _load_meta(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
        found = repr(meta.get("format"))[:60] if isinstance(meta, dict) else "no format"
        raise CheckpointError(
            f"{path}: not a compressed collection (format {found}, expected one of {', '.join(map(repr, STORAGES.values()))})"
        )
    check(meta, META_SCHEMA, path, CheckpointError)
    if meta["format"] in LEGACY_FORMATS:
        log.warning("%s: written before collections had checksums (%s): damage to it cannot be detected", path, meta["format"])
        return meta
    if "check" not in meta or "parts" not in meta:
        raise CheckpointError(f"{path}: damaged collection metadata (no {'check' if 'check' not in meta else 'parts'} field)")
    if json_checksum({k: v for k, v in meta.items() if k != "check"}) != meta["check"]:
        raise CheckpointError(f"{path}: damaged or edited collection metadata (checksum mismatch)")
    if (meta["format"] == CODED_LOSSY_FORMAT) != bool(values_of(meta).get("lossy")):
        raise CheckpointError(
            f"{path}: format {meta['format']} with values {values_of(meta).get('setting')!r}: lossy and lossless mixed up"
        )
    expected = {p for p in STORAGE_PARTS[storage_of(meta)] if p != META_FILE}
    if set(meta["parts"]) != expected:
        raise CheckpointError(f"{path}: parts {sorted(meta['parts'])}, a {storage_of(meta)} collection has {sorted(expected)}")
    return meta


def _check_sizes(collection: Path, meta: dict) -> None:
    """Each part the size meta.json records (a truncated or extended part), in a collection with checksums."""
    for part, size in (meta.get("parts") or {}).items():
        found = file_size(collection / part)
        if found != size:
            raise CheckpointError(f"{collection / part}: damaged part ({found} bytes, {META_FILE} records {size})")


def open_collection(collection: str | Path) -> tuple[dict, LazyStateDict, MaskSet]:
    """(meta, merged vector, masks) of a collection whose parts belong together: the same collection id,
    the tasks of meta.json, and masks covering exactly the merged vector's keys and shapes."""
    collection = Path(collection).expanduser()
    meta = read_meta(collection)
    if storage_of(meta) == "coded":
        raise CheckpointError(f"{collection}: a coded collection (open it with open_coded)")
    merged = load_state_dict(require_file(collection / MERGED_FILE, "collection data"))
    masks = MaskSet.load(collection / MASKS_FILE)
    expected = meta.get("collection")
    merged_meta = _merged_metadata(merged)
    if expected is not None:
        for part, found in ((MERGED_FILE, merged_meta.get("collection")), (MASKS_FILE, masks.info.get("collection"))):
            if found != expected:
                raise CheckpointError(
                    f"{collection / part}: belongs to another collection than {collection / META_FILE} "
                    "(copied in, or left by an interrupted compress); compress again"
                )
    _check_sizes(collection, meta)
    if masks.names != meta["tasks"]:
        raise CheckpointError(f"{collection / MASKS_FILE}: masks for {masks.names}, {META_FILE} lists {meta['tasks']}")
    keys = sorted(k for k in merged if merged.dtype(k).is_floating_point)
    masks.check_layout(Layout(tuple(keys), tuple(merged.shape(k) for k in keys)), collection / MASKS_FILE)
    if masks.layout.numel != meta["num_params"]:
        raise CheckpointError(f"{collection / META_FILE}: num_params {meta['num_params']}, the parts have {masks.layout.numel}")
    if meta["format"] not in LEGACY_FORMATS:
        origin = collection / MERGED_FILE
        if "checksums" not in merged_meta:
            raise CheckpointError(f"{origin}: damaged collection data (no checksums recorded)")
        recorded = parse_json(merged_meta["checksums"], f"{origin}: checksums", CheckpointError, Map(CHECKSUM_SCHEMA))
        merged = CheckedStateDict(merged, recorded, origin)  # type: ignore[assignment]
    return meta, merged, masks


def open_coded(collection: str | Path) -> tuple[dict, CodedFile]:
    """(meta, coded file) of a coded collection whose parts belong together (same id, tasks and size)."""
    collection = Path(collection).expanduser()
    meta = read_meta(collection)
    coded = CodedFile(require_file(collection / CODED_FILE, "coded collection data"))
    if meta.get("collection") is not None and coded.info.get("collection") != meta["collection"]:
        raise CheckpointError(
            f"{collection / CODED_FILE}: belongs to another collection than {collection / META_FILE} "
            "(copied in, or left by an interrupted compress); compress again"
        )
    _check_sizes(collection, meta)
    if coded.names != meta["tasks"]:
        raise CheckpointError(f"{collection / CODED_FILE}: masks for {coded.names}, {META_FILE} lists {meta['tasks']}")
    recorded = values_of(meta)
    if recorded.get("setting") != coded.values.setting or bool(recorded.get("lossy")) != coded.lossy:
        raise CheckpointError(
            f"{collection / CODED_FILE}: holds {coded.values.setting} values, {META_FILE} records {recorded.get('setting')!r} "
            f"({'lossy' if recorded.get('lossy') else 'lossless'})"
        )
    if coded.layout.numel != meta["num_params"]:
        raise CheckpointError(f"{collection / META_FILE}: num_params {meta['num_params']}, the parts have {coded.layout.numel}")
    return meta, coded


def _merged_metadata(merged: LazyStateDict) -> dict[str, str]:
    handle = getattr(merged, "_handle", None)
    return (handle.metadata() or {}) if handle is not None else {}


def task_name(meta: dict, task: str | int) -> str:
    """Resolve a task given by name or 0-based index."""
    tasks = meta["tasks"]
    if str(task) in tasks:
        return str(task)
    try:
        index = int(task)
    except (TypeError, ValueError):
        raise CheckpointError(f"no task {task!r} in the collection (tasks: {', '.join(tasks)})") from None
    if not 0 <= index < len(tasks):
        raise CheckpointError(f"task index {index} out of range (0..{len(tasks) - 1})")
    return tasks[index]


def decompress(
    collection: str | Path, task: str | int, out: str | Path | None = None, pretrained: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Rebuild theta_0 + scale_t * (m_t * tau_MTL) for one task; saved atomically to ``out`` when given (an
    output that is theta_0 or lies inside the collection is refused before any work)."""
    collection = Path(collection).expanduser()
    coded = storage_of(read_meta(collection)) == "coded"
    if coded:
        meta, coded_file = open_coded(collection)
    else:
        meta, merged, masks = open_collection(collection)
    name = task_name(meta, task)
    theta0_path = Path(pretrained).expanduser() if pretrained is not None else Path(meta["pretrained"]["path"])
    if not theta0_path.exists():
        raise CheckpointError(f"{theta0_path}: pre-trained checkpoint not found (pass --pretrained)")
    require_checkpoint(theta0_path)
    if out is not None:
        check_output(out, [collection, theta0_path], expected_bytes=checkpoint_size(theta0_path), label="--out")
    scale = float((meta["masks"].get("scales") or {}).get(name, 1.0))
    # theta_0's SHA-256 is computed beside the decoding (hashlib releases the interpreter's lock) and checked
    # before anything is returned or written; a mismatch is the error shown, whatever else went wrong
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, theta0_path)

        def check_digest() -> None:
            if digest.result() != meta["pretrained"]["sha256"]:
                raise CheckpointError(
                    f"{theta0_path}: differs from the pre-trained checkpoint the collection was made from (SHA-256 mismatch)"
                )

        try:
            if coded:
                model = decode_task(coded_file, load_state_dict(theta0_path), name, scale=scale)
            else:
                model = apply_vector(load_state_dict(theta0_path), merged, alpha=scale, mask=masks.get(name))
        except Exception:
            check_digest()
            raise
        check_digest()
    if out is not None:
        save_state_dict(model, out, finite=True)
    return model


def collection_masks(collection: str | Path) -> MaskSet:
    """Every task's mask of a compressed collection, whatever its storage."""
    if storage_of(read_meta(collection)) == "coded":
        return open_coded(collection)[1].masks()
    return open_collection(collection)[2]


def collection_report(collection: str | Path) -> dict:
    """Sizes, mask densities, the agreement profile, the masks' bits per weight per task, and the bytes
    beyond theta_0 beside the paper's scheme (float32 merged vector + 1 bit per weight per task)."""
    collection = Path(collection).expanduser()
    meta = read_meta(collection)
    storage = storage_of(meta)
    if storage == "coded":
        meta, coded = open_coded(collection)
        densities, agreement = coded.profile()  # chunk by chunk: the memory of one chunk, whatever is declared
        stats = coded.stats()
        mask_bytes, kept = stats["mask_bytes"], stats["kept"]
    else:
        meta, merged, masks = open_collection(collection)
        for key in merged:  # every tensor read once: its checksum checked
            merged[key]
        densities, agreement = {name: masks.density(name) for name in masks.names}, masks.agreement()
        mask_bytes, kept = (collection / MASKS_FILE).stat().st_size, None
    sizes = {part: (collection / part).stat().st_size for part in STORAGE_PARTS[storage]}
    n = meta["num_params"]
    tasks = len(meta["tasks"])
    total = sum(sizes.values())
    paper = 4 * n + tasks * ((n + 7) // 8)
    return {
        "format": meta["format"],
        "storage": storage,
        "values": values_of(meta),
        "model": meta.get("model"),
        "tasks": meta["tasks"],
        "masks": meta["masks"],
        "num_params": n,
        "files": sizes,
        "total_bytes": total,
        "bytes_per_param": total / max(n, 1),
        "mask_bytes": mask_bytes,
        "mask_bits_per_weight_per_task": 8 * mask_bytes / max(n * tasks, 1),
        "kept_weights": kept,
        "paper_bytes": paper,
        "ratio_to_paper": total / max(paper, 1),
        "budget_bytes": paper + 64 * 1024,
        "densities": densities,
        "agreement": agreement,
    }


def load_mask_file(path: str | Path, cs: CheckpointSet) -> MaskSet:
    """TALL masks from a file for the tasks of ``cs``: a MaskSet (.safetensors) or a released ``.npy`` dict."""
    path = require_file(path, "mask file")
    if path.suffix == ".npy":
        from tallmasks.io.released import load_released_masks

        masks = MaskSet.from_packed(load_released_masks(path), Layout.of(cs), {"kind": "tall", "source": str(path)})
    else:
        masks = MaskSet.load(path)
        masks.check_layout(Layout.of(cs), path)
    return masks.subset(cs.names)
