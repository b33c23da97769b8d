"""What a run writes down: its resolved configuration, one metrics line per epoch, and the environment.

The files' format, beneath the run logger (run_log.py), which decides when they are written, by the process
that ranks.py names: every writing function here is called on the main process alone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
# trainer.evaluate's per-image file in a run's evaluation/: each test image's label and top-1 class (what
# trainer/stats.py pairs runs on).
PREDICTIONS_FILE = "predictions.csv"
# accelerate's trackers log under this project name: TensorBoard into {save_dir}/cifar-trainer/.
TRACKER_PROJECT = "cifar-trainer"
# What the records and the trackers leave in a run's save_dir (the folders accelerate's TensorBoard, wandb and
# dvclive trackers write there); the checkpoints are the checkpoint manager's (checkpoint.run_entries).
RECORD_ENTRIES = (CONFIG_FILE, METRICS_FILE, STEPS_FILE, TRACKER_PROJECT, "wandb", "dvclive")


def read_run_config(folder: Path) -> dict | None:
    """A run's config.json, None when it has none; ValueError, one line naming the file, when it is cut short,
    damaged or not a mapping (the caller adds what to do about it)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # json's JSONDecodeError and a binary file's UnicodeDecodeError alike
        raise ValueError(f"{path} is not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not the run's options")
    return config


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "accelerate", "safetensors", "deepspeed"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran, with `+dirty` when the tree had changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def hardware() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_run_config(save_dir: Path, options: dict, resolved: dict, resumed: dict | None = None) -> None:
    """`resumed`: the checkpoint this session continues from, its step and the options changed since."""
    write_json_atomic(save_dir / CONFIG_FILE, {
        "options": options,
        "resolved": resolved,
        **({"resumed_from": resumed} if resumed is not None else {}),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def read_lines(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # a line cut short by a kill mid-write; a resume rewrites it
                break
            raise ValueError(f"{path}: line {number + 1} is not JSON") from None
    return entries


def entries(save_dir: Path, patterns) -> list[Path]:
    """What `save_dir` holds that matches `patterns`, sorted; empty files record nothing and are left out (a run
    killed at its start leaves empty metrics.jsonl and steps.jsonl)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = {p for pattern in patterns for p in save_dir.glob(pattern)}
    return sorted(p for p in found if not (p.is_file() and p.stat().st_size == 0))


def read_records(save_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl and steps.jsonl, each line an object with its `epoch` / `step`; ValueError naming the
    file and line otherwise (a resume reads them before it writes anything)."""
    found = {}
    for name, key in ((METRICS_FILE, "epoch"), (STEPS_FILE, "step")):
        path = Path(save_dir) / name
        lines = read_lines(path)
        for number, entry in enumerate(lines, 1):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), int):
                raise ValueError(f"{path}: line {number} has no integer {key!r}")
        found[name] = lines
    return found


def truncate_records(save_dir: Path, epochs_done: int, global_step: int) -> None:
    """Keep what a resumed run will not write again: epochs up to `epochs_done`, steps up to `global_step`.
    Both files are read (and checked) before either is written."""
    found = read_records(save_dir)
    for name, keep in ((METRICS_FILE, lambda m: m["epoch"] <= epochs_done),
                       (STEPS_FILE, lambda m: m["step"] <= global_step)):
        path = Path(save_dir) / name
        kept = [m for m in found[name] if keep(m)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, path)


def append_line(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
