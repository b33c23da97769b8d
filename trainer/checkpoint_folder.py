"""One checkpoint folder on disk, beneath the checkpoint manager (checkpoint.py): `{save_dir}/epoch_N/` holds
`model.safetensors` (the plain model, loadable by timm), with --model_ema `model_ema.safetensors` (its exponential moving average, the same timm keys), `state/`
(accelerate's `save_state`: optimizer, scheduler, RNG, progress; under DeepSpeed the engine's shards) and
`manifest.json` (SHA-256 and size of every file).

torch and safetensors are imported where used: the study runner asks about a run's checkpoints without them.

A checkpoint appears only when complete: everything is written into a hidden sibling folder, fsynced,
then renamed into place by one `os.rename`, after which `latest` is updated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import UserError

MODEL_FILE = "model.safetensors"
MODEL_EMA_FILE = "model_ema.safetensors"
STATE_DIR = "state"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
COMPILED_PREFIX = "_orig_mod."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (see UserError)."""


class SaveError(RuntimeError):
    """A checkpoint could not be written and --on_save_error is `stop`: printed as one line, exit status 1. Not a
    UserError: the disk or the file system failed, not the user's input (trainer/main.py ends it)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, info: dict) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({**info, "files": entries}, indent=1) + "\n")
    for p in files + [folder / MANIFEST_FILE]:
        _fsync(p)
    for d in {p.parent for p in files} | {folder}:
        _fsync(d)


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {}


def verify(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered."""
    folder = Path(folder)
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: {MANIFEST_FILE} is missing")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        raise CheckpointError(f"{manifest} is unreadable") from None
    for name in (MODEL_FILE, STATE_DIR):
        if not any(e == name or e.startswith(name + "/") for e in entries):
            raise CheckpointError(f"{folder} is not a checkpoint: the manifest lists no {name}")
    unlisted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and p.name != MANIFEST_FILE and str(p.relative_to(folder)) not in entries)
    if unlisted:
        raise CheckpointError(f"checkpoint file {folder / unlisted[0]} is not in the manifest (altered folder)")
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {path} has {path.stat().st_size} bytes, "
                                  f"the manifest says {entry['bytes']} (truncated?)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its SHA-256 in the manifest (altered)")


def save(accelerator, ranks, model, save_dir: Path, name: str, info: dict, ema: dict | None = None) -> Path | None:
    """Write checkpoint `save_dir/name` atomically; collective: every process must call it.

    `model`: what get_state_dict takes with unwrap=False (Runtime.state_dict_source).

    `ema`: the state dict of the model's EMA (the same on every process), written as MODEL_EMA_FILE.

    `ranks`: the job's Ranks (ranks.py), which says which process writes. Returns the folder, or None
    when writing failed on any process (disk full, permissions): then the
    partial folder is removed, earlier checkpoints are untouched, and the error has been printed.
    """
    from safetensors.torch import save_file
    final, staging = save_dir / name, save_dir / f".tmp-{name}"
    failure = None

    def attempt(step):
        nonlocal failure
        if failure is None:
            try:
                step()
            except Exception as error:  # disk full surfaces as OSError, SafetensorError or torch's RuntimeError
                failure = f"{type(error).__name__}: {error}"

    if ranks.is_main:
        attempt(lambda: (shutil.rmtree(staging, ignore_errors=True), staging.mkdir(parents=True)))
    accelerator.wait_for_everyone()
    # get_state_dict gathers ZeRO-3's and FSDP2's shards (collective).
    state_dict = accelerator.get_state_dict(model, unwrap=False)
    if ranks.is_main:
        # Under DeepSpeed get_state_dict unwraps with keep_torch_compile=True (accelerate's default), so a compiled
        # model's keys carry torch.compile's `_orig_mod.` prefix; timm names the tensors without it.
        plain = {k.removeprefix(COMPILED_PREFIX): v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        attempt(lambda: save_file(plain, staging / MODEL_FILE))
        if ema is not None:
            attempt(lambda: save_file({k: v.detach().to("cpu").contiguous() for k, v in ema.items()},
                                      staging / MODEL_EMA_FILE))
    del state_dict
    # save_state is collective under DeepSpeed, so every process enters it even after a local failure.
    attempt(lambda: accelerator.save_state(str(staging / STATE_DIR)))
    if not all_ok(accelerator, failure is None):
        failure = failure or "failed on another process"
    if ranks.is_main and failure is None:
        attempt(lambda: _publish(staging, final, save_dir, name, info))
    ok = all_ok(accelerator, failure is None)
    if not ok:
        if ranks.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        ranks.say(f"error: could not save checkpoint {final} ({failure or 'failed on another process'}); "
                      f"earlier checkpoints are untouched")
    return final if ok else None


def all_ok(accelerator, ok: bool) -> bool:
    """Whether `ok` holds on every process (collective)."""
    import torch
    flag = torch.tensor(0.0 if ok else 1.0, device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def _publish(staging: Path, final: Path, save_dir: Path, name: str, info: dict) -> None:
    write_manifest(staging, info)
    previous = save_dir / f".old-{name}"
    if final.exists():
        # The same name again: a run resumed from an earlier checkpoint redoes this step. The superseded copy is
        # moved aside first; a kill between the two renames leaves the earlier checkpoints, which resume uses.
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final, previous)
    os.rename(staging, final)
    _fsync(save_dir)
    shutil.rmtree(previous, ignore_errors=True)
    tmp = save_dir / (LATEST_FILE + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, save_dir / LATEST_FILE)


# Where a resume converts DeepSpeed state of another layout (full_state.py), in the run's save_dir.
UNIVERSAL_PREFIX = ".universal-"
# Left by a save or a conversion killed midway (see save, _publish and full_state.load); nothing reads them.
STALE_PATTERNS = (".tmp-*", ".old-*", UNIVERSAL_PREFIX + "*", LATEST_FILE + ".tmp")


def remove_stale(save_dir: Path) -> list[Path]:
    """Delete the leftovers of killed saves in `save_dir`; main process only, at the start of a run."""
    stale = sorted({p for pattern in STALE_PATTERNS for p in Path(save_dir).glob(pattern)})
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def list_checkpoints(save_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest (highest global step) first."""
    found = [p for p in Path(save_dir).glob("*_*") if p.is_dir() and not p.name.startswith(".")
             and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: read_manifest(p).get("global_step", -1), reverse=True)


def newest_valid(save_dir: Path, say=print) -> Path | None:
    """The newest checkpoint in `save_dir` that verifies, saying which ones were passed over and why."""
    folders = list_checkpoints(save_dir)
    for folder in folders:
        # A manifest that cannot be read gives no step: such a checkpoint sorts last and would be passed over
        # without a word, whichever it is.
        if "global_step" not in read_manifest(folder):
            say(f"warning: skipping checkpoint {folder}: {folder / MANIFEST_FILE} is unreadable (its step is unknown)")
    for folder in (f for f in folders if "global_step" in read_manifest(f)):
        try:
            verify(folder)
            return folder
        except CheckpointError as error:
            say(f"warning: skipping checkpoint {folder}: {error}; falling back to an older one")
    return None


def rotate(save_dir: Path, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the `keep_last` newest checkpoints (and the best by val_acc1); main process only.

    Called after a new checkpoint is complete, so the newest valid one is never among those deleted.
    """
    folders = list_checkpoints(save_dir)
    keep = set(folders[:keep_last])
    if keep_best:
        scored = [f for f in folders if read_manifest(f).get("val_acc1") is not None]
        if scored:
            keep.add(max(scored, key=lambda f: read_manifest(f)["val_acc1"]))
    removed = [f for f in folders if f not in keep]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def load(accelerator, ranks, folder: Path) -> None:
    """Restore model, optimizer, scheduler, RNG and progress from a verified checkpoint written under this run's
    layout (full_state.py reads one of another layout)."""
    folder = Path(folder)
    ranks.on_main(lambda: verify(folder))
    accelerator.load_state(str(folder / STATE_DIR))


def load_weights(path: Path) -> dict:
    """A safetensors file of the checkpoint (the EMA on resume), exactly as saved."""
    from safetensors.torch import load_file
    return load_file(str(path))
