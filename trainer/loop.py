"""The training loop: one Trainer whose methods each do one job (setup, train_epoch, evaluate, save, run).

With --model_ema the trainer keeps timm's ModelEmaV3 of the unwrapped model, updated once per optimizer step,
evaluated beside the model (`val_*_ema` in metrics.jsonl) and saved as `epoch_N/model_ema.safetensors`.
With --log_with (accelerate's trackers, e.g. tensorboard,mlflow) each tracker gets the run's options on a fresh
start, `step/train_loss`, `step/lr` and `step/images_per_s` every log_interval steps, and `epoch/*` (the
metrics.jsonl values) after each epoch, all against the optimizer step, under the project name `cifar-trainer`.
TensorBoard writes `{save_dir}/cifar-trainer/` (the options as hparams in a timestamped subfolder), and a resumed
run purges the events logged after its checkpoint, as it truncates the JSONL files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import DistributedType
from accelerate.utils import is_compiled_module, set_seed
from tqdm.auto import tqdm

from . import checkpoint, records
from .config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig, resolve_batching, to_dict
from .data import NUM_CLASSES, Normalize, TrainSteps, ensure_downloaded, iterate_steps, load_cifar100
from .distributed import create_accelerator, resolve_mixed_precision
from .graphs import CudaGraphStep
from .models import buffers_kept, count_parameters, create_model
from .optim import create_optimizer, create_scheduler, scheduled_lr


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint."""


class StopVote:
    """Whether any process was asked to stop, agreed by all processes one optimizer step late, with no host sync.

    After each step every process starts a non-blocking all-reduce (MAX) of its own stop flag and reads the
    previous step's result, which is the same on every process, so all stop after the same step, one or two
    steps after the signal, whatever the log interval. torch.distributed offers the collective; accelerate has no
    non-blocking reduce, and DeepSpeed runs on the same default process group. One process reads its own flag.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.pending = None  # (work, tensor, event) of the vote in flight
        # NCCL reduces device tensors only, and reading one is a sync with everything queued before it: the result
        # is copied into pinned host memory behind the collective and read one step later, once the copy's event
        # is done (by then the next step is queued, so the device never waits for the host).
        self.cuda = self.distributed and device.type == "cuda"
        self.host = torch.zeros(1, pin_memory=True) if self.cuda else None

    def exchange(self, stop: bool) -> bool:
        """The previous vote's result; starts this step's vote (with `stop`) unless that result is already stop."""
        if not self.distributed:
            return stop
        agreed = self.finish()
        if not agreed:
            flag = torch.full((1,), float(stop), device=self.device)  # a fill kernel: no host-to-device copy
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            event = None
            if self.cuda:
                work.wait()  # NCCL: the current stream waits for the collective; the host does not
                self.host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                work = None
            self.pending = (work, flag, event)
        return agreed

    def finish(self) -> bool:
        """Waits for the vote in flight, if any, and returns its result."""
        if self.pending is None:
            return False
        work, flag, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
            return bool(self.host.item())
        work.wait()  # gloo (CPU): already done unless another process is behind
        return bool(flag.item())

    def now(self, stop: bool) -> bool:
        """A blocking vote (once per epoch, after evaluation): whether any process was asked to stop by now."""
        self.finish()
        if not self.distributed:
            return stop
        flag = torch.full((1,), float(stop), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.accelerator = accelerator = create_accelerator(config)
        self.save_dir = Path(config.save_dir)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.micro_batch_size, self.accumulation = resolve_batching(
            config.batch_size, self.world, config.micro_batch_size, config.max_micro_batch_size)
        accelerator.gradient_accumulation_steps = self.accumulation
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            self._configure_deepspeed()
            if config.model_ema and accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise ConfigError("--model_ema is not supported under DeepSpeed ZeRO-3 (each process holds a slice "
                                  "of the weights); use ZeRO-1/2 or DDP")

        with accelerator.local_main_process_first():  # one download per node; the others wait
            folder = ensure_downloaded(config.data_dir, config.download) if accelerator.is_local_main_process \
                else Path(config.data_dir) / "cifar-100-python"
        train, test, _ = load_cifar100(folder)  # the class names are read to validate the meta file
        self.num_train = len(train.labels)
        if config.batch_size > self.num_train:  # every step would be mostly weight-0 padding
            raise ConfigError(f"--batch_size {config.batch_size} is larger than the training set "
                              f"({self.num_train} images in {folder / 'train'})")

        set_seed(config.seed)  # the same initial head on every process and topology
        with accelerator.main_process_first():  # pretrained weights: download once, then read the cache
            model = create_model(config)
        self.num_parameters = count_parameters(model)
        self._check_single_image_micro_batches(model)
        data_cfg = model.pretrained_cfg
        normalize = Normalize(data_cfg.get("mean", (0.5,) * 3), data_cfg.get("std", (0.5,) * 3), config.image_size)

        if config.data_device == "accelerator" and accelerator.device.type == "cpu":
            raise ConfigError("--data_device accelerator needs a GPU; use --data_device cpu or auto")
        # RandAugment takes PIL images: its data stay on the CPU (config.py refuses --data_device accelerator).
        self.data_on_accelerator = (accelerator.device.type != "cpu" and config.data_device != "cpu"
                                    and config.augment != "randaug")
        if self.data_on_accelerator:
            train.images, train.labels = train.images.to(accelerator.device), train.labels.to(accelerator.device)
        if config.mixes and self.micro_batch_size % 2:
            raise ConfigError(f"--mixup/--cutmix pair the images of a micro-batch: the micro-batch must be even, "
                              f"got {self.micro_batch_size} (set --micro_batch_size or --batch_size)")
        self.train_steps = TrainSteps(
            train, normalize.to(train.images.device), config.augment, config.seed, config.batch_size, self.rank,
            self.world, self.accumulation,
            randaug=config.randaug, reprob=config.reprob, mixup=config.mixup, cutmix=config.cutmix,
            mixup_prob=config.mixup_prob, mixup_switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing, pad=config.cuda_graph)
        self.steps_per_epoch = len(self.train_steps)
        self.normalize = normalize
        self.eval_normalize = normalize.to(accelerator.device)  # its own: see Normalize

        model.to(accelerator.device)  # before the optimizer, whose fused/capturable state lives beside the weights
        self.ema = None
        if config.model_ema:
            from timm.utils import ModelEmaV3
            # A float32 copy made before prepare(): DeepSpeed's bf16/fp16 engine converts the model, not its EMA.
            self.ema = ModelEmaV3(model, decay=config.model_ema_decay)
        fused = accelerator.device.type == "cuda" and not self.deepspeed
        optimizer = create_optimizer(config, model, fused=fused, capturable=config.cuda_graph)
        # The scheduler is not passed to prepare(): accelerate would step it once per process
        # (or, under DeepSpeed, inside the engine); it is stepped here once per optimizer step.
        self.scheduler = create_scheduler(config, optimizer, self.steps_per_epoch)
        test_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(test.images, test.labels), batch_size=config.eval_batch_size)
        self.model, self.optimizer, self.test_loader = accelerator.prepare(model, optimizer, test_loader)
        # accelerate's unwrap_model with keep_torch_compile=True (its default, also used by get_state_dict at every
        # save) re-parents torch.compile's wrapper onto the bare model: the prepared model then has no `no_sync`,
        # and under DDP every micro-step would all-reduce. So accumulate() gets the module that owns no_sync (DDP's
        # wrapper, inside the compiled one), taken now, and the trainer unwraps without keeping the compiled wrapper.
        self.sync_model = self.model._orig_mod if is_compiled_module(self.model) else self.model
        unwrapped = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.plain_model = getattr(unwrapped, "_orig_mod", unwrapped)  # without torch.compile's wrapper
        self.num_test = len(test.labels)
        self.progress = checkpoint.Progress()
        self.stop_signal = None  # set by the preemption signal handler
        accelerator.register_for_checkpointing(self.scheduler, self.progress)
        # Under DeepSpeed with bf16/fp16 the weights themselves are half precision and autocast does not
        # apply: a float32 input fails with "Input type (float) and bias type (c10::BFloat16) should be the same".
        # So inputs are cast to the engine's dtype.
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision, torch.float32) if self.deepspeed else torch.float32
        self.mixed_precision = resolve_mixed_precision(config, accelerator.device.type == "cpu")
        self.graph_step = None  # captured at the first step, after any resume has loaded the optimizer state
        if config.cuda_graph and self.accumulation != 1:
            raise ConfigError(f"--cuda_graph cannot accumulate gradients: use --micro_batch_size "
                              f"{config.batch_size} (now {self.micro_batch_size} x {self.accumulation} steps)")
        if config.cuda_graph and any(n.endswith(("running_mean", "running_var")) for n, _ in model.named_buffers()):
            # A CUDA graph needs one static shape, so the short last step is padded with weight-0 images; the loss
            # weights keep them out of the gradient, but batch statistics (BatchNorm, EvoNorm-B) would see them.
            raise ConfigError(f"--cuda_graph cannot train {config.model}: it has batch statistics (BatchNorm), which "
                              f"the padding of the epoch's short last step would reach; use --compile instead")
        if accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one static training shape: pick the fastest kernels once

    def say(self, *args) -> None:
        """Print on the main process of the whole job (accelerate's print speaks once per node)."""
        if self.accelerator.is_main_process:
            print(*args, flush=True)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype that the CUDA-graph step applies itself (accelerate does it on other paths)."""
        return {"bf16": torch.bfloat16}.get(self.mixed_precision)

    def _check_single_image_micro_batches(self, model: torch.nn.Module) -> None:
        """Refuse, before training, a last step whose single-image micro-batches the model cannot train on.

        The last step's micro-batches hold only their real images (data.py): fewer than 2 x processes x
        accumulation images leave some with one image, and BatchNorm in training mode raises on a batch of one
        value per channel (a 1x1 feature map, e.g. resnet18 at 32x32), which would end the run at its first
        epoch's end. One probe forward on one image (buffers put back) asks the model itself.
        """
        cfg = self.config
        last = self.num_train - (math.ceil(self.num_train / cfg.batch_size) - 1) * cfg.batch_size
        if last >= 2 * self.world * self.accumulation or cfg.cuda_graph:  # --cuda_graph pads every micro-batch
            return
        try:
            # fork_rng: dropout in the probe must not move the random stream that training draws from next.
            with buffers_kept(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
                model.train()(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
        except ValueError as error:
            raise ConfigError(f"the epoch's last step holds {last} images over {self.world * self.accumulation} "
                              f"micro-batches, so some hold one image, which {cfg.model} cannot train on ({error}); "
                              f"choose a --batch_size that leaves 0 or at least {2 * self.world * self.accumulation} "
                              f"images for the last step ({self.num_train} training images)") from None

    def _configure_deepspeed(self) -> None:
        """Micro-batch, accumulation, global batch and clipping come from the trainer's options alone."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.micro_batch_size
        ds["gradient_accumulation_steps"] = self.accumulation
        ds["train_batch_size"] = self.config.batch_size
        # accelerate fills "auto" with 1.0 (clipping that DDP would not do) and reads 0.0 as unset, so
        # the value is written here, the same as the DDP path's. Measured (test_vit, 2 CPU processes, 16 AdamW steps):
        # with accelerate's 1.0 ZeRO ended 6.8e-3 from DDP, with equal clipping 9.1e-7. 0 means off in DeepSpeed.
        ds["gradient_clipping"] = self.config.grad_clip
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

    def _deepspeed_applied(self) -> dict:
        """What the DeepSpeed engine applies of the settings above, read back from the engine (for config.json)."""
        engine = self.model
        return {"train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
                "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                "gradient_clipping": engine.gradient_clipping(),
                "gather_16bit_weights_on_model_save": engine.zero_gather_16bit_weights_on_model_save(),
                "throughput_timer": engine._config.timers_config.enabled}

    # --- what the run resolved -------------------------------------------------------------------
    def resolved(self) -> dict:
        acc = self.accelerator
        return {
            "timm_model": self.config.timm_name_and_kwargs()[0],
            "parameters": self.num_parameters,
            "processes": self.world,
            # torchrun / accelerate launch give each process LOCAL_WORLD_SIZE, its node's process count.
            "num_machines": self.world // int(os.environ.get("LOCAL_WORLD_SIZE", self.world)),
            "micro_batch_size": self.micro_batch_size,
            "accumulation_steps": self.accumulation,
            "global_batch_size": self.micro_batch_size * self.accumulation * self.world,
            "steps_per_epoch": self.steps_per_epoch,
            "last_step_images": self.num_train - (self.steps_per_epoch - 1) * self.config.batch_size,
            "train_images": self.num_train,
            "test_images": self.num_test,
            "mixed_precision": self.mixed_precision,
            "compile": self.config.compile,
            "cuda_graph": self.config.cuda_graph,
            "distributed_type": str(acc.distributed_type).split(".")[-1],
            "device": str(acc.device),
            "data_on_accelerator": self.data_on_accelerator,
            "deepspeed_zero_stage": acc.state.deepspeed_plugin.zero_stage if self.deepspeed else None,
            "deepspeed_engine": self._deepspeed_applied() if self.deepspeed else None,
            "normalize_mean": self.normalize.mean.flatten().tolist(),
            "normalize_std": self.normalize.std.flatten().tolist(),
        }

    def print_startup(self) -> None:
        r = self.resolved()
        self.say(
            f"model {self.config.model} ({r['timm_model']}, {r['parameters'] / 1e6:.2f} M parameters) | "
            f"{r['distributed_type']} on {r['processes']} process(es), {r['device']} | "
            f"micro-batch {r['micro_batch_size']} x accumulation {r['accumulation_steps']} x {r['processes']} "
            f"processes = global batch {r['global_batch_size']} | {r['steps_per_epoch']} steps per epoch "
            f"(last step {r['last_step_images']} images) | mixed precision {r['mixed_precision']}")

    # --- training --------------------------------------------------------------------------------
    def train_step(self, micro_batches: list, step_images: int) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns the summed per-image loss (on device)."""
        model, accelerator = self.model, self.accelerator
        loss_sum = torch.zeros((), device=accelerator.device)
        # The step's gradient must be the mean over its real images whatever the topology. DDP averages over
        # W processes and accelerate/DeepSpeed divide by A micro-steps, so each micro-batch contributes its
        # weighted loss sum times W*A/step_images: the plain mean for a full step, and the right weight for
        # the smaller last step, whose micro-batches hold fewer images (or weight-0 padding, see data.py).
        scale = self.world * self.accumulation / step_images
        if self.config.cuda_graph:
            if self.graph_step is None:
                self.graph_step = CudaGraphStep(
                    accelerator.unwrap_model(self.model), getattr(self.optimizer, "optimizer", self.optimizer),
                    self.per_image_loss, (self.micro_batch_size, 3, self.config.image_size, self.config.image_size),
                    self.autocast_dtype, self.config.grad_clip)
            (images, labels, weights), = micro_batches
            loss_sum = self.graph_step(images, labels, weights, scale)
            self.after_optimizer_step()
            return loss_sum
        for a, (images, labels, weights) in enumerate(micro_batches):
            # Micro-batch a of this rank starts at position a*W + rank of the step (data.py): past the step's end
            # it holds only weight-0 padding, run so that this rank joins the all-reduce. Its gradient is zero,
            # but its forward updates BatchNorm's running statistics (and num_batches_tracked): they are put
            # back after the step (after backward, which may still read the running buffers).
            padding_only = a * self.world + self.rank >= step_images
            images = images.to(accelerator.device, self.input_dtype, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            weights = weights.to(accelerator.device, non_blocking=True)
            with buffers_kept(self.plain_model) if padding_only else contextlib.nullcontext(), \
                    accelerator.accumulate(self.sync_model):
                weighted = (self.per_image_loss(model(images).float(), labels) * weights).sum()
                accelerator.backward(weighted * scale)
                if accelerator.sync_gradients and self.config.grad_clip > 0 and not self.deepspeed:
                    accelerator.clip_grad_norm_(model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += weighted.detach()
        assert accelerator.sync_gradients, "micro-steps out of step with the accumulation count"
        self.after_optimizer_step()
        return loss_sum

    def after_optimizer_step(self) -> None:
        self.scheduler.step()
        if self.ema is not None:  # once per optimizer step, from the weights it just wrote
            self.ema.update(self.plain_model)

    def lr_in_use(self) -> float:
        """The learning rate the next optimizer step uses: the head group's (lr_scale 1 under --layer_decay),
        as the scheduler set it after the previous step. Read from the prepared optimizer, so a scheduler that
        stepped twice or per micro-batch shows in what is logged."""
        groups = self.optimizer.param_groups
        head = max(range(len(groups)), key=lambda i: groups[i].get("lr_scale", 1.0))
        if not isinstance(groups[head]["lr"], torch.Tensor):
            return groups[head]["lr"]
        # Capturable optimizers (CUDA graphs) hold the lr in a device tensor, and reading it waits for the device:
        # the host float the scheduler filled it with instead.
        return scheduled_lr(self.scheduler, head)

    def per_image_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # torch's cross-entropy rather than timm's CrossEntropy/LabelSmoothingCrossEntropy/SoftTargetCrossEntropy
        # classes: those return the batch mean, and padded micro-batches need per-image losses to give padding
        # weight 0. With label_smoothing s both compute (1 - s) * NLL + s * mean over classes of -log p.
        if labels.dim() == 2:  # mixup/cutmix soft targets (smoothing already folded in): SoftTargetCrossEntropy
            return -(labels * F.log_softmax(logits, dim=-1)).sum(dim=-1)
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.config.label_smoothing)

    def train_epoch(self, epoch: int) -> dict:
        cfg, accelerator, progress = self.config, self.accelerator, self.progress
        self.model.train()
        self.train_steps.set_epoch(epoch)
        start_step = progress.step_in_epoch
        # Running sums live on the device and are read once per log interval (no sync per step). A run
        # resumed mid-epoch starts from the saved, already reduced sums (counted once, on the main process).
        carried = progress.epoch_loss_sum if accelerator.is_main_process else 0.0
        epoch_loss = torch.tensor(carried, dtype=torch.float64, device=accelerator.device)
        # Likewise the log interval a preemption cut short, so its steps.jsonl line is the uninterrupted run's.
        carried = progress.interval_loss_sum if accelerator.is_main_process else 0.0
        interval_loss = torch.tensor(carried, dtype=torch.float64, device=accelerator.device)
        interval_images = progress.interval_images
        vote = StopVote(accelerator.device)
        bar = tqdm(total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)
        start, images_this_session = time.perf_counter(), 0
        pin = accelerator.device.type == "cuda"
        for step, micro_batches in iterate_steps(self.train_steps, start_step, cfg.num_workers, pin):
            step_images = min(cfg.batch_size, self.num_train - step * cfg.batch_size)
            lr = self.lr_in_use()
            step_loss = self.train_step(micro_batches, step_images)
            epoch_loss += step_loss
            interval_loss += step_loss
            interval_images += step_images
            images_this_session += step_images
            progress.step_in_epoch, progress.global_step = step + 1, progress.global_step + 1
            bar.update(1)
            if progress.global_step % cfg.log_interval == 0 or step + 1 == self.steps_per_epoch:
                # One collective and one host sync per log interval: the interval's loss over all processes.
                loss_total = accelerator.reduce(interval_loss, reduction="sum").item()
                mean_loss = loss_total / interval_images
                rate = images_this_session / (time.perf_counter() - start)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss is {mean_loss} at step {progress.global_step} "
                                             f"(epoch {epoch + 1}); stopped before writing a checkpoint")
                self.log_step({"step": progress.global_step, "epoch": epoch + 1, "lr": lr,
                               "train_loss": mean_loss, "images_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                interval_loss.zero_()
                interval_images = 0
            # The last step of an epoch does not vote: the epoch ends, and train_epochs votes after evaluation.
            if step + 1 < self.steps_per_epoch and vote.exchange(self.stop_signal is not None):
                bar.close()
                progress.epoch_loss_sum = accelerator.reduce(epoch_loss, reduction="sum").item()
                progress.interval_loss_sum = accelerator.reduce(interval_loss, reduction="sum").item()
                progress.interval_images = interval_images
                progress.epoch_train_time += time.perf_counter() - start
                return None
        vote.finish()
        progress.interval_loss_sum, progress.interval_images = 0.0, 0
        bar.close()
        train_time = time.perf_counter() - start
        total_loss = accelerator.reduce(epoch_loss, reduction="sum").item()
        return {"train_loss": total_loss / self.num_train, "lr": lr,
                "train_time_s": progress.epoch_train_time + train_time,
                "images_per_s": images_this_session / train_time, "train_images": self.num_train}

    def log_step(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            records.append_line(self.save_dir / records.STEPS_FILE, entry)
        # accelerate logs on the main process only (and not at all without --log_with).
        self.accelerator.log({f"step/{k}": entry[k] for k in ("train_loss", "lr", "images_per_s")}, step=entry["step"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """Loss, top-1 and top-5 on the test set of the trained model, or of `model` (its EMA)."""
        ema = model is not None
        model = model if ema else self.model
        model.eval()
        # The EMA copy is not prepared by accelerate: it stays float32 and gets autocast here, where the
        # prepared model gets it from accelerate (or, with CUDA graphs, here too).
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        autocast_dtype = half if ema else (self.autocast_dtype if self.config.cuda_graph else None)
        loss, correct1, correct5, count = evaluate_model(
            self.accelerator, model, self.test_loader, self.eval_normalize, torch.float32 if ema else self.input_dtype,
            autocast_dtype)[0].tolist()
        if ema:
            return {"val_loss_ema": loss / count, "val_acc1_ema": 100 * correct1 / count,
                    "val_acc5_ema": 100 * correct5 / count}
        return {"val_loss": loss / count, "val_acc1": 100 * correct1 / count, "val_acc5": 100 * correct5 / count,
                "val_images": int(count)}

    # --- checkpoints ------------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        """What timm.create_model needs besides the name to rebuild this model (for export)."""
        model = self.accelerator.unwrap_model(self.model)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        return {"img_size": list(img_size)} if img_size is not None else {}

    def resume(self, folder: Path) -> dict:
        """Continue from checkpoint `folder`; returns where from and the options changed since (for config.json)."""
        saved = checkpoint.read_manifest(folder)
        here = self.resolved()
        changed = self.check_resume_options(folder, saved)
        if (saved.get("distributed_type") == "DEEPSPEED") != self.deepspeed:
            raise checkpoint.CheckpointError(
                f"{folder} was saved by a {saved.get('distributed_type')} run and cannot resume a "
                f"{here['distributed_type']} run; start from its model.safetensors with --pretrained_file instead")
        if self.deepspeed and saved.get("deepspeed_zero_stage") != here["deepspeed_zero_stage"]:
            raise checkpoint.CheckpointError(
                f"{folder} holds ZeRO-{saved.get('deepspeed_zero_stage')} state; resume it with the same stage (this "
                f"run: ZeRO-{here['deepspeed_zero_stage']}), or start from its model.safetensors with --pretrained_file")
        if saved.get("compiled", False) != self.config.compile:
            # accelerate's training state names the weights with or without torch.compile's wrapper.
            raise checkpoint.CheckpointError(
                f"{folder} was saved {'with' if saved.get('compiled') else 'without'} --compile; resume it the same "
                f"way, or start from its model.safetensors with --pretrained_file")
        reshard = self.deepspeed and saved.get("processes") != self.world
        if reshard and here["deepspeed_zero_stage"] == 3:
            # Measured: ZeRO-3 state re-partitioned through DeepSpeed's universal checkpoint resumes 3e-4 (relative
            # L2) away from the uninterrupted run after 5 steps, against 1e-7 for ZeRO-2: not float noise, so
            # it is refused rather than trained on.
            raise checkpoint.CheckpointError(
                f"{folder} holds ZeRO-3 state sharded over {saved.get('processes')} processes; resume it with "
                f"{saved.get('processes')} processes (ZeRO-1/2 checkpoints resume with any count), or start from "
                f"its model.safetensors with --pretrained_file")
        # torch's Optimizer.load_state_dict brings back the saved param_groups (lr, initial_lr, weight_decay, betas,
        # momentum, ...) and LambdaLR.load_state_dict the saved base_lrs: a changed option would be recorded in
        # config.json but not applied. So each group gets back the hyperparameters this run's
        # options built (its per-parameter state, moments and step counts, stays the checkpoint's; a tensor lr
        # stays the device tensor the optimizer was built with), and the schedule continues at the checkpoint's
        # step with this run's formula.
        optimizer = self.scheduler.optimizer
        built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        checkpoint.load(self.accelerator, folder, reshard_deepspeed=reshard)
        for group, options in zip(optimizer.param_groups, built):
            group.update(options)
        scheduler = self.scheduler
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        for index, group in enumerate(optimizer.param_groups):
            lr = scheduled_lr(scheduler, index)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        # accelerate restores its micro-step counter, which decides when gradients synchronise; checkpoints lie
        # on optimizer-step boundaries, and the accumulation count may differ from the saving run's.
        self.accelerator.step = 0
        if reshard:
            self.say(f"re-partitioned the ZeRO state of {folder} from {saved.get('processes')} to {self.world} processes")
        if self.ema is not None:
            if not (folder / checkpoint.MODEL_EMA_FILE).is_file():
                raise checkpoint.CheckpointError(
                    f"{folder} holds no {checkpoint.MODEL_EMA_FILE} (saved without --model_ema); resume it without "
                    f"--model_ema, or start from its model.safetensors with --pretrained_file")
            self.ema.module.load_state_dict(checkpoint.load_weights(folder / checkpoint.MODEL_EMA_FILE))
        p = self.progress
        if p.global_step != p.epoch * self.steps_per_epoch + p.step_in_epoch:
            raise checkpoint.CheckpointError(
                f"{folder} was saved with {p.global_step} steps after {p.epoch} epochs, which does not match "
                f"{self.steps_per_epoch} steps per epoch here: the data set or batch_size differ")
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        self.say(f"resumed from {folder}: epoch {p.epoch}, step {p.global_step}; "
                 f"training from step {p.global_step + 1}"
                 + (f"; from here on with changed options: {changes}" if changed else ""))
        return {"checkpoint": str(folder), "epoch": p.epoch, "global_step": p.global_step, "changed_options": changed}

    def check_resume_options(self, folder: Path, saved: dict) -> dict:
        """Refuse what a resume cannot change (checkpoint.FIXED_ON_RESUME); return the options that changed."""
        before = saved.get("options")
        if before is None:  # saved before checkpoints recorded their options: nothing to compare
            return {}
        changed = checkpoint.changed_options(before, to_dict(self.config))
        fixed = [f"{k} {a} -> {b}" for k, (a, b) in changed.items() if k in checkpoint.FIXED_ON_RESUME]
        if "weight_decay" in changed and (before["weight_decay"] > 0) != (self.config.weight_decay > 0):
            fixed.append(f"weight_decay {before['weight_decay']} -> {self.config.weight_decay} (to or from 0 "
                         f"changes the optimizer's parameter groups)")
        if saved.get("train_images", self.num_train) != self.num_train:
            fixed.append(f"training images {saved['train_images']} -> {self.num_train}")
        if fixed:
            raise checkpoint.CheckpointError(
                f"{folder} cannot be resumed with {', '.join(fixed)}: resume with the checkpoint's values, or start "
                f"a new run in another --save_dir (from its model.safetensors with --pretrained_file)")
        needed = saved.get("epoch", 0) + (1 if saved.get("step_in_epoch") else 0)
        if self.config.epochs < needed:
            raise checkpoint.CheckpointError(
                f"{folder} holds {saved.get('global_step')} steps ({saved.get('epoch')} epochs"
                f"{' and part of the next' if saved.get('step_in_epoch') else ''}): --epochs {self.config.epochs} "
                f"would end before it; give --epochs {needed} or more")
        return changed

    def resume_point(self) -> Path | None:
        if self.config.checkpoint:
            return Path(self.config.checkpoint)
        if self.config.resume == "auto":  # with none found, prepare_save_dir decides whether to start fresh
            return checkpoint.on_main(self.accelerator, lambda: checkpoint.newest_valid(self.save_dir, say=self.say))
        return None

    def prepare_save_dir(self, folder: Path | None) -> str | None:
        """Main process, before anything is written (run it through checkpoint.on_main): remove what killed saves
        left, then refuse (CheckpointError) a start that would overwrite, wipe or mix up the run in save_dir, or
        with --overwrite delete it. `folder`: the checkpoint to resume from. Returns a line to show, if any."""
        cfg, save_dir = self.config, self.save_dir
        if save_dir.is_dir():
            checkpoint.remove_stale(save_dir)
        held = records.run_entries(save_dir)
        what = ", ".join(p.name for p in held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")

        def records_readable() -> None:  # a resume rewrites them after its step: read them before writing anything
            try:
                records.read_records(save_dir)
            except ValueError as error:
                raise checkpoint.CheckpointError(f"{error}: repair or delete that file, then resume again") from None

        if folder is not None:
            if held and Path(folder).resolve().parent != save_dir.resolve():
                raise checkpoint.CheckpointError(
                    f"--save_dir {save_dir} holds a run ({what}) and --checkpoint {folder} lies outside it: resume "
                    f"into the folder that holds the checkpoint, or into another --save_dir")
            records_readable()
            return None
        if not held:
            return f"--resume auto: no valid checkpoint in {save_dir}, starting fresh" if cfg.resume else None
        if cfg.overwrite:
            records.clear_run(save_dir)
            return f"--overwrite: deleted the previous run in {save_dir} ({what})"
        if cfg.resume != "auto":
            raise checkpoint.CheckpointError(
                f"--save_dir {save_dir} holds a run ({what}): continue it with --resume auto, start a new one there "
                f"with --overwrite (deletes it), or choose another --save_dir")
        # --resume auto, and no checkpoint verifies. Starting again from step 0 is a resume from the run's start
        # only when the folder holds no checkpoint at all and its records were written with these same options
        # (a run killed before its first save): anything else would wipe a history that cannot be written again.
        checkpoints = [p.name for p in held if p.is_dir() and p.name.startswith(("epoch_", "step_"))]
        try:
            before = json.loads((save_dir / records.CONFIG_FILE).read_text())["options"]
        except (OSError, ValueError, KeyError, TypeError):
            before = None
        changed = checkpoint.changed_options(before, to_dict(cfg)) if isinstance(before, dict) else None
        if checkpoints:
            reason = f"holds checkpoints ({', '.join(checkpoints)}) but none that verifies (see the warnings above)"
        elif changed is None:
            reason = f"holds records of a run ({what}) whose {records.CONFIG_FILE} is missing or unreadable"
        elif changed:
            reason = (f"holds records of a run ({what}) started with other options "
                      f"({', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}) and no checkpoint")
        else:
            records_readable()
            return (f"--resume auto: no checkpoint in {save_dir} yet; starting its run again from the beginning "
                    f"(same options)")
        raise checkpoint.CheckpointError(
            f"--resume auto: {save_dir} {reason}; start a new run there with --overwrite (deletes it, without "
            f"--resume), or choose another --save_dir")

    def save(self, name: str, val_acc1: float | None = None) -> None:
        resolved = self.resolved()
        info = {"epoch": self.progress.epoch, "global_step": self.progress.global_step,
                "step_in_epoch": self.progress.step_in_epoch, "val_acc1": val_acc1,
                "timm_model": resolved["timm_model"], "num_classes": 100, "model_kwargs": self.model_kwargs(),
                "compiled": self.config.compile, "model_ema": self.ema is not None,
                "options": to_dict(self.config), "train_images": self.num_train,  # compared on resume
                **{k: resolved[k] for k in ("processes", "distributed_type", "deepspeed_zero_stage")}}
        ema = self.ema.module.state_dict() if self.ema is not None else None
        path = checkpoint.save(self.accelerator, self.model, self.save_dir, name, info, ema=ema)
        if path is None:
            if self.config.on_save_error == "stop":
                raise checkpoint.SaveError(f"stopped: checkpoint {self.save_dir / name} could not be written; "
                                           f"earlier checkpoints are intact (--on_save_error continue trains on)")
            return
        self.say(f"saved {path}")
        if self.config.keep_last and self.accelerator.is_main_process:
            for removed in checkpoint.rotate(self.save_dir, self.config.keep_last, self.config.keep_best):
                self.say(f"removed old checkpoint {removed}")
        self.accelerator.wait_for_everyone()

    def should_save(self, epoch: int) -> bool:
        every = self.config.save_epochs
        return epoch == self.config.epochs or (every > 0 and epoch % every == 0)

    def _request_stop(self, signum, frame) -> None:
        # Only a flag: the loop stops every process after the same step and saves there. A second
        # signal (a launcher passing the first one on, or during the save) lands here again and changes nothing.
        if self.stop_signal is None:
            print(f"received {signal.Signals(signum).name}: saving a checkpoint within two optimizer steps (or "
                  f"after this epoch's evaluation), then exiting with status {PREEMPTED_EXIT_CODE}", flush=True)
            self.stop_signal = signum

    def _stop_cause(self) -> str:
        return signal.Signals(self.stop_signal).name if self.stop_signal else "a signal to another process"

    # --- the whole run ------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg, accelerator = self.config, self.accelerator
        folder = self.resume_point()
        note = checkpoint.on_main(accelerator, lambda: self.prepare_save_dir(folder))
        if note:
            self.say(note)
        resumed = self.resume(folder) if folder is not None else None
        if accelerator.is_main_process:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            records.truncate_records(self.save_dir, self.progress.epoch, self.progress.global_step)
            records.write_run_config(self.save_dir, to_dict(cfg), self.resolved(), resumed)
        self.print_startup()
        # Ctrl-C (SIGINT) too: it saves and exits 75 like preemption (before this point: one line, main.py).
        for name in {cfg.preempt_signal, "SIGUSR1", "SIGINT"}:
            signal.signal(getattr(signal, name), self._request_stop)
        if cfg.log_with:
            # TensorBoard purges the events after the checkpoint, as truncate_records does for the JSONL files;
            # the options are written once, on a fresh start. Trackers that would write into the working folder
            # write into save_dir.
            init_kwargs = {"tensorboard": {"purge_step": self.progress.global_step + 1},
                           "mlflow": {"run_name": self.save_dir.resolve().name},
                           "wandb": {"dir": str(self.save_dir), "name": self.save_dir.resolve().name},
                           "dvclive": {"dir": str(self.save_dir / "dvclive")}}
            try:
                accelerator.init_trackers(records.TRACKER_PROJECT, config=to_dict(cfg) if self.progress.global_step == 0 else None,
                                          init_kwargs=init_kwargs)
            except Exception as error:  # a tracker's own set-up (server, credentials, URI): before the first step
                raise ConfigError(f"--log_with {cfg.log_with}: the tracker did not start ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})") from None
        try:
            history = self.train_epochs()
        except BaseException:
            for tracker in accelerator.trackers:  # flush what was logged; the error goes on
                tracker.finish()
            raise
        accelerator.end_training()
        return history

    def train_epochs(self) -> list[dict]:
        cfg, accelerator = self.config, self.accelerator
        history = []
        while self.progress.epoch < cfg.epochs:
            epoch = self.progress.epoch
            epoch_start = time.perf_counter()
            train = self.train_epoch(epoch)
            if train is None:  # asked to stop mid-epoch
                self.save(f"step_{self.progress.global_step}")
                raise Preempted(f"stopped by {self._stop_cause()} at step "
                                f"{self.progress.global_step}; resume with --resume auto")
            val = self.evaluate()
            if self.ema is not None:
                val.update(self.evaluate(self.ema.module))
            self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
            self.progress.epoch_loss_sum = self.progress.epoch_train_time = 0.0
            metrics = {"epoch": epoch + 1, "step": self.progress.global_step, **train, **val,
                       "epoch_time_s": time.perf_counter() - epoch_start}
            if not all(math.isfinite(v) for v in (metrics["train_loss"], metrics["val_loss"])):
                raise FloatingPointError(f"loss is not finite after epoch {epoch + 1} "
                                         f"(step {self.progress.global_step}); no checkpoint written")
            history.append(metrics)
            if accelerator.is_main_process:
                records.append_line(self.save_dir / records.METRICS_FILE, metrics)
            accelerator.log({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")},
                            step=metrics["step"])
            ema = f"val_acc1_ema {metrics['val_acc1_ema']:.2f} % | " if self.ema is not None else ""
            self.say(
                f"epoch {epoch + 1}/{cfg.epochs} step {metrics['step']} | train_loss {metrics['train_loss']:.4f} | "
                f"val_loss {metrics['val_loss']:.4f} | val_acc1 {metrics['val_acc1']:.2f} % | "
                f"val_acc5 {metrics['val_acc5']:.2f} % | {ema}lr {metrics['lr']:.3e} | "
                f"{metrics['images_per_s']:.0f} img/s | {metrics['epoch_time_s']:.1f} s")
            # One blocking vote per epoch: a signal during the last steps or the evaluation, on any process, stops
            # every process here, and the epoch is saved even when it is not a save epoch.
            stop = StopVote(accelerator.device).now(self.stop_signal is not None)
            if self.should_save(epoch + 1) or (stop and epoch + 1 < cfg.epochs):
                self.save(f"epoch_{epoch + 1}", val_acc1=metrics["val_acc1"])
            if stop and epoch + 1 < cfg.epochs:
                raise Preempted(f"stopped by {self._stop_cause()} after epoch "
                                f"{epoch + 1}; resume with --resume auto")
        return history


@torch.no_grad()
def evaluate_model(accelerator, model: torch.nn.Module, loader, normalize: Normalize,
                   input_dtype: torch.dtype = torch.float32, autocast_dtype: torch.dtype | None = None):
    """(summed loss, top-1 hits, top-5 hits, images) and the confusion matrix (true x predicted class) over
    `loader` (prepared by accelerate): the trainer's evaluation, shared with trainer/evaluate.py."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=accelerator.device)
    for images, labels in loader:
        with torch.autocast(accelerator.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(normalize(images).to(input_dtype)).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        top5 = logits.topk(5, dim=1).indices
        # gather_for_metrics drops the samples accelerate duplicated to even out the last batch,
        # so each test image counts exactly once.
        losses, top5, labels = accelerator.gather_for_metrics((losses, top5, labels))
        hits = top5 == labels[:, None]
        totals += torch.stack([losses.sum().double(), hits[:, 0].sum().double(),
                               hits.any(dim=1).sum().double(), torch.tensor(len(labels), device=hits.device,
                                                                            dtype=torch.float64)])
        confusion += torch.bincount(labels * NUM_CLASSES + top5[:, 0], minlength=NUM_CLASSES * NUM_CLASSES)
    return totals.cpu(), confusion.view(NUM_CLASSES, NUM_CLASSES).cpu()
