"""Data for tests and benchmarks on machines that cannot download any: CIFAR-100-format pickles of generated,
learnable images (same files, same layout, same loader as the real thing), and scikit-learn's handwritten digits
(real images the package ships) written as an image folder, a Hugging Face parquet data set and CIFAR-10 pickles.

    python -m trainer.synthetic DATA_DIR [--num_train N --num_test N --num_classes N]   # generated CIFAR-100
    python -m trainer.synthetic --digits DIR        # DIR/folder, DIR/parquet, DIR/cifar (needs scikit-learn, datasets)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .data import CIFAR_FOLDER, NUM_CLASSES


def write_fake_cifar100(data_dir: str | Path, num_train: int = 320, num_test: int = 200, num_classes: int = 10,
                        noise: float = 0.35, seed: int = 0) -> Path:
    """Write `{data_dir}/cifar-100-python/{train,test,meta}`; labels use the first `num_classes` classes.

    Each class has a smooth random prototype image; an example is its prototype plus pixel noise, so a
    small model learns it within an epoch or two.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.random((num_classes, 3, 4, 4))
    prototypes = coarse.repeat(8, axis=2).repeat(8, axis=3)  # (C, 3, 32, 32), blocky and easy to tell apart
    folder = Path(data_dir) / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, num_classes, count)
        images = (1 - noise) * prototypes[labels] + noise * rng.random((count, 3, 32, 32))
        data = (images * 255).round().clip(0, 255).astype(np.uint8).reshape(count, -1)
        entry = {b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(count)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class_{i}".encode() for i in range(NUM_CLASSES)],
                     b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}, f)
    return folder


DIGIT_CLASSES = [f"digit_{i}" for i in range(10)]  # sorted as strings in label order, as ImageFolder sorts them


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1,797 real 8x8 grey scans, shipped with the package) as 32x32 uint8
    images (each pixel repeated 4x4, 0-16 scaled to 0-255): the first 1,437 for training, the last 360 for
    validation, each sorted by label (stable), which is the order ImageFolder lists them in."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.kron((digits.images * 255 / 16).round().astype(np.uint8), np.ones((4, 4), np.uint8))
    labels = digits.target.astype(np.int64)
    parts = []
    for part in (slice(0, 1437), slice(1437, None)):
        order = np.argsort(labels[part], kind="stable")
        parts += [images[part][order], labels[part][order]]
    return tuple(parts)


def write_digits(root: Path) -> dict[str, list[str]]:
    """The same digits three ways; returns each one's trainer options (--data, and --data_dir for CIFAR-10):
    an image folder of grey PNGs (root/folder/{train,val}/digit_N/IIII.png), a Hugging Face parquet folder
    (root/parquet/data/{train,validation}-00000-of-00001.parquet, an Image and a ClassLabel column, written by
    datasets) and CIFAR-10's pickles (root/cifar/cifar-10-batches-py/, grey repeated into R, G and B)."""
    import datasets
    from PIL import Image
    datasets.disable_progress_bars()
    root = Path(root)
    train_images, train_labels, val_images, val_labels = digits_split()
    splits = {"train": (train_images, train_labels), "val": (val_images, val_labels)}
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / "folder" / split / DIGIT_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, "L").save(folder / f"{i:04d}.png")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_CLASSES)})
    for split, (images, labels) in splits.items():
        rows = {"image": [Image.fromarray(image, "L") for image in images], "label": labels.tolist()}
        name = {"train": "train", "val": "validation"}[split]
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    as_rgb = lambda images: np.repeat(images[:, None], 3, axis=1).reshape(len(images), -1)  # noqa: E731
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": as_rgb(train_images[part]), b"labels": train_labels[part].tolist()}, f)
    with open(cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": as_rgb(val_images), b"labels": val_labels.tolist()}, f)
    with open(cifar / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in DIGIT_CLASSES]}, f)
    return {"folder": ["--data", f"imagefolder:{root / 'folder'}"], "parquet": ["--data", f"hf:{root / 'parquet'}"],
            "cifar10": ["--data", "cifar10", "--data_dir", str(root / "cifar"), "--no-download"]}


def main(argv=None) -> int:
    from .errors import run_command
    return run_command(synthetic_command, argv)


def synthetic_command(argv) -> int:
    from .config import ConfigError, OneLineArgumentParser, check_writable_folder
    parser = OneLineArgumentParser(prog="python -m trainer.synthetic",
                                   description="Write generated CIFAR-100-format pickles, or scikit-learn's digits.")
    parser.add_argument("data_dir", nargs="?", help="folder to write cifar-100-python/ into (a trainer's --data_dir)")
    parser.add_argument("--digits", metavar="DIR", help="write scikit-learn's digits into the new folder DIR instead: "
                                                        "DIR/folder (--data imagefolder:DIR/folder), DIR/parquet "
                                                        "(--data hf:DIR/parquet), DIR/cifar (--data cifar10)")
    parser.add_argument("--num_train", type=int, default=50_000)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the train, test and meta files of a data set already in DATA_DIR")
    args = parser.parse_args(argv)
    if (args.data_dir is None) == (args.digits is None):
        raise ConfigError("give DATA_DIR (generated CIFAR-100) or --digits DIR, one of the two")
    if args.digits is not None:
        return write_digits_command(Path(args.digits).expanduser())
    for name, low, high in (("num_train", 1, None), ("num_test", 1, None), ("num_classes", 1, NUM_CLASSES)):
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            raise ConfigError(f"--{name} must lie in [{low}, {high}], got {value}" if high
                              else f"--{name} must be at least {low}, got {value}")
    check_writable_folder(args.data_dir, "DATA_DIR")
    folder = Path(args.data_dir).expanduser() / CIFAR_FOLDER
    check_writable_folder(str(folder), "DATA_DIR")  # cifar-100-python itself may be a file
    there = [name for name in ("train", "test", "meta") if (folder / name).exists()]
    if there and not args.overwrite:  # a real data set, or another generated one: never replaced silently
        raise ConfigError(f"{folder} already holds a data set ({', '.join(there)}); give another folder, or "
                          f"--overwrite to replace it")
    print(write_fake_cifar100(Path(args.data_dir).expanduser(), args.num_train, args.num_test, args.num_classes,
                              seed=args.seed))
    return 0


def write_digits_command(root: Path) -> int:
    import importlib.util
    from .config import ConfigError, check_writable_folder
    missing = [name for name in ("sklearn", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--digits needs scikit-learn and datasets: pip install scikit-learn datasets "
                          f"({', '.join(missing)} missing)")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"--digits {root} exists and is not an empty folder; name a new one")
    check_writable_folder(str(root), "--digits")
    for source, options in write_digits(root).items():
        print(f"{source}: {' '.join(options)}")
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
