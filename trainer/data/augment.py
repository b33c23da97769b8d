"""Augmentation of a batch of images on any device, its randomness drawn from the epoch plan (plan.py), and the
normalisation of uint8 images into the model's input.

Augmentation randomness, and what it depends on:
- crop offsets and flips come from the epoch plan's per-epoch generator (plan.py), one draw per image: a
  function of (seed, epoch, image), so an image gets the same crop and flip whichever process trains it;
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
folded in by Mixup), and the loss is the soft-target cross-entropy (step.py).
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F


PAD = 4  # pixels of zero padding for the random crop, as in the reference study


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
    targets = mixup_target(labels, mixer.num_classes, smoothing=mixer.label_smoothing)
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
