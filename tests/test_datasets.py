"""Datasets: specs, Val split, loaders on tiny trees written here, preparation helpers. Offline."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tallmasks.datasets as ds
from tallmasks.core.errors import ConfigError, DatasetMissingError, TallmasksError
from tallmasks.datasets import classnames as cn
from tallmasks.datasets import preparation, registry

EXPECTED_CLASSES = {
    "Cars": 196,
    "DTD": 47,
    "EuroSAT": 10,
    "GTSRB": 43,
    "MNIST": 10,
    "RESISC45": 45,
    "SVHN": 10,
    "SUN397": 397,
    "STL10": 10,
    "OxfordIIITPet": 37,
    "Flowers102": 102,
    "CIFAR100": 100,
    "PCAM": 2,
    "FER2013": 7,
    "CIFAR10": 10,
    "Food101": 101,
    "FashionMNIST": 10,
    "RenderedSST2": 2,
    "EMNIST": 10,
    "KMNIST": 10,
}


def _write_image(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (6, 5)
    color = (value % 256, (value * 7) % 256, 3) if mode == "RGB" else value % 256
    Image.new(mode, size, color).save(path)


def _pixel(image: Image.Image) -> int:
    return image.getpixel((0, 0))[0]


# ----------------------------------------------------------------------------------------------- specs


def test_all_datasets_in_paper_order() -> None:
    assert ds.ALL_DATASETS == list(EXPECTED_CLASSES)


@pytest.mark.parametrize("name,count", list(EXPECTED_CLASSES.items()))
def test_class_counts_and_templates(name: str, count: int) -> None:
    spec = ds.get_spec(name)
    assert spec.name == name
    assert len(spec.classnames) == count == spec.num_classes
    assert len(set(spec.classnames)) == count
    assert spec.templates
    for template in spec.templates:
        prompt = template(spec.classnames[0])
        assert isinstance(prompt, str) and spec.classnames[0] in prompt


def test_spec_details_follow_the_paper() -> None:
    assert ds.get_spec("MNISTVal") is ds.get_spec("MNIST")
    assert ds.get_spec("mnist").name == "MNIST"
    assert ds.get_spec("EuroSAT").classnames[2] == "brushland or shrubland"
    assert ds.get_spec("SUN397").classnames[8] == "apartment building outdoor"
    assert ds.get_spec("RESISC45").classnames[2] == "baseball diamond"
    assert ds.get_spec("Food101").classnames[0] == "apple_pie"
    assert ds.get_spec("FER2013").templates[0](ds.get_spec("FER2013").classnames[3]) == ("a photo of a ['happy', 'smiling'] looking face.")
    assert ds.get_spec("GTSRB").templates[0]("stop") == 'a zoomed in photo of a "stop" traffic sign.'
    assert len(ds.get_spec("CIFAR10").templates) == 18
    assert len(ds.get_spec("RESISC45").templates) == 18
    assert ds.get_spec("RESISC45").templates[6]("x") == "satellite imagery of a x."
    # class folders of SUN397 sort in the same order as the names
    folders = [c[0] + "_" + c.replace(" ", "_") for c in cn.SUN397]
    assert folders == sorted(folders)


def test_templates_pickle() -> None:
    templates = ds.get_spec("DTD").templates
    assert [t("x") for t in pickle.loads(pickle.dumps(templates))] == [t("x") for t in templates]


def test_unknown_dataset_is_config_and_missing_error() -> None:
    with pytest.raises(ConfigError, match="Nope"):
        ds.get_spec("Nope")
    with pytest.raises(DatasetMissingError):
        ds.get_spec("NopeVal")
    with pytest.raises(ConfigError, match="split"):
        ds.load_split("MNIST", "validation", "/nonexistent")


# --------------------------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("k", [8, 14, 20])
def test_resolve_num_tasks(k: int) -> None:
    assert ds.resolve_datasets(num_tasks=k) == ds.ALL_DATASETS[:k]


def test_resolve_names_and_errors() -> None:
    assert ds.resolve_datasets() == ds.ALL_DATASETS
    assert ds.resolve_datasets(names=["MNISTVal", "cars"]) == ["MNIST", "Cars"]
    assert ds.resolve_datasets(num_tasks=8, names=["SVHN"]) == ["SVHN"]
    assert ds.resolve_datasets(num_tasks=8, names=[]) == ds.ALL_DATASETS[:8]
    with pytest.raises(ConfigError, match="ImageNet"):
        ds.resolve_datasets(names=["MNIST", "ImageNet"])
    with pytest.raises(ConfigError, match="twice"):
        ds.resolve_datasets(names=["MNIST", "MNISTVal"])
    for bad in (0, 21, -1, True, 2.5):
        with pytest.raises(ConfigError, match="num_tasks"):
            ds.resolve_datasets(num_tasks=bad)  # type: ignore[arg-type]
    assert ds.resolve_datasets(names="MNIST, SVHNVal") == ["MNIST", "SVHN"]
    assert ds.resolve_datasets(num_tasks=14, names="") == ds.ALL_DATASETS[:14]
    assert ds.resolve_datasets(num_tasks=np.int64(8)) == ds.ALL_DATASETS[:8]


# ------------------------------------------------------------------------------------------- val split


def test_mnist_fingerprint() -> None:
    train, val = ds.val_split_indices(60000)
    assert len(train) == 55000 and len(val) == 5000
    assert train[0] == 36044
    assert val[:3] == [30102, 43764, 35133]


@pytest.mark.parametrize("n,v", [(10, 1), (99, 9), (1020, 102), (26640, 2664), (50000, 5000), (262144, 5000)])
def test_val_split_sizes_disjoint_deterministic(n: int, v: int) -> None:
    assert ds.val_size(n) == v
    train, val = ds.val_split_indices(n)
    assert (len(train), len(val)) == (n - v, v)
    assert sorted(train + val) == list(range(n))
    assert ds.val_split_indices(n) == (train, val)
    # identical to random_split applied to a dataset of that length
    reference = torch.utils.data.random_split(list(range(n)), [n - v, v], generator=torch.Generator().manual_seed(0))
    assert [list(r.indices) for r in reference] == [train, val]


def test_val_split_too_small() -> None:
    with pytest.raises(DatasetMissingError, match="too small"):
        ds.val_split_indices(9)


# ---------------------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_dataset_error_names_dataset_and_path(name: str, split: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # no Hugging Face hub access for FER2013
    with pytest.raises(DatasetMissingError) as info:
        ds.load_split(name, split, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert str(tmp_path) in message
    assert "\n" not in message


# ------------------------------------------------------------------------------------- folder datasets


def _eurosat_tree(root: Path, per_class: dict[str, int], folders: list[str] | None = None) -> None:
    for split, count in per_class.items():
        for label, folder in enumerate(folders or cn.EUROSAT_FOLDERS):
            for i in range(count):
                _write_image(root / "EuroSAT_splits" / split / folder / f"{folder}_{i}.png", label)


def test_eurosat_uses_its_own_val_folder(tmp_path: Path) -> None:
    _eurosat_tree(tmp_path, {"train": 3, "val": 2, "test": 1})
    sizes = {split: len(ds.load_split("EuroSATVal", split, tmp_path)) for split in ds.SPLITS}
    assert sizes == {"train": 30, "val": 20, "test": 10}
    test = ds.load_split("EuroSAT", "test", tmp_path)
    for index in range(len(test)):
        image, label = test[index]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert type(label) is int
        assert _pixel(image) == label  # label order = sorted class folders = class-name order
    assert [test[i][1] for i in range(10)] == list(range(10))


def test_eurosat_wrong_class_folders(tmp_path: Path) -> None:
    folders = cn.EUROSAT_FOLDERS[:-1] + ["Glacier"]
    _eurosat_tree(tmp_path, {"test": 1}, folders)
    with pytest.raises(DatasetMissingError, match="EuroSAT: classes at .* 'Glacier'"):
        ds.load_split("EuroSAT", "test", tmp_path)


def _dtd_tree(root: Path) -> None:
    for label, name in enumerate(cn.DTD):
        _write_image(root / "dtd" / "train" / name / f"{name}_0001.png", label, mode="L")
        _write_image(root / "dtd" / "train" / name / f"{name}_0002.png", label + 100, mode="L")
        _write_image(root / "dtd" / "val" / name / f"{name}_0003.png", label, mode="L")


def test_dtd_train_folder_is_split_and_val_folder_is_test(tmp_path: Path) -> None:
    _dtd_tree(tmp_path)
    n = 2 * 47
    train = ds.load_split("DTD", "train", tmp_path)
    val = ds.load_split("DTDVal", "val", tmp_path)
    test = ds.load_split("DTD", "test", tmp_path)
    v = ds.val_size(n)
    assert (len(train), len(val), len(test)) == (n - v, v, 47)
    train_idx, val_idx = ds.val_split_indices(n)
    # base item i is class i // 2 (two images per class, sorted)
    assert [train[i][1] for i in range(len(train))] == [j // 2 for j in train_idx]
    assert [val[i][1] for i in range(len(val))] == [j // 2 for j in val_idx]
    image, label = val[0]
    assert image.mode == "RGB" and image.size == (6, 5)
    assert _pixel(image) % 100 == label
    assert [test[i][1] for i in range(47)] == list(range(47))


def test_loaded_splits_pickle(tmp_path: Path) -> None:
    _eurosat_tree(tmp_path, {"train": 1})
    _dtd_tree(tmp_path)
    for name in ("EuroSAT", "DTD"):
        split = ds.load_split(name, "train", tmp_path)
        copy = pickle.loads(pickle.dumps(split))
        assert len(copy) == len(split) and copy[3][1] == split[3][1]


def test_resisc45_reads_split_files(tmp_path: Path) -> None:
    base = tmp_path / "resisc45"
    train_names, test_names = [], []
    for label, folder in enumerate(cn.RESISC45_FOLDERS):
        for i in range(3):
            file_name = f"{folder}_{i:03d}.png"
            _write_image(base / "NWPU-RESISC45" / folder / file_name, label)
            (test_names if i == 2 else train_names).append(file_name)
    (base / "resisc45-train.txt").write_text("\n".join(train_names) + "\n")
    (base / "resisc45-test.txt").write_text("\n".join(test_names) + "\n")
    n = 90
    assert len(ds.load_split("RESISC45", "train", tmp_path)) == n - ds.val_size(n)
    assert len(ds.load_split("RESISC45", "val", tmp_path)) == ds.val_size(n)
    test = ds.load_split("RESISC45", "test", tmp_path)
    test = pickle.loads(pickle.dumps(test))  # data loader workers may need to pickle it
    assert len(test) == 45
    assert [test[i][1] for i in range(45)] == list(range(45))
    assert all(_pixel(test[i][0]) == test[i][1] for i in (0, 17, 44))


# ----------------------------------------------------------------------------------------------- MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # unsigned byte data
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_raw_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 7)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 255, size=(n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = labels * 20  # the label is readable from the image
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    train = ds.load_split("MNIST", "train", tmp_path)
    val = ds.load_split("MNISTVal", "val", tmp_path)
    test = ds.load_split("MNIST", "test", tmp_path)
    assert (len(train), len(val), len(test)) == (27, 3, 7)
    _, val_idx = ds.val_split_indices(30)
    assert [val[i][1] for i in range(3)] == [j % 10 for j in val_idx]
    image, label = test[5]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 5
    assert _pixel(image) == 100


# ------------------------------------------------------------------------------------------- registry


def test_register_dataset_and_demo_flag(tmp_path: Path) -> None:
    calls: list[tuple[str, Path]] = []

    def loader(split: str, root: Path) -> list[tuple[Image.Image, int]]:
        calls.append((split, root))
        return [(Image.new("RGB", (2, 2)), 0)]

    spec = ds.DatasetSpec("ToyTask", ["a", "b"], [lambda c: f"a {c}"])
    ds.register_dataset("ToyTask", spec, loader, demo=True)
    try:
        assert "ToyTask" in ds.registered_datasets(demo=True)
        assert "ToyTask" not in ds.registered_datasets(demo=False)
        assert ds.get_spec("ToyTaskVal") is spec
        assert len(ds.load_split("ToyTask", "val", tmp_path)) == 1
        assert calls == [("val", tmp_path)]
        assert ds.resolve_datasets(names=["ToyTask"]) == ["ToyTask"]
        with pytest.raises(ConfigError, match="already registered"):
            ds.register_dataset("ToyTask", spec, loader)
    finally:
        registry._REGISTRY.pop("ToyTask", None)
    with pytest.raises(ConfigError, match="differs"):
        ds.register_dataset("Other", spec, loader)
    with pytest.raises(ConfigError, match="Val"):
        ds.register_dataset("ToyVal", ds.DatasetSpec("ToyVal", ["a"], [str]), loader)


def test_demo_datasets_match_registry() -> None:
    assert ds.DEMO_DATASETS == ds.registered_datasets(demo=True)
    assert not set(ds.DEMO_DATASETS) & set(ds.ALL_DATASETS)


# ----------------------------------------------------------------------------------------- preparation


def test_prepare_manual_datasets_say_what_to_do(tmp_path: Path) -> None:
    for name, hint in (("Cars", "devkit"), ("EuroSAT", "21,600"), ("RESISC45", "resisc45-"), ("SUN397", "Training_01")):
        with pytest.raises(DatasetMissingError, match=hint) as info:
            ds.prepare(name, tmp_path)
        assert str(info.value).startswith(f"{name}: ") and str(tmp_path) in str(info.value)


def test_prepare_cli_reports_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert preparation.main(["Cars", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Cars: ") and err.count("\n") == 1


def test_arrange_dtd_from_official_lists(tmp_path: Path) -> None:
    source = tmp_path / "dtd-r1.0.1" / "dtd"
    lists: dict[str, list[str]] = {"train1": [], "val1": [], "test1": []}
    for label, name in enumerate(cn.DTD):
        for i, list_name in enumerate(("train1", "val1", "test1")):
            file_name = f"{name}_{i:04d}.jpg"
            _write_image(source / "images" / name / file_name, label)
            lists[list_name].append(f"{name}/{file_name}")
    (source / "labels").mkdir(parents=True)
    for list_name, lines in lists.items():
        (source / "labels" / f"{list_name}.txt").write_text("\n".join(lines) + "\n")
    root = tmp_path / "data"
    assert ds.prepare("DTD", root, source=source) == root
    assert preparation.is_prepared("DTD", root)
    n = 2 * 47
    assert len(ds.load_split("DTD", "train", root)) == n - ds.val_size(n)
    test = ds.load_split("DTD", "test", root)
    assert len(test) == 47 and [test[i][1] for i in range(47)] == list(range(47))


def test_arrange_sun397_from_partitions(tmp_path: Path) -> None:
    source = tmp_path / "SUN397"
    training, testing = [], []
    for label, name in enumerate(cn.SUN397):
        folder = name.replace(" ", "_")
        # nest the last word one level deeper for some classes, as the original tree does
        relative = f"/{folder[0]}/{folder}" if label % 2 else f"/{folder[0]}/" + "/".join(folder.rsplit("_", 1))
        for i, target in ((0, training), (1, testing)):
            path = source / relative.lstrip("/") / f"sun_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (3, 3), (label % 256, 0, 0)).save(path)
            target.append(f"{relative}/sun_{i}.jpg")
    (source / "Partitions").mkdir()
    (source / "Partitions" / "Training_01.txt").write_text("\n".join(training) + "\n")
    (source / "Partitions" / "Testing_01.txt").write_text("\n".join(testing) + "\n")
    assert preparation.sun397_folder("/a/apartment_building/outdoor/sun_x.jpg") == "a_apartment_building_outdoor"
    root = tmp_path / "data"
    ds.prepare("SUN397", root, source=source)
    test = ds.load_split("SUN397", "test", root)
    assert len(test) == 397
    assert [test[i][1] for i in (0, 8, 396)] == [0, 8, 396]
    assert len(ds.load_split("SUN397", "val", root)) == ds.val_size(397)


def test_errors_are_tallmasks_errors() -> None:
    assert issubclass(ds.UnknownDatasetError, TallmasksError)
