"""Put the paper's datasets under a data location in the layout the loaders read.

Datasets that torchvision or Hugging Face can fetch are downloaded; DTD is downloaded and arranged into
class folders; SUN397 is arranged from a local copy; Cars, EuroSAT and RESISC45 need manual steps, which
the raised error states. Usage: ``python -m tallmasks.datasets.preparation NAME [NAME ...] --root DIR``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from tallmasks.core.errors import DatasetMissingError, TallmasksError, one_line
from tallmasks.core.progress import progress
from tallmasks.datasets.paper import FER2013_HF_ID, PAPER_DATASETS, how_to_prepare
from tallmasks.datasets.registry import canonical_name, load_split
from tallmasks.io.guard import check_output

logger = logging.getLogger(__name__)

# torchvision class name, sub-folder of root, and the constructor keywords of each of the two parts.
_TORCHVISION: dict[str, tuple[str, str, list[dict[str, object]]]] = {
    "GTSRB": ("GTSRB", "", [{"split": "train"}, {"split": "test"}]),
    "MNIST": ("MNIST", "", [{"train": True}, {"train": False}]),
    "SVHN": ("SVHN", "svhn", [{"split": "train"}, {"split": "test"}]),
    "STL10": ("STL10", "stl10", [{"split": "train"}, {"split": "test"}]),
    "OxfordIIITPet": ("OxfordIIITPet", "OxfordIIITPet", [{"split": "trainval"}, {"split": "test"}]),
    "Flowers102": ("Flowers102", "flowers102", [{"split": "train"}, {"split": "test"}]),
    "CIFAR100": ("CIFAR100", "", [{"train": True}, {"train": False}]),
    "PCAM": ("PCAM", "PCAM", [{"split": "train"}, {"split": "test"}]),
    "CIFAR10": ("CIFAR10", "", [{"train": True}, {"train": False}]),
    "Food101": ("Food101", "food101", [{"split": "train"}, {"split": "test"}]),
    "FashionMNIST": ("FashionMNIST", "FashionMNIST", [{"train": True}, {"train": False}]),
    "RenderedSST2": ("RenderedSST2", "RenderedSST2", [{"split": "train"}, {"split": "test"}]),
    "EMNIST": ("EMNIST", "EMNIST", [{"split": "digits", "train": True}, {"split": "digits", "train": False}]),
    "KMNIST": ("KMNIST", "KMNIST", [{"train": True}, {"train": False}]),
}


def is_prepared(name: str, root: str | Path) -> bool:
    """Whether the train and test splits of ``name`` load from ``root``."""
    try:
        load_split(name, "test", root)
        load_split(name, "train", root)
    except DatasetMissingError:
        return False
    return True


def prepare(name: str, root: str | Path, source: str | Path | None = None) -> Path:
    """Download or arrange dataset ``name`` under ``root``; returns ``root``.

    ``source``: an already unpacked copy to arrange from (DTD: the folder holding images/ and labels/;
    SUN397: the folder holding the class letter folders, with Training_01.txt and Testing_01.txt in it
    or in its Partitions/ sub-folder). Datasets that need manual steps raise DatasetMissingError saying them.
    """
    name = canonical_name(name)
    root = Path(root).expanduser()
    if name not in PAPER_DATASETS:
        logger.info("%s needs no preparation (its data is built in)", name)
        return root
    check_output(root, folder=True, label="--root")
    if source is None and is_prepared(name, root):
        logger.info("%s is already prepared under %s", name, root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    if name in _TORCHVISION:
        _download_torchvision(name, root)
    elif name == "FER2013":
        _download_fer2013(root)
    elif name == "DTD":
        arrange_dtd(Path(source).expanduser() if source else _download_dtd(root), root)
    elif name == "SUN397":
        if source is None:
            raise _manual("SUN397", root)
        arrange_sun397(Path(source).expanduser(), root)
    else:
        raise _manual(name, root)
    logger.info("%s prepared under %s", name, root)
    return root


def _manual(name: str, root: Path) -> DatasetMissingError:
    location = root / PAPER_DATASETS[name].location
    return DatasetMissingError(f"{name}: cannot be downloaded automatically; expected at {location}; {how_to_prepare(name, root)}")


def _download_torchvision(name: str, root: Path) -> None:
    import torchvision.datasets

    cls_name, subdir, parts = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    location = root / subdir if subdir else root
    for kwargs in parts:
        try:
            cls(str(location), download=True, **kwargs)
        except ImportError as exc:
            raise DatasetMissingError(f"{name}: needs the Python package {exc.name!r} (pip install it)") from exc
        except (RuntimeError, OSError) as exc:
            raise DatasetMissingError(f"{name}: download into {location} failed: {one_line(exc)}") from exc


def _download_fer2013(root: Path) -> None:
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise DatasetMissingError("FER2013: needs the Hugging Face 'datasets' package (pip install datasets)") from exc
    for part in ("train", "test"):
        target = root / "FER2013" / part
        try:
            rows = hf_datasets.load_dataset(FER2013_HF_ID, split=part)
        except Exception as exc:  # the hub client raises many kinds of errors
            raise DatasetMissingError(f"FER2013: download of {FER2013_HF_ID} failed: {one_line(exc)}") from exc
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        rows.save_to_disk(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)


def _download_dtd(root: Path) -> Path:
    import torchvision.datasets

    try:
        torchvision.datasets.DTD(str(root), split="train", partition=1, download=True)
    except (RuntimeError, OSError) as exc:
        raise DatasetMissingError(f"DTD: download into {root / 'dtd'} failed: {one_line(exc)}") from exc
    return root / "dtd" / "dtd"


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy when linking is impossible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _arrange(entries: Iterable[tuple[Path, Path]], desc: str) -> int:
    count = 0
    for src, dst in progress(list(entries), desc=desc, unit="img", leave=False):
        if not src.is_file():
            raise DatasetMissingError(f"{desc}: listed image {src} does not exist")
        _place(src, dst)
        count += 1
    return count


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetMissingError(f"split list {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def arrange_dtd(source: Path, root: Path, partition: int = 1) -> tuple[int, int]:
    """Arrange unpacked dtd-r1.0.1 (``source``/images, ``source``/labels) into root/dtd/{train,val}/<class>/.

    train = official train + val lists of ``partition``, val (used as the test set) = its test list.
    Returns the number of (train, val) images.
    """
    labels, images = source / "labels", source / "images"
    counts = []
    for folder, lists in (("train", ("train", "val")), ("val", ("test",))):
        entries = []
        for list_name in lists:
            for rel in _read_list(labels / f"{list_name}{partition}.txt"):
                cls, file_name = rel.split("/")
                entries.append((images / cls / file_name, root / "dtd" / folder / cls / file_name))
        counts.append(_arrange(entries, f"DTD {folder}"))
    return counts[0], counts[1]


def sun397_folder(relative: str) -> str:
    """Class folder name for a SUN397 image path such as "/a/apartment_building/outdoor/sun_x.jpg"."""
    parts = [p for p in relative.strip().split("/") if p][:-1]
    return "_".join(parts)


def arrange_sun397(source: Path, root: Path) -> tuple[int, int]:
    """Arrange an unpacked SUN397 (``source``/a/abbey/...) into root/sun397/{train,val}/<letter_class>/.

    train = Training_01.txt, val (used as the test set) = Testing_01.txt. Returns the image counts.
    """
    partitions = source / "Partitions" if (source / "Partitions").is_dir() else source
    counts = []
    for folder, list_name in (("train", "Training_01.txt"), ("val", "Testing_01.txt")):
        entries = [
            (source / rel.lstrip("/"), root / "sun397" / folder / sun397_folder(rel) / Path(rel).name)
            for rel in _read_list(partitions / list_name)
        ]
        counts.append(_arrange(entries, f"SUN397 {folder}"))
    return counts[0], counts[1]


def main(argv: list[str] | None = None) -> int:
    """Command line: prepare the named datasets under --root."""
    parser = argparse.ArgumentParser(prog="python -m tallmasks.datasets.preparation", description=__doc__)
    parser.add_argument("names", nargs="+", help="dataset names, e.g. MNIST SVHN (or 'all')")
    parser.add_argument("--root", default="~/data", help="data location (default: ~/data)")
    parser.add_argument("--source", default=None, help="unpacked copy to arrange from (DTD, SUN397)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(PAPER_DATASETS) if args.names == ["all"] else args.names
    failures = 0
    for name in names:
        try:
            prepare(name, args.root, source=args.source)
        except TallmasksError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
