"""The sharded epoch plan: which images each process trains on in each optimizer step, and the Dataset and
DataLoader that serve those steps.

The sampling rule, the same on every topology:
- epoch e visits the training set in the order `randperm(N)` drawn from a generator seeded by (seed, e);
- optimizer step s trains on the images at positions [s*B, (s+1)*B) of that order (B = batch_size);
- within a step, micro-batch a of rank r takes every (W*A)-th image starting at position a*W + r
  (W processes, A accumulation steps), so the W*A micro-batches of a step partition it;
- the last step of an epoch holds the remaining N mod B images (80 for CIFAR-100 at B=256) and is
  trained like any other, its gradient being the mean over those images (see step.py).
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Iterator

import torch

from .augment import PAD, Normalize, crop_flip, mix, posterize, rand_augment, random_erase
from .cifar import NUM_CLASSES, Split


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


class TrainSteps(torch.utils.data.Dataset):
    """Map-style dataset whose item `s` is this rank's list of micro-batches for optimizer step `s`.

    A whole step per item lets DataLoader workers (when asked for) prepare steps ahead, and lets the
    training loop start at any step of an epoch.
    """

    def __init__(self, split: Split, normalize: Normalize, augment: str, seed: int, batch_size: int,
                 rank: int, world: int, accumulation: int, *, randaug: str = "rand-m9-mstd0.5-inc1",
                 reprob: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0,
                 mixup_switch_prob: float = 0.5, label_smoothing: float = 0.0, pad: bool = False,
                 num_classes: int = NUM_CLASSES):
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
                translate_const=int(split.images.shape[-1] * 0.45), img_mean=mean, interpolation=Image.BILINEAR))
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
                               mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)

    def set_epoch(self, epoch: int) -> None:
        plan = EpochPlan.draw(len(self.split.labels), self.seed, epoch)
        device = self.split.images.device
        self.plan = EpochPlan(plan.order.to(device), plan.offsets.to(device), plan.flips.to(device), plan.seeds)
        self.cpu_order = plan.order  # per-image seeds are read on the host, without a device sync

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, weights) per micro-batch.

        labels are class indices, or with mixup/cutmix soft targets of shape (micro-batch, classes).

        In the epoch's short last step a micro-batch holds only its real images (weight 1), so BatchNorm's
        batch and running statistics see no padding; torch.compile compiles its shapes once per run. Two cases are
        filled up to the full micro-batch with weight-0 copies of the step's first image: a micro-batch with
        no real image at all (it must still run, to join the all-reduce; step.py puts the module buffers back
        after it), and every micro-batch when `pad` is set (the static shape of a CUDA graph; models.py refuses
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
