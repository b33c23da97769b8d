"""A user's own images: an image folder in torchvision's ImageFolder layout, or a Hugging Face `datasets` data set,
served to the trainer as CIFAR's pickles are (uint8 tensors of (3, image_size, image_size) indexed by the epoch
plan), so that every guarantee of the trainer (the plan, exact resume, the same weights on any topology) holds
for them unchanged.

Each image is decoded with PIL, converted to RGB (as timm's and torchvision's loaders do: grey is repeated, CMYK
converted, an alpha channel dropped; the conversions are counted and reported), its shorter side resized to
--image_size (bilinear, PIL's antialiased resize, torchvision's `resize`) and its centre cropped to a square
(torchvision's `center_crop`). An image already of that size is kept pixel for pixel.

--decode once decodes every image at the start into memory (refused, naming the memory, when they would not fit);
--decode per_step keeps the files (or rows) and decodes each step's images as the step is prepared, by the
--num_workers DataLoader processes (ImageFiles stands in for the tensor); auto is once when they fit, else
per_step. Either way every image is decoded once before training (by --num_workers threads), so a file that
cannot be decoded, a label outside the classes or a validation class that training lacks stops the run before
its first step, in one line naming the file (or row).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

from .cifar import DataError, Split

# timm's ImageDataset and torchvision's ImageFolder name the validation folder either way.
VAL_FOLDERS = ("val", "validation", "test")
VAL_SPLITS = ("validation", "val", "test")
# 16-bit and 32-bit integer and float grey: Image.convert("RGB") clips their values to 0-255 instead of scaling
# them (a 16-bit scan becomes nearly all white), silently; refused, naming the file.
CLIPPED_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MODE_NAMES = {"L": "grey", "LA": "grey with alpha", "1": "black-and-white", "P": "palette", "RGBA": "RGBA",
              "CMYK": "CMYK", "I;16": "16-bit grey", "I": "32-bit grey", "F": "float grey", "YCbCr": "YCbCr"}


@dataclass
class OwnImages:
    """What read_image_folder and read_hf_dataset return; data/sources.py makes it a DataSet."""
    train: Split | None  # None when read for evaluation only
    test: Split
    class_names: list[str]
    notes: list[str]  # what was done to the images, for the run's log (conversions to RGB)


def decode(source, name: str, image_size: int) -> tuple[torch.Tensor, str]:
    """One image (a path or a file object) as uint8 (3, image_size, image_size), and the mode it was stored in;
    `name` names it in errors."""
    try:
        with Image.open(source) as image:
            image.load()  # decodes now: a truncated file fails here
            mode = image.mode
            if mode in CLIPPED_MODES:
                raise DataError(f"{name} is a {MODE_NAMES.get(mode, mode)} ({mode}) image, whose values PIL's "
                                f"conversion to RGB would clip to 0-255 rather than scale; save it as 8-bit")
            if mode != "RGB":
                image = image.convert("RGB")
            image = TF.center_crop(TF.resize(image, image_size, interpolation=TF.InterpolationMode.BILINEAR),
                                   image_size)
            return TF.pil_to_tensor(image), mode
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{name} is not a readable image ({type(error).__name__}: {error}); remove or replace "
                        f"it") from None


class FileList:
    """The images of an image folder split: (path, name) by index."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[object, str]:
        return self.paths[i], self.paths[i]


class RowList:
    """The images of a Hugging Face split, undecoded (datasets' Image(decode=False): bytes and/or a path): (file
    object or path, name) by index, read from the memory-mapped data set as they are asked for."""

    def __init__(self, split, column: str, where: str):
        self.split, self.column, self.where = split, column, where

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[object, str]:
        image = self.split[i][self.column]
        if not image or not (image.get("bytes") or image.get("path")):
            raise DataError(f"{self.where}, row {i} has no image; remove the row")
        name = f"{self.where}, row {i}" + (f" ({image['path']})" if image.get("path") else "")
        return (io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]), name


class ImageFiles:
    """What a Split holds in place of its uint8 tensor under --decode per_step: indexed like that tensor (an int,
    or a tensor of indices as the epoch plan gives them), it decodes the images asked for. TrainSteps and the
    evaluation's TensorDataset index it as they index a tensor; with --num_workers the DataLoader's processes
    decode the steps ahead."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, sources, image_size: int):
        self.sources, self.image_size = sources, image_size
        self.shape = torch.Size((len(sources), 3, image_size, image_size))

    def __len__(self) -> int:
        return len(self.sources)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return decode(*self.sources[int(index)], self.image_size)[0]
        indices = index.tolist()
        images = torch.empty(len(indices), 3, self.image_size, self.image_size, dtype=torch.uint8)
        for j, i in enumerate(indices):
            images[j] = decode(*self.sources[i], self.image_size)[0]
        return images


def decode_pass(sources, image_size: int, threads: int, converted: Counter, keep: bool) -> torch.Tensor | None:
    """Decode every image once, in `threads` threads (PIL releases the GIL while it decodes and resizes), counting
    the modes converted to RGB; the decoded images when `keep`, else only the check that every one decodes."""
    images = torch.empty(len(sources), 3, image_size, image_size, dtype=torch.uint8) if keep else None

    def one(i: int) -> str:
        image, mode = decode(*sources[i], image_size)
        if keep:
            images[i] = image
        return mode

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for mode in pool.map(one, range(len(sources))):  # re-raises the first failure, in order
            if mode != "RGB":
                converted[mode] += 1
    return images


def serve(splits: list[tuple[object, list[int]]], image_size: int, decode_mode: str, threads: int,
          where: str) -> tuple[list[Split], list[str]]:
    """Each (sources, labels) split as a Split, decoded once into memory or per step (module docstring), and the
    notes for the run's log."""
    num_images = sum(len(sources) for sources, _ in splits)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed, total = num_images * 3 * image_size * image_size * local, total_memory()
    # Half the node's total memory, not what is free now: every process of the node reads the same total and so
    # makes the same choice (the first to decode would otherwise leave the others less, and a different choice).
    fits = total is None or needed <= total / 2
    need = (f"decoding its {num_images:,} images at {image_size}x{image_size} needs {needed / 2**30:.1f} GiB of "
            f"memory ({local} process(es) on this node, one copy each), more than half of the node's "
            f"{total / 2**30:.1f} GiB" if total is not None else "")
    if decode_mode == "once" and not fits:
        raise DataError(f"{where}: {need}; use --decode per_step (or auto), lower --image_size, use fewer "
                        f"processes per node, or resize the images on disk")
    per_step = decode_mode == "per_step" or not fits
    notes = [f"{where}: {need}: decoding each step's images as it is prepared instead (--decode per_step; "
             f"--num_workers N processes prepare the steps)"] if per_step and not fits else []
    converted, served = Counter(), []
    for sources, labels in splits:
        images = decode_pass(sources, image_size, threads, converted, keep=not per_step)
        served.append(Split(ImageFiles(sources, image_size) if per_step else images,
                            torch.tensor(labels, dtype=torch.int64)))
    if converted:
        counts = ", ".join(f"{n} {MODE_NAMES.get(mode, mode)}" for mode, n in sorted(converted.items()))
        notes.append(f"{where}: converted to RGB as timm's loader does: {counts} image(s)")
    return served, notes


def total_memory() -> int | None:
    """MemTotal of /proc/meminfo in bytes, None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- image folders ----------------------------------------------------------------------------------

def read_image_folder(root: Path, image_size: int, decode_mode: str = "auto", threads: int = 1,
                      evaluation_only: bool = False) -> OwnImages:
    """`root/train/<class>/*` and `root/val/<class>/*` (or validation/, test/), read by torchvision's ImageFolder
    functions: classes are the train folder's sub-folders in sorted order, files with an image extension only.
    `evaluation_only`: the training images are neither listed nor decoded (train is None)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    train_dir = root / "train"
    val_dir = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise DataError(f"--data imagefolder:{root} must hold train/<class>/ and val/<class>/ (torchvision's "
                        f"ImageFolder layout; val may be called validation or test)")
    classes, class_to_idx = listed(train_dir, find_classes, str(train_dir))
    check_class_folders(train_dir, classes)
    train = [] if evaluation_only else listed(train_dir, make_dataset, str(train_dir), class_to_idx, IMG_EXTENSIONS)
    val_classes, _ = listed(val_dir, find_classes, str(val_dir))
    check_class_folders(val_dir, val_classes)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise DataError(f"{val_dir / unknown[0]}: class {unknown[0]!r} has no folder in {train_dir}; the labels come "
                        f"from the training classes, so add its training images or remove it")
    test = listed(val_dir, make_dataset, str(val_dir), {c: class_to_idx[c] for c in val_classes}, IMG_EXTENSIONS)
    read = [test] if evaluation_only else [train, test]
    for samples in read:
        check_no_file_twice(samples)
    splits, notes = serve([(FileList([path for path, _ in samples]), [label for _, label in samples])
                           for samples in read], image_size, decode_mode, threads, str(root))
    train_split, test_split = (None, *splits) if evaluation_only else splits
    return OwnImages(train_split, test_split, list(classes), notes)


def listed(split_dir: Path, reader, *args):
    """torchvision's find_classes or make_dataset on one split's folder; their errors in one line naming it
    (FileNotFoundError: no class folder, or a class folder without an image; PermissionError: unreadable)."""
    try:
        return reader(*args)
    except OSError as error:
        raise DataError(f"{split_dir}: {error}") from None


def check_class_folders(split_dir: Path, classes: list[str]) -> None:
    """A hidden folder (`.ipynb_checkpoints`, `.cache`) would be a class to ImageFolder: refused, not trained on."""
    hidden = [name for name in classes if name.startswith(".")]
    if hidden:
        raise DataError(f"{split_dir / hidden[0]}: a hidden folder would be a class of its own; remove it (or move "
                        f"it out of {split_dir})")


def check_no_file_twice(samples: list[tuple[str, int]]) -> None:
    """ImageFolder follows folder links: a link back up the tree lists the same files again, and again."""
    seen = {}
    for path, _ in samples:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(f"{path} is {seen[real]} again (a folder link that loops, or two links to one folder); "
                            f"each image must be listed once")
        seen[real] = path


# --- Hugging Face datasets ----------------------------------------------------------------------------

def load_hf_dataset(source: str):
    """The DatasetDict of a `save_to_disk` folder, a local folder `load_dataset` reads (parquet, imagefolder, ...)
    or a data set name in the hub cache (downloaded when missing and the hub is reachable)."""
    try:
        import datasets
    except ImportError:
        raise DataError("--data hf: needs Hugging Face datasets: pip install -e '.[datasets]'") from None
    datasets.disable_progress_bars()  # one bar per process and split: the start-up line says what was read
    path = Path(source)
    try:
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path) if path.is_dir() else source)
    except Exception as error:  # every reader failure alike: a missing folder, no data files, an offline hub
        message = str(error).splitlines()[0] if str(error) else ""
        raise DataError(f"--data hf:{source} could not be read by datasets ({type(error).__name__}: {message})") \
            from None


def hf_columns(split, where: str) -> tuple[str, str]:
    """The split's image column (an Image feature) and label column (a ClassLabel feature)."""
    import datasets
    images = [name for name, f in split.features.items() if isinstance(f, datasets.Image)]
    labels = [name for name, f in split.features.items() if isinstance(f, datasets.ClassLabel)]
    if len(images) != 1:
        raise DataError(f"{where} must have one image column (an Image feature), found "
                        f"{', '.join(images) or 'none'} among {', '.join(split.features)}")
    if len(labels) != 1:
        hint = " (an integer column needs its class names: dataset.cast_column('label', ClassLabel(names=[...])))"
        raise DataError(f"{where} must have one label column with class names (a ClassLabel feature), found "
                        f"{', '.join(labels) or 'none'} among {', '.join(split.features)}" + hint)
    return images[0], labels[0]


def read_hf_dataset(source: str, image_size: int, decode_mode: str = "auto", threads: int = 1,
                    evaluation_only: bool = False) -> OwnImages:
    """The `train` split and the first of validation/val/test, class names from the label column's ClassLabel.
    `evaluation_only`: the train split's rows are neither checked nor decoded (train is None)."""
    import datasets
    splits = load_hf_dataset(source)
    where = f"--data hf:{source}"
    if not isinstance(splits, datasets.DatasetDict) or "train" not in splits:
        found = ", ".join(splits) if isinstance(splits, datasets.DatasetDict) else "a single split"
        raise DataError(f"{where} needs a train split and a validation split, found {found}")
    val_name = next((name for name in VAL_SPLITS if name in splits), None)
    if val_name is None:
        raise DataError(f"{where} needs a validation split ({' or '.join(VAL_SPLITS)}), found {', '.join(splits)}")
    image_column, label_column = hf_columns(splits["train"], f"{where} train split")
    class_names = list(splits["train"].features[label_column].names)
    checked, read = [], (val_name,) if evaluation_only else ("train", val_name)
    for name in read:
        split = splits[name]
        columns = hf_columns(split, f"{where} {name} split")
        if columns != (image_column, label_column) or list(split.features[label_column].names) != class_names:
            raise DataError(f"{where}: the {name} split's columns or class names differ from the train split's")
        if len(split) == 0:
            raise DataError(f"{where}: its {name} split holds no rows")
        labels = split[label_column]
        bad = next((row for row, label in enumerate(labels)
                    if not isinstance(label, int) or not 0 <= label < len(class_names)), None)
        if bad is not None:
            raise DataError(f"{where} {name} split, row {bad}: label {labels[bad]} is not one of the "
                            f"{len(class_names)} classes (0 to {len(class_names) - 1}); unlabelled rows (-1) "
                            f"cannot be trained or evaluated on")
        # Undecoded, so an unreadable image is named by its row (and file) rather than failing inside datasets.
        rows = RowList(split.cast_column(image_column, datasets.Image(decode=False)), image_column,
                       f"{where} {name} split")
        checked.append((rows, labels))
    decoded, notes = serve(checked, image_size, decode_mode, threads, where)
    train_split, test_split = (None, *decoded) if evaluation_only else decoded
    return OwnImages(train_split, test_split, class_names, notes)
