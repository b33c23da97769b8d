"""Which images a run trains and evaluates on (--data), read into one DataSet that the rest of the trainer takes
without knowing where it came from:

    cifar100 (the default)  CIFAR-100's pickles under --data_dir, downloaded when missing
    cifar10                 CIFAR-10's pickles under --data_dir, downloaded when missing
    imagefolder:PATH        PATH/train/<class>/*.png|jpg|..., PATH/val/<class>/... (torchvision's ImageFolder layout)
    hf:PATH_OR_NAME         a Hugging Face `datasets` data set: a save_to_disk folder, a folder load_dataset reads
                            (parquet, imagefolder, ...) or a name in the hub cache; an Image and a ClassLabel column

The spelling is parsed by config.data_source (no torch import); this module reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cifar import CIFAR10, CIFAR100, DataError, Split, cifar100_superclasses, ensure_downloaded, load_cifar
from ..config import data_source

CIFAR_FORMATS = {"cifar100": CIFAR100, "cifar10": CIFAR10}


@dataclass
class DataSet:
    spec: str               # --data as given
    title: str              # names the data set to a reader: "CIFAR-100", "image folder /data/pets", ...
    train: Split | None     # None when read for evaluation only
    test: Split
    class_names: list[str]
    train_source: str       # names the training images in messages ("/data/cifar-100-python/train", a folder)
    cifar100_folder: Path | None = None  # CIFAR-100's folder, which holds its 20 superclasses
    notes: list[str] = field(default_factory=list)  # what was done to the images, for the run's log

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def superclasses(self) -> tuple[list[int], list[str]] | None:
        """CIFAR-100's superclass of each class and their names (trainer.evaluate's grouping); None for other data."""
        return cifar100_superclasses(self.cifar100_folder) if self.cifar100_folder is not None else None

    @property
    def decoded(self) -> str:
        """`once` (the images are in memory: CIFAR's always) or `per_step` (images.ImageFiles)."""
        return "once" if isinstance(self.test.images, torch.Tensor) else "per_step"

    def describe(self) -> dict:
        """What config.json and each checkpoint record of the data."""
        return {"data": self.spec, "data_title": self.title, "num_classes": self.num_classes,
                "class_names": self.class_names, "decoded": self.decoded}


def load_data(spec: str, data_dir: str, image_size: int, fetch: bool, download: bool = True, decode: str = "auto",
              threads: int = 1, evaluation_only: bool = False) -> DataSet:
    """Read --data. `fetch`: this process downloads what is missing (one per node, the others wait for it, then
    read): CIFAR's archive, or a Hugging Face data set's conversion into the datasets cache. `decode` (own images
    only): once, per_step or auto (images.py), decoded by `threads` threads. `evaluation_only` (trainer.evaluate):
    own training images are not decoded (train is None); CIFAR's pickles are read whole, as they are checked."""
    kind, location = data_source(spec)
    if kind in CIFAR_FORMATS:
        fmt = CIFAR_FORMATS[kind]
        folder = ensure_downloaded(data_dir, download, fmt) if fetch else Path(data_dir) / fmt.folder
        train, test, names = load_cifar(folder, fmt)
        return DataSet(spec, fmt.title, train, test, names, str(folder / fmt.train_files[0]),
                       folder if fmt is CIFAR100 else None)
    from .images import read_hf_dataset, read_image_folder
    if kind == "imagefolder":
        own = read_image_folder(Path(location), image_size, decode, threads, evaluation_only)
        title, train_source = f"image folder {location}", str(Path(location) / "train")
    else:
        own = read_hf_dataset(location, image_size, decode, threads, evaluation_only)
        title = train_source = f"Hugging Face data set {location}"
    if len(own.class_names) < 2:
        raise DataError(f"--data {spec} has {len(own.class_names)} class(es); a classifier needs at least 2")
    return DataSet(spec, title, own.train, own.test, own.class_names, train_source, notes=own.notes)
