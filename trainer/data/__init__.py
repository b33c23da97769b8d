"""CIFAR-100 data: reading and downloading, the sharded epoch plan, augmentation (all in plan.py for now)."""

from .plan import (CIFAR100_CLASSES, CIFAR_FOLDER, NUM_CLASSES, DataError, EpochPlan, Normalize, Split, TrainSteps,
                   crop_flip, ensure_downloaded, iterate_steps, load_cifar100, micro_batch_indices, posterize,
                   random_erase, read_class_names, read_split, seeded, steps_per_epoch)

__all__ = ["CIFAR100_CLASSES", "CIFAR_FOLDER", "NUM_CLASSES", "DataError", "EpochPlan", "Normalize", "Split",
           "TrainSteps", "crop_flip", "ensure_downloaded", "iterate_steps", "load_cifar100", "micro_batch_indices",
           "posterize", "random_erase", "read_class_names", "read_split", "seeded", "steps_per_epoch"]
