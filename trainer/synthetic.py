"""CIFAR-100-format pickles of generated, learnable images, for tests and benchmarks on machines that
cannot download the real data set. Same files, same layout, same loader as the real thing."""

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


def main(argv=None) -> int:
    from .errors import run_command
    return run_command(synthetic_command, argv)


def synthetic_command(argv) -> int:
    from .config import ConfigError, OneLineArgumentParser, check_writable_folder
    parser = OneLineArgumentParser(prog="python -m trainer.synthetic",
                                   description="Write generated CIFAR-100-format pickles.")
    parser.add_argument("data_dir", help="folder to write cifar-100-python/ into (a trainer's --data_dir)")
    parser.add_argument("--num_train", type=int, default=50_000)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument("--num_classes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the train, test and meta files of a data set already in DATA_DIR")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
