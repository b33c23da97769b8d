"""accelerate's trackers (--log_with): TensorBoard and MLflow hold the steps.jsonl and metrics.jsonl values; a tracker
that is unknown or not installed stops the run before it starts."""

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, assert_resumed, child_env, read_jsonl, record_lines, run_trainer
from trainer.config import TRACKERS
from trainer.main import main


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "cifar-trainer"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_metrics(store) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"file:{store}")
    experiment = client.get_experiment_by_name("cifar-trainer")
    run, = client.search_runs([experiment.experiment_id])
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                    key=lambda m: m.step)]
            for key in run.data.metrics}


@pytest.mark.launches
def test_tensorboard_and_mlflow_hold_the_logged_values_and_a_resume_replaces_the_steps_after_its_checkpoint(
        cifar_dir, tmp_path, monkeypatch):
    # 288 images at 64 per step: 5 steps per epoch; logged every 2 steps and at the end of each epoch.
    args = TINY + ["--data_dir", cifar_dir, "--epochs", 2, "--warmup_epochs", 1, "--batch_size", 64,
                   "--save_epochs", 1, "--log_interval", 2, "--log_with", "tensorboard,mlflow", "--save_dir", tmp_path]
    # MLflow's own settings: a local file store (mlflow 3.17 asks for MLFLOW_ALLOW_FILE_STORE to use one).
    env = child_env(MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}", MLFLOW_ALLOW_FILE_STORE="true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for reading it back here
    run_trainer(args, env=env)
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
    assert len(list((tmp_path / "cifar-trainer").glob("*/hparams.yml"))) == 1  # the options, once

    # MLflow, the second tracker of the same run: the same steps and values (stored as float64).
    logged = mlflow_metrics(tmp_path / "mlruns")
    for key in ("train_loss", "lr"):
        assert [step for step, _ in logged[f"step/{key}"]] == [s["step"] for s in steps]
        assert [value for _, value in logged[f"step/{key}"]] == pytest.approx([s[key] for s in steps], rel=1e-12)
    for key in ("train_loss", "val_loss", "val_acc1", "val_acc5"):
        assert [step for step, _ in logged[f"epoch/{key}"]] == [m["step"] for m in metrics]
        assert [value for _, value in logged[f"epoch/{key}"]] == pytest.approx([m[key] for m in metrics], rel=1e-12)

    # step/lr is the lr logged in steps.jsonl (read from the optimizer; test_train checks it against the formula).
    assert [value for _, value in first["step/lr"]] == pytest.approx([s["lr"] for s in steps], rel=1e-6)

    shutil.rmtree(tmp_path / "epoch_2")
    before = record_lines(tmp_path)
    resumed = run_trainer(args + ["--log_with", "tensorboard", "--checkpoint", tmp_path / "epoch_1"])
    assert_resumed(tmp_path, tmp_path / "epoch_1", before, resumed.stdout)
    again = scalars(tmp_path)
    # The events up to the checkpoint (step 5) are the first run's: their images_per_s, a timing, is unchanged.
    assert again["step/images_per_s"][:3] == first["step/images_per_s"][:3]
    # Steps 6-10 were logged twice; the resumed run's purge leaves one point per step, with the same values.
    assert [step for step, _ in again["step/train_loss"]] == [2, 4, 5, 6, 8, 10]
    assert [value for _, value in again["step/train_loss"]] == pytest.approx(
        [value for _, value in first["step/train_loss"]], rel=1e-6)
    assert len(list((tmp_path / "cifar-trainer").glob("*/hparams.yml"))) == 1


def test_the_trackers_are_accelerates():
    from accelerate.utils import LoggerType
    assert set(TRACKERS) == {t.value for t in LoggerType} - {"all"}


@pytest.mark.parametrize("log_with, message", [
    ("tensorboard,nosuch", "error: --log_with 'nosuch' is not one of accelerate's trackers: tensorboard, "),
    ("wandb", "error: --log_with wandb needs the wandb package: pip install wandb"),
])
def test_an_unknown_or_missing_tracker_stops_before_anything_is_written(log_with, message, cifar_dir, tmp_path,
                                                                        monkeypatch, capsys):
    # A tracker counts as missing when accelerate's own test says so: pretend wandb is not installed.
    monkeypatch.setattr("accelerate.utils.imports.is_wandb_available", lambda: False)
    assert main(TINY + ["--data_dir", str(cifar_dir), "--log_with", log_with, "--save_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "run").exists()


@pytest.mark.launches
def test_a_tracker_that_does_not_start_is_one_line_before_training(cifar_dir, tmp_path):
    # MLflow 3.17 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: an error of the tracker's own set-up.
    env = child_env(MLFLOW_TRACKING_URI=f"file:{tmp_path / 'mlruns'}")
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    result = run_trainer(TINY + ["--data_dir", cifar_dir, "--epochs", 1, "--log_with", "mlflow",
                                 "--save_dir", tmp_path / "run"], env=env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --log_with mlflow: the tracker did not start"), err
    assert not (tmp_path / "run").exists()  # no config.json or records written before the refusal
