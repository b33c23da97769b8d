"""What the user asked for, or a refusal: one line `error: ...`, exit status 2, before training, nothing left behind."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from conftest import MAIN, REPO, TINY, child_env, fresh_accelerate_state, refused, run_trainer, train_here
from trainer.config import ConfigError, TrainConfig, check_writable_folder, parse_config
from trainer.data import DataError, ensure_downloaded, read_split
from trainer.main import main
from trainer.models import create_model
from trainer.runtime import check_process_group
from trainer.study import StudyError, load_study
from trainer.synthetic import write_fake_cifar100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    write_fake_cifar100(root, num_train=16, num_test=8)
    return root


def weights_file(path, model_name, **kwargs):
    save_file(timm.create_model(model_name, **kwargs).state_dict(), str(path))
    return path


# --- command line and config files ------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("epochs: 1.9", "epochs must be an int, got 1.9"),
    ("epochs: null", "epochs must be an int, got null"),
    ("epochs: true", "epochs must be an int, got True"),
    ("batch_size: 64.0", "batch_size must be an int, got 64.0"),
    ("learning_rate: false", "learning_rate must be a float, got False"),
    ("pretrained: 1", "pretrained must be a bool, got 1"),
    ("model: 3", "model must be a str, got 3"),
    ("learning_rate: .inf", "--learning_rate must be a finite number, got inf"),
])
def test_config_file_values_need_the_options_type_exactly(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(["--config", str(path)])


def test_config_file_ints_are_floats_and_nulls_where_the_option_has_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1\nwarmup_epochs: 0\nmin_lr: 5e-5\nmicro_batch_size: null\n")
    c = parse_config(["--config", str(path)])
    assert (c.learning_rate, c.warmup_epochs, c.min_lr, c.micro_batch_size) == (1.0, 0.0, 5e-5, None)
    assert type(c.learning_rate) is float and type(c.min_lr) is float  # YAML reads 5e-5 as a string


def test_study_file_values_need_the_options_type_exactly(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("defaults: {epochs: 1.9}\nexperiments: {a: {options: {model: test_vit}}}\n")
    with pytest.raises(StudyError, match=r"defaults: epochs must be an int, got 1\.9"):
        load_study(path)


def test_config_and_its_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "ck").mkdir()
    (tmp_path / "run.yaml").write_text("save_dir: ~/runs\ndata_dir: ~/data\npretrained_file: ~/w.safetensors\n"
                                       "checkpoint: ~/ck\n")
    c = parse_config(["--config", "~/run.yaml"])
    assert (c.save_dir, c.data_dir) == (str(tmp_path / "runs"), str(tmp_path / "data"))
    assert (c.pretrained_file, c.checkpoint) == (str(tmp_path / "w.safetensors"), str(tmp_path / "ck"))


@pytest.mark.parametrize("argv", [["--learning_rate", "inf"], ["--learning_rate", "nan"], ["--weight_decay", "inf"],
                                  ["--mixup", "inf"], ["--grad_clip", "nan"], ["--warmup_epochs=-inf"]])
def test_non_finite_numbers_are_refused(argv):
    name, value = "=".join(argv).split("=")
    with pytest.raises(ConfigError, match=f"{name} must be a finite number, got {value}"):
        parse_config(argv)


@pytest.mark.parametrize("seed, ok", [(-5, False), (2**32, False), (2**70, False), (0, True), (2**32 - 1, True)])
def test_seed_must_be_one_numpy_takes(seed, ok):
    if ok:
        assert parse_config(["--seed", str(seed)]).seed == seed
    else:
        with pytest.raises(ConfigError, match=r"--seed must lie in \[0, 2\*\*32 - 1\]"):
            parse_config(["--seed", str(seed)])


def test_argparse_errors_are_one_line_and_help_is_whole(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--epochs", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == ["error: argument --epochs: invalid int value: '1.5' (see --help)"]
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: trainer") and "--learning_rate" in out


# --- the trainer stops before training and leaves nothing behind --------------------------------------

def test_refusals_before_training_leave_nothing_behind(data, tmp_path):
    base = TINY + ["--data_dir", data, "--epochs", "1", "--batch_size", "8"]
    run = tmp_path / "run"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not weights")
    not_pickle = tmp_path / "notes.pth"
    not_pickle.write_text("not weights")
    nfnet = weights_file(tmp_path / "nfnet.safetensors", "test_nfnet")
    config = tmp_path / "nulls.yaml"
    config.write_text("epochs: null\n")
    cases = [
        (["--save_dir", a_file], f"--save_dir {a_file} is a file, not a folder"),
        (["--save_dir", a_file / "run"], f"--save_dir {a_file / 'run'} cannot be created: {a_file} is a file"),
        (["--save_dir", run, "--data_dir", a_file], f"--data_dir {a_file} is a file, not a folder"),
        (["--save_dir", run, "--image_size", "33"],
         "--image_size 33 does not fit --model test_vit (AssertionError: Input height (33) should be divisible by "
         "patch size (16).)"),
        (["--save_dir", run, "--pretrained_file", not_weights],
         f"--pretrained_file {not_weights} cannot be loaded into test_vit by timm: it is not a weights file timm can "
         f"read (safetensors, or a PyTorch state dict saved with torch.save) (SafetensorError"),
        # torch.load reads the text's first byte as a pickle opcode: its KeyError(number) is left out.
        (["--save_dir", run, "--pretrained_file", not_pickle],
         f"--pretrained_file {not_pickle} cannot be loaded into test_vit by timm: it is not a weights file timm can "
         f"read (safetensors, or a PyTorch state dict saved with torch.save)"),
        (["--save_dir", run, "--pretrained_file", nfnet],
         f"--pretrained_file {nfnet} does not fit test_vit: 78 of the model's 80 tensors are not in the file"),
        (["--save_dir", run, "--batch_size", "32"],
         f"--batch_size 32 is larger than the training set (16 images in {data / 'cifar-100-python' / 'train'})"),
        (["--save_dir", run, "--config", config], f"--config {config}: epochs must be an int, got null"),
    ]
    for extra, message in cases:
        assert message in refused(base + extra)
        assert not run.exists(), extra
        assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["a_file", "notes.safetensors", "notes.pth", "nfnet.safetensors", "nulls.yaml"])


def snapshot(folder) -> dict:
    """Every file and folder under `folder` with its bytes."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("trackers", ["mlflow", "tensorboard,mlflow"])
def test_a_tracker_that_does_not_start_deletes_and_writes_nothing(data, tmp_path, monkeypatch, trackers):
    # No MLflow settings: MLflow's default store is refused as the tracker starts, after the data and model are built.
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    base = TINY + ["--data_dir", data, "--epochs", "1", "--batch_size", "8"]
    run = tmp_path / "run"
    train_here(base + ["--save_dir", run])
    (run / ".tmp-step_1").mkdir()  # left by a killed save: the start that is refused leaves it too
    before = snapshot(run)
    for extra in (["--overwrite"], ["--resume", "auto"]):
        message = refused(base + ["--save_dir", run, "--log_with", trackers, *extra])
        assert message.startswith(f"error: --log_with {trackers}: the tracker did not start"), message
        assert snapshot(run) == before
    fresh = tmp_path / "fresh"
    refused(base + ["--save_dir", fresh, "--log_with", trackers])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_empty_save_dir_is_refused(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(TINY + ["--data_dir", data, "--batch_size", "8", "--save_dir", ""])
    assert message == "error: --save_dir is empty: name the run's folder (e.g. --save_dir runs/vit)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="as root every folder is writable: a read-only one cannot be made")
def test_read_only_save_dir_is_refused(data, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        message = refused(TINY + ["--data_dir", data, "--batch_size", "8", "--save_dir", parent / "run"])
        assert f"--save_dir {parent / 'run'} cannot be created: {parent} is not writable" in message
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_unwritable_save_dir_is_refused_without_creating_it(tmp_path, monkeypatch):
    # As root every folder is writable; os.access is what the check asks, so here it stands in for a read-only folder.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=f"--save_dir {tmp_path / 'run'} cannot be created: {tmp_path} is not writable"):
        check_writable_folder(str(tmp_path / "run"), "--save_dir")
    with pytest.raises(ConfigError, match=f"--save_dir {tmp_path} is not writable"):
        check_writable_folder(str(tmp_path), "--save_dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.launches
def test_study_save_dir_that_is_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    result = subprocess.run([sys.executable, "-m", "trainer.study", "--save_dir", str(a_file)], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.splitlines() == [f"error: --save_dir {a_file} is a file, not a folder"]
    assert a_file.read_text() == "mine"


def test_fp16_that_accelerate_would_not_apply_on_the_cpu_is_refused(data, tmp_path):
    args = TINY + ["--data_dir", data, "--batch_size", "8", "--save_dir", tmp_path / "run", "--device", "cpu"]
    args[args.index("--mixed_precision") + 1] = "fp16"
    # accelerate keeps one mixed precision per process: refused() starts afresh; leave none behind for other tests.
    try:
        assert ("--mixed_precision fp16 is not applied on cpu by accelerate (it would train in fp32)"
                in refused(args))
    finally:
        fresh_accelerate_state()
    assert not (tmp_path / "run").exists()


# --- options, data and checkpoints the trainer refuses -------------------------------------------------

@pytest.fixture()
def data_256(tmp_path):
    """Fresh for each test (one truncates a file of it), and as large as the default --batch_size."""
    write_fake_cifar100(tmp_path / "data", num_train=256, num_test=8)
    return tmp_path / "data"


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_model"], "--model 'no_such_model' is neither a preset (nfnet, vit) nor a timm model name"),
    (["--batch_size", "64", "--micro_batch_size", "24"], "--micro_batch_size 24 does not divide"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU is visible"),
    (["--cuda_graph"], "--cuda_graph needs one process on a GPU"),
    (["--data_device", "accelerator"], "--data_device accelerator needs a GPU"),
])
def test_bad_options_stop_before_training(data_256, tmp_path, extra, message):
    line = refused(TINY + ["--data_dir", data_256, "--save_dir", tmp_path / "run", "--epochs", "1"] + extra)
    assert message in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_without_download(tmp_path):
    line = refused(TINY + ["--data_dir", tmp_path / "empty", "--no-download", "--epochs", "1",
                           "--save_dir", tmp_path / "run"])
    assert line.startswith("error: CIFAR-100 not found") and "--data_dir" in line


def test_corrupt_data_file_names_the_file(data_256, tmp_path):
    test_file = data_256 / "cifar-100-python" / "test"
    test_file.write_bytes(test_file.read_bytes()[:-500])
    line = refused(TINY + ["--data_dir", data_256, "--epochs", "1", "--save_dir", tmp_path / "run"])
    assert str(test_file) in line


def test_checkpoint_that_is_not_a_checkpoint(data_256, tmp_path):
    (tmp_path / "notes").mkdir()
    line = refused(TINY + ["--data_dir", data_256, "--epochs", "1", "--save_dir", tmp_path / "run",
                           "--checkpoint", tmp_path / "notes"])
    assert "is not a checkpoint: manifest.json is missing" in line


def test_processes_that_did_not_join_one_group_are_refused():
    with pytest.raises(ConfigError, match="started 2 processes but accelerate sees 1"):
        check_process_group(Accelerator(cpu=True), launched=2)
    check_process_group(Accelerator(cpu=True), launched=1)


@pytest.mark.launches
def test_unknown_option_exits_2_from_the_command_line():
    result = subprocess.run([sys.executable, MAIN, "--learning_rat", "0.1"], cwd=REPO, capture_output=True,
                            text=True, env=child_env())
    # argparse's refusal, made one line (no usage block).
    assert result.returncode == 2
    assert result.stderr == "error: unrecognized arguments: --learning_rat 0.1 (see --help)\n"


@pytest.mark.launches
def test_unreachable_pretrained_weights_fail_fast_naming_the_alternatives(data_256, tmp_path):
    # An empty cache and a hub address that refuses connections: the real path, without waiting on retries.
    env = child_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    args = [a for a in TINY if a != "--no-pretrained"]
    result = subprocess.run([sys.executable, MAIN, *args, "--data_dir", str(data_256), "--epochs", "1",
                             "--save_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: pretrained weights of test_vit are not cached and http://127.0.0.1:9 cannot be "
                           "reached;") and "--pretrained_file" in line and "--no-pretrained" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- data --------------------------------------------------------------------------------------------

def test_swapped_train_and_test_files_are_refused(tmp_path):
    write_fake_cifar100(tmp_path / "data", num_train=8, num_test=16)
    folder = tmp_path / "data" / "cifar-100-python"
    message = refused(TINY + ["--data_dir", tmp_path / "data", "--batch_size", "8", "--save_dir", tmp_path / "run"])
    assert f"{folder / 'test'} holds more images (16) than {folder / 'train'} (8): are the two files swapped?" in message
    assert not (tmp_path / "run").exists()


def test_float_labels_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "train"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [3.7, 1.0]}, f)
    with pytest.raises(DataError, match=f"{path}: fine_labels must be integers, got float64 values such as 3.7"):
        read_split(path)


def test_failed_download_removes_the_folders_it_made(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise RuntimeError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match="could not be downloaded"):
        ensure_downloaded(str(tmp_path / "new" / "data"), download=True)
    assert list(tmp_path.iterdir()) == []


def test_data_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="cannot be written to download it"):
        ensure_downloaded(str(tmp_path / "a_file" / "data"), download=True)


# --- pretrained weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("blocks.0.norm1.weight"), "1 of the model's 80 tensors are not in the file (blocks.0.norm1.weight"),
    (lambda w: w.update(extra=torch.zeros(1)), "0 of the model's 80 tensors are not in the file and 1 of the file's "
                                               "are not in the model (extra"),
])
def test_weights_that_do_not_fit_beyond_the_head_are_refused(tmp_path, change, message):
    weights = timm.create_model("test_vit").state_dict()
    change(weights)
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        create_model(TrainConfig(model="test_vit", pretrained_file=str(tmp_path / "w.safetensors")))


@pytest.mark.launches
def test_another_architectures_weights_are_refused_in_one_line(data, tmp_path):
    # A real process: in pytest's own process, timm's logged "Unexpected keys" warning would not reach stderr.
    nfnet = weights_file(tmp_path / "nfnet.safetensors", "test_nfnet")
    result = run_trainer(TINY + ["--data_dir", data, "--batch_size", "8", "--save_dir", tmp_path / "run",
                                 "--pretrained_file", nfnet], check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --pretrained_file {nfnet} does not fit test_vit: 78 of the model's 80 tensors are not in the file "
        f"(cls_token, ...) and 93 of the file's are not in the model (final_conv.bias, ...); are they another "
        f"model's weights?"]
    assert not (tmp_path / "run").exists()


def test_weights_of_other_shapes_are_refused(tmp_path):
    path = weights_file(tmp_path / "wide.safetensors", "test_vit", embed_dim=128)
    with pytest.raises(ConfigError, match=r"cannot be loaded into test_vit by timm \(RuntimeError: .* size mismatch"):
        create_model(TrainConfig(model="test_vit", pretrained_file=str(path)))


# --- report and launch.sh -----------------------------------------------------------------------------

# --- every command of the package: one line, exit 2, nothing written -------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A real run folder with its checkpoint epoch_1 (export and evaluate verify what they read)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train_here(TINY + ["--data_dir", data, "--epochs", "1", "--batch_size", "8", "--save_dir", run])
    return run


def command_main(name: str):
    import importlib
    return importlib.import_module(f"trainer.{name}").main


def damaged_copy(run, tmp, text):
    """A copy of the run whose config.json holds `text`."""
    import shutil
    copy = tmp / "copy"
    shutil.copytree(run, copy)
    (copy / "config.json").write_text(text)
    return copy


def damaged_report_run(tmp, change):
    """A report's run folder (test_report.write_run), changed by change(folder)."""
    from conftest import write_run
    run = write_run(tmp / "r")
    change(run)
    return run


def lines_without(key):
    def change(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        lines[1].pop(key) if key != "null" else lines[1].update(val_acc1=None)
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return change


def evaluation_with(metrics=None, per_class=None):
    def change(run):
        (run / "evaluation").mkdir()
        (run / "evaluation" / "metrics.json").write_text(json.dumps(
            metrics or {"val_acc1": 1.0, "val_acc5": 2.0, "val_loss": 3.0, "val_images": 10}))
        if per_class:
            (run / "evaluation" / "per_class.csv").write_text(per_class)
    return change


def study_file(tmp):
    (tmp / "study.yaml").write_text("experiments: {a: {options: {model: test_vit}}}\n")
    return ["--study", tmp / "study.yaml", "--no-pretrained", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8"]


def study_with_corrupt_config(tmp, data):
    (tmp / "s" / "a").mkdir(parents=True)
    (tmp / "s" / "a" / "config.json").write_text('{"options": ')
    return [*study_file(tmp), "--save_dir", tmp / "s", "--data_dir", data]


# (id, command, argv(c) with c: tmp, data, run (a real run folder), ckpt (its checkpoint), what the line says)
COMMAND_REFUSALS = [
    # An --out inside a checkpoint would fail its manifest: every later resume, evaluate or export refuses it.
    ("report-out-in-checkpoint", "report", lambda c: [c.run, "--out", c.ckpt / "figures"], "lies inside the checkpoint"),
    ("evaluate-out-in-checkpoint", "evaluate", lambda c: [c.ckpt, "--out", c.ckpt / "eval"],
     "lies inside the checkpoint"),
    ("report-out-file", "report", lambda c: [c.run, "--out", c.tmp / "a_file"], "is a file; give a folder"),
    ("export-out-under-file", "export", lambda c: [c.ckpt, "--out", c.tmp / "a_file" / "x"],
     "cannot be created: {tmp}/a_file is a file"),
    ("evaluate-out-under-file", "evaluate", lambda c: [c.ckpt, "--out", c.tmp / "a_file" / "x"],
     "cannot be created: {tmp}/a_file is a file"),
    ("export-corrupt-config", "export", lambda c: [damaged_copy(c.run, c.tmp, "{") / "epoch_1", "--out", c.tmp / "o"],
     "{tmp}/copy/config.json is not valid JSON"),
    ("export-config-list", "export", lambda c: [damaged_copy(c.run, c.tmp, "[]") / "epoch_1", "--out", c.tmp / "o"],
     "{tmp}/copy/config.json holds a list, not the run's options"),
    ("evaluate-corrupt-config", "evaluate",
     lambda c: [damaged_copy(c.run, c.tmp, "{") / "epoch_1", "--out", c.tmp / "o", "--device", "cpu"],
     "{tmp}/copy/config.json is not valid JSON"),
    ("study-corrupt-config", "study", lambda c: study_with_corrupt_config(c.tmp, c.data),
     "{tmp}/s/a/config.json is not valid JSON"),
    ("study-launcher-missing", "study", lambda c: [*study_file(c.tmp), "--save_dir", c.tmp / "s", "--launcher", "nope x"],
     "--launcher 'nope x': nope is not a program that can be run"),
    ("study-launcher-unparsed", "study", lambda c: [*study_file(c.tmp), "--save_dir", c.tmp / "s", "--launcher", "a 'b"],
     "--launcher \"a 'b\" does not parse as a command"),
    ("study-missing-data", "study",
     lambda c: [*study_file(c.tmp), "--save_dir", c.tmp / "s", "--data_dir", c.tmp / "none", "--no-download"],
     "CIFAR-100 not found in {tmp}/none"),
    # The trainer's own checks of every run (trainer/precheck.py, in one subprocess), before any run folder or log.
    ("study-precheck", "study",
     lambda c: [*study_file(c.tmp), "--save_dir", c.tmp / "s", "--data_dir", c.data, "--model", "no_such_model"],
     "--model 'no_such_model' is neither a preset (nfnet, vit) nor a timm model name"),
    ("report-no-val_acc1", "report", lambda c: [damaged_report_run(c.tmp, lines_without("val_acc1"))],
     "{tmp}/r/metrics.jsonl: line 2 has no number val_acc1 (got None)"),
    ("report-val_acc1-null", "report", lambda c: [damaged_report_run(c.tmp, lines_without("null"))],
     "{tmp}/r/metrics.jsonl: line 2 has no number val_acc1 (got None)"),
    ("report-no-lr", "report",
     lambda c: [damaged_report_run(c.tmp, lambda r: (r / "steps.jsonl").write_text('{"step": 1, "train_loss": 2}\n'))],
     "{tmp}/r/steps.jsonl: line 1 has no number lr"),
    ("report-config-list", "report",
     lambda c: [damaged_report_run(c.tmp, lambda r: (r / "config.json").write_text("[]"))],
     "{tmp}/r/config.json does not hold the run's options"),
    ("report-bad-evaluation", "report",
     lambda c: [damaged_report_run(c.tmp, evaluation_with({"val_acc1": "x", "val_acc5": 1, "val_loss": 1,
                                                           "val_images": 1}))],
     "{tmp}/r/evaluation/metrics.json: line 1 has no number val_acc1 (got 'x')"),
    ("report-bad-per-class", "report",
     lambda c: [damaged_report_run(c.tmp, evaluation_with(per_class="class,name,correct,images,accuracy\n0,a,1,2,x\n"))],
     "{tmp}/r/evaluation/per_class.csv is damaged (ValueError"),
    ("trainer-binary-config", "main", lambda c: ["--config", c.tmp / "weights.bin"], "--config {tmp}/weights.bin is not a "
                                                                                       "text file (YAML or JSON)"),
    ("synthetic-existing-data", "synthetic", lambda c: [c.data], "{data}/cifar-100-python already holds a data set "
                                                                 "(train, test, meta); give another folder, or --overwrite"),
    ("synthetic-no-train", "synthetic", lambda c: [c.tmp / "new", "--num_train", "0"], "--num_train must be at least 1"),
    ("synthetic-out-file", "synthetic", lambda c: [c.tmp / "a_file"], "DATA_DIR {tmp}/a_file is a file, not a folder"),
    ("bench-models", "bench", lambda c: ["--models", "nope"], "--models 'nope': nope is neither a preset"),
    ("bench-steps", "bench", lambda c: ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("bench-out-file", "bench", lambda c: ["--out", c.tmp / "a_file"], "--out {tmp}/a_file is a file, not a folder"),
    ("bench-cuda-graph-on-cpu", "bench", lambda c: ["--modes", "eager,cuda_graph"], "--modes cuda_graph needs a CUDA GPU"),
    # argparse's own refusals: its line alone, not its usage block (as the trainer's).
] + [(f"{name}-argparse", name, lambda c, argv=argv: argv, message) for name, argv, message in [
    ("evaluate", ["x", "--nope"], "unrecognized arguments: --nope (see --help)"),
    ("export", ["x", "--nope"], "unrecognized arguments: --nope (see --help)"),
    ("report", ["x", "--nope"], "unrecognized arguments: --nope (see --help)"),
    ("synthetic", ["x", "--nope"], "unrecognized arguments: --nope (see --help)"),
    ("study", ["--processes", "x"], "argument --processes: invalid int value: 'x' (see --help)"),
    ("bench", ["--steps", "x"], "argument --steps: invalid int value: 'x' (see --help)"),
    ("bench", ["--compile_backend", "x"], "argument --compile_backend: invalid choice: 'x'")]]


# The study's check of its runs is one trainer subprocess (trainer/precheck.py): the full suite's, not the fast tier's.
LAUNCHING_CASES = {"study-precheck"}


@pytest.mark.parametrize("command, argv, message", [
    pytest.param(*case[1:], id=case[0], marks=[pytest.mark.launches] if case[0] in LAUNCHING_CASES else [])
    for case in COMMAND_REFUSALS])
def test_every_command_refuses_in_one_line_and_writes_nothing(trained, data, tmp_path, capsys, command, argv, message):
    from types import SimpleNamespace
    from trainer import checkpoint
    if command == "bench" and torch.cuda.is_available() and "cuda_graph" in message:
        pytest.skip("a GPU takes --modes cuda_graph")
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    c = SimpleNamespace(tmp=tmp_path, data=data, run=trained, ckpt=trained / "epoch_1")
    args = [str(a) for a in argv(c)]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    data_before = {p: p.read_bytes() for p in (data / "cifar-100-python").iterdir()}
    try:
        code = command_main(command)(args)
    except SystemExit as stop:  # argparse's refusals
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    assert err[0].startswith("error: ") and message.format(tmp=tmp_path, data=data) in err[0], err[0]
    # Nothing written: no new or changed file here, the checkpoint verifies, the data set is the same.
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    checkpoint.verify(trained / "epoch_1")
    assert {p: p.read_bytes() for p in (data / "cifar-100-python").iterdir()} == data_before


def test_a_command_ends_its_process_with_its_status_after_freezing_the_objects_it_leaves(monkeypatch):
    """exit_process: the status, and gc.freeze() first, so that the interpreter's last collections skip the objects
    torch and timm left (~0.9 s of CPU per process: trainer/errors.py)."""
    import gc
    from trainer.errors import exit_process
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    with pytest.raises(SystemExit) as stop:
        exit_process(75)
    assert stop.value.code == 75 and frozen == [True]


def test_every_command_run_as_a_program_ends_through_exit_process():
    """Each module's `if __name__ == "__main__":` (and `python -m trainer`, and the cifar-train script) ends with
    exit_process(main()), not sys.exit(main()): read from the sources, as a new command would be added."""
    import ast
    import configparser
    programs = {}
    for path in sorted((REPO / "trainer").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                programs[path.name] = ast.unparse(node)
    programs["__main__.py"] = (REPO / "trainer" / "__main__.py").read_text()
    assert set(programs) >= {"main.py", "__main__.py", "evaluate.py", "export.py", "report.py", "study.py",
                             "bench.py", "synthetic.py", "accelerate_launch.py"}, sorted(programs)
    for name, code in programs.items():
        assert "exit_process(main())" in code or code.strip().endswith("console()"), (name, code)
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].strip() == "cifar-train = trainer.main:console"
    assert "exit_process(main())" in ast.unparse(ast.parse((REPO / "trainer" / "main.py").read_text()))


@pytest.mark.parametrize("command", ["evaluate", "export", "report"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(trained, tmp_path, capsys, monkeypatch, command):
    # As root every folder is writable; os.access is what the check asks, so here it stands in for a read-only one.
    # Without the check, evaluate would fail after the whole evaluation, with a traceback.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    source = trained if command == "report" else trained / "epoch_1"
    assert command_main(command)([str(source), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'out'} cannot be created: {tmp_path} is not writable\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("launch, extra, message", [
    (["3", "ddp"], [], "--batch_size 8 is not divisible by the 3 processes"),
    (["2", "zero3"], ["--model_ema"], "--model_ema is not supported under DeepSpeed ZeRO-3"),
    (["2", "fsdp"], ["--model_ema"], "--model_ema is not supported under FSDP (each process holds a slice"),
    (["2", "ddp"], ["--batch_size", "32"], "--batch_size 32 is larger than the training set (16 images"),
    (["2", "ddp"], ["--data_dir", "{tmp}/none", "--no-download"], "CIFAR-100 not found"),
    (["2", "ddp"], ["--model", "no_such_model"], "--model 'no_such_model' is neither a preset"),
    (["2", "ddp"], ["--learning_rate", "-1"], "--learning_rate must be positive, got -1.0"),
    (["x", "ddp"], [], "--check_launch needs PROCESSES STRATEGY"),
    (["2", "ddp"], ["--epochs", "1"], None),  # nothing to refuse: exit 0
], ids=["processes", "zero3-ema", "fsdp-ema", "batch", "data", "model", "option", "usage", "fine"])
def test_launch_sh_checks_a_launch_once_before_its_workers(data, tmp_path, launch, extra, message):
    """What launch.sh runs before it starts several workers (trainer/precheck.py), in this process: what the
    process count or strategy cannot train, the data and the model, one line, exit 2, nothing written."""
    argv = ["--check_launch", *launch, *TINY, "--data_dir", data, "--batch_size", "8", "--save_dir", tmp_path / "run",
            *[a.format(tmp=tmp_path) for a in extra]]
    if message is None:
        result = train_here(argv)
        assert result.stderr == "", result.stderr
    else:
        assert message in refused(argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, message", [
    ({"GPUS": "abc"}, "GPUS must be a whole number >= 0, got 'abc'"),
    ({"GPUS": "0", "NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a whole number >= 1, got 'two'"),
    ({"GPUS": "0", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a whole number >= 1, got '0'"),
    ({"GPUS": "0", "NNODES": "1.5"}, "NNODES must be a whole number >= 1, got '1.5'"),
    ({"GPUS": "0", "NODE_RANK": "-1"}, "NODE_RANK must be a whole number >= 0, got '-1'"),
    ({"GPUS": "0", "MASTER_PORT": "http"}, "MASTER_PORT must be a whole number >= 1, got 'http'"),
])
@pytest.mark.launches
def test_launch_sh_numeric_variables_are_checked(env, message):
    steering = ("GPUS", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in steering and not k.startswith("SLURM_")}
    result = subprocess.run([str(REPO / "launch.sh"), "--dry-run"], env={**base, **env}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and result.stderr.splitlines() == [f"error: {message}"]


def test_fsdp1_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """An accelerate config with fsdp_version 1 (accelerate's default when the key is missing): FSDP1 renames the
    parameters (FlatParameter) that checkpoints and resume rely on. As `accelerate launch` sets it in the workers."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    argv = TINY + ["--data_dir", tmp_path / "none", "--no-download", "--save_dir", tmp_path / "run"]
    assert refused(argv) == ("error: FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (see "
                                     "accelerate_configs/fsdp.yaml) or pass --fsdp_version 2 to accelerate launch")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--data_device", "accelerator"], "--data_device accelerator needs a GPU"),
    (["--mixup", "0.8", "--batch_size", "6", "--micro_batch_size", "3"], "the micro-batch must be even, got 3"),
])
def test_refusals_that_need_no_data_come_before_any_is_read(tmp_path, extra, message):
    """runtime.py makes them from the options and the launch alone: a missing data set is never reached."""
    argv = TINY + ["--data_dir", tmp_path / "none", "--no-download", "--save_dir", tmp_path / "run", *extra]
    assert message in refused(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
