"""CIFAR-100: reading the official pickles, downloading them once per node, and the sharded epoch plan.

The sampling rule, the same on every topology:
- epoch e visits the training set in the order `randperm(N)` drawn from a generator seeded by (seed, e);
- optimizer step s trains on the images at positions [s*B, (s+1)*B) of that order (B = batch_size);
- within a step, micro-batch a of rank r takes every (W*A)-th image starting at position a*W + r
  (W processes, A accumulation steps), so the W*A micro-batches of a step partition it;
- the last step of an epoch holds the remaining N mod B images (80 for CIFAR-100 at B=256) and is
  trained like any other, its gradient being the mean over those images (see loop.py).
Augmentation draws (crop offsets, flips) come from the same per-epoch generator, one per image, so an
image gets the same augmentation whichever process trains it.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

CIFAR_FOLDER = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
PAD = 4  # pixels of zero padding for the random crop, as in the reference study


class DataError(RuntimeError):
    """A user-facing data problem: printed as one line, exit status 2."""


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
    import numpy as np
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(labels, dtype=np.int64)
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
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".download-{socket.gethostname()}-", dir=root))
    try:
        from torchvision.datasets import CIFAR100
        CIFAR100(root=str(staging), train=True, download=True)
        try:
            os.rename(staging / CIFAR_FOLDER, folder)
        except OSError:
            if not folder.is_dir():  # another node's rename won the race: theirs is as good as ours
                raise
    except Exception as error:
        raise DataError(f"CIFAR-100 is not in --data_dir {root} and could not be downloaded "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                        f"{expected}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_cifar100(folder: Path) -> tuple[Split, Split, list[str]]:
    train, test = read_split(folder / "train"), read_split(folder / "test")
    return train, test, read_class_names(folder / "meta")


# --- the sharded epoch plan ---------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


@dataclass
class EpochPlan:
    """Image order and augmentation draws of one epoch; identical on every process."""
    order: torch.Tensor    # int64 (N,): the epoch's permutation of image indices
    offsets: torch.Tensor  # int64 (N, 2): crop offsets (row, column) in [0, 2*PAD], indexed by image
    flips: torch.Tensor    # bool (N,): mirror the image, indexed by image

    @staticmethod
    def draw(num_images: int, seed: int, epoch: int) -> "EpochPlan":
        g = epoch_generator(seed, epoch)
        order = torch.randperm(num_images, generator=g)
        offsets = torch.randint(0, 2 * PAD + 1, (num_images, 2), generator=g)
        flips = torch.randint(0, 2, (num_images,), generator=g).bool()
        return EpochPlan(order, offsets, flips)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    return math.ceil(num_images / batch_size)


def micro_batch_indices(order: torch.Tensor, step: int, batch_size: int, rank: int, world: int,
                        accumulation: int) -> list[torch.Tensor]:
    """The image indices of each of this rank's `accumulation` micro-batches in optimizer step `step`."""
    step_images = order[step * batch_size:(step + 1) * batch_size]
    stride = world * accumulation
    return [step_images[a * world + rank::stride] for a in range(accumulation)]


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Random crop of the zero-padded image plus horizontal flip, as one gather on a uint8 batch.

    torchvision's transforms work one image at a time on the CPU; this works on a whole batch wherever
    it lives (GPU included) and takes its randomness from the epoch plan instead of a global RNG.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class Normalize:
    """uint8 images -> float32, scaled to [0, 1], normalised with the model's mean/std, resized if asked."""

    def __init__(self, mean, std, image_size: int):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.image_size = image_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # moved once, not copied every batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = images.float().div_(255)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


class TrainSteps(torch.utils.data.Dataset):
    """Map-style dataset whose item `s` is this rank's list of micro-batches for optimizer step `s`.

    A whole step per item lets DataLoader workers (when asked for) prepare steps ahead, and lets the
    training loop start at any step of an epoch.
    """

    def __init__(self, split: Split, normalize: Normalize, augment: str, seed: int, batch_size: int,
                 rank: int, world: int, accumulation: int):
        self.split, self.normalize, self.augment, self.seed = split, normalize, augment, seed
        self.batch_size, self.rank, self.world, self.accumulation = batch_size, rank, world, accumulation
        self.plan: EpochPlan | None = None
        self.num_steps = steps_per_epoch(len(split.labels), batch_size)

    def set_epoch(self, epoch: int) -> None:
        plan = EpochPlan.draw(len(self.split.labels), self.seed, epoch)
        device = self.split.images.device
        self.plan = EpochPlan(plan.order.to(device), plan.offsets.to(device), plan.flips.to(device))

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, weights) per micro-batch, each padded to the full micro-batch size.

        Every micro-batch has the same shape, also in the epoch's short last step: its missing places hold
        copies of a real image with weight 0. Static shapes let torch.compile and CUDA graphs run the last
        step with the same graph, and a micro-batch with no real image still joins the all-reduce.
        """
        micro_size = self.batch_size // (self.world * self.accumulation)
        filler = self.plan.order[step * self.batch_size]
        micro = []
        for index in micro_batch_indices(self.plan.order, step, self.batch_size, self.rank, self.world,
                                         self.accumulation):
            real = len(index)
            weights = (torch.arange(micro_size, device=index.device) < real).float()
            if real < micro_size:
                index = torch.cat([index, filler.expand(micro_size - real)])
            images = self.split.images[index]
            if self.augment == "crop_flip":
                images = crop_flip(images, self.plan.offsets[index], self.plan.flips[index])
            micro.append((self.normalize(images), self.split.labels[index], weights))
        return micro


def iterate_steps(steps: TrainSteps, start_step: int, num_workers: int, pin_memory: bool) -> Iterator:
    """Yield (step, micro-batches) from `start_step` to the end of the epoch."""
    if num_workers == 0 or steps.split.images.device.type != "cpu":
        # Data already on the accelerator (or no workers asked for): index it in this process.
        for step in range(start_step, len(steps)):
            yield step, steps[step]
        return
    loader = torch.utils.data.DataLoader(
        steps, batch_size=None, sampler=range(start_step, len(steps)), num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=4)
    yield from zip(range(start_step, len(steps)), loader)
