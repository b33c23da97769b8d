"""The Trainer conducts a run: it builds the parts (runtime.py resolved the run, data/, models.py, optim.py,
step.py, evaluation.py, checkpoint.py, ranks.py, run_log.py), resumes, then per epoch trains, evaluates, logs
and maybe saves, stopping every process after the same step when a signal or the time limit asks
(preemption.py, time_limit.py).

With --model_ema the trainer keeps timm's ModelEmaV3 of the unwrapped model, updated once per optimizer step,
evaluated beside the model (`val_*_ema` in metrics.jsonl) and saved beside its weights in each checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import torch
from accelerate.utils import set_seed

from .checkpoint import CheckpointManager
from .config import PREEMPTED_EXIT_CODE, ConfigError, TrainConfig
from .data import Normalize, TrainSteps, iterate_steps, load_data
from .evaluation import Evaluator
from .models import check_trainable, count_parameters, create_model
from .optim import create_optimizer, create_scheduler, scheduled_lr
from .preemption import Preempted, StopRequest, StopVote
from .ranks import Ranks
from .run_lock import RunLock
from .run_log import RunLog
from .runtime import (check_batch_fits, configure_fsdp, deepspeed_applied, fsdp_applied, resolve_runtime,
                      training_set_fits)
from .step import create_step
from .time_limit import TimeLimit


class Progress:
    """Where training stands; saved with the accelerate state so a resume continues at the right step."""

    def __init__(self) -> None:
        self.epoch = 0           # epochs completed
        self.step_in_epoch = 0   # optimizer steps completed within the current epoch
        self.global_step = 0     # optimizer steps completed in all
        self.epoch_loss_sum = 0.0    # summed per-image training loss of the current epoch so far, all processes
        self.epoch_train_time = 0.0  # seconds spent training in the current epoch before this session
        self.interval_loss_sum = 0.0  # summed loss of the log interval a preemption cut short, all processes
        self.interval_images = 0      # and its image count

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class EpochOutcome(NamedTuple):
    """What Trainer.train_epoch returns."""
    stopped: bool  # every process was asked to stop within the epoch: progress holds where, for a step checkpoint
    metrics: dict  # the epoch's training metrics (train_loss, lr, train_time_s, images_per_s, train_images), or {}


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.runtime = rt = resolve_runtime(config)  # every refusal that needs no data, before any is read
        self.accelerator = accelerator = rt.accelerator
        self.ranks = Ranks(accelerator)  # which process writes, downloads first, broadcasts
        self.log = RunLog(self.ranks, config)
        self.save_dir = Path(config.save_dir)

        with self.ranks.first_on_main(per_node=True) as downloads:  # one download per node; the others wait
            self.data = data = load_data(config.data, config.data_dir, config.image_size, downloads, config.download,
                                         config.decode, threads=config.num_workers)
        for note in data.notes:
            self.ranks.say(note)
        train, test = data.train, data.test
        self.num_train, self.num_test = len(train.labels), len(test.labels)
        check_batch_fits(config.batch_size, self.num_train, data.train_source)

        set_seed(config.seed)  # the same initial head on every process and topology
        with self.ranks.first_on_main():  # pretrained weights: download once, then read the cache
            model = create_model(config, data.num_classes)
        self.num_parameters = count_parameters(model)
        check_trainable(model, config, self.num_train, rt.processes, rt.accumulation)
        data_cfg = model.pretrained_cfg
        self.normalize = Normalize(data_cfg.get("mean", (0.5,) * 3), data_cfg.get("std", (0.5,) * 3),
                                   config.image_size)
        if rt.data_on_accelerator and not isinstance(train.images, torch.Tensor):  # --decode per_step: files
            if config.data_device == "accelerator":
                raise ConfigError("--data_device accelerator holds the decoded training set on the GPU; with "
                                  "--decode per_step (chosen, or auto's choice: see above) use --data_device auto")
            rt.data_on_accelerator = False
        if rt.data_on_accelerator:
            nbytes = train.images.numel() * train.images.element_size()
            if training_set_fits(nbytes, torch.cuda.mem_get_info(rt.device)[1], config.data_device, data.title):
                train.images, train.labels = train.images.to(rt.device), train.labels.to(rt.device)
            else:
                rt.data_on_accelerator = False  # recorded so in config.json
                self.ranks.say(f"the training set ({nbytes / 2**30:.1f} GiB) stays on the CPU: more than a quarter "
                               f"of the GPU's memory (--data_device auto)")
        self.train_steps = TrainSteps(
            train, self.normalize.to(train.images.device), config.augment, config.seed, config.batch_size, rt.rank,
            rt.processes, rt.accumulation,
            randaug=config.randaug, reprob=config.reprob, mixup=config.mixup, cutmix=config.cutmix,
            mixup_prob=config.mixup_prob, mixup_switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing, pad=config.cuda_graph, num_classes=data.num_classes)
        self.steps_per_epoch = len(self.train_steps)

        model.to(rt.device)  # before the optimizer, whose fused/capturable state lives beside the weights
        self.ema = None
        if config.model_ema:
            from timm.utils import ModelEmaV3
            # A float32 copy made before prepare(): DeepSpeed's bf16/fp16 engine converts the model, not its EMA.
            self.ema = ModelEmaV3(model, decay=config.model_ema_decay)
        # Not fused under fp16: with a fused optimizer the gradient scaler hands its inf/NaN flag to the kernel,
        # which skips the update inside, so accelerate (which sees a skip as optimizer.step not being called) cannot
        # tell a skipped step, and the schedule and the EMA would advance over it (train_step); knowing it would
        # take a device read every step. Unfused, the scaler reads the flag on the host anyway.
        fused = rt.device.type == "cuda" and not rt.deepspeed and rt.mixed_precision != "fp16"
        optimizer = create_optimizer(config, model, fused=fused, capturable=config.cuda_graph)
        # The scheduler is not passed to prepare(): accelerate would step it once per process
        # (or, under DeepSpeed, inside the engine); it is stepped here once per optimizer step.
        self.scheduler = create_scheduler(config, optimizer, self.steps_per_epoch)
        test_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(test.images, test.labels), batch_size=config.eval_batch_size)
        # Before prepare(), which may shard or flatten them: a checkpoint of another layout is read by these names.
        names = {id(p): n for n, p in model.named_parameters()}
        param_names = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        if rt.fsdp:
            configure_fsdp(accelerator.state.fsdp_plugin, model)
        self.model, self.optimizer, self.test_loader = accelerator.prepare(model, optimizer, test_loader)
        self.step = create_step(rt, self.model, self.optimizer, config)
        self.plain_model = self.step.plain_model  # the bare timm model (the EMA follows it)
        # With its own Normalize on the device (see Normalize).
        self.evaluator = Evaluator(rt, self.test_loader, self.normalize.to(rt.device), data.num_classes)
        self.progress = Progress()
        accelerator.register_for_checkpointing(self.scheduler, self.progress)
        # Built once, every part being built: config.json, the start-up line, the resume checks and each
        # checkpoint's metadata read this one read-only mapping.
        self.resolved = self.resolve()
        self.checkpoints = CheckpointManager(config, rt, self.ranks, self.resolved, self.model, self.scheduler,
                                             self.ema, self.progress, param_names)
        self.stop = StopRequest(self.ranks.say_here,
                                TimeLimit.resolve(config.time_limit, config.time_limit_margin))
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one static training shape: pick the fastest kernels once

    @property
    def accumulation(self) -> int:
        return self.runtime.accumulation

    def resolve(self) -> MappingProxyType:
        """What the run resolved, for config.json, the start-up line and each checkpoint's metadata: read-only
        (the normalisation as tuples, which config.json writes as the same lists)."""
        rt = self.runtime
        return MappingProxyType({
            "timm_model": self.config.timm_name_and_kwargs()[0],
            "parameters": self.num_parameters,
            **rt.resolved(),
            "steps_per_epoch": self.steps_per_epoch,
            "last_step_images": self.num_train - (self.steps_per_epoch - 1) * self.config.batch_size,
            **self.data.describe(),
            "train_images": self.num_train,
            "test_images": self.num_test,
            "compile": self.config.compile,
            "cuda_graph": self.config.cuda_graph,
            "deepspeed_engine": deepspeed_applied(self.model) if rt.deepspeed else None,
            "fsdp": fsdp_applied(self.accelerator.state.fsdp_plugin, self.model) if rt.fsdp else None,
            "normalize_mean": tuple(self.normalize.mean.flatten().tolist()),
            "normalize_std": tuple(self.normalize.std.flatten().tolist()),
        })

    # --- training --------------------------------------------------------------------------------
    def train_step(self, micro_batches: list, step_images: int) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns the summed per-image loss (on device)."""
        loss_sum = self.step(micro_batches, step_images)
        # fp16: a step the gradient scaler skipped (inf/NaN gradients; DeepSpeed's overflow alike) wrote no weight,
        # so the schedule and the EMA do not advance either, as in the HF Trainer.
        if self.accelerator.optimizer_step_was_skipped:
            return loss_sum
        self.scheduler.step()
        if self.ema is not None:  # once per optimizer step, from the weights it just wrote
            self.ema.update(self.plain_model)
        return loss_sum

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

    def train_epoch(self, epoch: int) -> EpochOutcome:
        cfg, accelerator, progress = self.config, self.accelerator, self.progress
        self.model.train()
        self.train_steps.set_epoch(epoch)
        start_step = progress.step_in_epoch
        # Running sums live on the device and are read once per log interval (no sync per step). A run
        # resumed mid-epoch starts from the saved, already reduced sums (counted once, on the main process).
        carried = progress.epoch_loss_sum if self.runtime.rank == 0 else 0.0
        epoch_loss = torch.tensor(carried, dtype=torch.float64, device=accelerator.device)
        # Likewise the log interval a preemption cut short, so its steps.jsonl line is the uninterrupted run's.
        carried = progress.interval_loss_sum if self.runtime.rank == 0 else 0.0
        interval_loss = torch.tensor(carried, dtype=torch.float64, device=accelerator.device)
        interval_images = progress.interval_images
        vote = StopVote(accelerator.device)
        bar = self.log.progress_bar(self.steps_per_epoch, start_step, f"epoch {epoch + 1}/{cfg.epochs}")
        start, images_this_session = time.perf_counter(), 0
        pin = accelerator.device.type == "cuda"
        # Each step reads the rate it uses; a session that starts at the epoch's end (no step left) reports the one
        # the schedule stands at.
        lr = self.lr_in_use()
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
                self.log.log_step({"step": progress.global_step, "epoch": epoch + 1, "lr": lr,
                                   "train_loss": mean_loss, "images_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                interval_loss.zero_()
                interval_images = 0
            # The last step of an epoch does not vote: the epoch ends, and train_epochs votes after evaluation.
            if step + 1 < self.steps_per_epoch and vote.exchange(self.stop.asked):
                bar.close()
                progress.epoch_loss_sum = accelerator.reduce(epoch_loss, reduction="sum").item()
                progress.interval_loss_sum = accelerator.reduce(interval_loss, reduction="sum").item()
                progress.interval_images = interval_images
                progress.epoch_train_time += time.perf_counter() - start
                return EpochOutcome(stopped=True, metrics={})
        vote.finish()
        progress.interval_loss_sum, progress.interval_images = 0.0, 0
        bar.close()
        train_time = time.perf_counter() - start
        total_loss = accelerator.reduce(epoch_loss, reduction="sum").item()
        return EpochOutcome(stopped=False, metrics={
            "train_loss": total_loss / self.num_train, "lr": lr, "train_time_s": progress.epoch_train_time + train_time,
            "images_per_s": images_this_session / train_time if images_this_session else 0.0,
            "train_images": self.num_train})

    # --- the whole run ------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        # The run owns its save_dir from before anything there is read, cleaned, deleted or written until it ends;
        # the main process holds the lock and every process learns a refusal (run_lock.py).
        lock = RunLock(self.save_dir)
        self.ranks.on_main(lambda: lock.acquire(self.log.say), (ConfigError,))
        try:
            return self.run_owned()
        finally:
            lock.release()

    def run_owned(self) -> list[dict]:
        cfg = self.config
        folder = self.checkpoints.resume_point()
        # Every refusal before the folder changes (see CheckpointManager.check_save_dir).
        self.checkpoints.check_save_dir(folder)
        resumed = self.checkpoints.resume(folder) if folder is not None else None
        self.checkpoints.set_aside()
        try:
            self.log.start_trackers(self.progress.global_step)
        except ConfigError:
            self.checkpoints.put_back()
            raise
        self.checkpoints.commit(folder)
        r = self.resolved
        self.log.start(self.progress.epoch, self.progress.global_step, r, resumed)
        self.log.say(
            f"model {cfg.model} ({r['timm_model']}, {r['parameters'] / 1e6:.2f} M parameters) | "
            f"{r['data_title']}: {r['train_images']} train / {r['test_images']} test images, "
            f"{r['num_classes']} classes | "
            f"{r['distributed_type']} on {r['processes']} process(es), {r['device']} | "
            f"micro-batch {r['micro_batch_size']} x accumulation {r['accumulation_steps']} x {r['processes']} "
            f"processes = global batch {r['global_batch_size']} | {r['steps_per_epoch']} steps per epoch "
            f"(last step {r['last_step_images']} images) | mixed precision {r['mixed_precision']}")
        if self.stop.time_limit.deadline is not None:
            self.log.say(f"time limit: saves and exits {PREEMPTED_EXIT_CODE} before {self.stop.time_limit.describe()}")
        # Ctrl-C (SIGINT) too: it saves and exits 75 like preemption (before this point: one line, main.py).
        self.stop.install([cfg.preempt_signal, "SIGUSR1", "SIGINT"])
        try:
            history = self.train_epochs()
        except BaseException:
            self.log.end_trackers()
            raise
        self.log.end_trackers()  # before the lock is released: the next owner's trackers write into save_dir
        return history

    def close(self) -> None:
        """The explicit end of a run: the trackers (when run() did not end them) and the process group, while every
        process is alive and Python whole (left to interpreter exit, gloo's teardown can abort the process: see
        CheckpointManager). What accelerator.end_training() does, with each part once. The entry points call it
        when every process ends at the same point: run() returned, or raised Preempted (exit 75). Not after other
        errors: another process may have died, and its peers would wait on it in the teardown."""
        self.log.end_trackers()
        self.accelerator.state.destroy_process_group()

    def train_epochs(self) -> list[dict]:
        cfg, progress = self.config, self.progress
        history = []
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            epoch_start = time.perf_counter()
            trained = self.train_epoch(epoch)
            if trained.stopped:  # asked to stop mid-epoch
                self.checkpoints.save_step()
                raise Preempted(f"stopped by {self.stop.cause()} at step {progress.global_step}; "
                                f"resume with --resume auto")
            val = self.evaluate()
            if self.ema is not None:
                val.update(self.evaluate(self.ema.module))
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            progress.epoch_loss_sum = progress.epoch_train_time = 0.0
            metrics = {"epoch": epoch + 1, "step": progress.global_step, **trained.metrics, **val,
                       "epoch_time_s": time.perf_counter() - epoch_start}
            if not all(math.isfinite(v) for v in (metrics["train_loss"], metrics["val_loss"])):
                raise FloatingPointError(f"loss is not finite after epoch {epoch + 1} "
                                         f"(step {progress.global_step}); no checkpoint written")
            history.append(metrics)
            self.log.log_epoch(metrics)
            # One blocking vote per epoch: a signal during the last steps or the evaluation, on any process, stops
            # every process here, and the epoch is saved even when it is not a save epoch.
            stop = StopVote(self.runtime.device).now(self.stop.asked)
            if self.checkpoints.should_save(epoch + 1) or (stop and epoch + 1 < cfg.epochs):
                self.checkpoints.save_epoch(epoch + 1, metrics["val_acc1"], preempted=stop and epoch + 1 < cfg.epochs)
            if stop and epoch + 1 < cfg.epochs:
                raise Preempted(f"stopped by {self.stop.cause()} after epoch {epoch + 1}; "
                                f"resume with --resume auto")
            if stop:  # the signal's own line promised 75: say why the status is 0
                self.log.say(f"{self.stop.cause()} arrived in the last epoch's last step or evaluation: the run is "
                             f"complete and saved (epoch {epoch + 1}), exit status 0, nothing to resume")
        return history

    def evaluate(self, model: torch.nn.Module | None = None) -> dict:
        """Loss, top-1 and top-5 on the test set of the trained model, or of `model` (its EMA)."""
        return self.evaluator(model, ema=True) if model is not None else self.evaluator(self.model)
