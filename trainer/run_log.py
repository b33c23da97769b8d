"""What a run shows and writes down besides its checkpoints, from the process that writes (ranks.py decides
which: the main process of the whole job). Console lines, the progress bar, `steps.jsonl` and `metrics.jsonl`
(records.py holds their format), `config.json`, accelerate's trackers, and their truncation when a run resumes
from a checkpoint.

With --log_with (accelerate's trackers, e.g. tensorboard,mlflow) each tracker gets the run's options on a fresh
start, `step/train_loss`, `step/lr` and `step/images_per_s` every log_interval steps, and `epoch/*` (the
metrics.jsonl values) after each epoch, all against the optimizer step, under the project name `cifar-trainer`.
TensorBoard writes `{save_dir}/cifar-trainer/` (the options as hparams in a timestamped subfolder), and a resumed
run purges the events logged after its checkpoint, as it truncates the JSONL files.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from . import records
from .config import ConfigError, TrainConfig, to_dict
from .ranks import Ranks


class RunLog:
    def __init__(self, ranks: Ranks, config: TrainConfig):
        self.ranks, self.config = ranks, config
        self.accelerator = ranks.accelerator  # its trackers
        self.save_dir = Path(config.save_dir)
        self.trackers_ended = False

    def say(self, *args) -> None:
        """A line on the console, once per job."""
        self.ranks.say(*args)

    # --- a session's start and end ----------------------------------------------------------------------
    def start_trackers(self, global_step: int) -> None:
        """Start accelerate's trackers (before the records are touched: a tracker that cannot start is a refusal);
        ConfigError, with what they created in save_dir removed, when one cannot."""
        cfg = self.config
        if not cfg.log_with:
            return
        # TensorBoard purges the events after the checkpoint, as truncate_records does for the JSONL files;
        # the options are written once, on a fresh start. Trackers that would write into the working folder
        # write into save_dir.
        init_kwargs = {"tensorboard": {"purge_step": global_step + 1},
                       "mlflow": {"run_name": self.save_dir.resolve().name},
                       "wandb": {"dir": str(self.save_dir), "name": self.save_dir.resolve().name},
                       "dvclive": {"dir": str(self.save_dir / "dvclive")}}

        def start() -> None:  # accelerate starts trackers on the main process only; every process learns a refusal
            before = set(records.entries(self.save_dir, records.RECORD_ENTRIES))
            try:
                self.accelerator.init_trackers(records.TRACKER_PROJECT,
                                               config=to_dict(cfg) if global_step == 0 else None,
                                               init_kwargs=init_kwargs)
            except Exception as error:  # a tracker's own set-up (server, credentials, URI): before the first step
                self.end_trackers()  # the trackers that did start close their files
                for path in set(records.entries(self.save_dir, records.RECORD_ENTRIES)) - before:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                raise ConfigError(f"--log_with {cfg.log_with}: the tracker did not start ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})") from None
        self.ranks.on_main(start, (ConfigError,))

    def start(self, epochs_done: int, global_step: int, resolved: Mapping, resumed: dict | None) -> None:
        """Keep the records up to the step training continues from and write config.json (after
        start_trackers)."""
        if self.ranks.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            records.truncate_records(self.save_dir, epochs_done, global_step)
            records.write_run_config(self.save_dir, to_dict(self.config), dict(resolved), resumed)

    def end_trackers(self) -> None:
        """The trackers write out what was logged and close: at the run's end, or when it stops on an error (the
        error goes on). Once: Trainer.close() calls it again for a run that did not get that far."""
        if self.trackers_ended:
            return
        self.trackers_ended = True
        for tracker in self.accelerator.trackers:
            tracker.finish()

    # --- during training ----------------------------------------------------------------------------------
    def progress_bar(self, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                    disable=not (self.config.progress and self.ranks.is_main))

    def log_step(self, entry: dict) -> None:
        """A steps.jsonl line (step, epoch, lr, train_loss, images_per_s) and the trackers' step/* values."""
        if self.ranks.is_main:
            records.append_line(self.save_dir / records.STEPS_FILE, entry)
        # accelerate logs on the main process only (and not at all without --log_with).
        self.accelerator.log({f"step/{k}": entry[k] for k in ("train_loss", "lr", "images_per_s")},
                             step=entry["step"])

    def log_epoch(self, metrics: dict) -> None:
        """A metrics.jsonl line, the trackers' epoch/* values and the epoch's console line."""
        if self.ranks.is_main:
            records.append_line(self.save_dir / records.METRICS_FILE, metrics)
        self.accelerator.log({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")},
                             step=metrics["step"])
        m = metrics
        ema = f"val_acc1_ema {m['val_acc1_ema']:.2f} % | " if "val_acc1_ema" in m else ""
        self.say(f"epoch {m['epoch']}/{self.config.epochs} step {m['step']} | train_loss {m['train_loss']:.4f} | "
                 f"val_loss {m['val_loss']:.4f} | val_acc1 {m['val_acc1']:.2f} % | val_acc5 {m['val_acc5']:.2f} % | "
                 f"{ema}lr {m['lr']:.3e} | {m['images_per_s']:.0f} img/s | {m['epoch_time_s']:.1f} s")
