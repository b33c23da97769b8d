"""What a run writes down: its resolved configuration, one metrics line per epoch, and the environment.

Only the main process writes; every function here is called on it alone (see loop.py).
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


def write_run_config(save_dir: Path, options: dict, resolved: dict) -> None:
    write_json_atomic(save_dir / CONFIG_FILE, {
        "options": options,
        "resolved": resolved,
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


def truncate_records(save_dir: Path, epochs_done: int, global_step: int) -> None:
    """Keep what a resumed run will not write again: epochs up to `epochs_done`, steps up to `global_step`."""
    for name, keep in ((METRICS_FILE, lambda m: m["epoch"] <= epochs_done),
                       (STEPS_FILE, lambda m: m["step"] <= global_step)):
        path = Path(save_dir) / name
        kept = [m for m in read_lines(path) if keep(m)]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, path)


def append_line(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
