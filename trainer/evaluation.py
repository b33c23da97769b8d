"""Evaluation on the test set: loss, top-1, top-5 and the confusion matrix, over every process's share of the
test images, each counted once. One Evaluator serves the trained model and its EMA alike; trainer/evaluate.py
evaluates a saved checkpoint with the same function.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .data import Normalize
from .runtime import Runtime


class Evaluator:
    def __init__(self, runtime: Runtime, loader, normalize: Normalize, num_classes: int):
        """`loader`: the test set, prepared by accelerate (each process holds its share)."""
        self.runtime, self.loader, self.normalize, self.num_classes = runtime, loader, normalize, num_classes

    def __call__(self, model: torch.nn.Module, ema: bool = False) -> dict:
        """val_loss, val_acc1, val_acc5 and val_images of the prepared model; with `ema`, val_*_ema of the EMA.

        The EMA is not prepared by accelerate: a float32 copy, fed float32 inputs and autocast here in the run's
        half precision, where the prepared model gets autocast from accelerate (with CUDA graphs, from here too).
        """
        rt = self.runtime
        if ema:
            input_dtype, autocast_dtype = torch.float32, rt.half_dtype
        else:
            input_dtype, autocast_dtype = rt.input_dtype, rt.half_dtype if rt.cuda_graph else None
        loss, correct1, correct5, count = evaluate_model(
            rt.accelerator, model, self.loader, self.normalize, self.num_classes, input_dtype,
            autocast_dtype)[0].tolist()
        if ema:
            return {"val_loss_ema": loss / count, "val_acc1_ema": 100 * correct1 / count,
                    "val_acc5_ema": 100 * correct5 / count}
        return {"val_loss": loss / count, "val_acc1": 100 * correct1 / count, "val_acc5": 100 * correct5 / count,
                "val_images": int(count)}


class Evaluation(NamedTuple):
    """What evaluate_model returns, on the CPU. With per_image, `labels` and `predictions` hold each image's label
    and top-1 class in the order the processes' shares gather to (the test set's order, for a sequential loader)."""
    totals: torch.Tensor  # summed loss, top-1 hits, top-5 hits, images (float64)
    confusion: torch.Tensor  # true x predicted class counts
    labels: Optional[torch.Tensor] = None
    predictions: Optional[torch.Tensor] = None


@torch.no_grad()
def evaluate_model(accelerator, model: torch.nn.Module, loader, normalize: Normalize, num_classes: int,
                   input_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None,
                   per_image: bool = False) -> Evaluation:
    """Loss, top-1 and top-5 totals and the confusion matrix over `loader` (prepared by accelerate), and with
    `per_image` each image's label and top-1 prediction: the trainer's evaluation, shared with trainer/evaluate.py.
    With fewer than 5 classes, top-5 is top-`num_classes` (100 %)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=accelerator.device)
    all_labels, predictions = [], []
    for images, labels in loader:
        with torch.autocast(accelerator.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(normalize(images).to(input_dtype)).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        # gather_for_metrics drops the samples accelerate duplicated to even out the last batch,
        # so each test image counts exactly once.
        losses, top5, labels = accelerator.gather_for_metrics((losses, top5, labels))
        hits = top5 == labels[:, None]
        # No host sync per batch on a GPU: the image count is added as a host number (torch.tensor(n, device=...)
        # would be a blocking copy), and the confusion counts are scattered in place (torch.bincount on CUDA reads
        # the labels' min and max back to the host to size its output).
        totals[:3] += torch.stack([losses.sum().double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        totals[3] += len(labels)
        confusion.index_add_(0, labels * num_classes + top5[:, 0], torch.ones_like(labels))
        if per_image:
            all_labels.append(labels)
            predictions.append(top5[:, 0])
    confusion = confusion.view(num_classes, num_classes).cpu()
    if not per_image:
        return Evaluation(totals.cpu(), confusion)
    return Evaluation(totals.cpu(), confusion, torch.cat(all_labels).cpu(), torch.cat(predictions).cpu())
