"""The Accelerator for the topology at hand: CPU or GPU, DDP or DeepSpeed, precision, and the checks that
stop a launch which would train wrongly without saying so."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

from .config import ConfigError, TrainConfig, env_world_size


def resolve_mixed_precision(config: TrainConfig, on_cpu: bool) -> str:
    """`auto`: fp32 on CPU; on a GPU, the half precision an accelerate config asks for, else bf16 where supported.

    A bare `accelerate launch` sets ACCELERATE_MIXED_PRECISION=no whether or not anyone asked, so "no" there
    cannot be told from the default; fp32 on a GPU takes an explicit --mixed_precision no.
    """
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if on_cpu:
        return "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    return "bf16" if torch.cuda.is_bf16_supported() else "no"


def create_accelerator(config: TrainConfig) -> Accelerator:
    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    on_cpu = config.device == "cpu" or not has_cuda
    deepspeed_asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # On CPU the process group must be gloo; accelerate picks it for DDP, but under DeepSpeed it only
    # counts the processes when told: without the gloo handler, 2 CPU processes under DeepSpeed each see
    # num_processes 1 and DeepSpeed stops on "train_batch_size is not equal to micro_batch_per_gpu * ...".
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and env_world_size() > 1 else []
    # cpu=True would silently drop the DeepSpeed plugin; DeepSpeed finds the CPU by itself when there is no GPU.
    # accelerate's own TorchDynamoPlugin compiles the prepared model and strips `_orig_mod.` when saving.
    dynamo = TorchDynamoPlugin(backend="inductor" if config.compile else "no", mode=config.compile_mode)
    precision = resolve_mixed_precision(config, on_cpu)
    if config.cuda_graph:
        if on_cpu or deepspeed_asked or env_world_size() > 1 or precision == "fp16" or config.compile:
            raise ConfigError("--cuda_graph needs one process on a GPU, without DeepSpeed, fp16 or --compile "
                              "(use --compile alone on other set-ups)")
        # The graphed step applies autocast itself (its cache must be off while capturing); accelerate's
        # forward wrapper would cache casts.
        precision = "no"
    accelerator = Accelerator(cpu=on_cpu and not deepspeed_asked, mixed_precision=precision,
                              kwargs_handlers=handlers, step_scheduler_with_optimizer=False, dynamo_plugin=dynamo,
                              log_with=config.trackers or None, project_dir=config.save_dir)
    check_process_group(accelerator, launched=env_world_size())
    # accelerate 1.15 autocasts fp16 only on accelerators: on the CPU it keeps mixed_precision "fp16" but sets
    # native_amp False and trains in fp32 (measured: a Linear layer's output stays float32). bf16 it does autocast on
    # the CPU (the same layer's output is bfloat16).
    # Under DeepSpeed the engine itself holds the weights in the half precision.
    if precision != "no" and not accelerator.native_amp and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"--mixed_precision {precision} is not applied on {accelerator.device.type} by accelerate "
                          f"(it would train in fp32); use --mixed_precision bf16 or no")
    if deepspeed_asked and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError("the launcher asked for DeepSpeed but accelerate did not enable it; "
                          "install it with: pip install -e '.[deepspeed]'")
    if deepspeed_asked and config.device == "cpu" and has_cuda:
        raise ConfigError("--device cpu is not supported under DeepSpeed on a machine with GPUs")
    return accelerator


def check_process_group(accelerator: Accelerator, launched: int) -> None:
    """Refuse processes that each believe they are alone: each would train on all the data, silently.

    This is what `accelerate launch --multi_gpu` gives on a machine without GPUs when the Accelerator is
    not built with cpu=True (measured with accelerate 1.15: DistributedType.NO, num_processes 1 in each of
    the two processes), and what a launcher whose group failed to form looks like.
    """
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(f"the launcher started {launched} processes but accelerate sees "
                          f"{accelerator.num_processes}: they did not join one process group; on CPU use "
                          f"`accelerate launch --multi_gpu --num_processes N` (or torchrun) with --device cpu/auto")
