"""The paper's 20 datasets: specs and loaders reading the same on-disk layout as the paper's code.

Every path is relative to the data location ``root``. Nothing is downloaded here; see ``prepare``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from tallmasks.core.errors import DatasetMissingError
from tallmasks.datasets import classnames as cn
from tallmasks.datasets.registry import DatasetSpec, LabeledImages, register_dataset, val_split_loader
from tallmasks.datasets.templates import TEMPLATES

logger = logging.getLogger(__name__)

FER2013_HF_ID = "Jeneral/fer-2013"

_PREPARE_CMD = "python -m tallmasks.datasets.preparation {name} --root {root}"


@dataclass(frozen=True)
class PaperDataset:
    """Where a paper dataset lives under the data location and how to get it there."""

    name: str
    location: str  # path relative to root that the loader reads (shown in errors)
    downloadable: bool  # prepare() can fetch it (torchvision or Hugging Face)
    manual_steps: str = ""  # for the others: one sentence saying how to prepare it


PAPER_DATASETS: dict[str, PaperDataset] = {
    d.name: d
    for d in [
        PaperDataset(
            "Cars",
            "stanford_cars",
            False,
            "download the Stanford Cars images and devkit by hand (the official URL is gone; see pytorch/vision "
            "issue 7545) into stanford_cars/{cars_train,cars_test,devkit} plus "
            "stanford_cars/cars_test_annos_withlabels.mat",
        ),
        PaperDataset("DTD", "dtd", True),
        PaperDataset(
            "EuroSAT",
            "EuroSAT_splits",
            False,
            "split the RGB EuroSAT.zip at random into EuroSAT_splits/{train,val,test}/<class>/ with "
            "21,600/2,700/2,700 images (mlfoundations/task_vectors issue 1)",
        ),
        PaperDataset("GTSRB", "gtsrb", True),
        PaperDataset("MNIST", "MNIST", True),
        PaperDataset(
            "RESISC45",
            "resisc45",
            False,
            "unpack NWPU-RESISC45.rar into resisc45/NWPU-RESISC45/<class>/ and add resisc45/resisc45-"
            "{train,val,test}.txt (the Hugging Face dataset torchgeo/resisc45 carries these split files)",
        ),
        PaperDataset("SVHN", "svhn", True),
        PaperDataset(
            "SUN397",
            "sun397",
            False,
            "unpack SUN397.tar.gz and copy the Training_01 / Testing_01 partitions into sun397/train and "
            "sun397/val, one folder per class named like a_abbey or a_apartment_building_outdoor "
            "(mlfoundations/task_vectors issue 1)",
        ),
        PaperDataset("STL10", "stl10", True),
        PaperDataset("OxfordIIITPet", "OxfordIIITPet", True),
        PaperDataset("Flowers102", "flowers102", True),
        PaperDataset("CIFAR100", "cifar-100-python", True),
        PaperDataset("PCAM", "PCAM", True),
        PaperDataset("FER2013", "FER2013", True),
        PaperDataset("CIFAR10", "cifar-10-batches-py", True),
        PaperDataset("Food101", "food101", True),
        PaperDataset("FashionMNIST", "FashionMNIST", True),
        PaperDataset("RenderedSST2", "RenderedSST2", True),
        PaperDataset("EMNIST", "EMNIST", True),
        PaperDataset("KMNIST", "KMNIST", True),
    ]
}

PAPER_ORDER: list[str] = list(PAPER_DATASETS)


def how_to_prepare(name: str, root: Path | str) -> str:
    """One sentence saying how to put dataset ``name`` under ``root``."""
    info = PAPER_DATASETS[name]
    if info.downloadable:
        return "prepare it with `" + _PREPARE_CMD.format(name=name, root=root) + "`"
    return info.manual_steps


def missing(name: str, path: Path, root: Path) -> DatasetMissingError:
    """The error for dataset ``name`` not found at ``path``."""
    return DatasetMissingError(f"{name}: expected at {path}; {how_to_prepare(name, root)}")


def _mismatch(name: str, path: Path, found: list[str], expected: list[str]) -> DatasetMissingError:
    extra = [c for c in found if c not in expected]
    absent = [c for c in expected if c not in found]
    detail = f"unexpected {extra[0]!r}" if extra else (f"missing {absent[0]!r}" if absent else "different order")
    return DatasetMissingError(f"{name}: classes at {path} do not match the paper's {len(expected)} classes (found {len(found)}, {detail})")


def _check_classes(name: str, path: Path, found: list[str], expected: list[str]) -> None:
    if list(found) != list(expected):
        raise _mismatch(name, path, list(found), list(expected))


# --------------------------------------------------------------------------------------- folder datasets


def _image_folder(name: str, path: Path, root: Path, folder_to_class: Callable[[str], str], expected: list[str]) -> Any:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise missing(name, path, root)
    try:
        dataset = ImageFolder(str(path))
    except FileNotFoundError as exc:
        raise DatasetMissingError(f"{name}: no images found under {path}; {how_to_prepare(name, root)}") from exc
    _check_classes(name, path, [folder_to_class(c) for c in dataset.classes], expected)
    return dataset


def _spaces(folder: str) -> str:
    return folder.replace("_", " ")


def _dtd_base(part: str, root: Path) -> Dataset:
    path = root / "dtd" / ("train" if part == "train" else "val")
    return LabeledImages(_image_folder("DTD", path, root, _spaces, cn.DTD))


def _sun397_base(part: str, root: Path) -> Dataset:
    path = root / "sun397" / ("train" if part == "train" else "val")
    return LabeledImages(_image_folder("SUN397", path, root, lambda f: f[2:].replace("_", " "), cn.SUN397))


def _eurosat_loader(split: str, root: Path) -> Dataset:
    # EuroSAT has its own prepared val folder: "train" is the whole train folder.
    path = root / "EuroSAT_splits" / split
    return LabeledImages(_image_folder("EuroSAT", path, root, lambda f: f, cn.EUROSAT_FOLDERS))


def _resisc45_base(part: str, root: Path) -> Dataset:
    from torchvision.datasets import ImageFolder

    split_file = root / "resisc45" / f"resisc45-{part}.txt"
    images = root / "resisc45" / "NWPU-RESISC45"
    if not split_file.is_file():
        raise missing("RESISC45", split_file, root)
    if not images.is_dir():
        raise missing("RESISC45", images, root)
    wanted = {line.strip() for line in split_file.read_text().splitlines() if line.strip()}
    try:
        dataset = ImageFolder(str(images), is_valid_file=lambda p: Path(p).name in wanted)
    except FileNotFoundError as exc:
        raise DatasetMissingError(
            f"RESISC45: no images listed in {split_file} found under {images}; {how_to_prepare('RESISC45', root)}"
        ) from exc
    _check_classes("RESISC45", images, dataset.classes, cn.RESISC45_FOLDERS)
    return LabeledImages(dataset)


# ---------------------------------------------------------------------------------- torchvision datasets


def _torchvision_base(
    name: str,
    subdir: str,
    make: Callable[[str, str], Any],
    expected_at: str,
    classes: Callable[[Any], list[str]] | None = None,
    expected_classes: list[str] | None = None,
) -> Callable[[str, Path], Dataset]:
    """Base loader around a torchvision dataset built by ``make(location, part)`` with download off."""

    def load(part: str, root: Path) -> Dataset:
        location = root / subdir if subdir else root
        try:
            dataset = make(str(location), part)
        except ImportError as exc:
            raise DatasetMissingError(f"{name}: needs the Python package {exc.name!r} (pip install it)") from exc
        except (RuntimeError, OSError) as exc:
            raise missing(name, root / expected_at, root) from exc
        if classes is not None and expected_classes is not None:
            _check_classes(name, location, classes(dataset), expected_classes)
        return LabeledImages(dataset)

    return load


def _tv(cls_name: str) -> Any:
    import torchvision.datasets

    return getattr(torchvision.datasets, cls_name)


def _cars(location: str, part: str) -> Any:
    return _tv("StanfordCars")(location, split=part, download=False)


def _gtsrb(location: str, part: str) -> Any:
    return _tv("GTSRB")(location, split=part, download=False)


def _mnist_like(cls_name: str, **kwargs: Any) -> Callable[[str, str], Any]:
    def make(location: str, part: str) -> Any:
        return _tv(cls_name)(location, train=(part == "train"), download=False, **kwargs)

    return make


def _split_kw(cls_name: str, train_split: str = "train") -> Callable[[str, str], Any]:
    def make(location: str, part: str) -> Any:
        return _tv(cls_name)(location, split=(train_split if part == "train" else "test"), download=False)

    return make


class _FERImages(Dataset):
    """FER2013 rows from a Hugging Face dataset: grayscale face images, 7 emotion labels."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.rows[int(index)]
        # Decoded as grayscale first (as the paper did), then given three channels.
        image = Image.open(io.BytesIO(row["img_bytes"])).convert("L").convert("RGB")
        return image, int(row["labels"])


def _fer2013_base(part: str, root: Path) -> Dataset:
    local = root / "FER2013" / part
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise DatasetMissingError(
            f"FER2013: expected at {local} (or {FER2013_HF_ID} in the Hugging Face cache); reading it needs the "
            "Hugging Face 'datasets' package (pip install datasets)"
        ) from exc
    try:
        if local.is_dir():
            rows = hf_datasets.load_from_disk(str(local))
        else:
            rows = hf_datasets.load_dataset(FER2013_HF_ID, split=part)
    except Exception as exc:  # the hub client raises many kinds of errors when offline or not cached
        raise DatasetMissingError(
            f"FER2013: expected at {local} (or {FER2013_HF_ID} in the Hugging Face cache); {how_to_prepare('FER2013', root)}"
        ) from exc
    return _FERImages(rows)


def _classes_attr(dataset: Any) -> list[str]:
    return list(dataset.classes)


def _register_all() -> None:
    def spec(name: str, names: list[str]) -> DatasetSpec:
        return DatasetSpec(name=name, classnames=list(names), templates=list(TEMPLATES[name]))

    splitting = val_split_loader
    bases: dict[str, tuple[list[str], Callable[[str, Path], Dataset]]] = {
        "Cars": (
            cn.CARS,
            _torchvision_base("Cars", "", _cars, "stanford_cars", lambda d: [_spaces(c) for c in d.classes], cn.CARS),
        ),
        "DTD": (cn.DTD, _dtd_base),
        "GTSRB": (cn.GTSRB, _torchvision_base("GTSRB", "", _gtsrb, "gtsrb/GTSRB")),
        "MNIST": (cn.DIGITS, _torchvision_base("MNIST", "", _mnist_like("MNIST"), "MNIST/raw")),
        "RESISC45": (cn.RESISC45, _resisc45_base),
        "SVHN": (cn.DIGITS, _torchvision_base("SVHN", "svhn", _split_kw("SVHN"), "svhn")),
        "SUN397": (cn.SUN397, _sun397_base),
        "STL10": (
            cn.STL10,
            _torchvision_base("STL10", "stl10", _split_kw("STL10"), "stl10/stl10_binary", _classes_attr, cn.STL10),
        ),
        "OxfordIIITPet": (
            cn.OXFORD_PETS,
            _torchvision_base(
                "OxfordIIITPet",
                "OxfordIIITPet",
                _split_kw("OxfordIIITPet", train_split="trainval"),
                "OxfordIIITPet/oxford-iiit-pet",
            ),
        ),
        "Flowers102": (
            cn.FLOWERS102,
            _torchvision_base("Flowers102", "flowers102", _split_kw("Flowers102"), "flowers102/flowers-102"),
        ),
        "CIFAR100": (
            cn.CIFAR100,
            _torchvision_base("CIFAR100", "", _mnist_like("CIFAR100"), "cifar-100-python", _classes_attr, cn.CIFAR100),
        ),
        "PCAM": (cn.PCAM, _torchvision_base("PCAM", "PCAM", _split_kw("PCAM"), "PCAM/pcam")),
        "FER2013": (cn.FER2013, _fer2013_base),
        "CIFAR10": (
            cn.CIFAR10,
            _torchvision_base("CIFAR10", "", _mnist_like("CIFAR10"), "cifar-10-batches-py", _classes_attr, cn.CIFAR10),
        ),
        "Food101": (
            cn.FOOD101,
            _torchvision_base("Food101", "food101", _split_kw("Food101"), "food101/food-101", _classes_attr, cn.FOOD101),
        ),
        "FashionMNIST": (
            cn.FASHION_MNIST,
            _torchvision_base(
                "FashionMNIST",
                "FashionMNIST",
                _mnist_like("FashionMNIST"),
                "FashionMNIST/FashionMNIST/raw",
                _classes_attr,
                cn.FASHION_MNIST,
            ),
        ),
        "RenderedSST2": (
            cn.RENDERED_SST2,
            _torchvision_base(
                "RenderedSST2",
                "RenderedSST2",
                _split_kw("RenderedSST2"),
                "RenderedSST2/rendered-sst2",
                _classes_attr,
                cn.RENDERED_SST2,
            ),
        ),
        "EMNIST": (
            cn.DIGITS,
            _torchvision_base("EMNIST", "EMNIST", _mnist_like("EMNIST", split="digits"), "EMNIST/EMNIST/raw", _classes_attr, cn.DIGITS),
        ),
        "KMNIST": (
            cn.KMNIST,
            _torchvision_base("KMNIST", "KMNIST", _mnist_like("KMNIST"), "KMNIST/KMNIST/raw", _classes_attr, cn.KMNIST),
        ),
    }
    for name in PAPER_ORDER:
        if name == "EuroSAT":
            register_dataset(name, spec(name, cn.EUROSAT), _eurosat_loader)
            continue
        names, base = bases[name]
        register_dataset(name, spec(name, names), splitting(base))


_register_all()
