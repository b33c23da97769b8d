"""The optimizer step: one call, `step(micro_batches, step_images)`, returning this process's summed per-image
loss on the device, whichever way the step runs: eagerly through accelerate (DDP, DeepSpeed or FSDP, accumulating
micro-batches), or as one captured CUDA graph (--cuda_graph, graphs.py). The loss is a plain function.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from accelerate.utils import is_compiled_module

from .graphs import CudaGraphStep
from .models import buffers_kept
from .runtime import Runtime


def per_image_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of each image: class labels, or mixup/cutmix soft targets (one row per image).

    torch's cross-entropy rather than timm's CrossEntropy/LabelSmoothingCrossEntropy/SoftTargetCrossEntropy
    classes: those return the batch mean, and padded micro-batches need per-image losses to give padding
    weight 0. With label_smoothing s both compute (1 - s) * NLL + s * mean over classes of -log p.
    """
    if labels.dim() == 2:  # mixup/cutmix soft targets (smoothing already folded in): SoftTargetCrossEntropy
        return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)


def step_scale(runtime: Runtime, step_images: int) -> float:
    """The factor on each micro-batch's weighted loss sum that makes the step's gradient the mean over its real
    images whatever the topology. DDP averages over W processes and accelerate/DeepSpeed divide by A micro-steps,
    so W*A/step_images: the plain mean for a full step, and the right weight for the smaller last step, whose
    micro-batches hold fewer images (or weight-0 padding, see data/plan.py)."""
    return runtime.processes * runtime.accumulation / step_images


class EagerStep:
    def __init__(self, runtime: Runtime, model: torch.nn.Module, optimizer, grad_clip: float,
                 label_smoothing: float):
        """`model` and `optimizer` as accelerate prepared them."""
        self.runtime, self.model, self.optimizer, self.grad_clip = runtime, model, optimizer, grad_clip
        self.loss = functools.partial(per_image_loss, label_smoothing=label_smoothing)
        # accelerate's unwrap_model with keep_torch_compile=True (its default, also used by get_state_dict under
        # DeepSpeed at every save) re-parents torch.compile's wrapper onto the bare model: the prepared model then
        # has no `no_sync`, and under DDP every micro-step would all-reduce. So accumulate() gets the module that
        # owns no_sync (DDP's wrapper, inside the compiled one), taken now.
        self.sync_model = model._orig_mod if is_compiled_module(model) else model
        self.plain_model = runtime.bare_model(model)

    def __call__(self, micro_batches: list, step_images: int) -> torch.Tensor:
        rt, model = self.runtime, self.model
        accelerator = rt.accelerator
        loss_sum = torch.zeros((), device=rt.device)
        scale = step_scale(rt, step_images)
        for a, (images, labels, weights) in enumerate(micro_batches):
            # Micro-batch a of this rank starts at position a*W + rank of the step (data/plan.py): past the step's end
            # it holds only weight-0 padding, run so that this rank joins the all-reduce. Its gradient is zero,
            # but its forward updates BatchNorm's running statistics (and num_batches_tracked): they are put
            # back after the step (after backward, which may still read the running buffers).
            padding_only = a * rt.processes + rt.rank >= step_images
            images = images.to(rt.device, rt.input_dtype, non_blocking=True)
            labels = labels.to(rt.device, non_blocking=True)
            weights = weights.to(rt.device, non_blocking=True)
            with buffers_kept(self.plain_model) if padding_only else contextlib.nullcontext(), \
                    accelerator.accumulate(self.sync_model):
                weighted = (self.loss(model(images).float(), labels) * weights).sum()
                accelerator.backward(weighted * scale)
                if accelerator.sync_gradients and self.grad_clip > 0 and not rt.deepspeed:
                    accelerator.clip_grad_norm_(model.parameters(), self.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += weighted.detach()
        assert accelerator.sync_gradients, "micro-steps out of step with the accumulation count"
        return loss_sum


class GraphStep:
    """The CUDA-graph step (one process, one micro-batch per step), captured at its first call: after any
    resume has loaded the optimizer state the graph reads."""

    def __init__(self, runtime: Runtime, model: torch.nn.Module, optimizer, grad_clip: float,
                 label_smoothing: float, input_shape: tuple):
        self.runtime, self.grad_clip, self.input_shape = runtime, grad_clip, input_shape
        self.plain_model = runtime.bare_model(model)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's
        self.loss = functools.partial(per_image_loss, label_smoothing=label_smoothing)
        self.graph = None

    def __call__(self, micro_batches: list, step_images: int) -> torch.Tensor:
        if self.graph is None:
            self.graph = CudaGraphStep(self.plain_model, self.optimizer, self.loss, self.input_shape,
                                       self.runtime.half_dtype, self.grad_clip)
        (images, labels, weights), = micro_batches
        return self.graph(images, labels, weights, step_scale(self.runtime, step_images))


def create_step(runtime: Runtime, model: torch.nn.Module, optimizer, config) -> EagerStep | GraphStep:
    if runtime.cuda_graph:
        shape = (runtime.micro_batch_size, 3, config.image_size, config.image_size)
        return GraphStep(runtime, model, optimizer, config.grad_clip, config.label_smoothing, shape)
    return EagerStep(runtime, model, optimizer, config.grad_clip, config.label_smoothing)
