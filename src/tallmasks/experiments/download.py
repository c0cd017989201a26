"""Download the paper's released checkpoints, heads and TALL masks into the layout main.py reads.

Sources: the Hugging Face hub (repository nik-dim/tall_masks, default) or Google Drive (gdown). Files are
fetched into a staging folder (both sources resume partial downloads there), moved into place, then
verified: every expected file present and loadable without running pickle code. Verified files are
recorded and skipped on the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tallmasks.core.errors import CheckpointError, ConfigError, TallmasksError
from tallmasks.io.guard import check_output
from tallmasks.models.paths import mask_dir

log = logging.getLogger(__name__)

MODELS = ["ViT-B-32", "ViT-B-16", "ViT-L-14"]
KINDS = ("checkpoints", "tall_masks")
SOURCES = ("hf", "gdrive")
HF_REPO = "nik-dim/tall_masks"
GDRIVE_FOLDERS = {
    "checkpoints": {
        "ViT-B-32": "16xmoeMqNf1JlICqjMUEgHiH6mHn0G1f0",
        "ViT-B-16": "1dmLqIwCYPqO0qsNEuflPhC5-_QodQHDv",
        "ViT-L-14": "1QFBcz79RqXUAkEVlYOItt6VJIcf1Ppq6",
    },
    "tall_masks": {
        "ViT-B-32": "1jpqsurrAdD5bn9i7pRBsTq4E3ayPb0YK",
        "ViT-B-16": "1jYNsdeFz6vlwIl5s4T48zeTm7FdwTSL9",
        "ViT-L-14": "16GVDMhpScmM3zeyfubjmNRFLiFKkBE7p",
    },
}
MASK_TASK_COUNTS = (8, 14, 20)
STAGING = ".download"
ZEROSHOT_FILE = "MNISTVal/nonlinear_zeroshot.pt"
VERIFIED = ".verified.json"

_FINETUNED = re.compile(r"^(?P<ds>[A-Za-z0-9]+)Val/nonlinear_finetuned\.pt$")
_ZEROSHOT = re.compile(r"^(?P<ds>[A-Za-z0-9]+)Val/nonlinear_zeroshot\.pt$")
_HEAD = re.compile(r"^head_(?P<ds>[A-Za-z0-9]+)Val\.pt$")
_MASK = re.compile(r"^TALL_mask_\d+task[A-Za-z0-9_]*\.npy$")


def masks_location(model_location: str | Path) -> Path:
    """Where main.py reads masks (models.paths.mask_dir): 'checkpoints' -> 'tall_masks'."""
    return mask_dir(model_location)


def kind_root(kind: str, model: str, model_location: str | Path) -> Path:
    """The folder that receives files of ``kind`` for ``model``."""
    base = Path(model_location).expanduser() if kind == "checkpoints" else masks_location(model_location)
    return base / model


def _relative_target(parts: Sequence[str], kind: str) -> str | None:
    """Layout path (relative to the kind's model folder) of a released file, from its path after the model folder."""
    if not parts:
        return None
    name = parts[-1]
    if kind == "checkpoints":
        last_two = "/".join(parts[-2:])
        if len(parts) >= 2 and (_FINETUNED.match(last_two) or _ZEROSHOT.match(last_two)):
            return last_two
        if name in ("nonlinear_zeroshot.pt", "zeroshot.pt"):  # a shared zero-shot encoder outside a dataset folder
            return ZEROSHOT_FILE
        return name if _HEAD.match(name) else None
    return name if _MASK.match(name) else None


@dataclass
class Plan:
    """Released files to fetch: source path -> layout path (relative to the kind's model folder)."""

    model: str
    kind: str
    files: dict[str, str] = field(default_factory=dict)


def plan_from_listing(repo_files: Iterable[str], model: str, kind: str) -> Plan:
    """Match a repository listing to the layout; the model folder is matched case-insensitively
    (the hub stores ViT-B-16 under ``VIT-B-16``)."""
    _check_choice(model, kind)
    tops = {"single_task", "checkpoints"} if kind == "checkpoints" else {"tall_masks"}
    plan = Plan(model, kind)
    for path in repo_files:
        parts = PurePosixPath(path).parts
        lowered = [p.lower() for p in parts]
        if model.lower() not in lowered:
            continue
        where = lowered.index(model.lower())
        if not tops & set(lowered[:where]):
            continue
        rel = _relative_target(parts[where + 1 :], kind)
        if rel is not None:
            plan.files[path] = rel
    return plan


def expected_files(kind: str, datasets: Sequence[str] | None = None) -> list[str]:
    """Layout paths that must be present after a download of ``kind``."""
    if kind == "tall_masks":
        return [f"TALL_mask_{n}task.npy" for n in MASK_TASK_COUNTS]
    if datasets is None:
        from tallmasks.datasets import ALL_DATASETS

        datasets = ALL_DATASETS
    return [f"{name}Val/nonlinear_finetuned.pt" for name in datasets]


def verify_file(path: Path) -> None:
    """Load ``path`` in its released format without running pickle code; CheckpointError if it is bad."""
    name = path.name
    if name.endswith(".npy"):
        from tallmasks.io.released import load_released_masks

        load_released_masks(path)
    elif name.startswith("head_"):
        from tallmasks.models.heads import load_released_head

        load_released_head(path)
    else:
        from tallmasks.io.checkpoints import load_state_dict

        state = load_state_dict(path)
        if not any(key.startswith("model.") for key in state):
            raise CheckpointError(f"{path}: not an image-encoder state dict (no 'model.' keys)")


@dataclass
class Report:
    """Outcome of verification: layout paths present and loadable, missing, and corrupt (with reasons)."""

    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.corrupt


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, int(stat.st_mtime_ns)]


def _read_verified(root: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((root / VERIFIED).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verified(root: Path, verified: dict[str, list[int]]) -> None:
    from tallmasks.io.checkpoints import atomic_path

    with atomic_path(root / VERIFIED) as tmp:
        tmp.write_text(json.dumps(verified, indent=1, sort_keys=True))


def is_verified(root: Path, rel: str) -> bool:
    """True if ``root/rel`` was verified before and has not changed since."""
    path = root / rel
    return path.is_file() and _read_verified(root).get(rel) == _fingerprint(path)


def verify(root: str | Path, expected: Sequence[str], extra: Sequence[str] = (), remove_corrupt: bool = True) -> Report:
    """Check every expected (and extra, if present) layout file under ``root``; corrupt files are removed
    so that the next run fetches them again."""
    root = Path(root)
    verified = _read_verified(root)
    report = Report()
    names = list(dict.fromkeys([*expected, *extra]))
    for rel in names:
        path = root / rel
        if not path.is_file():
            if rel in expected:
                report.missing.append(rel)
            verified.pop(rel, None)
            continue
        if verified.get(rel) == _fingerprint(path):
            report.ok.append(rel)
            continue
        try:
            verify_file(path)
        except TallmasksError as exc:
            reason = str(exc).split(": ", 1)[-1]
            report.corrupt[rel] = reason
            verified.pop(rel, None)
            if remove_corrupt:
                path.unlink(missing_ok=True)
            continue
        verified[rel] = _fingerprint(path)
        report.ok.append(rel)
    if root.is_dir():
        _write_verified(root, verified)
    return report


def report_error(report: Report, root: Path, hint: str) -> CheckpointError:
    """One line naming missing and corrupt files."""
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} missing ({', '.join(report.missing)})")
    if report.corrupt:
        listed = "; ".join(f"{rel}: {why}" for rel, why in report.corrupt.items())
        parts.append(f"{len(report.corrupt)} corrupt and removed ({listed})")
    return CheckpointError(f"{root}: {', '.join(parts)}; {hint}")


def explain_network_error(
    exc: BaseException, source: str, model: str = "", kind: str = "", staging: Path | None = None, repo: str = HF_REPO
) -> str:
    """A one-line, actionable message for a failed download (from ``repo`` on the hub, or Google Drive)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc)
    folder = GDRIVE_FOLDERS.get(kind, {}).get(model, "")
    manual = f" into {staging}" if staging else ""
    if source == "gdrive":
        lowered = text.lower()
        if "too many users" in lowered or "quota" in lowered or "many accesses" in lowered or "public link" in lowered:
            return (
                f"Google Drive refused the download (quota exceeded or too many accesses); wait and rerun to resume, "
                f"download https://drive.google.com/drive/folders/{folder} manually{manual}, or use --source=hf"
            )
    network = {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
        "Timeout",
        "NetworkError",
        "ProxyError",
        "SSLError",
        "MaxRetryError",
        "NewConnectionError",
        "gaierror",
    }
    if names & network or isinstance(exc, (ConnectionError, TimeoutError)):
        if source == "hf":
            return (
                "cannot reach the Hugging Face hub (huggingface.co); check the network, proxy or HF_HUB_OFFLINE/"
                "HF_ENDPOINT, then rerun (partial downloads resume)" + (", or use --source=gdrive" if repo == HF_REPO else "")
            )
        return "cannot reach Google Drive; check the network or proxy, then rerun (partial downloads resume), or use --source=hf"
    if names & {"RepositoryNotFoundError", "GatedRepoError"}:
        return f"the Hugging Face repository {repo} is not accessible ({_first_line(exc)}); check HF_ENDPOINT/token"
    if names & {"RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return f"a file is missing on the Hugging Face hub ({_first_line(exc)})"
    return f"{source} download failed: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_choice(model: str, kind: str, source: str = "hf") -> None:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; released files exist for {', '.join(MODELS)}")
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")


def place(staged: Path, root: Path, files: dict[str, str]) -> list[str]:
    """Put staged files (source path -> layout path) into ``root``, hard-linked so that the staging folder
    still lets the downloader resume; returns the layout paths placed."""
    placed = []
    for src_rel, rel in files.items():
        src = staged / src_rel
        if not src.is_file() or is_verified(root, rel):
            continue
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(src, target)
        except OSError:
            os.replace(src, target)
        placed.append(rel)
    return placed


def plan_from_folder(folder: Path, model: str, kind: str) -> Plan:
    """Match files found under a downloaded folder (gdown output) to the layout."""
    plan = Plan(model, kind)
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.endswith(".part"):
            continue
        rel_parts = path.relative_to(folder).parts
        target = _relative_target(rel_parts, kind)
        if target is not None:
            plan.files["/".join(rel_parts)] = target
    return plan


def _fetch_hf(model: str, kind: str, root: Path, staged: Path) -> Plan:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(HF_REPO)
    plan = plan_from_listing(files, model, kind)
    if not plan.files:
        raise CheckpointError(f"{HF_REPO}: no {kind} files for {model} in the repository listing")
    todo = [src for src, rel in plan.files.items() if not is_verified(root, rel)]
    if todo:
        log.info("fetching %d files of %s/%s from %s", len(todo), kind, model, HF_REPO)
        snapshot_download(repo_id=HF_REPO, allow_patterns=todo, local_dir=str(staged))
    return plan


def _fetch_gdrive(model: str, kind: str, root: Path, staged: Path) -> Plan:
    import gdown

    folder_id = GDRIVE_FOLDERS[kind][model]
    gdown.download_folder(id=folder_id, output=str(staged), quiet=False, resume=True)
    return plan_from_folder(staged, model, kind)


def download(model: str, kind: str, source: str = "hf", model_location: str | Path = "models/checkpoints") -> Report:
    """Fetch, place and verify the released ``kind`` files of ``model``; raises a one-line error if incomplete."""
    _check_choice(model, kind, source)
    root = kind_root(kind, model, model_location)
    check_output(root, folder=True, label="--model-location")  # writable before anything is fetched
    expected = expected_files(kind)
    if source == "gdrive" and root.is_dir() and verify(root, expected).complete:
        log.info("%s %s: every expected file is already present and verified under %s", model, kind, root)
        return verify(root, expected, extra=_present_layout_files(root, kind))
    staged = root / STAGING / source
    try:
        plan = _fetch_hf(model, kind, root, staged) if source == "hf" else _fetch_gdrive(model, kind, root, staged)
    except TallmasksError:
        raise
    except Exception as exc:  # network, hub and gdown errors of many types
        _remove_empty_dirs(root)
        raise TallmasksError(explain_network_error(exc, source, model, kind, staged)) from None
    placed = place(staged, root, plan.files)
    log.info("placed %d files under %s", len(placed), root)
    report = verify(root, expected, extra=sorted(set(plan.files.values())))
    if not report.complete:
        raise report_error(report, root, "rerun the same command to fetch them again")
    shutil.rmtree(root / STAGING, ignore_errors=True)
    if kind == "checkpoints" and not (root / ZEROSHOT_FILE).is_file():
        log.warning(
            "%s is not among the released files; main.py needs it: run finetune.py, or save the open_clip encoder "
            "with tallmasks.models.save_zeroshot_encoder(%r, %r)",
            root / ZEROSHOT_FILE,
            model,
            str(model_location),
        )
    log.info("%s %s: %d files verified under %s", model, kind, len(report.ok), root)
    return report


def _remove_empty_dirs(root: Path) -> None:
    """Drop staging folders left empty by a failed first attempt (partial files are kept to resume)."""
    for folder in (root / STAGING / "hf", root / STAGING / "gdrive", root / STAGING, root):
        try:
            folder.rmdir()
        except OSError:
            pass


def _present_layout_files(root: Path, kind: str) -> list[str]:
    return sorted(plan_from_folder(root, "", kind).files.values()) if root.is_dir() else []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="download_checkpoints.py",
        description="Download the paper's released fine-tuned checkpoints, heads or TALL masks and verify them.",
    )
    parser.add_argument("--model", required=True, help=f"one of {', '.join(MODELS)}")
    parser.add_argument("--kind", required=True, help="checkpoints (fine-tuned encoders and heads) or tall_masks")
    parser.add_argument("--source", default="hf", help="hf (Hugging Face hub, default) or gdrive (Google Drive)")
    parser.add_argument(
        "--model-location",
        default="models/checkpoints",
        help="checkpoint root; masks go to the same path with 'checkpoints' replaced by 'tall_masks'",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of download_checkpoints.py: errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = download(args.model, args.kind, args.source, args.model_location)
    except TallmasksError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("done: %d files present and loadable", len(report.ok))
    return 0
