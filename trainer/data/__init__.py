"""The trainer's data, one concern a module:

- sources.py: --data (CIFAR-100, CIFAR-10, an image folder, a Hugging Face data set) read into one DataSet.
- cifar.py: CIFAR's official formats (constants, class names), reading and validating the pickles, downloading
  them once per node; DataError, the user-facing data problem.
- images.py: a user's own images (image folders, Hugging Face datasets), decoded once into memory.
- plan.py: the sharded epoch plan (which images each process trains on in each optimizer step, the same on
  every topology), TrainSteps (a Dataset whose item is one optimizer step) and iterate_steps (its DataLoader).
- augment.py: crop and flip, RandAugment, random erasing and mixup/cutmix on batches, each seeded by the
  epoch plan, and Normalize.

The names used elsewhere are re-exported here, so `from trainer.data import ...` needs no module name.
"""

from .augment import Normalize, crop_flip, posterize, random_erase, seeded
from .cifar import (CIFAR100_CLASSES, CIFAR_FOLDER, NUM_CLASSES, DataError, Split, ensure_downloaded, load_cifar100,
                    read_class_names, read_split)
from .sources import DataSet, load_data
from .plan import EpochPlan, TrainSteps, iterate_steps, micro_batch_indices, steps_per_epoch

__all__ = [
    # cifar.py
    "CIFAR100_CLASSES", "CIFAR_FOLDER", "NUM_CLASSES", "DataError", "Split", "ensure_downloaded", "load_cifar100",
    "read_class_names", "read_split",
    # sources.py
    "DataSet", "load_data",
    # plan.py
    "EpochPlan", "TrainSteps", "iterate_steps", "micro_batch_indices", "steps_per_epoch",
    # augment.py
    "Normalize", "crop_flip", "posterize", "random_erase", "seeded",
]
