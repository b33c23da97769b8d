"""A user's own images: an image folder in torchvision's ImageFolder layout, or a Hugging Face `datasets` data set,
decoded once into memory as the CIFAR pickles are, so that every guarantee of the trainer (the epoch plan, exact
resume, the same weights on any topology) holds for them unchanged.

Each image is decoded with PIL, converted to RGB (as timm's and torchvision's loaders do: grey is repeated, CMYK
converted, an alpha channel dropped; the conversions are counted and reported), its shorter side resized to
--image_size (bilinear, PIL's antialiased resize, torchvision's `resize`) and its centre cropped to a square
(torchvision's `center_crop`): the training set then holds uint8 tensors of (3, image_size, image_size), which the
crop/flip and the other augmentations take as they take CIFAR's 32x32 images. An image already of that size is
kept pixel for pixel. A file that cannot be decoded, a label outside the classes, a validation class that training
lacks: one line naming the file (or row), before any training.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .cifar import DataError, Split

# timm's ImageDataset and torchvision's ImageFolder name the validation folder either way.
VAL_FOLDERS = ("val", "validation", "test")
VAL_SPLITS = ("validation", "val", "test")
MODE_NAMES = {"L": "grey", "LA": "grey with alpha", "1": "black-and-white", "P": "palette", "RGBA": "RGBA",
              "CMYK": "CMYK", "I;16": "16-bit grey", "I": "32-bit grey", "F": "float grey", "YCbCr": "YCbCr"}


@dataclass
class OwnImages:
    """What read_image_folder and read_hf_dataset return; data/sources.py makes it a DataSet."""
    train: Split
    test: Split
    class_names: list[str]
    notes: list[str]  # what was done to the images, for the run's log (conversions to RGB)


def decode(source, name: str, image_size: int, converted: Counter) -> torch.Tensor:
    """One image (a path or a file object) as uint8 (3, image_size, image_size); `name` names it in errors."""
    from PIL import Image, UnidentifiedImageError
    import torchvision.transforms.functional as TF
    try:
        with Image.open(source) as image:
            image.load()  # decodes now: a truncated file fails here, not in the middle of training
            if image.mode != "RGB":
                converted[image.mode] += 1
                image = image.convert("RGB")
            image = TF.center_crop(TF.resize(image, image_size, interpolation=TF.InterpolationMode.BILINEAR),
                                   image_size)
            return TF.pil_to_tensor(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{name} is not a readable image ({type(error).__name__}: {error}); remove or replace "
                        f"it") from None


def check_memory(num_images: int, image_size: int, where: str) -> None:
    """Refuse, before decoding, a data set whose decoded images would not fit in this machine's available memory
    (each process of a node holds its own copy)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = num_images * 3 * image_size * image_size * local
    available = available_memory()
    if available is not None and needed > 0.8 * available:
        raise DataError(f"{where}: decoding its {num_images:,} images at {image_size}x{image_size} needs "
                        f"{needed / 2**30:.1f} GiB of memory ({local} process(es) on this node, one copy each), "
                        f"and {available / 2**30:.1f} GiB are available; lower --image_size, use fewer processes "
                        f"per node, or resize the images on disk")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def conversion_notes(converted: Counter, where: str) -> list[str]:
    if not converted:
        return []
    counts = ", ".join(f"{n} {MODE_NAMES.get(mode, mode)}" for mode, n in sorted(converted.items()))
    return [f"{where}: converted to RGB as timm's loader does: {counts} image(s)"]


def decode_all(items: list[tuple[object, str]], labels: list[int], image_size: int, converted: Counter) -> Split:
    images = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8)
    for i, (source, name) in enumerate(items):
        images[i] = decode(source, name, image_size, converted)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


# --- image folders ----------------------------------------------------------------------------------

def read_image_folder(root: Path, image_size: int) -> OwnImages:
    """`root/train/<class>/*` and `root/val/<class>/*` (or validation/, test/), read by torchvision's ImageFolder
    functions: classes are the train folder's sub-folders in sorted order, files with an image extension only."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    train_dir = root / "train"
    val_dir = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise DataError(f"--data imagefolder:{root} must hold train/<class>/ and val/<class>/ (torchvision's "
                        f"ImageFolder layout; val may be called validation or test)")
    try:
        classes, class_to_idx = find_classes(str(train_dir))
        train = make_dataset(str(train_dir), class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as error:  # no class folder, or a class folder without an image
        raise DataError(f"{train_dir}: {error}") from None
    try:
        val_classes, _ = find_classes(str(val_dir))
    except FileNotFoundError as error:
        raise DataError(f"{val_dir}: {error}") from None
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise DataError(f"{val_dir / unknown[0]}: class {unknown[0]!r} has no folder in {train_dir}; the labels come "
                        f"from the training classes, so add its training images or remove it")
    try:
        test = make_dataset(str(val_dir), {c: class_to_idx[c] for c in val_classes}, IMG_EXTENSIONS)
    except FileNotFoundError as error:
        raise DataError(f"{val_dir}: {error}") from None
    check_memory(len(train) + len(test), image_size, f"--data imagefolder:{root}")
    converted = Counter()
    splits = [decode_all([(path, path) for path, _ in samples], [label for _, label in samples], image_size,
                         converted) for samples in (train, test)]
    return OwnImages(*splits, list(classes), conversion_notes(converted, str(root)))


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


def read_hf_dataset(source: str, image_size: int) -> OwnImages:
    """The `train` split and the first of validation/val/test, class names from the label column's ClassLabel."""
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
    check_memory(len(splits["train"]) + len(splits[val_name]), image_size, where)
    converted, decoded = Counter(), []
    for name in ("train", val_name):
        split = splits[name]
        columns = hf_columns(split, f"{where} {name} split")
        if columns != (image_column, label_column) or list(split.features[label_column].names) != class_names:
            raise DataError(f"{where}: the {name} split's columns or class names differ from the train split's")
        # Undecoded, so an unreadable image is named by its row (and file) rather than failing inside datasets.
        split = split.cast_column(image_column, datasets.Image(decode=False))
        labels = split[label_column]
        bad = next((row for row, label in enumerate(labels) if not 0 <= label < len(class_names)), None)
        if bad is not None:
            raise DataError(f"{where} {name} split, row {bad}: label {labels[bad]} is not one of the "
                            f"{len(class_names)} classes (0 to {len(class_names) - 1}); unlabelled rows (-1) "
                            f"cannot be trained or evaluated on")
        items = []
        for row, image in enumerate(split[image_column]):
            label = f"{where} {name} split, row {row}" + (f" ({image['path']})" if image.get("path") else "")
            items.append((io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"], label))
        decoded.append(decode_all(items, labels, image_size, converted))
    return OwnImages(*decoded, class_names, conversion_notes(converted, where))
