"""What the run will be, resolved before any data is read or any model built: the Accelerator for the
topology at hand (CPU or GPU, DDP, DeepSpeed or FSDP2), processes, micro-batch and accumulation, precision and the
DeepSpeed settings written before `prepare()`, and every refusal that needs no data: a launch that would train
wrongly without saying so stops here, in one line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator, DistributedType, PartialState
from accelerate.utils import (FullyShardedDataParallelPlugin, InitProcessGroupKwargs, TorchDynamoPlugin,
                             is_compiled_module)

from .config import ConfigError, TrainConfig, env_world_size

# The half precisions by accelerate's names: the dtype DeepSpeed's engine holds the weights in, and autocast's.
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    """Everything the run resolved from its options and the launcher's environment."""
    accelerator: Accelerator
    processes: int
    rank: int
    micro_batch_size: int
    accumulation: int
    mixed_precision: str  # what `auto` became: no, bf16 or fp16
    deepspeed: bool
    zero_stage: int | None
    fsdp: bool  # torch's FSDP2 (fully_shard) through accelerate's plugin
    # Under DeepSpeed with bf16/fp16 the weights themselves are half precision and autocast does not
    # apply: a float32 input fails with "Input type (float) and bias type (c10::BFloat16) should be the same".
    # So inputs are cast to the engine's dtype.
    input_dtype: torch.dtype
    # The half precision (None: fp32) where the trainer applies autocast itself: in the CUDA-graph step (its
    # cache must be off while capturing) and the float32 EMA's evaluation; accelerate applies it on other paths.
    half_dtype: torch.dtype | None
    data_on_accelerator: bool  # the training images live on the GPU (augmented there)
    cuda_graph: bool  # the whole step is one captured CUDA graph (step.py)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def strategy(self) -> str:
        return strategy_name(self.deepspeed, self.zero_stage, self.fsdp)

    def bare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The timm model inside what prepare() wrapped it in (DDP, DeepSpeed's engine, torch.compile's wrapper;
        FSDP2 wraps nothing), as accelerate's unwrap_model(model, keep_torch_compile=False) gives it.

        Only DeepSpeed runs ask accelerate: its unwrap_model imports DeepSpeed whenever it is installed, to test
        for the engine's class, which adds 1.7 s to the start of every process of a run without DeepSpeed
        (measured 2026-12-05 on the 2-core CPU machine, deepspeed 0.19.8: a third of a short run's CPU time)."""
        if self.deepspeed:
            return self.accelerator.unwrap_model(model, keep_torch_compile=False)
        model = model._orig_mod if is_compiled_module(model) else model
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model

    def state_dict_source(self, model: torch.nn.Module) -> torch.nn.Module:
        """What accelerate's get_state_dict(..., unwrap=False) takes for the full weights: the prepared model
        where it gathers them (ZeRO-3's and FSDP2's shards; ZeRO-1/2 unwrap the engine themselves), else the bare
        model (bare_model: no DeepSpeed import)."""
        return model if self.deepspeed or self.fsdp else self.bare_model(model)

    def resolved(self) -> dict:
        """For config.json, the start-up line and checkpoint metadata."""
        return {
            "processes": self.processes,
            # torchrun / accelerate launch give each process LOCAL_WORLD_SIZE, its node's process count.
            "num_machines": self.processes // int(os.environ.get("LOCAL_WORLD_SIZE", self.processes)),
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation,
            "global_batch_size": self.micro_batch_size * self.accumulation * self.processes,
            "mixed_precision": self.mixed_precision,
            "distributed_type": str(self.accelerator.distributed_type).split(".")[-1],
            "device": str(self.device),
            "data_on_accelerator": self.data_on_accelerator,
            "deepspeed_zero_stage": self.zero_stage,
            "strategy": self.strategy,
        }


def resolve_runtime(config: TrainConfig) -> Runtime:
    """The Accelerator and everything the run will be; ConfigError for a set-up that cannot train rightly."""
    accelerator = create_accelerator(config)
    processes = accelerator.num_processes
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None
    fsdp = accelerator.is_fsdp2
    on_cpu = accelerator.device.type == "cpu"
    micro_batch_size, accumulation = check_layout(config, processes, strategy_name(deepspeed, zero_stage, fsdp),
                                                  on_cpu)
    accelerator.gradient_accumulation_steps = accumulation
    if deepspeed:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, config, micro_batch_size,
                            accumulation)
    check_ema_precision(config.model_ema, deepspeed, accelerator.mixed_precision)
    mixed_precision = resolve_mixed_precision(config, on_cpu)
    return Runtime(
        accelerator=accelerator, processes=processes, rank=accelerator.process_index,
        micro_batch_size=micro_batch_size, accumulation=accumulation, mixed_precision=mixed_precision,
        deepspeed=deepspeed, zero_stage=zero_stage, fsdp=fsdp,
        input_dtype=HALF_DTYPES.get(accelerator.mixed_precision, torch.float32) if deepspeed else torch.float32,
        half_dtype=HALF_DTYPES.get(mixed_precision),
        # RandAugment takes PIL images: its data stay on the CPU (config.py refuses --data_device accelerator).
        data_on_accelerator=not on_cpu and config.data_device != "cpu" and config.augment != "randaug",
        cuda_graph=config.cuda_graph)


def strategy_name(deepspeed: bool, zero_stage: int | None, fsdp: bool) -> str:
    """launch.sh's name for what accelerate resolved: ddp (one process included), zero1/2/3 or fsdp."""
    return "fsdp" if fsdp else f"zero{zero_stage}" if deepspeed else "ddp"


def check_layout(config: TrainConfig, processes: int, strategy: str, on_cpu: bool) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps), or ConfigError for options that this many processes, this strategy
    (launch.sh's names: single, ddp, zero1, zero2, zero3, zero2_offload, zero3_offload, fsdp) or the CPU cannot
    train. Needs no Accelerator: launch.sh asks it once, before the workers start (trainer/precheck.py), and every
    worker asks it again with what accelerate resolved."""
    micro_batch_size, accumulation = resolve_batching(
        config.batch_size, processes, config.micro_batch_size, config.max_micro_batch_size)
    if config.model_ema and strategy.startswith(("zero3", "fsdp")):
        # timm's ModelEmaV3 copies the whole module and lerps towards its weights: each process holds a slice.
        name = "FSDP" if strategy == "fsdp" else "DeepSpeed ZeRO-3"
        raise ConfigError(f"--model_ema is not supported under {name} (each process holds a slice of the weights); "
                          f"use ZeRO-1/2 or DDP")
    if config.data_device == "accelerator" and on_cpu:
        raise ConfigError("--data_device accelerator needs a GPU; use --data_device cpu or auto")
    if config.mixes and micro_batch_size % 2:
        raise ConfigError(f"--mixup/--cutmix pair the images of a micro-batch: the micro-batch must be even, "
                          f"got {micro_batch_size} (set --micro_batch_size or --batch_size)")
    if config.cuda_graph and (on_cpu or processes > 1 or strategy not in ("single", "ddp") or config.compile):
        raise ConfigError(CUDA_GRAPH_SETUP)
    if config.cuda_graph and accumulation != 1:
        raise ConfigError(f"--cuda_graph cannot accumulate gradients: use --micro_batch_size "
                          f"{config.batch_size} (now {micro_batch_size} x {accumulation} steps)")
    return micro_batch_size, accumulation


def training_set_fits(nbytes: int, capacity: int, data_device: str, title: str) -> bool:
    """Whether the training set (`nbytes` of uint8 images) goes on the GPU of `capacity` bytes (its total memory:
    the same on every process with the same GPU, so all of them choose alike). Under --data_device auto it may take a
    quarter (the rest is the model's, its activations' and the augmentation's); a set that does not fit stays on
    the CPU (said by the caller). --data_device accelerator asks for it whatever the size: refused, rather than
    failing with a CUDA out-of-memory error, when it would take more than 80 % of `capacity`."""
    if data_device == "accelerator" and nbytes > 0.8 * capacity:
        from .data import DataError
        raise DataError(f"--data_device accelerator: the training set of {title} needs {nbytes / 2**30:.1f} GiB "
                        f"and the GPU holds {capacity / 2**30:.1f} GiB; use --data_device cpu or auto (with "
                        f"--num_workers N), or a smaller --image_size")
    return data_device == "accelerator" or nbytes <= 0.25 * capacity


def check_batch_fits(batch_size: int, images: int, train_file) -> None:
    """Refuse a global batch larger than the training set: every step would be mostly weight-0 padding."""
    if batch_size > images:
        raise ConfigError(f"--batch_size {batch_size} is larger than the training set ({images} images in "
                          f"{train_file})")


CUDA_GRAPH_SETUP = ("--cuda_graph needs one process on a GPU, without DeepSpeed, FSDP, fp16 or --compile (use "
                    "--compile alone on other set-ups)")


# The first timm whose ModelEmaV3 updates a float32 EMA from half-precision weights: before it, its update calls
# torch._foreach_lerp_(float32 EMA, bf16 weights), which raises "expected dtype float for 'end' but got dtype
# c10::BFloat16". setup.cfg asks for it; an environment that runs the repository without installing it may be older.
TIMM_EMA_FROM_HALF = "1.0.31"


def check_ema_precision(model_ema: bool, deepspeed: bool, mixed_precision: str, timm_version: str | None = None):
    """Refuse --model_ema where DeepSpeed holds the weights in bf16/fp16 (the EMA stays float32) and timm is too
    old to update it from them: the run would fail at its first optimizer step."""
    from packaging.version import Version
    import timm
    timm_version = timm_version or timm.__version__
    if model_ema and deepspeed and mixed_precision in HALF_DTYPES and \
            Version(timm_version) < Version(TIMM_EMA_FROM_HALF):
        raise ConfigError(f"--model_ema under DeepSpeed {mixed_precision} needs timm >= {TIMM_EMA_FROM_HALF} "
                          f"(installed: {timm_version}): pip install -U timm, or use --mixed_precision no or DDP")


def resolve_batching(batch_size: int, processes: int, micro_batch_size: int | None,
                     max_micro_batch_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps) with batch_size = micro x processes x accumulation."""
    if batch_size % processes:
        divisors = [p for p in range(1, batch_size + 1) if batch_size % p == 0 and p <= 64]
        raise ConfigError(f"--batch_size {batch_size} is not divisible by the {processes} processes; "
                          f"use a batch_size that is a multiple of {processes}, or one of these process counts: "
                          f"{divisors}")
    per_process = batch_size // processes
    valid = [m for m in range(1, per_process + 1) if per_process % m == 0]
    if micro_batch_size is None:
        fitting = [m for m in valid if m <= max_micro_batch_size]
        micro_batch_size = fitting[-1]
    elif per_process % micro_batch_size:
        raise ConfigError(f"--micro_batch_size {micro_batch_size} does not divide batch_size {batch_size} / "
                          f"{processes} processes = {per_process}; valid values: {valid}")
    return micro_batch_size, per_process // micro_batch_size


def configure_deepspeed(ds: dict, config: TrainConfig, micro_batch_size: int, accumulation: int) -> None:
    """Micro-batch, accumulation, global batch and clipping come from the trainer's options alone; written into
    accelerate's DeepSpeed config, which `prepare()` hands to the engine."""
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = config.batch_size
    # accelerate fills "auto" with 1.0 (clipping that DDP would not do) and reads 0.0 as unset, so
    # the value is written here, the same as the DDP path's. Measured (test_vit, 2 CPU processes, 16 AdamW steps):
    # with accelerate's 1.0 ZeRO ended 6.8e-3 from DDP, with equal clipping 9.1e-7. 0 means off in DeepSpeed.
    ds["gradient_clipping"] = config.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # model.safetensors needs the full weights: accelerate's get_state_dict gathers them from the ZeRO-3
        # shards only when this is on, and `accelerate launch --use_deepspeed --zero_stage 3` leaves it off
        # (zero3_save_16bit_model); the run would then train a whole epoch and fail at its first save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    # DeepSpeed's throughput timer (synchronized by default) is started in every forward when the engine
    # has no dataloader, which accelerate never gives it: a full device sync per micro-step. The trainer
    # measures its own throughput. Key as read by deepspeed.utils.config.get_timers_config.
    ds["timers"] = {"throughput": {"enabled": False}}


def deepspeed_applied(engine) -> dict:
    """What the DeepSpeed engine applies of configure_deepspeed's settings, read back from it (for config.json)."""
    return {"train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "gradient_clipping": engine.gradient_clipping(),
            "gather_16bit_weights_on_model_save": engine.zero_gather_16bit_weights_on_model_save(),
            "throughput_timer": engine._config.timers_config.enabled}


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


def runs_on_cpu(device: str) -> bool:
    """Whether `--device` (auto, cpu or cuda) means the CPU here; ConfigError for cuda without a visible GPU.
    Shared with trainer/evaluate.py."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return device == "cpu" or not has_cuda


def create_accelerator(config: TrainConfig) -> Accelerator:
    on_cpu = runs_on_cpu(config.device)
    has_cuda = torch.cuda.is_available()
    deepspeed_asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and os.environ.get("FSDP_VERSION", "1") != "2":
        # FSDP1 wraps the model in FlatParameters whose names, state dicts and no_sync differ from DDP's: only
        # fully_shard (FSDP2) keeps the timm model's own parameter names that checkpoints and resume rely on.
        raise ConfigError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (see "
                          "accelerate_configs/fsdp.yaml) or pass --fsdp_version 2 to accelerate launch")
    # On CPU the process group must be gloo; accelerate picks it for DDP, but under DeepSpeed it only
    # counts the processes when told: without the gloo handler, 2 CPU processes under DeepSpeed each see
    # num_processes 1 and DeepSpeed stops on "train_batch_size is not equal to micro_batch_per_gpu * ...".
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and env_world_size() > 1 else []
    # cpu=True would silently drop the DeepSpeed plugin; DeepSpeed finds the CPU by itself when there is no GPU.
    # accelerate's own TorchDynamoPlugin compiles the prepared model (checkpoint_folder.py strips `_orig_mod.` when saving).
    # dynamic=False: the epoch's short last step (and evaluation's batches) would otherwise make dynamo recompile
    # with a symbolic batch size, and since it tries its newest cache entry first, every later full step would
    # run that slower dynamic-shape graph. Static, each shape compiles once and keeps its own graph.
    dynamo = TorchDynamoPlugin(backend=config.compile_backend if config.compile else "no", mode=config.compile_mode,
                               dynamic=False)
    precision = resolve_mixed_precision(config, on_cpu)
    if config.cuda_graph:
        if on_cpu or deepspeed_asked or fsdp_asked or env_world_size() > 1 or precision == "fp16" or config.compile:
            raise ConfigError(CUDA_GRAPH_SETUP)
        # The graphed step applies autocast itself (its cache must be off while capturing); accelerate's
        # forward wrapper would cache casts.
        precision = "no"
    if deepspeed_asked:
        import_deepspeed_without_mlflow()
    if deepspeed_asked and on_cpu:
        skip_deepspeed_shared_memory_op()
    accelerator = Accelerator(cpu=on_cpu and not deepspeed_asked, mixed_precision=precision,
                              kwargs_handlers=handlers, step_scheduler_with_optimizer=False, dynamo_plugin=dynamo,
                              log_with=config.trackers or None, project_dir=config.save_dir)
    check_process_group(accelerator, launched=env_world_size())
    if fsdp_asked and on_cpu:
        use_fsdp_on_cpu(accelerator, precision)
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


def import_deepspeed_without_mlflow() -> None:
    """Import DeepSpeed (before accelerate does) without letting it import MLflow.

    deepspeed/autotuning/autotuner.py runs `import mlflow` when DeepSpeed is imported, for its autotuner, which the
    trainer never runs; with MLflow installed (the [mlflow] extra) that cost 1.1 s of CPU in every DeepSpeed
    process's start (`import torch, timm, deepspeed`: 4.0 CPU-s, 2.9 without; deepspeed 0.19.8, mlflow-skinny
    3.18.0, 2-core CPU machine, 2026-12-05). A None in sys.modules makes that import raise ImportError, which the
    autotuner catches (has_mlflow = False); the entry goes again at once, so `--log_with mlflow` imports MLflow as
    usual. Nothing is hidden when MLflow is imported already."""
    import importlib
    import sys
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None
    try:
        importlib.import_module("deepspeed")
    except ImportError:  # refused in create_accelerator: the launcher asked for DeepSpeed but accelerate did not enable it
        pass
    finally:
        if hide:
            del sys.modules["mlflow"]


def skip_deepspeed_shared_memory_op() -> None:
    """Keep DeepSpeed from compiling an op that training never uses.

    On the CPU accelerator DeepSpeed's TorchBackend builds its shared-memory all-reduce (`deepspeed_shm_comm`)
    with g++ at its first start in an environment: 70 s and 86 s measured on 2 cores (deepspeed 0.19.8,
    2026-12-04/05), and a failed start where no compiler is installed. Only its tensor-parallel inference
    (`inference_all_reduce`) uses the op; ZeRO's training collectives go through torch.distributed (gloo).
    DeepSpeed decides whether to build it from `deepspeed.ops.__compatible_ops__`, a dict it keeps once probed
    "so edits to it persist" (deepspeed/ops/__init__.py); marking the op incompatible there skips the build."""
    try:
        import deepspeed.ops
    except ImportError:  # refused below: the launcher asked for DeepSpeed but accelerate did not enable it
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # ShareMemCommBuilder.NAME


def use_fsdp_on_cpu(accelerator: Accelerator, precision: str) -> None:
    """Turn accelerate's FSDP plugin on for processes on the CPU (gloo), as it is on GPUs.

    accelerate 1.16 sets DistributedType.FSDP only for accelerator types (MULTI_GPU, MULTI_XPU, ...;
    accelerate/state.py): with cpu=True it resolves MULTI_CPU and drops the plugin, which would train DDP while
    the launcher asked for FSDP. torch's fully_shard itself runs on the CPU over gloo (measured: 2 processes, 2
    epochs of test_vit, the same weights as DDP bit for bit; tests/test_strategies.py), so the state is set as
    accelerate sets it on a GPU (state.py, where it resolves DistributedType.FSDP): the distributed type, in the
    shared process state too, and the plugin from the launcher's FSDP_* variables, with the run's precision."""
    plugin = FullyShardedDataParallelPlugin()
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def configure_fsdp(plugin, model) -> None:
    """Wrap the timm model's own blocks (models.block_classes) unless the accelerate config names the classes or
    another policy; called before `prepare()`, which shards each wrapped block, then the whole model."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from .models import block_classes
    if plugin.auto_wrap_policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = block_classes(model)
    policy = plugin.mixed_precision_policy
    if policy is not None and policy.reduce_dtype not in (None, torch.float32):
        # accelerate reduces the gradients in the compute dtype (bf16), where DDP sums the float32 gradients that
        # autocast leaves: float32, as DDP (and torchtitan's default policy). Measured (test_vit, 2 CPU processes,
        # bf16, 2 epochs, 2026-12-04): 3.6e-3 from DDP (relative L2) against 3.8e-3 with bf16 reductions; the rest
        # is FSDP computing in bf16 weights where DDP autocasts.
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def fsdp_applied(plugin, model) -> dict:
    """What FSDP applies to the prepared `model`, for config.json: the classes of the sharded units (the blocks,
    the final norm that accelerate shards apart, the whole model), the dtypes, and the share of the parameters'
    elements this process holds (1 / processes when the shards are even)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    from torch.distributed.tensor import DTensor
    policy = plugin.mixed_precision_policy
    params = list(model.parameters())
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return {"fsdp_version": plugin.fsdp_version, "reshard_after_forward": plugin.reshard_after_forward,
            # fully_shard makes each sharded module an instance of a class named FSDP<its class>.
            "sharded_units": sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules()
                                     if isinstance(m, FSDPModule)}),
            "param_dtype": str(getattr(policy, "param_dtype", None) or torch.float32).removeprefix("torch."),
            "reduce_dtype": str(getattr(policy, "reduce_dtype", None) or torch.float32).removeprefix("torch."),
            "state_dict_type": str(plugin.state_dict_type).split(".")[-1],
            "cpu_offload": isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            "parameter_share_held": round(held / sum(p.numel() for p in params), 4)}


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
