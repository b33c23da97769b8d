"""Optimizers and learning-rate schedules, as functions of the optimizer step.

A schedule is stepped once per optimizer step (never per micro-batch or per process), so the sequence of
learning rates is the same on every topology: `lr_at(step)` is the single source of truth, and tests
check it against the formula. With --layer_decay, timm's factory gives each parameter group an `lr_scale`
(1 for the head, layer_decay^k for k layers below it) and group g follows lr_at(step) * lr_scale_g; the
logged lr is the head's, read from the optimizer (Trainer.lr_in_use, loop.py).
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def create_optimizer(config: TrainConfig, model: torch.nn.Module, fused: bool,
                     capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum through timm's factory (no weight decay on biases and norms, as timm does),
    with timm's layer-wise lr decay groups when config.layer_decay is set.

    `fused` asks torch for its fused CUDA kernels (one launch for all parameters). `capturable` makes the
    step runnable inside a CUDA graph: the learning rate becomes a device tensor the scheduler fills in place.
    """
    from timm.optim import create_optimizer_v2
    extra = {"fused": True} if fused else {}
    if config.layer_decay is not None:
        extra["layer_decay"] = config.layer_decay
    lr = config.learning_rate
    if capturable:
        lr = torch.tensor(lr, device=next(model.parameters()).device)
        if config.optimizer == "adamw":  # torch's SGD has no such flag: its fused step is graph-safe as it is
            extra["capturable"] = True
    if config.optimizer == "adamw":
        optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=config.weight_decay, **extra)
    else:
        optimizer = create_optimizer_v2(model, "sgd", lr=lr, weight_decay=config.weight_decay,
                                        momentum=config.momentum, nesterov=config.nesterov, **extra)
    if capturable:
        # torch gives every group the same lr tensor object; the scheduler fills each group's in place, so
        # groups with their own lr_scale need their own tensor.
        for group in optimizer.param_groups:
            group["lr"] = lr.clone()
    return optimizer


def lr_at(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warm-up rises linearly and reaches learning_rate at its last step; afterwards `cosine` falls to min_lr
    and `linear_decay` to 0, both reaching the end value one step after the last step of training.
    """
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    peak = config.learning_rate
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if config.scheduler == "cosine":
        return config.min_lr + (peak - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def create_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                     steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    # torch's LambdaLR multiplies the optimizer's initial lr by the factor; keeping the formula in lr_at
    # (not in timm's epoch-based schedulers) makes it one readable function of the step. A float initial_lr
    # keeps the scheduler in floats when the lr is a device tensor (CUDA graphs): it then fills that tensor
    # in place without reading it back, which would wait for the GPU every step. timm's schedulers apply a
    # group's lr_scale (layer decay) at every step; LambdaLR does it through the group's initial lr.
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", config.learning_rate * group.get("lr_scale", 1.0))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, config, steps_per_epoch) / config.learning_rate)


def scheduled_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, group: int) -> float:
    """The lr LambdaLR sets into parameter group `group` at its current step, base_lr * lambda(last_epoch), computed
    on the host (LambdaLR's get_lr warns when called outside step(), and a capturable optimizer's lr tensor would
    need a device read)."""
    return scheduler.base_lrs[group] * scheduler.lr_lambdas[group](scheduler.last_epoch)
