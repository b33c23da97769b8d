"""The training loop: one Trainer whose methods each do one job (setup, train_epoch, evaluate, save, run).

With --model_ema the trainer keeps timm's ModelEmaV3 of the unwrapped model, updated once per optimizer step,
evaluated beside the model (`val_*_ema` in metrics.jsonl) and saved as `epoch_N/model_ema.safetensors`.
With --log_with tensorboard, accelerate's tracker writes `{save_dir}/tensorboard/` (the run's options as
hparams in a timestamped subfolder on a fresh start): `step/train_loss`, `step/lr` and `step/images_per_s`
every log_interval steps, and `epoch/*` (the metrics.jsonl values) after each epoch, all against the
optimizer step. A resumed run purges the events logged after its checkpoint, as it truncates the JSONL files.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import DistributedType
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint, records
from .config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig, resolve_batching, to_dict
from .data import Normalize, TrainSteps, ensure_downloaded, iterate_steps, load_cifar100
from .distributed import create_accelerator, resolve_mixed_precision
from .graphs import CudaGraphStep
from .models import count_parameters, create_model
from .optim import create_optimizer, create_scheduler, lr_at


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

        set_seed(config.seed)  # the same initial head on every process and topology
        with accelerator.main_process_first():  # pretrained weights: download once, then read the cache
            model = create_model(config)
        self.num_parameters = count_parameters(model)
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
            train, normalize, config.augment, config.seed, config.batch_size, self.rank, self.world, self.accumulation,
            randaug=config.randaug, reprob=config.reprob, mixup=config.mixup, cutmix=config.cutmix,
            mixup_prob=config.mixup_prob, mixup_switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing)
        self.steps_per_epoch = len(self.train_steps)
        self.normalize = normalize

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
        unwrapped = accelerator.unwrap_model(self.model)
        self.plain_model = getattr(unwrapped, "_orig_mod", unwrapped)  # without torch.compile's wrapper
        self.num_test = len(test.labels)
        self.progress = checkpoint.Progress()
        self.stop_signal = None  # set by the preemption signal handler
        accelerator.register_for_checkpointing(self.scheduler, self.progress)
        # Under DeepSpeed with bf16/fp16 the weights themselves are half precision and autocast does not
        # apply, so inputs are cast to the engine's dtype (shared notes).
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision, torch.float32) if self.deepspeed else torch.float32
        self.mixed_precision = resolve_mixed_precision(config, accelerator.device.type == "cpu")
        self.graph_step = None  # captured at the first step, after any resume has loaded the optimizer state
        if config.cuda_graph and self.accumulation != 1:
            raise ConfigError(f"--cuda_graph cannot accumulate gradients: use --micro_batch_size "
                              f"{config.batch_size} (now {self.micro_batch_size} x {self.accumulation} steps)")
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

    def _configure_deepspeed(self) -> None:
        """Micro-batch, accumulation, global batch and clipping come from the trainer's options alone."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = self.micro_batch_size
        ds["gradient_accumulation_steps"] = self.accumulation
        ds["train_batch_size"] = self.config.batch_size
        # accelerate fills "auto" with 1.0 (clipping that DDP would not do) and reads 0.0 as unset, so
        # the value is written here, the same as the DDP path's (shared notes). 0 means off in DeepSpeed.
        ds["gradient_clipping"] = self.config.grad_clip

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
        # the smaller last step, whose micro-batches are padded with weight-0 images.
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
        for images, labels, weights in micro_batches:
            images = images.to(accelerator.device, self.input_dtype, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            weights = weights.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
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
            lr = lr_at(progress.global_step, cfg, self.steps_per_epoch)  # what the scheduler set, without a device read
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
        totals = torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)
        for images, labels in self.test_loader:
            with torch.autocast(self.accelerator.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = model(self.normalize(images).to(torch.float32 if ema else self.input_dtype)).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            top5 = logits.topk(5, dim=1).indices
            # gather_for_metrics drops the samples accelerate duplicated to even out the last batch,
            # so each test image counts exactly once.
            losses, top5, labels = self.accelerator.gather_for_metrics((losses, top5, labels))
            hits = top5 == labels[:, None]
            totals += torch.stack([losses.sum().double(), hits[:, 0].sum().double(),
                                   hits.any(dim=1).sum().double(), torch.tensor(len(labels), device=hits.device,
                                                                                dtype=torch.float64)])
        loss, correct1, correct5, count = totals.tolist()
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

    def resume(self, folder: Path) -> None:
        saved = checkpoint.read_manifest(folder)
        here = self.resolved()
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
        checkpoint.load(self.accelerator, folder, reshard_deepspeed=reshard)
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
        self.say(f"resumed from {folder}: epoch {p.epoch}, step {p.global_step}")

    def resume_point(self) -> Path | None:
        if self.config.checkpoint:
            return Path(self.config.checkpoint)
        if self.config.resume == "auto":
            found = checkpoint.on_main(self.accelerator, lambda: checkpoint.newest_valid(self.save_dir, say=self.say))
            if found is None:
                self.say(f"--resume auto: no valid checkpoint in {self.save_dir}, starting fresh")
            return found
        return None

    def save(self, name: str, val_acc1: float | None = None) -> None:
        resolved = self.resolved()
        info = {"epoch": self.progress.epoch, "global_step": self.progress.global_step,
                "step_in_epoch": self.progress.step_in_epoch, "val_acc1": val_acc1,
                "timm_model": resolved["timm_model"], "num_classes": 100, "model_kwargs": self.model_kwargs(),
                "compiled": self.config.compile, "model_ema": self.ema is not None,
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
        if folder is not None:
            self.resume(folder)
        if accelerator.is_main_process:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            records.write_run_config(self.save_dir, to_dict(cfg), self.resolved())
            records.truncate_records(self.save_dir, self.progress.epoch, self.progress.global_step)
        self.print_startup()
        # Ctrl-C (SIGINT) too: it saves and exits 75 like preemption (before this point: one line, main.py).
        for name in {cfg.preempt_signal, "SIGUSR1", "SIGINT"}:
            signal.signal(getattr(signal, name), self._request_stop)
        if cfg.log_with == "tensorboard":
            # Events after the checkpoint are purged, as truncate_records does for the JSONL files; the options
            # are written once, on a fresh start.
            accelerator.init_trackers("tensorboard", config=to_dict(cfg) if self.progress.global_step == 0 else None,
                                      init_kwargs={"tensorboard": {"purge_step": self.progress.global_step + 1}})
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
