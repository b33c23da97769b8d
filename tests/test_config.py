"""The configuration: command line spellings, config files, batching arithmetic and validation."""

import json
import re

import pytest

from trainer.config import ConfigError, TrainConfig, parse_config
from trainer.runtime import resolve_batching


def test_defaults_are_the_reference_study():
    c = TrainConfig()
    assert (c.seed, c.epochs, c.warmup_epochs, c.learning_rate, c.weight_decay, c.batch_size) == (3407, 25, 5, 5e-4, 1e-2, 256)
    assert (c.optimizer, c.scheduler, c.save_epochs, c.save_dir, c.image_size) == ("adamw", "cosine", -1, "checkpoint", 32)
    assert c.timm_name_and_kwargs() == ("dm_nfnet_f0.dm_in1k", {})
    assert TrainConfig(model="vit").timm_name_and_kwargs() == (
        "vit_base_patch8_224.augreg_in21k_ft_in1k", {"img_size": (32, 32)})


def test_underscore_and_dash_spellings_and_boolean_flags():
    c = parse_config(["--learning-rate", "1e-3", "--weight_decay", "0.05", "--no-pretrained", "--micro-batch-size", "32"])
    assert (c.learning_rate, c.weight_decay, c.pretrained, c.micro_batch_size) == (1e-3, 0.05, False, 32)
    assert parse_config(["--pretrained"]).pretrained is True


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_are_overridden_by_the_command_line(tmp_path, suffix):
    values = {"epochs": 3, "learning_rate": 0.01, "optimizer": "sgdm", "pretrained": False}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(values))  # JSON is also YAML
    c = parse_config(["--config", str(path), "--epochs", "7", "--warmup_epochs", "1"])
    assert (c.epochs, c.learning_rate, c.optimizer, c.pretrained) == (7, 0.01, "sgdm", False)


def test_config_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown option.*learning_rat"):
        parse_config(["--config", str(path)])
    path.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs must be an int, got 'many'"):
        parse_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize("processes, micro, expected", [
    (1, None, (256, 1)), (2, None, (128, 1)), (8, None, (32, 1)), (1, 64, (64, 4)), (2, 32, (32, 4)), (4, 64, (64, 1))])
def test_accumulation_keeps_the_global_batch(processes, micro, expected):
    assert resolve_batching(256, processes, micro, max_micro_batch_size=256) == expected


def test_automatic_micro_batch_respects_the_memory_bound():
    assert resolve_batching(256, 1, None, max_micro_batch_size=100) == (64, 4)


def test_batch_sizes_that_do_not_divide_say_which_values_work():
    with pytest.raises(ConfigError, match=r"--micro_batch_size 48 does not divide .* valid values: \[1, 2, 4, 8, 16, 32, 64, 128\]"):
        resolve_batching(256, 2, 48, 256)
    with pytest.raises(ConfigError, match="--batch_size 256 is not divisible by the 3 processes"):
        resolve_batching(256, 3, None, 256)


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "adam"], "--optimizer 'adam' is not one of: adamw, sgdm"),
    (["--scheduler", "step"], "--scheduler 'step' is not one of"),
    (["--augment", "mixup"], "--augment 'mixup' is not one of"),
    (["--device", "tpu"], "--device 'tpu' is not one of"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "2"], r"--warmup_epochs must lie in \[0, epochs=2\]"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
    (["--save_epochs", "0"], "--save_epochs must be -1 or >= 1"),
    (["--pretrained_file", "{tmp}/missing.safetensors"], "--pretrained_file {tmp}/missing.safetensors does not exist"),
    (["--checkpoint", "{tmp}/missing"], "--checkpoint {tmp}/missing is not a folder"),
    (["--resume", "latest"], "--resume must be auto"),
    (["--compile_mode", "reduce-overhead"], "--compile_mode 'reduce-overhead' is not one of: default, max-autotune-no-cudagraphs"),
    (["--compile_backend", "cudagraphs"], "--compile_backend 'cudagraphs' is not one of: inductor, aot_eager, eager"),
    (["--augment", "randaug", "--randaug", "rand-x9"], "--randaug 'rand-x9' is not a timm RandAugment string.*'x9'"),
    (["--augment", "randaug", "--randaug", "augmix-m5"], "--randaug 'augmix-m5' is not a timm RandAugment string"),
    (["--randaug", "rand-m5"], "--randaug 'rand-m5' applies to --augment randaug only"),
    (["--augment", "randaug", "--data_device", "accelerator"], "--augment randaug runs .* on the CPU: use --data_device"),
    (["--reprob", "1.5"], r"--reprob must lie in \[0, 1\]"),
    (["--mixup", "-1"], r"--mixup must be >= 0 \(0 = off\)"),
    (["--cutmix", "-0.5"], r"--cutmix must be >= 0 \(0 = off\)"),
    (["--mixup_prob", "2"], r"--mixup_prob must lie in \[0, 1\]"),
    (["--mixup_switch_prob", "-0.1"], r"--mixup_switch_prob must lie in \[0, 1\]"),
    (["--cutmix", "1", "--cuda_graph"], "--cuda_graph does not support --mixup/--cutmix"),
    (["--layer_decay", "0"], r"--layer_decay must lie in \(0, 1\]"),
    (["--layer_decay", "1.5"], r"--layer_decay must lie in \(0, 1\]"),
    (["--model_ema_decay", "1"], r"--model_ema_decay must lie in \[0, 1\)"),
    (["--log_with", "tensorboard,tensorbored"], "--log_with 'tensorbored' is not one of accelerate's trackers: tensorboard, "),
])
def test_bad_values_are_refused_with_the_option_named(tmp_path, argv, message):
    # Paths that are missing are made missing here, under tmp_path, not assumed missing on the machine.
    argv, message = [a.format(tmp=tmp_path) for a in argv], message.format(tmp=re.escape(str(tmp_path)))
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)
