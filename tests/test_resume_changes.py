"""A run folder is never silently overwritten, and a resume applies what it logs or refuses what it cannot change."""

import json
import shutil
import signal

import pytest

from conftest import TINY, fresh_accelerate_state, read_jsonl, refused, train_here
from trainer.optim import lr_at

EPOCHS = 2
STEPS_PER_EPOCH = 9  # 288 images, batch 32


def args_for(cifar_dir, save_dir, *extra):
    return TINY + ["--data_dir", cifar_dir, "--epochs", EPOCHS, "--batch_size", 32, "--save_epochs", 1,
                   "--save_dir", save_dir, *extra]


@pytest.fixture(scope="module")
def first_run(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    train_here(args_for(cifar_dir, root))
    return root


@pytest.fixture()
def used(first_run, tmp_path):
    """A copy of the first run's folder, and a file of the user's in it."""
    folder = tmp_path / "run"
    shutil.copytree(first_run, folder)
    (folder / "notes.txt").write_text("mine\n")
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_fresh_run_is_refused_and_leaves_the_first_byte_identical(cifar_dir, used):
    before = snapshot(used)
    result = train_here(args_for(cifar_dir, used, "--model", "test_nfnet"), check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --save_dir {used} holds a run (config.json, epoch_1, epoch_2, latest, ")
    assert "--resume auto" in line and "--overwrite" in line
    assert snapshot(used) == before


def test_overwrite_deletes_the_previous_run_and_trains(cifar_dir, used):
    result = train_here(args_for(cifar_dir, used, "--overwrite", "--epochs", 1, "--learning_rate", "1e-3"))
    assert f"--overwrite: deleted the previous run in {used}" in result.stdout
    assert sorted(p.name for p in used.iterdir()) == ["config.json", "epoch_1", "latest", "metrics.jsonl",
                                                      "notes.txt", "steps.jsonl"]
    assert [m["epoch"] for m in read_jsonl(used / "metrics.jsonl")] == [1]
    assert [s["step"] for s in read_jsonl(used / "steps.jsonl")] == list(range(1, STEPS_PER_EPOCH + 1))
    assert json.loads((used / "config.json").read_text())["options"]["learning_rate"] == 1e-3


def test_resume_auto_without_a_valid_checkpoint_keeps_the_records(cifar_dir, used):
    for epoch in range(1, EPOCHS + 1):  # every checkpoint damaged: none verifies
        (used / f"epoch_{epoch}" / "model.safetensors").write_bytes(b"damaged")
    before = snapshot(used)
    line = refused(args_for(cifar_dir, used, "--resume", "auto"))
    assert line.startswith(f"error: --resume auto: {used} holds checkpoints (epoch_1, epoch_2) but none that "
                           f"verifies") and "--overwrite" in line
    assert snapshot(used) == before


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint_only_with_the_same_options(
        cifar_dir, used):
    for epoch in range(1, EPOCHS + 1):
        shutil.rmtree(used / f"epoch_{epoch}")
    before = snapshot(used)
    line = refused(args_for(cifar_dir, used, "--resume", "auto", "--learning_rate", "1e-3"))
    assert "holds records of a run (config.json, latest, metrics.jsonl, steps.jsonl) started with other options " \
           "(learning_rate 0.002 -> 0.001) and no checkpoint" in line
    assert snapshot(used) == before


@pytest.mark.parametrize("change, message", [
    (["--model", "test_nfnet"], "model test_vit -> test_nfnet"),
    (["--optimizer", "sgdm"], "optimizer adamw -> sgdm"),
    (["--image_size", "48"], "image_size 32 -> 48"),
    (["--batch_size", "16"], "batch_size 32 -> 16"),
    (["--weight_decay", "0"], "weight_decay 0.01 -> 0.0 (to or from 0"),
])
def test_a_change_a_resume_cannot_make_is_refused_before_anything_is_written(cifar_dir, used, change, message):
    before = snapshot(used)
    line = refused(args_for(cifar_dir, used, "--checkpoint", used / "epoch_1", *change))
    assert line.startswith(f"error: {used / 'epoch_1'} cannot be resumed with {message}")
    assert snapshot(used) == before


def test_epochs_that_end_before_the_checkpoint_are_refused(cifar_dir, used):
    before = snapshot(used)
    assert refused(args_for(cifar_dir, used, "--checkpoint", used / "epoch_2", "--epochs", 1)) == (
        f"error: {used / 'epoch_2'} holds 18 steps (2 epochs): --epochs 1 would end before it; give --epochs 2 or more")
    assert snapshot(used) == before


def test_a_checkpoint_from_elsewhere_is_not_resumed_into_a_used_folder(cifar_dir, first_run, used):
    before = snapshot(used)
    line = refused(args_for(cifar_dir, used, "--checkpoint", first_run / "epoch_1"))
    assert line.startswith(f"error: --save_dir {used} holds a run (config.json, epoch_1, epoch_2, latest, ")
    assert f"--checkpoint {first_run / 'epoch_1'} lies outside it" in line
    assert snapshot(used) == before


def test_a_corrupt_metrics_file_on_resume_is_one_line(cifar_dir, used):
    lines = (used / "metrics.jsonl").read_text().splitlines()
    (used / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    before = snapshot(used)
    assert refused(args_for(cifar_dir, used, "--resume", "auto")) == (
        f"error: {used / 'metrics.jsonl'}: line 1 is not JSON: repair or delete that file, then resume again")
    assert snapshot(used) == before


def test_changed_learning_rate_weight_decay_and_epochs_are_applied_as_logged(cifar_dir, used):
    """Resumed from epoch 1 with a new peak lr, weight decay and one more epoch: every step's lr in the optimizer
    is the one steps.jsonl logs, and that is the schedule of the new options from step 9 on."""
    from trainer.config import parse_config
    from trainer.loop import Trainer
    for stale in (".tmp-step_5", ".old-epoch_1", ".universal-epoch_1"):  # left by killed saves
        (used / stale / "state").mkdir(parents=True)
        (used / stale / "state" / "x.bin").write_bytes(b"partial")
    fresh_accelerate_state()
    config = parse_config([str(a) for a in args_for(cifar_dir, used, "--checkpoint", used / "epoch_1",
                                                    "--learning_rate", "4e-3", "--weight_decay", "0.05",
                                                    "--epochs", EPOCHS + 1)])
    trainer = Trainer(config)
    applied = []
    step = trainer.train_step

    def record(*args):
        groups = trainer.optimizer.param_groups
        applied.append((trainer.progress.global_step, [float(g["lr"]) for g in groups],
                        sorted({g["weight_decay"] for g in groups})))
        return step(*args)
    trainer.train_step = record
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer.run()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert not [p for p in used.iterdir() if p.name.startswith(".")]
    logged = {s["step"] - 1: s["lr"] for s in read_jsonl(used / "steps.jsonl")}  # a line after each step
    assert [s for s, _, _ in applied] == list(range(STEPS_PER_EPOCH, (EPOCHS + 1) * STEPS_PER_EPOCH))
    for s, lrs, decays in applied:
        assert lrs == pytest.approx([logged[s]] * len(lrs), rel=1e-12)
        assert logged[s] == pytest.approx(lr_at(s, config, STEPS_PER_EPOCH), rel=1e-12)
        assert decays == [0.0, 0.05]
    # Step 9 of 27 at peak 4e-3: 4e-3 * (1 + cos(pi / 3)) / 2, not the saved schedule's 1e-3.
    assert applied[0][1][0] == pytest.approx(3e-3, rel=1e-12)
    resumed = json.loads((used / "config.json").read_text())["resumed_from"]
    assert resumed["global_step"] == STEPS_PER_EPOCH
    assert resumed["changed_options"] == {"epochs": [2, 3], "learning_rate": [0.002, 0.004],
                                          "weight_decay": [0.01, 0.05]}


def test_overwrite_deletes_the_tracker_folders_and_leaves_other_files(tmp_path):
    # What accelerate's trackers write under save_dir belongs to the run: a new run must not log beside it.
    from trainer import checkpoint, records
    for name in ("config.json", "metrics.jsonl", "latest"):
        (tmp_path / name).write_text("x\n")
    for folder in ("epoch_1", records.TRACKER_PROJECT, "wandb", "dvclive"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "file").write_text("x\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    checkpoint.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
