"""TensorBoard through accelerate's tracker (--log_with tensorboard): the steps.jsonl and metrics.jsonl values."""

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, assert_resumed, read_jsonl, record_lines, run_trainer


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_logged_losses_and_a_resume_replaces_the_steps_after_its_checkpoint(cifar_dir, tmp_path):
    # 288 images at 64 per step: 5 steps per epoch; logged every 2 steps and at the end of each epoch.
    args = TINY + ["--data_dir", cifar_dir, "--epochs", 2, "--warmup_epochs", 1, "--batch_size", 64,
                   "--save_epochs", 1, "--log_interval", 2, "--log_with", "tensorboard", "--save_dir", tmp_path]
    run_trainer(args)
    first = scalars(tmp_path)
    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [s["step"] for s in steps] == [2, 4, 5, 6, 8, 10]
    assert [step for step, _ in first["step/train_loss"]] == [s["step"] for s in steps]
    for (_, value), line in zip(first["step/train_loss"], steps):
        assert value == pytest.approx(line["train_loss"], rel=1e-6)  # stored as float32
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [step for step, _ in first["epoch/val_acc1"]] == [m["step"] for m in metrics]
    assert [value for _, value in first["epoch/val_acc1"]] == pytest.approx([m["val_acc1"] for m in metrics], rel=1e-6)
    assert {"step/lr", "epoch/train_loss", "epoch/val_loss", "epoch/val_acc5"} <= first.keys()
    assert len(list((tmp_path / "tensorboard").glob("*/hparams.yml"))) == 1  # the options, once

    # step/lr is the lr logged in steps.jsonl (read from the optimizer; test_train checks it against the formula).
    assert [value for _, value in first["step/lr"]] == pytest.approx([s["lr"] for s in steps], rel=1e-6)

    shutil.rmtree(tmp_path / "epoch_2")
    before = record_lines(tmp_path)
    resumed = run_trainer(args + ["--checkpoint", tmp_path / "epoch_1"])
    assert_resumed(tmp_path, tmp_path / "epoch_1", before, resumed.stdout)
    again = scalars(tmp_path)
    # The events up to the checkpoint (step 5) are the first run's: their images_per_s, a timing, is unchanged.
    assert again["step/images_per_s"][:3] == first["step/images_per_s"][:3]
    # Steps 6-10 were logged twice; the resumed run's purge leaves one point per step, with the same values.
    assert [step for step, _ in again["step/train_loss"]] == [2, 4, 5, 6, 8, 10]
    assert [value for _, value in again["step/train_loss"]] == pytest.approx(
        [value for _, value in first["step/train_loss"]], rel=1e-6)
    assert len(list((tmp_path / "tensorboard").glob("*/hparams.yml"))) == 1
