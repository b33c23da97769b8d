"""Checkpoints that survive kills, signals, corruption, full disks and a changed process count."""

import json
import os
import random
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import (TINY, assert_resumed, assert_same_run, launching, load_weights, read_jsonl, record_lines,
                      relative_l2, run_trainer, start_trainer, train, train_here, wait_while_running)
from trainer import checkpoint, records

EPOCHS = 3
STEPS_PER_EPOCH = 9  # 288 images, batch 32


def args_for(cifar_dir, save_dir, *extra):
    return TINY + ["--data_dir", cifar_dir, "--epochs", EPOCHS, "--batch_size", 32, "--augment", "crop_flip",
                   "--save_epochs", 1, "--save_dir", save_dir, *extra]


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    train_here(args_for(cifar_dir, root))
    return root


def wait_for_step(run_dir, step, process):
    def reached():
        lines = records.read_lines(run_dir / "steps.jsonl")  # skips a last line caught half-written
        return bool(lines) and lines[-1]["step"] >= step
    wait_while_running(process, reached, f"step {step}")


@pytest.mark.parametrize("sent, option", [(signal.SIGTERM, []), (signal.SIGUSR2, ["--preempt_signal", "SIGUSR2"])])
@pytest.mark.launches
def test_preemption_signal_mid_epoch_saves_exits_75_and_resumes_to_the_same_run(cifar_dir, tmp_path, uninterrupted,
                                                                               sent, option):
    args = args_for(cifar_dir, tmp_path, "--resume", "auto", *option)
    process = start_trainer(args)
    wait_for_step(tmp_path, STEPS_PER_EPOCH + 4, process)
    process.send_signal(sent)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output
    (saved,) = [p for p in checkpoint.list_checkpoints(tmp_path) if p.name.startswith("step_")]
    info = checkpoint.read_manifest(saved)
    assert info["epoch"] == 1 and 0 < info["step_in_epoch"] < STEPS_PER_EPOCH
    checkpoint.verify(saved)
    before = record_lines(tmp_path)
    resumed = train_here(args)
    assert_resumed(tmp_path, saved, before, resumed.stdout)
    assert_same_run(tmp_path, uninterrupted, EPOCHS, rel=1e-9)


@pytest.mark.launches
def test_sigkill_at_random_moments_costs_only_the_work_since_the_last_checkpoint(cifar_dir, tmp_path, uninterrupted):
    args = args_for(cifar_dir, tmp_path, "--resume", "auto")
    rng = random.Random(7)
    kills = 0
    for target in sorted(rng.sample(range(2, EPOCHS * STEPS_PER_EPOCH - 2), 2)) + ["save"]:
        resume_from, before = checkpoint.newest_valid(tmp_path), record_lines(tmp_path)
        process = start_trainer(args)
        if target == "save":
            # Kill while a checkpoint is being written: the moment its hidden staging folder exists.
            wait_while_running(process, lambda: any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()),
                       "a checkpoint was being written")
        else:
            wait_for_step(tmp_path, target, process)
        process.kill()
        process.wait()
        kills += 1
        for folder in checkpoint.list_checkpoints(tmp_path):
            checkpoint.verify(folder)  # whatever is visible is complete
        if resume_from is not None:  # what came before the checkpoint it resumed from was not trained again
            step = checkpoint.read_manifest(resume_from)["global_step"]
            kept = [line for line in before["steps.jsonl"] if json.loads(line)["step"] <= step]
            assert record_lines(tmp_path)["steps.jsonl"][:len(kept)] == kept
    assert kills == 3
    resume_from, before = checkpoint.newest_valid(tmp_path), record_lines(tmp_path)
    resumed = train_here(args)
    assert_resumed(tmp_path, resume_from, before, resumed.stdout)
    assert_same_run(tmp_path, uninterrupted, EPOCHS, rel=1e-9)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "has .* bytes, the manifest says .* \\(truncated\\?\\)"),
    ("flip", "does not match its SHA-256"),
    ("unlisted", "is not in the manifest"),
])
def test_damaged_checkpoint_is_refused_and_auto_resume_falls_back(cifar_dir, tmp_path, uninterrupted, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / f"epoch_{EPOCHS}"
    model = newest / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    else:
        manifest = json.loads((newest / "manifest.json").read_text())
        del manifest["files"]["state/optimizer.bin"]
        (newest / "manifest.json").write_text(json.dumps(manifest))
    before = record_lines(run_dir)
    refused = train_here(args_for(cifar_dir, run_dir, "--checkpoint", newest), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: checkpoint file")
    import re
    assert re.search(message, refused.stderr)
    resumed = train_here(args_for(cifar_dir, run_dir, "--resume", "auto"))
    assert f"skipping checkpoint {newest}" in resumed.stdout
    assert_resumed(run_dir, run_dir / f"epoch_{EPOCHS - 1}", before, resumed.stdout)
    assert_same_run(run_dir, uninterrupted, EPOCHS, rel=1e-9)


def test_resume_auto_in_an_empty_folder_starts_fresh(cifar_dir, tmp_path):
    result = train_here(args_for(cifar_dir, tmp_path, "--resume", "auto", "--epochs", 1, "--warmup_epochs", 0))
    assert "no valid checkpoint" in result.stdout and (tmp_path / "epoch_1").is_dir()
    assert (tmp_path / "latest").read_text().strip() == "epoch_1"


def test_rotation_keeps_the_newest_k_and_the_best(tmp_path):
    for step, acc in [(10, 50.0), (20, 90.0), (30, 60.0), (40, 70.0), (45, None)]:
        folder = tmp_path / f"ckpt_{step}"
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"global_step": step, "val_acc1": acc, "files": {}}))
    removed = checkpoint.rotate(tmp_path, keep_last=2, keep_best=True)
    assert sorted(p.name for p in removed) == ["ckpt_10", "ckpt_30"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_20", "ckpt_40", "ckpt_45"]
    checkpoint.rotate(tmp_path, keep_last=1, keep_best=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_45"]


def test_keep_last_during_a_run(cifar_dir, tmp_path):
    train_here(args_for(cifar_dir, tmp_path, "--keep_last", 1))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [f"epoch_{EPOCHS}"]


@pytest.fixture()
@launching
def small_disk(tmp_path):
    """A 7 MB file system: room for one test_vit checkpoint (~5 MB) but not two."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to mount a small tmpfs and fill a disk for real (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)]).returncode != 0:
        pytest.fail("this test needs to mount a small tmpfs (run as root), to fill a disk for real")
    yield mount
    subprocess.run(["umount", str(mount)])


def test_a_full_disk_stops_the_run_and_leaves_the_previous_checkpoint_valid(cifar_dir, small_disk):
    result = run_trainer(args_for(cifar_dir, small_disk), check=False)
    assert result.returncode == 1
    assert "could not save checkpoint" in result.stdout and "No space left on device" in result.stdout
    assert "earlier checkpoints are intact" in result.stderr.strip().splitlines()[-1]
    checkpoint.verify(small_disk / "epoch_1")
    assert (small_disk / "latest").read_text().strip() == "epoch_1"
    assert not [p for p in small_disk.iterdir() if p.name.startswith(".tmp-")]


def test_on_save_error_continue_trains_on(cifar_dir, small_disk):
    result = run_trainer(args_for(cifar_dir, small_disk, "--on_save_error", "continue"), check=False)
    assert [m["epoch"] for m in read_jsonl(small_disk / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    checkpoint.verify(small_disk / "epoch_1")
    # ... but not past a final checkpoint that could not be written either (the disk holds one).
    assert result.returncode == 1
    assert "the one this run ends with, could not be written" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
@pytest.mark.launches
def test_a_checkpoint_resumes_with_another_process_count(cifar_dir, tmp_path, uninterrupted, before, after):
    # A micro-batch of 16 makes the accumulation differ too: 2 steps on 1 process, 1 step on 2.
    run_dir = tmp_path / "run"
    train(args_for(cifar_dir, run_dir, "--micro_batch_size", 16), before)
    lines = record_lines(run_dir)
    resumed = train(args_for(cifar_dir, run_dir, "--micro_batch_size", 16, "--checkpoint", run_dir / "epoch_1"), after)
    assert_resumed(run_dir, run_dir / "epoch_1", lines, resumed.stdout)
    # Saved on `before` processes (the checkpoint's manifest), resumed on `after` (the run's record).
    assert checkpoint.read_manifest(run_dir / "epoch_1")["processes"] == before
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["processes"] == after
    # Float re-association across process counts only (see test_train.py).
    assert relative_l2(load_weights(run_dir / f"epoch_{EPOCHS}/model.safetensors"),
                       load_weights(uninterrupted / f"epoch_{EPOCHS}/model.safetensors")) < 1e-5
    assert [m["val_acc1"] for m in read_jsonl(run_dir / "metrics.jsonl")] == \
        [m["val_acc1"] for m in read_jsonl(uninterrupted / "metrics.jsonl")]


def test_a_nan_loss_stops_with_the_step_and_writes_no_checkpoint(cifar_dir, tmp_path):
    result = train_here(args_for(cifar_dir, tmp_path, "--learning_rate", "1e30"), check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training loss is nan at step") or "not finite" in last, last
    assert not checkpoint.list_checkpoints(tmp_path)


# --- what a start may change in the folder, in this process (faster than a new one) ------------------------------

def test_overwrite_deletes_exactly_the_runs_own_entries(cifar_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / "epoch_1_export").mkdir()  # trainer.export's default output
    (run_dir / "epoch_1_export" / "model.safetensors").write_text("exported")
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / ".overwritten" / "epoch_9").mkdir(parents=True)  # left by an --overwrite start killed before its commit
    result = train_here(args_for(cifar_dir, run_dir, "--overwrite", "--epochs", 1), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert "--overwrite: deleted the previous run" in out
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.json", "epoch_1", "epoch_1_export", "latest", "metrics.jsonl", "notes.txt", "steps.jsonl"])
    assert (run_dir / "epoch_1_export" / "model.safetensors").read_text() == "exported"
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]


def test_going_back_sets_the_later_checkpoints_aside_so_auto_resume_continues_the_new_branch(
        cifar_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    result = train_here(args_for(cifar_dir, run_dir, "--checkpoint", run_dir / "epoch_1", "--epochs", 2), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    (aside,) = (run_dir / "superseded").iterdir()
    assert f"moved the checkpoints after epoch_1 (epoch_2, epoch_3), which this run replaces, to {aside}" in out
    assert sorted(p.name for p in aside.iterdir()) == ["epoch_2", "epoch_3"]
    checkpoint.verify(aside / "epoch_3")  # kept, whole, where auto resume does not look
    assert (run_dir / "latest").read_text().strip() == "epoch_2" and not (run_dir / "epoch_3").exists()
    result = train_here(args_for(cifar_dir, run_dir, "--resume", "auto"), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert f"resumed from {run_dir / 'epoch_2'}: epoch 2, step 18" in out
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_an_unreadable_manifest_is_passed_over_out_loud(cifar_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    (run_dir / f"epoch_{EPOCHS}" / "manifest.json").write_text("{not json")
    result = train_here(args_for(cifar_dir, run_dir, "--resume", "auto"), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, err
    assert (f"warning: skipping checkpoint {run_dir / f'epoch_{EPOCHS}'}: "
            f"{run_dir / f'epoch_{EPOCHS}' / 'manifest.json'} is unreadable") in out
    assert f"resumed from {run_dir / f'epoch_{EPOCHS - 1}'}" in out


@pytest.fixture()
def saves_fail(monkeypatch):
    """Every checkpoint fails to be published, as on a full disk."""
    from trainer import checkpoint_folder

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint_folder, "_publish", full)


@pytest.mark.launches
def test_a_failed_final_save_is_a_failure_even_with_on_save_error_continue(cifar_dir, tmp_path, saves_fail):
    result = train_here(args_for(cifar_dir, tmp_path, "--epochs", 1, "--on_save_error", "continue"), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: stopped: checkpoint {tmp_path / 'epoch_1'}, the one this run ends with, could not be written; "
        f"earlier checkpoints are intact (resume from them with --resume auto)"]
    assert "No space left on device" in out and not checkpoint.list_checkpoints(tmp_path)


def test_a_preempted_run_whose_save_fails_does_not_exit_75(cifar_dir, tmp_path, saves_fail, monkeypatch):
    from trainer.preemption import StopRequest
    # The preemption signal, as though received as training starts (no handler is installed in pytest's process).
    monkeypatch.setattr(StopRequest, "install", lambda self, names: setattr(self, "signal", signal.SIGTERM))
    result = train_here(args_for(cifar_dir, tmp_path, "--on_save_error", "continue"), check=False)
    code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 1, (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: stopped: checkpoint {tmp_path / 'step_'}") and "the one this run ends with" in line
    assert not checkpoint.list_checkpoints(tmp_path)


def test_a_model_that_draws_random_numbers_resumes_to_the_same_weights(cifar_dir, tmp_path, monkeypatch):
    """The RNG is restored on resume. test_vit as trained elsewhere draws nothing from the global generators, so
    a resume that skipped the restore would pass every other resume test; with dropout (timm's drop_rate) each
    step draws its masks from torch's global generator, and a resume without the restore diverges. In this
    process: the trainer has no dropout option, so timm.create_model gets drop_rate here."""
    import timm
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: create(*args, **{**kwargs, "drop_rate": 0.3}))
    args = TINY + ["--data_dir", cifar_dir, "--epochs", 2, "--batch_size", 96, "--save_epochs", 1, "--augment", "none"]
    train_here(args + ["--save_dir", tmp_path / "whole"])
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "epoch_2")
    train_here(args + ["--save_dir", tmp_path / "resumed", "--checkpoint", tmp_path / "resumed" / "epoch_1"])
    whole, resumed = (load_weights(tmp_path / d / "epoch_2" / "model.safetensors") for d in ("whole", "resumed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), relative_l2(resumed, whole)
