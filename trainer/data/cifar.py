"""CIFAR-100 and CIFAR-10 in their official formats: reading the pickles (validated) and downloading them once per
node."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

CIFAR_FOLDER = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarFormat:
    """Where one of the two official CIFAR archives keeps what (torchvision's CIFAR10/CIFAR100 read the same)."""
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    torchvision_class: str


CIFAR100 = CifarFormat("CIFAR-100", CIFAR_FOLDER, ("train",), ("test",), "meta", b"fine_labels",
                       b"fine_label_names", NUM_CLASSES, "CIFAR100")
CIFAR10 = CifarFormat("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                      ("test_batch",), "batches.meta", b"labels", b"label_names", 10, "CIFAR10")
# The official fine label names, in label order (the `fine_label_names` of CIFAR-100's `meta` pickle): for
# exports whose run's data folder is no longer at hand.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)


class DataError(UserError, RuntimeError):
    """A data problem the user can fix (see UserError)."""


# --- reading and downloading --------------------------------------------------------------------

@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)


def read_split(path: Path, fmt: CifarFormat = CIFAR100) -> Split:
    """One CIFAR pickle (CIFAR-100's `train` or `test`, CIFAR-10's `data_batch_N` or `test_batch`), validated;
    every error names the file."""
    if not path.is_file():
        files = ", ".join(fmt.train_files + fmt.test_files + (fmt.meta_file,))
        raise DataError(f"{path} is missing: --data_dir must hold {fmt.folder}/ with {files}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = entry[b"data"], entry[fmt.label_key]
    except Exception as error:  # truncated, not a pickle, or missing keys: all the same to the user
        raise DataError(f"{path} is not a {fmt.title} pickle ({type(error).__name__}: {error})") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):  # int64 would truncate 3.7 to 3 silently
        raise DataError(f"{path}: {fmt.label_key.decode()} must be integers, got {labels.dtype} values such as "
                        f"{labels.flat[0]}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if data.shape[0] == 0:
        raise DataError(f"{path} holds no images")
    if labels.min() < 0 or labels.max() >= fmt.num_classes:
        raise DataError(f"{path}: {fmt.label_key.decode()} must lie in [0, {fmt.num_classes}), got "
                        f"[{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images=images, labels=torch.from_numpy(labels))


def read_class_names(path: Path, fmt: CifarFormat = CIFAR100) -> list[str]:
    try:
        with open(path, "rb") as f:
            names = pickle.load(f, encoding="bytes")[fmt.names_key]
    except Exception as error:
        raise DataError(f"{path} is not the {fmt.title} meta pickle ({type(error).__name__}: {error})") from None
    if len(names) != fmt.num_classes:
        raise DataError(f"{path}: expected {fmt.num_classes} {fmt.names_key.decode()}, got {len(names)}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def ensure_downloaded(data_dir: str, download: bool, fmt: CifarFormat = CIFAR100) -> Path:
    """The `cifar-100-python` (or CIFAR-10's `cifar-10-batches-py`) folder, downloading the official archive when
    it is missing.

    Call on one process per node (the others wait): the archive is unpacked in a private temporary
    folder and moved into place with one rename, so nodes sharing a file system cannot see or
    produce a half-unpacked folder.
    """
    root = Path(data_dir)
    folder = root / fmt.folder
    if folder.is_dir():
        return folder
    expected = f"expected {folder}/{{{','.join(fmt.train_files + fmt.test_files + (fmt.meta_file,))}}}"
    if not download:
        raise DataError(f"{fmt.title} not found: {expected} under --data_dir, or drop --no-download")
    if root.exists() and not root.is_dir():
        raise DataError(f"--data_dir {root} is a file, not a folder")
    # The folders made here are removed again if the download fails (those still empty: another node may be
    # downloading into the same ones).
    created = []  # innermost first
    for made in (root, *root.parents):
        if made.exists():
            break
        created.append(made)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".download-{socket.gethostname()}-", dir=root))
    except OSError as error:
        raise DataError(f"{fmt.title} is not in --data_dir {root}, which cannot be written to download it "
                        f"({error.strerror}: {error.filename})") from None
    try:
        import torchvision.datasets
        getattr(torchvision.datasets, fmt.torchvision_class)(root=str(staging), train=True, download=True)
        try:
            os.rename(staging / fmt.folder, folder)
        except OSError:
            if not folder.is_dir():  # another node's rename won the race: theirs is as good as ours
                raise
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        for made in created:  # innermost first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise DataError(f"{fmt.title} is not in --data_dir {root} and could not be downloaded "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"{expected}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_files(folder: Path, names: tuple[str, ...], fmt: CifarFormat) -> Split:
    splits = [read_split(folder / name, fmt) for name in names]
    if len(splits) == 1:
        return splits[0]
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def load_cifar(folder: Path, fmt: CifarFormat = CIFAR100) -> tuple[Split, Split, list[str]]:
    train, test = read_files(folder, fmt.train_files, fmt), read_files(folder, fmt.test_files, fmt)
    if len(test.labels) > len(train.labels):  # CIFAR holds 50,000 train and 10,000 test images
        trained = folder / fmt.train_files[0] if len(fmt.train_files) == 1 else f"{folder}/data_batch_*"
        raise DataError(f"{folder / fmt.test_files[0]} holds more images ({len(test.labels)}) than {trained} "
                        f"({len(train.labels)}): are the two files swapped?")
    return train, test, read_class_names(folder / fmt.meta_file, fmt)


def load_cifar100(folder: Path) -> tuple[Split, Split, list[str]]:
    return load_cifar(folder, CIFAR100)


def cifar100_superclasses(folder: Path) -> tuple[list[int], list[str]]:
    """Each fine class's superclass (from the test pickle's `coarse_labels`; -1 for a class absent from the test
    set) and the superclass names (the `meta` pickle's `coarse_label_names`, else their numbers)."""
    with open(folder / "test", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    coarse = [-1] * NUM_CLASSES
    for fine, superclass in zip(test[b"fine_labels"], test.get(b"coarse_labels", [])):
        coarse[fine] = int(superclass)
    with open(folder / "meta", "rb") as f:
        names = pickle.load(f, encoding="bytes").get(b"coarse_label_names") or range(20)
    return coarse, [n.decode() if isinstance(n, bytes) else str(n) for n in names]
