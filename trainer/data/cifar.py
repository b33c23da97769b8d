"""CIFAR-100 in its official format: reading the pickles (validated) and downloading them once per node."""

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


def read_split(path: Path) -> Split:
    """One CIFAR-100 pickle (`train` or `test`), validated; every error names the file."""
    if not path.is_file():
        raise DataError(f"{path} is missing: --data_dir must hold {CIFAR_FOLDER}/train, test and meta")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = entry[b"data"], entry[b"fine_labels"]
    except Exception as error:  # truncated, not a pickle, or missing keys: all the same to the user
        raise DataError(f"{path} is not a CIFAR-100 pickle ({type(error).__name__}: {error})") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):  # int64 would truncate 3.7 to 3 silently
        raise DataError(f"{path}: fine_labels must be integers, got {labels.dtype} values such as {labels.flat[0]}")
    labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if data.shape[0] == 0:
        raise DataError(f"{path} holds no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{path}: fine_labels must lie in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images=images, labels=torch.from_numpy(labels))


def read_class_names(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            names = pickle.load(f, encoding="bytes")[b"fine_label_names"]
    except Exception as error:
        raise DataError(f"{path} is not the CIFAR-100 meta pickle ({type(error).__name__}: {error})") from None
    if len(names) != NUM_CLASSES:
        raise DataError(f"{path}: expected {NUM_CLASSES} fine_label_names, got {len(names)}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def ensure_downloaded(data_dir: str, download: bool) -> Path:
    """The `cifar-100-python` folder, downloading the official archive when it is missing.

    Call on one process per node (the others wait): the archive is unpacked in a private temporary
    folder and moved into place with one rename, so nodes sharing a file system cannot see or
    produce a half-unpacked folder.
    """
    root = Path(data_dir)
    folder = root / CIFAR_FOLDER
    if folder.is_dir():
        return folder
    expected = f"expected {folder}/{{train,test,meta}}"
    if not download:
        raise DataError(f"CIFAR-100 not found: {expected} under --data_dir, or drop --no-download")
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
        raise DataError(f"CIFAR-100 is not in --data_dir {root}, which cannot be written to download it "
                        f"({error.strerror}: {error.filename})") from None
    try:
        from torchvision.datasets import CIFAR100
        CIFAR100(root=str(staging), train=True, download=True)
        try:
            os.rename(staging / CIFAR_FOLDER, folder)
        except OSError:
            if not folder.is_dir():  # another node's rename won the race: theirs is as good as ours
                raise
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        for made in created:  # innermost first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise DataError(f"CIFAR-100 is not in --data_dir {root} and could not be downloaded "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"{expected}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_cifar100(folder: Path) -> tuple[Split, Split, list[str]]:
    train, test = read_split(folder / "train"), read_split(folder / "test")
    if len(test.labels) > len(train.labels):  # CIFAR-100 holds 50,000 train and 10,000 test images
        raise DataError(f"{folder / 'test'} holds more images ({len(test.labels)}) than {folder / 'train'} "
                        f"({len(train.labels)}): are the two files swapped?")
    return train, test, read_class_names(folder / "meta")
