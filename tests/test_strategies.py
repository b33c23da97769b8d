"""DeepSpeed ZeRO and FSDP2 through `accelerate launch` on 2 CPU processes train the same model as DDP on 2 CPU
processes, and a checkpoint of any of them resumes under any other and any process count.

Every run: test_vit, 288 generated images, global batch 64 = micro-batch 16 x 2 accumulation x 2 processes,
so each epoch is 4 full steps and a last step of 32 images; 2 epochs, 1 of warm-up, a checkpoint after each.
The FSDP and ZeRO-3 runs are `./launch.sh --strategy fsdp|zero3` (accelerate_configs/fsdp.yaml on the CPU over
gloo, zero3.yaml); the FSDP run with --grad_clip 0.5 is `accelerate launch` with fsdp.yaml, and the ZeRO-3 run with
--grad_clip 0.5 is launched from accelerate's flags, without a config file.

Measured on the development machine (torch 2.14.1, accelerate 1.15, deepspeed 0.19.8, 2 CPU cores), relative
L2 of all weights vs DDP after epoch 1 / epoch 2:
  no clipping       ZeRO-1 0 / 0 (bit-identical)   ZeRO-2 1.4e-6 / 2.3e-6   ZeRO-3 1.4e-6 / 2.3e-6
  --grad_clip 0.5   ZeRO-2 1.7e-7 / 3.0e-7         ZeRO-3 2.1e-7 / 4.2e-7
  for scale: DDP with vs without --grad_clip 0.5: 1.1e-2 / 1.9e-2 (and clipping at 1.0, which accelerate's
  "auto" would silently add under DeepSpeed: 8e-3 / 1.5e-2).
FSDP2 (2026-12-04, torch 2.14.1, accelerate 1.16.0): 0 / 0 vs DDP, bit-identical (gloo's reduce-scatter of two
ranks adds the same two numbers as DDP's all-reduce, and AdamW is elementwise).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

from conftest import (REPO, TINY, assert_lrs_follow_the_schedule, assert_resumed, assert_same_run, launching,
                      load_weights, read_jsonl, record_lines, relative_l2, run_trainer)

# Why 1e-5: DeepSpeed reduces the gradients in its own flat buckets (reduce-scatter under ZeRO-2/3) and
# computes the clipping norm over its partitions, so its float32 sums are re-associated relative to DDP's
# all-reduce. That alone moves the weights by ~1e-6 after 10 AdamW steps (see above); Adam amplifies it in
# parameters whose gradient is ~0. A wrong split of the batch, a wrong accumulation or loss scale, or
# clipping that differs between the paths gives 1e-3..1e-2 (1.1e-2 measured here).
DEEPSPEED_TOLERANCE = 1e-5
STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


@pytest.fixture(scope="module")
@launching
def launch(noisy_cifar_dir, tmp_path_factory):
    """launch(config, *extra) -> save_dir: each distinct run happens once per module (DDP baseline included);
    configs "fsdp" and "zero3" without extra options run through `./launch.sh --strategy CONFIG` (which launches
    accelerate with accelerate_configs/CONFIG.yaml: tests/test_launch.py), the others through `accelerate launch`
    itself (launch.sh's own pre-check and launcher process, twice more, would prove nothing more)."""
    root = tmp_path_factory.mktemp("strategies")
    done = {}

    def launch(config: str, *extra: str):
        key = (config, *extra)
        if key not in done:
            save_dir = root / "_".join(k.strip("-") for k in key)
            if config in ("fsdp", "zero3") and not extra:
                run_launch_sh(config, noisy_cifar_dir, save_dir)
            else:
                run(config, noisy_cifar_dir, save_dir, *extra)
            done[key] = save_dir
        return done[key]
    return launch


def run_launch_sh(strategy: str, noisy_cifar_dir, save_dir, processes: int = 2):
    """`./launch.sh --strategy STRATEGY` with NPROC_PER_NODE processes on this machine without GPUs (it adds
    --device cpu, as tests/test_launch.py checks), the runs' options as run() gives them; it must exit 0."""
    import subprocess

    from conftest import child_env, free_port
    args = TINY + ["--data_dir", noisy_cifar_dir, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
                   "--micro_batch_size", "16", "--save_epochs", "1", "--save_dir", save_dir]
    env = child_env(NPROC_PER_NODE=str(processes), GPUS="0", MASTER_PORT=str(free_port()))
    result = subprocess.run([str(REPO / "launch.sh"), "--strategy", strategy, *map(str, args)], cwd=save_dir.parent,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run(config: str, noisy_cifar_dir, save_dir, *extra: str, processes: int = 2):
    """The real `accelerate launch --config_file accelerate_configs/{config}.yaml --num_processes N`; config
    "single": one plain process (`python trainer/main.py`)."""
    args = TINY + ["--data_dir", noisy_cifar_dir, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
                   "--micro_batch_size", "16", "--save_epochs", "1", "--save_dir", save_dir, *extra]
    config_file = None if config == "single" else str(REPO / "accelerate_configs" / f"{config}.yaml")
    return run_trainer(args, processes=processes, config_file=config_file)


def weights(save_dir, epoch: int) -> dict[str, torch.Tensor]:
    return load_weights(save_dir / f"epoch_{epoch}" / "model.safetensors")


def assert_same_training(ddp, ds, label: str) -> None:
    for epoch in (1, 2):
        distance = relative_l2(weights(ddp, epoch), weights(ds, epoch))
        print(f"{label} vs DDP, epoch {epoch}: relative L2 {distance:.3g}")
        assert distance < DEEPSPEED_TOLERANCE, (label, epoch, distance)
    steps_ddp, steps_ds = read_jsonl(ddp / "steps.jsonl"), read_jsonl(ds / "steps.jsonl")
    assert len(steps_ds) == 10
    assert [s["lr"] for s in steps_ds] == [s["lr"] for s in steps_ddp]  # exactly: one scheduler step per step
    for a, b in zip(steps_ds, steps_ddp):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    metrics_ddp, metrics_ds = read_jsonl(ddp / "metrics.jsonl"), read_jsonl(ds / "metrics.jsonl")
    assert [m["val_acc1"] for m in metrics_ds] == [m["val_acc1"] for m in metrics_ddp]
    assert all(m["val_images"] == 201 for m in metrics_ds)


def assert_fsdp_really_ran(save_dir, processes: int = 2) -> None:
    resolved = json.loads((save_dir / "config.json").read_text())["resolved"]
    # Not DDP under another name: accelerate's resolved type, the timm model's blocks sharded, and each process
    # holding its share of the parameters (sharded on dim 0, so not exactly 1/2 for odd first dimensions).
    assert (resolved["distributed_type"], resolved["strategy"], resolved["processes"]) == ("FSDP", "fsdp", processes)
    fsdp = resolved["fsdp"]
    assert fsdp["sharded_units"] == ["Block", "LayerNorm", "VisionTransformer"], fsdp
    assert fsdp["parameter_share_held"] == pytest.approx(1 / processes, abs=0.01), fsdp
    assert (fsdp["fsdp_version"], fsdp["state_dict_type"], fsdp["param_dtype"]) == (2, "FULL_STATE_DICT", "float32")
    state = sorted(p.name for p in (save_dir / "epoch_2" / "state").iterdir())
    assert "optimizer.bin" in state and "pytorch_model_fsdp.bin" in state, state  # accelerate's FSDP full state


def assert_really_ran(save_dir, config: str) -> None:
    if config == "fsdp":
        assert_fsdp_really_ran(save_dir)
    else:
        assert_deepspeed_really_ran(save_dir, STAGES[config])


def assert_deepspeed_really_ran(save_dir, stage: int) -> None:
    resolved = json.loads((save_dir / "config.json").read_text())["resolved"]
    # Not a silent fallback to DDP or to two lone processes: accelerate's resolved type and stage.
    assert resolved["distributed_type"] == "DEEPSPEED" and resolved["deepspeed_zero_stage"] == stage
    assert (resolved["processes"], resolved["micro_batch_size"], resolved["accumulation_steps"],
            resolved["global_batch_size"], resolved["steps_per_epoch"], resolved["last_step_images"]) == \
        (2, 16, 2, 64, 5, 32)
    # The engine's own checkpoint: optimizer state partitioned over the 2 ranks.
    shards = sorted(p.name for p in (save_dir / "epoch_2" / "state").rglob("*optim_states.pt"))
    assert len(shards) == 2 and all(s.startswith(("zero_pp_rank_0", "zero_pp_rank_1")) for s in shards), shards


@pytest.mark.parametrize("config", list(STAGES))
def test_zero_trains_the_same_model_as_ddp(launch, config):
    ddp = launch("cpu_multi")
    ds = launch(config)
    assert json.loads((ddp / "config.json").read_text())["resolved"]["distributed_type"] == "MULTI_CPU"
    assert_deepspeed_really_ran(ds, STAGES[config])
    assert_same_training(ddp, ds, config)
    # The lr each step used, read from the optimizer DeepSpeed steps (2 micro-batches per step: a scheduler
    # stepped per micro-batch or twice would run ahead): 5 steps per epoch, 1 epoch of warm-up, 2 in all.
    assert_lrs_follow_the_schedule(read_jsonl(ds / "steps.jsonl"), warmup_steps=5, total_steps=10, peak=2e-3)


def test_launch_sh_fsdp_trains_the_same_model_as_ddp(launch):
    """The issue's own words: `./launch.sh --strategy fsdp` trains to the same weights as DDP on 2 CPU processes,
    with the same global batch, accumulation, schedule and last-step weighting (the run's 5th step holds 32 of 64)."""
    ddp, fsdp = launch("cpu_multi"), launch("fsdp")
    assert_fsdp_really_ran(fsdp)
    assert_same_training(ddp, fsdp, "fsdp")
    assert all(relative_l2(weights(ddp, epoch), weights(fsdp, epoch)) == 0 for epoch in (1, 2))  # bit-identical
    assert_lrs_follow_the_schedule(read_jsonl(fsdp / "steps.jsonl"), warmup_steps=5, total_steps=10, peak=2e-3)
    # model.safetensors holds the full timm model, gathered from the shards.
    saved = weights(fsdp, 2)
    reference = timm.create_model("test_vit", num_classes=100, img_size=(32, 32)).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}


# DeepSpeed's clipping is one run: the trainer hands --grad_clip to the engine as `gradient_clipping` the same way
# for every ZeRO stage (runtime.py), and ZeRO-3's partitioned parameters are the harder case for the engine's norm.
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_sharded_with_clipping_trains_the_same_model_as_ddp_with_clipping(launch, request, config):
    ddp, ddp_clipped = launch("cpu_multi"), launch("cpu_multi", "--grad_clip", "0.5")
    # ZeRO-3 with clipping is the run launched from accelerate's flags (zero3_from_flags): one launch, two claims.
    sharded_clipped = request.getfixturevalue("zero3_from_flags") if config == "zero3" else \
        launch(config, "--grad_clip", "0.5")
    # Clipping at 0.5 really bites on this run (else the comparison below would prove nothing).
    assert relative_l2(weights(ddp, 2), weights(ddp_clipped, 2)) > 1e-3
    assert_really_ran(sharded_clipped, config)
    assert_same_training(ddp_clipped, sharded_clipped, f"{config} --grad_clip 0.5")


def test_zero3_checkpoint_loads_in_timm_with_full_weights(launch):
    ddp, zero3 = launch("cpu_multi"), launch("zero3")
    path = zero3 / "epoch_2" / "model.safetensors"
    saved = load_weights(path)
    reference = timm.create_model("test_vit", num_classes=100, img_size=(32, 32)).state_dict()
    assert saved.keys() == reference.keys()  # no `module.` prefix, nothing missing
    for name, tensor in saved.items():
        # Under ZeRO-3 each rank holds a slice; an ungathered save writes empty or partial tensors.
        assert tensor.numel() > 0 and tensor.shape == reference[name].shape, (name, tensor.shape)
        assert tensor.dtype == torch.float32
    model = timm.create_model("test_vit", pretrained=True, num_classes=100, img_size=(32, 32),
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=100))
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)  # loaded as saved (head kept)
    assert relative_l2(weights(ddp, 2), {k: v.float() for k, v in state.items()}) < DEEPSPEED_TOLERANCE


# ZeRO-1 is left out: DeepSpeed runs stages 1 and 2 with the same optimizer class (stage_1_and_2.py) and accelerate
# saves and loads every stage with the same engine calls, so its resume is ZeRO-2's (ZeRO-1's training is tested above).
@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp"])
def test_sharded_run_resumed_from_epoch_1_ends_bit_identical(launch, noisy_cifar_dir, tmp_path, config):
    uninterrupted = launch(config)
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted, resumed)  # the same save_dir layout, as after a crash in epoch 2
    shutil.rmtree(resumed / "epoch_2")
    before = record_lines(resumed)
    result = run(config, noisy_cifar_dir, resumed, "--checkpoint", resumed / "epoch_1")
    assert_resumed(resumed, resumed / "epoch_1", before, result.stdout)
    assert "converted the training state" not in result.stdout  # the same layout: accelerate's own load_state
    assert_really_ran(resumed, config)
    # Measured bit-identical under ZeRO-1, 2 and 3 (2026-11-28) and FSDP (2026-12-04), the versions above: the
    # engine (FSDP: the full state) restores the fp32 weights, Adam moments and step counts exactly, and the data
    # order and schedule are functions of (seed, epoch, step).
    assert_same_run(resumed, uninterrupted, 2)


# (saved under, resumed under, resumed on how many processes): each saved on 2 processes after epoch 1, and finished
# from there. Measured 2026-12-04 (versions above), relative L2 of the final weights to the uninterrupted run of the
# resuming strategy on 2 processes (DDP's, for 1 process): DDP -> ZeRO-2 5.4e-7; ZeRO-3 -> ZeRO-3 on 1 process
# 2.4e-6; FSDP -> one process 6.7e-7; ZeRO-2 -> FSDP 2.4e-6; DDP -> FSDP 0 (the same sums, see the top).
# (DDP's own 1- vs 2-process distance is 6.7e-7, ZeRO-2/3's distance to DDP 2.3e-6.) A lost moment, step count or
# master weight gives 1e-3 or more: the breaks tried are in the closing note of the change. Each way through the full
# state is here once: DeepSpeed's state read (ZeRO-3 on 2, ZeRO-2 on 2) and written (into ZeRO-2's and ZeRO-3's
# partitions, on 2 processes and on 1), FSDP's and DDP's read and written; a ZeRO-2 checkpoint of 1 process resumed
# on 2 combines two of them (measured 2026-12-04 within 1e-5, no longer in the suite).
MATRIX = [("cpu_multi", "zero2", 2), ("zero3", "zero3", 1), ("fsdp", "single", 1), ("zero2", "fsdp", 2),
          ("cpu_multi", "fsdp", 2)]
LAYOUT = {"cpu_multi": "ddp", "single": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp"}


@pytest.mark.parametrize("saved, resumed_under, processes", MATRIX)
def test_a_checkpoint_resumes_under_another_strategy_and_process_count(launch, noisy_cifar_dir, tmp_path, saved,
                                                                       resumed_under, processes):
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(launch(saved) / "epoch_1", resumed / "epoch_1")
    for name in ("steps.jsonl", "metrics.jsonl"):  # the records beside it, as after a crash in epoch 2
        shutil.copy(launch(saved) / name, resumed / name)
    lines = record_lines(resumed)
    result = run(resumed_under, noisy_cifar_dir, resumed, "--checkpoint", resumed / "epoch_1", processes=processes)
    assert_resumed(resumed, resumed / "epoch_1", lines, result.stdout)
    assert (f"converted the training state of {resumed / 'epoch_1'} from {LAYOUT[saved]} on 2 process(es) to "
            f"{LAYOUT[resumed_under]} on {processes} through its full state") in result.stdout
    assert not list(resumed.glob(".universal-*"))  # DeepSpeed's converted copy is removed
    resolved = json.loads((resumed / "config.json").read_text())["resolved"]
    assert (resolved["strategy"], resolved["processes"]) == (LAYOUT[resumed_under], processes)
    reference = launch(resumed_under) if processes == 2 else launch("cpu_multi")
    distance = relative_l2(weights(resumed, 2), weights(reference, 2))
    print(f"{saved} -> {resumed_under} on {processes}: relative L2 {distance:.3g} to the uninterrupted run")
    if (saved, resumed_under) == ("cpu_multi", "fsdp"):
        assert distance == 0  # the same arithmetic as the uninterrupted FSDP run: bit-identical
    assert distance < DEEPSPEED_TOLERANCE
    # The schedule continues at the checkpoint's step: the same lr at every step as the uninterrupted run.
    assert [s["lr"] for s in read_jsonl(resumed / "steps.jsonl")] == [s["lr"] for s in read_jsonl(reference / "steps.jsonl")]


def test_launch_sh_zero3_trains_like_ddp(launch):
    """The issue's own words: `./launch.sh --strategy zero3 ...` trains to the same result as DDP (this module's
    DDP run: on the CPU, launch.sh --strategy ddp runs `accelerate launch` with cpu_multi.yaml and --device cpu,
    as tests/test_launch.py checks). The module's ZeRO-3 run is this launch."""
    save_dir = launch("zero3")
    resolved = json.loads((save_dir / "config.json").read_text())["resolved"]
    assert (resolved["distributed_type"], resolved["deepspeed_zero_stage"], resolved["processes"]) == ("DEEPSPEED", 3, 2)
    ddp = launch("cpu_multi")
    assert_same_training(ddp, save_dir, "launch.sh --strategy zero3")
    assert read_jsonl(ddp / "metrics.jsonl")[-1]["val_acc1"] == read_jsonl(save_dir / "metrics.jsonl")[-1]["val_acc1"]


@pytest.fixture(scope="module")
@launching
def zero3_from_flags(noisy_cifar_dir, tmp_path_factory):
    """accelerate's documented way, with no config file: `accelerate launch --use_deepspeed --zero_stage 3
    --num_processes 2 trainer/main.py --device cpu ...` (accelerate then leaves zero3_save_16bit_model off), with
    --grad_clip 0.5: it is also the ZeRO-3 run of the clipping comparison."""
    import subprocess
    import sys

    from conftest import MAIN, child_env, free_port
    root = tmp_path_factory.mktemp("zero3_flags")
    save_dir = root / "run"
    args = TINY + ["--data_dir", noisy_cifar_dir, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
                   "--micro_batch_size", "16", "--save_epochs", "1", "--save_dir", save_dir, "--device", "cpu",
                   "--grad_clip", "0.5"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
           "--num_processes", "2", "--main_process_port", str(free_port()), MAIN, *map(str, args)]
    # HF_HOME in a fresh folder: no accelerate default_config.yaml of this machine can fill in what the flags leave.
    result = subprocess.run(cmd, cwd=REPO, env=child_env(HF_HOME=str(root / "hf")), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return save_dir


def test_zero3_from_accelerate_flags_trains_and_saves_like_ddp(launch, zero3_from_flags):
    ddp, ds = launch("cpu_multi", "--grad_clip", "0.5"), zero3_from_flags
    assert_deepspeed_really_ran(ds, 3)
    assert_same_training(ddp, ds, "zero3 from accelerate's flags, --grad_clip 0.5")
    path = ds / "epoch_2" / "model.safetensors"
    saved = load_weights(path)
    model = timm.create_model("test_vit", pretrained=True, num_classes=100, img_size=(32, 32),
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=100))
    state = model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(state[k], saved[k]) for k in saved)  # full weights
    # What the engine applies, read back from it (config.json): the trainer's batching and clipping (--grad_clip;
    # the config-file runs' 0 = off: below), full weights gathered for model.safetensors, and DeepSpeed's
    # synchronising throughput timer off.
    engine = json.loads((ds / "config.json").read_text())["resolved"]["deepspeed_engine"]
    assert engine == {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
                      "gather_16bit_weights_on_model_save": True, "throughput_timer": False}


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_throughput_timer_is_off_with_config_files(launch, config):
    engine = json.loads((launch(config) / "config.json").read_text())["resolved"]["deepspeed_engine"]
    assert engine["throughput_timer"] is False and engine["gradient_clipping"] == 0.0


def test_deepspeed_on_the_cpu_builds_no_op(launch):
    """DeepSpeed's shared-memory all-reduce, which only its inference uses, is not compiled (runtime.py): with it,
    the first DeepSpeed run in an environment spends a minute or more in g++ (TORCH_EXTENSIONS_DIR: conftest.py)."""
    launch("zero2")
    built = sorted(p.name for p in Path(os.environ["TORCH_EXTENSIONS_DIR"]).iterdir())  # one folder per op
    assert built == [], built


DEEPSPEED_WITHOUT_MLFLOW = """
import sys
from trainer.runtime import import_deepspeed_without_mlflow
import_deepspeed_without_mlflow()
print("deepspeed" in sys.modules, "mlflow" in sys.modules, sys.modules["deepspeed.autotuning.autotuner"].has_mlflow)
import mlflow  # still importable afterwards, for --log_with mlflow
print(mlflow.__name__)
"""


@pytest.mark.launches
def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """runtime.import_deepspeed_without_mlflow, in a fresh process: DeepSpeed's autotuner does not import MLflow (1.1 s
    of every DeepSpeed process's start), and MLflow imports as usual afterwards."""
    import subprocess
    import sys

    from conftest import child_env
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_WITHOUT_MLFLOW], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["True False False", "mlflow"], result.stdout  # after DeepSpeed's own


@pytest.mark.parametrize("saved, here, natively", [
    (("MULTI_CPU", None, 2), ("NO", None, 1), True),  # DDP's state is replicated: any count
    (("FSDP", None, 2), ("FSDP", None, 1), True),  # FSDP's full state: any count
    (("DEEPSPEED", 2, 2), ("DEEPSPEED", 2, 2), True),
    (("DEEPSPEED", 2, 2), ("DEEPSPEED", 2, 1), False),  # the engine refuses another partitioning
    (("DEEPSPEED", 2, 2), ("DEEPSPEED", 3, 2), False),
    (("MULTI_CPU", None, 2), ("FSDP", None, 2), False),
    (("FSDP", None, 2), ("MULTI_GPU", None, 2), False),
    (("MULTI_GPU", None, 2), ("DEEPSPEED", 1, 2), False),
])
def test_which_checkpoints_accelerate_reads_as_saved(saved, here, natively):
    from trainer import full_state
    as_dict = lambda t: {"distributed_type": t[0], "deepspeed_zero_stage": t[1], "processes": t[2]}  # noqa: E731
    assert full_state.loads_natively(as_dict(saved), as_dict(here)) is natively


def test_a_zero_checkpoint_of_sgd_is_refused_for_another_layout_in_one_line(tmp_path):
    """DeepSpeed's ds_to_universal reads Adam's moments by name; for SGD it would fail midway (KeyError 'exp_avg',
    measured with a 2-process zero2 --optimizer sgdm checkpoint). DDP's and FSDP's SGD state converts (DDP -> ZeRO-2
    with sgdm measured 1.9e-9 from the uninterrupted DDP run)."""
    from trainer import full_state
    from trainer.checkpoint import CheckpointError
    saved = {"distributed_type": "DEEPSPEED", "deepspeed_zero_stage": 2, "processes": 2, "options": {"optimizer": "sgdm"}}
    with pytest.raises(CheckpointError, match=r"holds DeepSpeed zero2 state of --optimizer sgdm on 2 process\(es\).*"
                                              r"resume it under zero2 on 2 process\(es\)$"):
        full_state.check_convertible(tmp_path, saved)
    full_state.check_convertible(tmp_path, {**saved, "options": {"optimizer": "adamw"}})
    full_state.check_convertible(tmp_path, {**saved, "distributed_type": "MULTI_CPU"})
