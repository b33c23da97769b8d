"""CIFAR-100: reading the official pickles, downloading them once per node, and the sharded epoch plan.

The sampling rule, the same on every topology:
- epoch e visits the training set in the order `randperm(N)` drawn from a generator seeded by (seed, e);
- optimizer step s trains on the images at positions [s*B, (s+1)*B) of that order (B = batch_size);
- within a step, micro-batch a of rank r takes every (W*A)-th image starting at position a*W + r
  (W processes, A accumulation steps), so the W*A micro-batches of a step partition it;
- the last step of an epoch holds the remaining N mod B images (80 for CIFAR-100 at B=256) and is
  trained like any other, its gradient being the mean over those images (see loop.py).
Augmentation randomness, and what it depends on:
- crop offsets and flips come from the same per-epoch generator, one draw per image: a function of
  (seed, epoch, image), so an image gets the same crop and flip whichever process trains it;
- RandAugment (`--augment randaug`) uses timm's class, which draws from python's `random`, numpy's and
  torch's global generators. Each image is processed with those generators seeded by its own seed from the
  epoch plan (and put back afterwards); random erasing (`--reprob`) makes timm's draws from generators of its
  own seeded the same way (random_erase). So these too are functions of (seed, epoch, image) alone: the same
  on any number of processes or workers, and on a resumed run;
- mixup / cutmix (`--mixup`, `--cutmix`, timm's Mixup) mix the images of one micro-batch with each other
  (image i with image n-1-i, one mixing weight per micro-batch), seeded by the plan's seed of the
  micro-batch's first image. So they depend on (seed, epoch) and on the micro-batch's composition, which
  the micro-batch size alone sets: micro-batch a of rank r takes every (W*A)-th image from position
  a*W + r, so any topology with the same micro_batch_size mixes the same pairs with the same weights, and a
  different micro_batch_size mixes differently. Only the real images of a micro-batch are mixed, never the
  weight-0 padding of the epoch's last step; with an odd number of real images the last one stays unmixed.
With mixup or cutmix the labels become soft targets (micro-batch x 100, rows summing to 1, label smoothing
folded in by Mixup), and the loss is the soft-target cross-entropy (loop.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import random
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_FOLDER = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)
PAD = 4  # pixels of zero padding for the random crop, as in the reference study
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


# --- the sharded epoch plan ---------------------------------------------------------------------

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


@dataclass
class EpochPlan:
    """Image order and augmentation draws of one epoch; identical on every process."""
    order: torch.Tensor    # int64 (N,): the epoch's permutation of image indices
    offsets: torch.Tensor  # int64 (N, 2): crop offsets (row, column) in [0, 2*PAD], indexed by image
    flips: torch.Tensor    # bool (N,): mirror the image, indexed by image
    seeds: torch.Tensor    # int64 (N, 3), on the CPU: seeds of the image's RandAugment, random erasing, and of
                           # the mixing of a micro-batch that starts with it; indexed by image

    @staticmethod
    def draw(num_images: int, seed: int, epoch: int) -> "EpochPlan":
        g = epoch_generator(seed, epoch)
        order = torch.randperm(num_images, generator=g)
        offsets = torch.randint(0, 2 * PAD + 1, (num_images, 2), generator=g)
        flips = torch.randint(0, 2, (num_images,), generator=g).bool()
        seeds = torch.randint(0, 2**31, (num_images, 3), generator=g)  # drawn last: the draws above are unchanged
        return EpochPlan(order, offsets, flips, seeds)


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
    it lives (GPU included) and takes its randomness from the epoch plan instead of a global RNG. A flip is
    the crop's column indices reversed; each output pixel is read from its flat index in the padded image
    (3.7x faster than advanced indexing on 2 CPU cores, and the result stays contiguous).
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, flat).view(n, c, h, w)


@contextlib.contextmanager
def seeded(seed: int):
    """Run timm's augmentations with python's, numpy's and torch's CPU generators seeded by `seed`, then
    restore them, so a draw depends on its seed alone and leaves the training's own random streams as they were."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed every GPU
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def posterize(image, bits_to_keep: int, **_):
    """timm's posterize op, keeping 0 bits as Pillow < 13 did (a black image).

    timm 1.0.31's PosterizeIncreasing keeps 4 - int(magnitude * 0.4) bits, so 0 at magnitude 10, which
    `rand-m9-mstd0.5` reaches; Pillow 13 raises "bits must be between or equal to 1 and 8" there.
    """
    from PIL import Image, ImageOps
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def rand_augment(images: torch.Tensor, transform, seeds: list[int]) -> torch.Tensor:
    """timm's RandAugment on each uint8 CPU image (as PIL, the only input it takes), each with its own seed."""
    from PIL import Image
    out = torch.empty_like(images)
    for i, seed in enumerate(seeds):
        with seeded(seed):
            image = transform(Image.fromarray(images[i].permute(1, 2, 0).numpy()))
        out[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return out


def erase_boxes(eraser, rng: random.Random, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The boxes (top, left, height, width) that timm's RandomErasing._erase draws for one image, from `rng`.

    The same draws in the same order as timm 1.0's `_erase` with python's `random` in the state of `rng`.
    """
    if rng.random() > eraser.probability:
        return []
    area = height * width
    count = eraser.min_count if eraser.min_count == eraser.max_count else rng.randint(eraser.min_count, eraser.max_count)
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = rng.uniform(eraser.min_area, eraser.max_area) * area / count
            aspect_ratio = math.exp(rng.uniform(*eraser.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                boxes.append((rng.randint(0, height - h), rng.randint(0, width - w), h, w))
                break
    return boxes


def random_erase(images: torch.Tensor, eraser, seeds: list[int]) -> None:
    """timm's RandomErasing (per-pixel noise) on each normalised image of a batch in place, each with its own seed.

    timm's eraser works one image at a time with python's and torch's global generators and, on GPU-resident data,
    copies each box's noise to the device (a copy and a sync per image). Here every image's boxes and noise are
    drawn on the CPU from generators seeded by its own seed (random.Random(seed) and a torch.Generator seeded
    with it give exactly what timm gives under random.seed(seed) / torch.manual_seed(seed)), packed into one
    tensor, copied to the images' device once, and written with one masked_scatter_ per box (masked_scatter_
    fills the mask's positions in row-major order, which is each box's (channel, row, column) order; on CUDA it
    does not synchronise).
    """
    n, c, height, width = images.shape
    per_image = [erase_boxes(eraser, random.Random(seed), height, width) for seed in seeds]
    rounds = max(map(len, per_image))
    if rounds == 0:
        return
    assert eraser.per_pixel, "only timm's mode='pixel' is implemented"
    corners = torch.zeros(rounds, n, 4)  # (top, left, bottom, right); an empty box where an image has none
    noise = [[] for _ in range(rounds)]
    for i, (boxes, seed) in enumerate(zip(per_image, seeds)):
        generator = torch.Generator().manual_seed(seed) if boxes else None
        for k, (top, left, h, w) in enumerate(boxes):
            corners[k, i] = torch.tensor([top, left, top + h, left + w])
            noise[k].append(torch.empty(c, h, w).normal_(generator=generator).flatten())
    noise = [torch.cat(values) for values in noise]
    packed = torch.cat([corners.flatten(), *noise])
    if images.device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(images.device, non_blocking=True)
    corners, start = packed[:corners.numel()].view(rounds, n, 4, 1), corners.numel()
    rows, cols = torch.arange(height, device=images.device), torch.arange(width, device=images.device)
    for k in range(rounds):  # a later box of an image is written over an earlier one, as in timm
        top, left, bottom, right = corners[k].unbind(1)
        mask = ((rows >= top) & (rows < bottom))[:, None, :, None] & ((cols >= left) & (cols < right))[:, None, None, :]
        images.masked_scatter_(mask.expand(n, c, height, width), packed[start:start + len(noise[k])])
        start += len(noise[k])


def mix(mixer, images: torch.Tensor, labels: torch.Tensor, real: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup/CutMix over the first `real` images of a micro-batch: (images, soft targets).

    Padding and, for an odd count, the last real image keep their own image and a (smoothed) one-hot target.
    """
    from timm.data.mixup import mixup_target
    targets = mixup_target(labels, NUM_CLASSES, smoothing=mixer.label_smoothing)
    paired = real - real % 2  # timm's Mixup pairs image i with image n-1-i: it needs an even count
    if paired:
        with seeded(seed):
            mixed, mixed_targets = mixer(images[:paired], labels[:paired])  # mixes the view in place
        images[:paired], targets[:paired] = mixed, mixed_targets
    return images, targets


class Normalize:
    """uint8 images -> float32, scaled to [0, 1], normalised with the model's mean/std, resized if asked.

    It never changes itself: the training steps and the evaluation each get their own (`to`), on their images'
    device. A shared one that moved its mean/std to the GPU during evaluation would make the next epoch's forked
    DataLoader workers touch CUDA ("Cannot re-initialize CUDA in forked subprocess").
    """

    def __init__(self, mean, std, image_size: int, device: torch.device | str = "cpu"):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.image_size = image_size

    def to(self, device: torch.device | str) -> "Normalize":
        """A Normalize whose mean/std live on `device`; this one is left as it is."""
        return Normalize(self.mean.flatten().tolist(), self.std.flatten().tolist(), self.image_size, device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Images on another device than mean/std get copies (no-ops when already there); self is not changed.
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        x = images.float().div_(255)
        x = (x - mean) / std
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x


class TrainSteps(torch.utils.data.Dataset):
    """Map-style dataset whose item `s` is this rank's list of micro-batches for optimizer step `s`.

    A whole step per item lets DataLoader workers (when asked for) prepare steps ahead, and lets the
    training loop start at any step of an epoch.
    """

    def __init__(self, split: Split, normalize: Normalize, augment: str, seed: int, batch_size: int,
                 rank: int, world: int, accumulation: int, *, randaug: str = "rand-m9-mstd0.5-inc1",
                 reprob: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5, label_smoothing: float = 0.0, pad: bool = False):
        self.split, self.normalize, self.augment, self.seed = split, normalize, augment, seed
        self.pad = pad  # fill every micro-batch up to the full size (CUDA graphs need one static shape)
        self.batch_size, self.rank, self.world, self.accumulation = batch_size, rank, world, accumulation
        self.plan: EpochPlan | None = None
        self.num_steps = steps_per_epoch(len(split.labels), batch_size)
        self.randaug = self.eraser = self.mixer = None
        if augment == "randaug":
            if split.images.device.type != "cpu":
                raise ValueError("RandAugment works on PIL images: the training set must be on the CPU")
            from timm.data import rand_augment_transform
            from PIL import Image
            # What timm's transform factory passes: translations relative to the image side, the data set's
            # mean colour where ops leave the image, one interpolation.
            mean = tuple(min(255, round(255 * m)) for m in normalize.mean.flatten().tolist())
            self.randaug = rand_augment_transform(randaug, dict(
                translate_const=int(IMAGE_SHAPE[-1] * 0.45), img_mean=mean, interpolation=Image.BILINEAR))
            for op in self.randaug.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing
            # timm train.py's defaults (--remode pixel, --recount 1); its parameters are read by random_erase.
            self.eraser = RandomErasing(probability=reprob, mode="pixel", max_count=1, device="cpu")
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            self.mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                               mode="batch", label_smoothing=label_smoothing, num_classes=NUM_CLASSES)

    def set_epoch(self, epoch: int) -> None:
        plan = EpochPlan.draw(len(self.split.labels), self.seed, epoch)
        device = self.split.images.device
        self.plan = EpochPlan(plan.order.to(device), plan.offsets.to(device), plan.flips.to(device), plan.seeds)
        self.cpu_order = plan.order  # per-image seeds are read on the host, without a device sync

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, weights) per micro-batch.

        labels are class indices, or with mixup/cutmix soft targets of shape (micro-batch, 100).

        In the epoch's short last step a micro-batch holds only its real images (weight 1), so BatchNorm's
        batch and running statistics see no padding; torch.compile compiles its shapes once per run. Two cases are
        filled up to the full micro-batch with weight-0 copies of the step's first image: a micro-batch with
        no real image at all (it must still run, to join the all-reduce; loop.py puts the module buffers back
        after it), and every micro-batch when `pad` is set (the static shape of a CUDA graph; loop.py refuses
        that for models with batch statistics).
        """
        micro_size = self.batch_size // (self.world * self.accumulation)
        seeded_augments = self.randaug is not None or self.eraser is not None or self.mixer is not None
        # Per-image seeds are read on the host (no device sync); the plain crop+flip path needs none.
        orders = (self.plan.order, self.cpu_order) if seeded_augments else (self.plan.order,)
        indices = [micro_batch_indices(order, step, self.batch_size, self.rank, self.world, self.accumulation)
                   for order in orders]
        micro = []
        for index, *host_index in zip(*indices):
            real = len(index)
            size = micro_size if self.pad or real == 0 else real
            weights = (torch.arange(size, device=index.device) < real).float()
            if real < size:
                index = torch.cat([index, self.plan.order[step * self.batch_size].expand(size - real)])
            if seeded_augments:
                host_index = torch.cat([host_index[0], self.cpu_order[step * self.batch_size].expand(size - real)])
                seeds = self.plan.seeds[host_index]
            images = self.split.images[index]
            if self.augment in ("crop_flip", "randaug"):
                images = crop_flip(images, self.plan.offsets[index], self.plan.flips[index])
            if self.randaug is not None:
                images = rand_augment(images, self.randaug, seeds[:, 0].tolist())
            images, labels = self.normalize(images), self.split.labels[index]
            if self.eraser is not None:
                random_erase(images, self.eraser, seeds[:, 1].tolist())
            if self.mixer is not None:
                images, labels = mix(self.mixer, images, labels, real, int(seeds[0, 2]))
            micro.append((images, labels, weights))
        return micro


# SLURM signals every process of a job step, and torch's elastic agent its workers' whole process groups: the
# DataLoader's workers too, which then die (torch's worker handler exits on a SIGTERM not sent by its parent), and
# the next batch raises "DataLoader worker exited unexpectedly" instead of the run saving. The workers are forked
# with these signals blocked (a child inherits the mask; torch 2.14.1's worker leaves it), so they stay
# pending there and the training process alone acts on them; it ends its workers when it is done.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


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
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        batches = iter(loader)  # starts the workers
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a signal held meanwhile is delivered here
    yield from zip(range(start_step, len(steps)), batches)
