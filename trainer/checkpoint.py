"""The checkpoint manager: when the run saves, what a checkpoint holds besides the weights and training state
(its metadata), where a run resumes from, whether a checkpoint can resume this run, and rotation (keep the
newest N and the best). Nothing outside this module and checkpoint_folder.py, the atomic folder beneath it
(write, manifest, verify, load), names a checkpoint's files or folders. torch is imported where used, so the
study runner (which never imports it) asks this module whether a run has checkpoints.

Checkpoints are `{save_dir}/epoch_N/` (after epoch N) and `{save_dir}/step_N/` (a run stopped by a signal
within an epoch, after optimizer step N), and `{save_dir}/latest` names the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import records
from .checkpoint_folder import (LATEST_FILE, MANIFEST_FILE, MODEL_EMA_FILE, MODEL_FILE, UNIVERSAL_PREFIX,
                                CheckpointError, SaveError,
                                list_checkpoints, load_weights, newest_valid, read_manifest, remove_stale, rotate,
                                verify)
from .checkpoint_folder import load as load_folder
from .checkpoint_folder import save as save_folder
from .config import TrainConfig, to_dict

__all__ = ["CheckpointManager", "CheckpointError", "SaveError", "MODEL_FILE", "MODEL_EMA_FILE", "MANIFEST_FILE",
           "FIXED_ON_RESUME", "SESSION_OPTIONS", "changed_options", "list_checkpoints", "newest_valid",
           "read_manifest", "verify", "rotate", "load_weights", "run_entries", "clear_run", "final_checkpoint",
           "has_checkpoint", "is_checkpoint", "weights_file", "load_checkpoint_model"]

# The checkpoint folders (epoch_name, step_name), and all the checkpoints leave in a run's save_dir
# (records.RECORD_ENTRIES is the rest of the run). A checkpoint's name is exactly `epoch_N` or `step_N`: other
# folders in save_dir, such as trainer.export's default `epoch_N_export`, are not the run's.
CHECKPOINT_PATTERNS = ("epoch_*", "step_*")
CHECKPOINT_NAME = re.compile(r"(epoch|step)_[0-9]+")
# Where a resume sets aside the checkpoints later than the one it continues from (see CheckpointManager.commit).
SUPERSEDED_DIR = "superseded"
CHECKPOINT_ENTRIES = (LATEST_FILE, SUPERSEDED_DIR)
# Where --overwrite moves the previous run until the new one has started (a refusal puts it back); left by a kill
# in between, it is deleted by the next start's commit(), as --overwrite asked.
SET_ASIDE_DIR = ".overwritten"

# Options that a resume cannot change, each refused in one line before anything is written: the weights and
# the optimizer's moments belong to one model trained at one image size (a ViT's position embeddings have its
# shape) and to one optimizer type; the checkpoint's step count and the data plan (which images each step
# holds, their order and augmentation, a function of seed and epoch) are counted in steps of batch_size, so a
# changed batch_size or seed would continue neither the saved run nor one that config.json describes;
# layer_decay shapes timm's parameter groups, which the saved optimizer state is matched to (so does
# weight_decay 0 against > 0, checked apart). The data is compared by what it is, not by --data's spelling: its
# classes (the model's head) and its number of training images (what the plan indexes), so that a data set copied
# to another path (a node's local disk) resumes. Every other option takes effect from the resumed step (see
# CheckpointManager.resume).
FIXED_ON_RESUME = ("model", "image_size", "optimizer", "batch_size", "seed", "layer_decay")
# Options about one session rather than the run (how it is started, where its folder is, how it is shown and
# fed): they may differ between the sessions of one run without being a change.
SESSION_OPTIONS = ("resume", "checkpoint", "overwrite", "progress", "save_dir", "num_workers")


def changed_options(before: dict, now: dict) -> dict[str, list]:
    """{option: [before, now]} for every option of the run that differs (SESSION_OPTIONS aside; an option that
    `before` does not know, from an older version of the trainer, is not compared)."""
    return {k: [before[k], v] for k, v in now.items() if k not in SESSION_OPTIONS and k in before and before[k] != v}



def class_change(saved_names, saved_count: int, names) -> str | None:
    """How the data's classes differ from a checkpoint's (None: the same), named by the first that differs."""
    names = list(names)
    if saved_count != len(names):
        return f"{saved_count} classes -> {len(names)}"
    if saved_names is None or list(saved_names) == names:
        return None
    i = next((i for i, (a, b) in enumerate(zip(saved_names, names)) if a != b), None)
    if i is None:  # names recorded for another count than num_classes: a hand-edited manifest
        return f"{len(saved_names)} class names -> {len(names)}"
    return f"class {i} {saved_names[i]!r} -> {names[i]!r}"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch}"


def step_name(global_step: int) -> str:
    return f"step_{global_step}"


def is_checkpoint(folder: Path) -> bool:
    """A folder that looks like a complete checkpoint (verify() checks its files)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def final_checkpoint(run_dir: Path, epochs: int) -> Path | None:
    """The checkpoint a run of `epochs` epochs ends with, if it is on disk."""
    folder = Path(run_dir) / epoch_name(epochs)
    return folder if is_checkpoint(folder) else None


def has_checkpoint(run_dir: Path) -> bool:
    return any(is_checkpoint(p) for pattern in CHECKPOINT_PATTERNS for p in Path(run_dir).glob(pattern))


def weights_file(folder: Path, ema: bool = False) -> Path:
    """The checkpoint's model weights (timm's names, loadable by timm), or its EMA's."""
    return Path(folder) / (MODEL_EMA_FILE if ema else MODEL_FILE)


def load_checkpoint_model(folder: Path, ema: bool = False):
    """The checkpoint's timm model with its trained weights (or EMA weights), on the CPU, in float32: what
    trainer.export writes and trainer.evaluate evaluates."""
    import timm
    verify(folder)  # the checkpoint's model.safetensors is already consolidated (gathered under ZeRO-3)
    info = read_manifest(folder)
    weights = weights_file(folder, ema)
    if ema and not weights.is_file():
        raise CheckpointError(f"{folder} holds no {weights.name}: it was saved without --model_ema; drop --ema")
    model = timm.create_model(info["timm_model"], num_classes=info["num_classes"], **info.get("model_kwargs", {}))
    # ZeRO-3 writes the training dtype (bf16 under bf16): load_state_dict copies it into the float32 model.
    model.load_state_dict(load_weights(weights))
    return model.eval(), info


def checkpoint_folders(save_dir: Path) -> list[Path]:
    """The folders of `save_dir` named as checkpoints (complete or not), sorted."""
    return sorted(p for pattern in CHECKPOINT_PATTERNS for p in Path(save_dir).glob(pattern)
                  if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name))


def run_entries(save_dir: Path) -> list[Path]:
    """Everything a run leaves in its save_dir, sorted: a fresh start refuses a folder that holds any of it, and
    --overwrite deletes it (and nothing else)."""
    return sorted(records.entries(save_dir, records.RECORD_ENTRIES + CHECKPOINT_ENTRIES) + checkpoint_folders(save_dir))


def clear_run(save_dir: Path) -> list[Path]:
    """Delete what `save_dir` holds of a run (--overwrite); other files in it stay."""
    entries = run_entries(save_dir)
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return entries


class CheckpointManager:
    def __init__(self, config: TrainConfig, runtime, ranks, resolved, model, scheduler, ema, progress,
                 param_names: list[str]):
        """`ranks`: the job's Ranks (which process writes, broadcasts); `resolved`: what the run resolved
        (Trainer.resolved, read-only), part of each checkpoint's metadata and of the resume checks; `model`: the
        prepared model; `ema`: timm's ModelEmaV3 or None; `progress`: the trainer's Progress; `param_names`: the
        model's parameter names in its optimizer's order (full_state.py reads a checkpoint of another layout by them).
        No reference back to the Trainer: a cycle would keep the DDP model, and the process group it holds,
        alive until interpreter exit, where gloo's teardown can abort the process (seen once while such a cycle
        existed: exit -6, "terminate called without an active exception", after a complete 2-process run;
        tests/test_options.py checks that the Trainer is freed when its run returns)."""
        self.config, self.runtime, self.ranks, self.resolved = config, runtime, ranks, resolved
        self.model, self.scheduler, self.ema, self.progress = model, scheduler, ema, progress
        self.param_names = param_names
        self.save_dir = Path(config.save_dir)
        self.note = None  # check_save_dir's line about the start, said once the start is committed

    # --- saving -----------------------------------------------------------------------------------------
    def should_save(self, epoch: int) -> bool:
        every = self.config.save_epochs
        return epoch == self.config.epochs or (every > 0 and epoch % every == 0)

    def save_epoch(self, epoch: int, val_acc1: float, preempted: bool = False) -> None:
        """`preempted`: the run stops after this save (the preemption signal)."""
        self.save(epoch_name(epoch), val_acc1, required=preempted or epoch == self.config.epochs)

    def save_step(self) -> None:
        self.save(step_name(self.progress.global_step), None, required=True)

    def save(self, name: str, val_acc1: float | None, required: bool = False) -> None:
        """Collective: every process calls it. A failed write stops the run (SaveError) or, with --on_save_error
        continue, is reported and training goes on; `required` (the final checkpoint, or the one a preempted run
        exits with) stops it whatever --on_save_error says: the run would otherwise end, with 0 or 75, without it."""
        model = self.runtime.bare_model(self.model)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        resolved = self.resolved
        info = {"epoch": self.progress.epoch, "global_step": self.progress.global_step,
                "step_in_epoch": self.progress.step_in_epoch, "val_acc1": val_acc1,
                "timm_model": resolved["timm_model"], "num_classes": resolved["num_classes"],
                "class_names": resolved["class_names"], "data_title": resolved["data_title"],
                # what timm.create_model needs besides the name to rebuild this model (for export)
                "model_kwargs": {"img_size": list(img_size)} if img_size is not None else {},
                "compiled": self.config.compile, "model_ema": self.ema is not None,
                "options": to_dict(self.config), "train_images": resolved["train_images"],  # compared on resume
                **{k: resolved[k] for k in ("processes", "distributed_type", "deepspeed_zero_stage")}}
        ema = self.ema.module.state_dict() if self.ema is not None else None
        path = save_folder(self.runtime.accelerator, self.ranks, self.runtime.state_dict_source(self.model),
                           self.save_dir, name, info, ema=ema)
        if path is None:
            if required:
                raise SaveError(f"stopped: checkpoint {self.save_dir / name}, the one this run ends with, could not "
                                f"be written; earlier checkpoints are intact (resume from them with --resume auto)")
            if self.config.on_save_error == "stop":
                raise SaveError(f"stopped: checkpoint {self.save_dir / name} could not be written; "
                                f"earlier checkpoints are intact (--on_save_error continue trains on)")
            return
        self.ranks.say(f"saved {path}")
        if self.config.keep_last and self.ranks.is_main:
            for removed in rotate(self.save_dir, self.config.keep_last, self.config.keep_best):
                self.ranks.say(f"removed old checkpoint {removed}")
        self.runtime.accelerator.wait_for_everyone()

    # --- where the run starts -------------------------------------------------------------------------
    def resume_point(self) -> Path | None:
        if self.config.checkpoint:
            return Path(self.config.checkpoint)
        if self.config.resume == "auto":  # with none found, check_save_dir decides whether to start fresh
            return self.ranks.on_main(lambda: newest_valid(self.save_dir, say=self.ranks.say),
                                          (CheckpointError,))
        return None

    # The run's folder is changed only after every refusal (the caller holds its lock, run_lock.py): check_save_dir
    # refuses; resume() may refuse; set_aside() moves a run that --overwrite replaces out of the way (the trackers,
    # which may still refuse, start next and write into the folder); then commit() deletes it, or put_back()
    # restores it after a refusal.
    def check_save_dir(self, folder: Path | None) -> None:
        """Refuse (CheckpointError, on every process) a start that would overwrite, wipe or mix up the run in
        save_dir; changes nothing. `folder`: the checkpoint to resume from."""
        self.note = self.ranks.on_main(lambda: self._check_save_dir(folder), (CheckpointError,))

    def set_aside(self) -> None:
        """--overwrite: move the previous run's entries into SET_ASIDE_DIR (main process)."""
        def move():
            entries = run_entries(self.save_dir)
            if entries:
                aside = self.save_dir / SET_ASIDE_DIR
                # Left by an --overwrite start killed before its commit(): that run was to be deleted anyway.
                shutil.rmtree(aside, ignore_errors=True)
                aside.mkdir()
                for path in entries:
                    os.rename(path, aside / path.name)
        if self.config.overwrite:
            self.ranks.on_main(move)

    def put_back(self) -> None:
        """The start was refused after set_aside(): the previous run returns as it was."""
        def restore():
            aside = self.save_dir / SET_ASIDE_DIR
            if aside.is_dir():
                for path in aside.iterdir():
                    os.rename(path, self.save_dir / path.name)
                aside.rmdir()
        self.ranks.on_main(restore)

    def commit(self, folder: Path | None) -> None:
        """Every refusal is past: remove what killed saves left, delete the run --overwrite set aside, and, on a
        resume, move the checkpoints later than `folder` to superseded/, so that --resume auto never continues the
        run that this one abandons (going back to an earlier checkpoint)."""
        def work():
            remove_stale(self.save_dir)
            shutil.rmtree(self.save_dir / SET_ASIDE_DIR, ignore_errors=True)
            return self._supersede(folder) if folder is not None else None
        superseded = self.ranks.on_main(work)
        for line in (self.note, superseded):
            if line:
                self.ranks.say(line)

    def _supersede(self, folder: Path) -> str | None:
        save_dir, folder = self.save_dir, Path(folder)
        if folder.resolve().parent != save_dir.resolve():
            return None
        step = read_manifest(folder).get("global_step", -1)
        later = [p for p in checkpoint_folders(save_dir) if read_manifest(p).get("global_step", -1) > step]
        if not later:
            return None
        aside = save_dir / SUPERSEDED_DIR / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside.mkdir(parents=True, exist_ok=True)
        for path in later:
            os.rename(path, aside / path.name)
        tmp = save_dir / (LATEST_FILE + ".tmp")
        tmp.write_text(folder.name + "\n")
        os.replace(tmp, save_dir / LATEST_FILE)
        return (f"moved the checkpoints after {folder.name} ({', '.join(p.name for p in later)}), which this run "
                f"replaces, to {aside}; --resume auto no longer picks them (delete that folder when not needed)")

    def _check_save_dir(self, folder: Path | None) -> str | None:
        cfg, save_dir = self.config, self.save_dir
        held = run_entries(save_dir)
        what = ", ".join(p.name for p in held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")

        def records_readable() -> None:  # a resume rewrites them after its step: read them before writing anything
            try:
                records.read_records(save_dir)
            except ValueError as error:
                raise CheckpointError(f"{error}: repair or delete that file, then resume again") from None

        if folder is not None:
            if held and Path(folder).resolve().parent != save_dir.resolve():
                raise CheckpointError(
                    f"--save_dir {save_dir} holds a run ({what}) and --checkpoint {folder} lies outside it: resume "
                    f"into the folder that holds the checkpoint, or into another --save_dir")
            records_readable()
            return None
        if not held:
            return f"--resume auto: no valid checkpoint in {save_dir}, starting fresh" if cfg.resume else None
        if cfg.overwrite:  # deleted by set_aside() and commit(), once nothing can refuse the start
            return f"--overwrite: deleted the previous run in {save_dir} ({what})"
        if cfg.resume != "auto":
            raise CheckpointError(
                f"--save_dir {save_dir} holds a run ({what}): continue it with --resume auto, start a new one there "
                f"with --overwrite (deletes it), or choose another --save_dir")
        # --resume auto, and no checkpoint verifies. Starting again from step 0 is a resume from the run's start
        # only when the folder holds no checkpoint at all and its records were written with these same options
        # (a run killed before its first save): anything else would wipe a history that cannot be written again.
        checkpoints = [p.name for p in checkpoint_folders(save_dir)]
        try:
            before = json.loads((save_dir / records.CONFIG_FILE).read_text())["options"]
        except (OSError, ValueError, KeyError, TypeError):
            before = None
        changed = changed_options(before, to_dict(cfg)) if isinstance(before, dict) else None
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
        raise CheckpointError(
            f"--resume auto: {save_dir} {reason}; start a new run there with --overwrite (deletes it, without "
            f"--resume), or choose another --save_dir")

    # --- resuming -------------------------------------------------------------------------------------
    def resume(self, folder: Path) -> dict:
        """Continue from checkpoint `folder`; returns where from and the options changed since (for config.json)."""
        here = self.resolved
        saved = read_manifest(folder)
        steps_per_epoch = here["steps_per_epoch"]
        changed = self.check_resume_options(folder, saved, here["train_images"], here["class_names"])
        rt = self.runtime
        if saved.get("compiled", False) != self.config.compile:
            # accelerate's training state names the weights with or without torch.compile's wrapper.
            raise CheckpointError(
                f"{folder} was saved {'with' if saved.get('compiled') else 'without'} --compile; resume it the same "
                f"way, or start from its model.safetensors with --pretrained_file")
        if self.ema is not None and not weights_file(folder, ema=True).is_file():
            raise CheckpointError(
                f"{folder} holds no {MODEL_EMA_FILE} (saved without --model_ema); resume it without "
                f"--model_ema, or start from its model.safetensors with --pretrained_file")
        # torch's Optimizer.load_state_dict brings back the saved param_groups (lr, initial_lr, weight_decay, betas,
        # momentum, ...) and LambdaLR.load_state_dict the saved base_lrs: a changed option would be recorded in
        # config.json but not applied. So each group gets back the hyperparameters this run's
        # options built (its per-parameter state, moments and step counts, stays the checkpoint's; a tensor lr
        # stays the device tensor the optimizer was built with), and the schedule continues at the checkpoint's
        # step with this run's formula.
        import torch

        from . import full_state  # imports torch: here, not at the top (see above)
        from .optim import scheduled_lr
        optimizer = self.scheduler.optimizer
        built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        natively = full_state.loads_natively(saved, here)
        if natively:
            load_folder(rt.accelerator, self.ranks, folder)
        else:  # another strategy or, under DeepSpeed, another process count: through the full state
            full_state.load(rt, self.ranks, folder, saved, self.model, optimizer, self.param_names,
                            scratch=self.save_dir / f"{UNIVERSAL_PREFIX}{Path(folder).name}")
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
        rt.accelerator.step = 0
        if not natively:
            before = full_state.layout(saved.get("distributed_type"), saved.get("deepspeed_zero_stage"))
            self.ranks.say(f"converted the training state of {folder} from {before} on {saved.get('processes')} "
                           f"process(es) to {rt.strategy} on {rt.processes} through its full state")
        if self.ema is not None:
            self.ema.module.load_state_dict(load_weights(weights_file(folder, ema=True)))
        p = self.progress
        if p.global_step != p.epoch * steps_per_epoch + p.step_in_epoch:
            raise CheckpointError(
                f"{folder} was saved with {p.global_step} steps after {p.epoch} epochs, which does not match "
                f"{steps_per_epoch} steps per epoch here: the data set or batch_size differ")
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        self.ranks.say(f"resumed from {folder}: epoch {p.epoch}, step {p.global_step}; "
                     f"training from step {p.global_step + 1}"
                     + (f"; from here on with changed options: {changes}" if changed else ""))
        return {"checkpoint": str(folder), "epoch": p.epoch, "global_step": p.global_step, "changed_options": changed}

    def check_resume_options(self, folder: Path, saved: dict, num_train: int, class_names) -> dict:
        """Refuse what a resume cannot change (FIXED_ON_RESUME); return the options that changed."""
        config = self.config
        before = saved.get("options")
        if before is None:  # saved before checkpoints recorded their options: nothing to compare
            return {}
        changed = changed_options(before, to_dict(config))
        fixed = [f"{k} {a} -> {b}" for k, (a, b) in changed.items() if k in FIXED_ON_RESUME]
        if "weight_decay" in changed and (before["weight_decay"] > 0) != (config.weight_decay > 0):
            fixed.append(f"weight_decay {before['weight_decay']} -> {config.weight_decay} (to or from 0 "
                         f"changes the optimizer's parameter groups)")
        if saved.get("train_images", num_train) != num_train:
            fixed.append(f"training images {saved['train_images']} -> {num_train}")
        # Checkpoints from before --data recorded no class names: CIFAR-100's 100 classes.
        classes = class_change(saved.get("class_names"), saved.get("num_classes", 100), class_names)
        if classes is not None:
            fixed.append(classes)
        if fixed:
            raise CheckpointError(
                f"{folder} cannot be resumed with {', '.join(fixed)}: resume with the checkpoint's values, or start "
                f"a new run in another --save_dir (from its model.safetensors with --pretrained_file)")
        needed = saved.get("epoch", 0) + (1 if saved.get("step_in_epoch") else 0)
        if config.epochs < needed:
            raise CheckpointError(
                f"{folder} holds {saved.get('global_step')} steps ({saved.get('epoch')} epochs"
                f"{' and part of the next' if saved.get('step_in_epoch') else ''}): --epochs {config.epochs} "
                f"would end before it; give --epochs {needed} or more")
        return changed
