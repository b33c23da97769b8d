"""CIFAR-100 for the trainer, one concern a module:

- cifar.py: the official format (constants, class names), reading and validating the pickles, downloading them
  once per node; DataError, the user-facing data problem.
- plan.py: the sharded epoch plan (which images each process trains on in each optimizer step, the same on
  every topology), TrainSteps (a Dataset whose item is one optimizer step) and iterate_steps (its DataLoader).
- augment.py: crop and flip, RandAugment, random erasing and mixup/cutmix on batches, each seeded by the
  epoch plan, and Normalize.

The names used elsewhere are re-exported here, so `from trainer.data import ...` needs no module name.
"""

from .augment import Normalize, crop_flip, posterize, random_erase, seeded
from .cifar import (CIFAR100_CLASSES, CIFAR_FOLDER, NUM_CLASSES, DataError, Split, ensure_downloaded, load_cifar100,
                    read_class_names, read_split)
from .plan import EpochPlan, TrainSteps, iterate_steps, micro_batch_indices, steps_per_epoch

__all__ = [
    # cifar.py
    "CIFAR100_CLASSES", "CIFAR_FOLDER", "NUM_CLASSES", "DataError", "Split", "ensure_downloaded", "load_cifar100",
    "read_class_names", "read_split",
    # plan.py
    "EpochPlan", "TrainSteps", "iterate_steps", "micro_batch_indices", "steps_per_epoch",
    # augment.py
    "Normalize", "crop_flip", "posterize", "random_erase", "seeded",
]
