"""Bad input: one clear line naming what to fix, exit status 2, and no training."""

import subprocess
import sys

import pytest
from accelerate import Accelerator

from conftest import MAIN, REPO, TINY, child_env
from trainer.config import ConfigError
from trainer.runtime import check_process_group
from trainer.main import main
from trainer.synthetic import write_fake_cifar100


def run_main(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def user_error(argv, capsys) -> str:
    """The one stderr line of a run refused with exit status 2."""
    code, err = run_main(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.fixture()
def data(tmp_path):
    write_fake_cifar100(tmp_path / "data", num_train=256, num_test=8)  # the default --batch_size 256 fits
    return tmp_path / "data"


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_model"], "--model 'no_such_model' is neither a preset (nfnet, vit) nor a timm model name"),
    (["--batch_size", "64", "--micro_batch_size", "24"], "--micro_batch_size 24 does not divide"),
    (["--device", "cuda"], "--device cuda was asked for but no CUDA GPU is visible"),
    (["--cuda_graph"], "--cuda_graph needs one process on a GPU"),
    (["--data_device", "accelerator"], "--data_device accelerator needs a GPU"),
])
def test_bad_options_stop_before_training(data, tmp_path, capsys, extra, message):
    line = user_error(TINY + ["--data_dir", data, "--save_dir", tmp_path / "run", "--epochs", "1"] + extra, capsys)
    assert message in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_without_download(tmp_path, capsys):
    line = user_error(TINY + ["--data_dir", tmp_path / "empty", "--no-download", "--epochs", "1",
                              "--save_dir", tmp_path / "run"], capsys)
    assert line.startswith("error: CIFAR-100 not found") and "--data_dir" in line


def test_corrupt_data_file_names_the_file(data, tmp_path, capsys):
    test_file = data / "cifar-100-python" / "test"
    test_file.write_bytes(test_file.read_bytes()[:-500])
    line = user_error(TINY + ["--data_dir", data, "--epochs", "1", "--save_dir", tmp_path / "run"], capsys)
    assert str(test_file) in line


def test_checkpoint_that_is_not_a_checkpoint(data, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    line = user_error(TINY + ["--data_dir", data, "--epochs", "1", "--save_dir", tmp_path / "run",
                              "--checkpoint", tmp_path / "notes"], capsys)
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
def test_unreachable_pretrained_weights_fail_fast_naming_the_alternatives(data, tmp_path):
    # An empty cache and a hub address that refuses connections: the real path, without waiting on retries.
    env = child_env(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0")
    args = [a for a in TINY if a != "--no-pretrained"]
    result = subprocess.run([sys.executable, MAIN, *args, "--data_dir", str(data), "--epochs", "1",
                             "--save_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: pretrained weights of test_vit are not cached and http://127.0.0.1:9 cannot be "
                           "reached;") and "--pretrained_file" in line and "--no-pretrained" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
