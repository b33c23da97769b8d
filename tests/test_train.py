"""End-to-end runs of the real trainer through `python` and `accelerate launch` on generated CIFAR data."""

import json
import math
import shutil

import pytest
import timm
import torch

from conftest import (TINY, assert_lrs_follow_the_schedule, assert_resumed, assert_same_run, launching,
                      load_weights, make_trainer, read_jsonl, record_lines, relative_l2, run_trainer,
                      train_here)

# Two correct topologies differ only by float re-association: measured ~2e-7 relative L2 after an epoch
# of test_vit in fp32; a wrong data split or schedule gives ~3e-2 (measured 2026-11-27). 1e-5 sits between.
TOPOLOGY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
@launching
def one_vs_two(cifar_dir, tmp_path_factory):
    """The same run as 1 process x 4 accumulation steps and as 2 processes x 2 accumulation steps."""
    root = tmp_path_factory.mktemp("topology")
    args = TINY + ["--data_dir", cifar_dir, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "64",
                   "--micro_batch_size", "16"]
    one = train_here(args + ["--save_dir", root / "one"])
    two = run_trainer(args + ["--save_dir", root / "two"], processes=2)
    return root / "one", root / "two", one, two


def test_one_and_two_processes_train_the_same_weights(one_vs_two):
    one, two, *_ = one_vs_two
    config_one, config_two = (json.loads((d / "config.json").read_text())["resolved"] for d in (one, two))
    assert (config_one["processes"], config_one["accumulation_steps"]) == (1, 4)
    assert (config_two["processes"], config_two["accumulation_steps"]) == (2, 2)
    assert config_two["distributed_type"] == "MULTI_CPU" and config_two["global_batch_size"] == 64
    assert relative_l2(load_weights(one / "epoch_2/model.safetensors"),
                       load_weights(two / "epoch_2/model.safetensors")) < TOPOLOGY_TOLERANCE
    metrics_one, metrics_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["val_acc1"] for m in metrics_one] == [m["val_acc1"] for m in metrics_two]
    for a, b in zip(metrics_one, metrics_two):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_learning_rate_sequence_is_the_same_and_follows_the_formula(one_vs_two):
    # The logged lr is read from the optimizer before each step, so it is the lr the step used. Both runs
    # accumulate (4 and 2 micro-batches per step): a scheduler stepped per micro-batch, or twice per step,
    # runs ahead of the schedule.
    one, two, *_ = one_vs_two
    for run in (one, two):
        steps = read_jsonl(run / "steps.jsonl")
        # 288 images at 64 per step: 5 steps per epoch (the last of 32 images); 1 epoch of warm-up, 2 in all.
        assert_lrs_follow_the_schedule(steps, warmup_steps=5, total_steps=10, peak=2e-3)
        # metrics.jsonl: the lr of each epoch's last step.
        assert [m["lr"] for m in read_jsonl(run / "metrics.jsonl")] == [steps[4]["lr"], steps[9]["lr"]]
    assert [s["lr"] for s in read_jsonl(one / "steps.jsonl")] == [s["lr"] for s in read_jsonl(two / "steps.jsonl")]


def test_evaluation_with_two_processes_counts_each_test_image_once(one_vs_two):
    _, two, *_ = one_vs_two
    # 201 test images in batches of 50 on 2 processes: accelerate pads the last batches, gather_for_metrics drops it.
    assert {m["val_images"] for m in read_jsonl(two / "metrics.jsonl")} == {201}


def test_metrics_lines_hold_the_documented_fields(one_vs_two):
    one, *_ = one_vs_two
    metrics = read_jsonl(one / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and [m["step"] for m in metrics] == [5, 10]
    for key in ("train_loss", "val_loss", "val_acc1", "val_acc5", "lr", "epoch_time_s", "images_per_s"):
        assert all(isinstance(m[key], float) and math.isfinite(m[key]) for m in metrics), key
    assert all(0 <= m["val_acc1"] <= m["val_acc5"] <= 100 for m in metrics)
    assert all(m["train_images"] == 288 for m in metrics)


def test_startup_lines_state_the_resolved_batching(one_vs_two):
    *_, two = one_vs_two
    assert "micro-batch 16 x accumulation 2 x 2 processes = global batch 64" in two.stdout
    assert "5 steps per epoch (last step 32 images)" in two.stdout
    assert two.stdout.count("model test_vit") == 1  # printed by the main process only


@pytest.mark.launches
def test_a_short_run_learns(cifar_dir, tmp_path):
    # `python -m trainer` is the single-process fallback; crop+flip augmentation on.
    run_trainer(TINY + ["--data_dir", cifar_dir, "--epochs", "4", "--batch_size", "32", "--augment", "crop_flip",
                        "--save_dir", tmp_path], module=True)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[-1]["val_acc1"] > 50  # 10 classes used: chance is 10 %
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]


def test_resume_from_epoch_checkpoint_continues_to_the_same_weights(cifar_dir, tmp_path):
    args = TINY + ["--data_dir", cifar_dir, "--epochs", "3", "--batch_size", "32", "--save_epochs", "1",
                   "--augment", "crop_flip", "--save_dir", tmp_path / "run"]
    train_here(args)
    shutil.copytree(tmp_path / "run", tmp_path / "uninterrupted")
    before = record_lines(tmp_path / "run")
    resumed = train_here(args + ["--checkpoint", tmp_path / "run" / "epoch_1"])
    assert_resumed(tmp_path / "run", tmp_path / "run" / "epoch_1", before, resumed.stdout)
    assert_same_run(tmp_path / "run", tmp_path / "uninterrupted", 3)  # bit-identical on CPU in fp32


def test_checkpoint_weights_load_in_timm(one_vs_two):
    one, *_ = one_vs_two
    path = one / "epoch_2" / "model.safetensors"
    model = timm.create_model("test_vit", pretrained=True, num_classes=100, img_size=(32, 32),
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=100))
    # num_classes=100 in the overlay keeps the trained head; without it timm resets heads of other sizes.
    saved = load_weights(path)
    state = model.state_dict()
    assert saved.keys() == state.keys()  # no `module.` or `_orig_mod.` prefixes
    assert all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.launches
def test_compile_gives_the_eager_losses_and_recompiles_only_for_the_last_step_and_evaluation(tmp_path):
    from conftest import child_env
    from trainer.synthetic import write_fake_cifar100
    write_fake_cifar100(tmp_path / "data", num_train=288, num_test=200, num_classes=10)
    # 288 images at 64 per step (2 micro-batches of 32): the last step holds 32 images, 2 micro-batches of 16.
    args = TINY + ["--data_dir", tmp_path / "data", "--epochs", "1", "--batch_size", "64", "--micro_batch_size", "32"]
    train_here(args + ["--save_dir", tmp_path / "eager"])
    # aot_eager: dynamo's capture, guards and recompiles and AOTAutograd's graphs, which decide what this test checks
    # of the trainer, run eagerly. Inductor would add its generated kernels, torch's own code: with an empty cache
    # this run took 70 CPU-s with inductor (62 g++ runs, 47.5 CPU-s of them) and 13 with aot_eager (torch 2.14.1,
    # 2-core CPU, 2026-12-05). Inductor runs on the GPU, where it is measured (benchmarks/gpu_check.sh stage d).
    compiled = run_trainer(args + ["--save_dir", tmp_path / "compiled", "--compile", "--compile_backend", "aot_eager"],
                           env=child_env(TORCH_LOGS="recompiles"), timeout=600)
    eager_steps, compiled_steps = (read_jsonl(tmp_path / d / "steps.jsonl") for d in ("eager", "compiled"))
    assert len(eager_steps) == len(compiled_steps) == 5
    # The same losses: the captured graphs run the same operations in the same order (measured equal, torch 2.14.1).
    assert [s["train_loss"] for s in compiled_steps] == [s["train_loss"] for s in eager_steps]
    # Two recompiles in all: the last step's micro-batches of 16 real images (no padding: data/plan.py), and
    # evaluation (no_grad).
    recompiles = [line for line in compiled.stderr.splitlines() if "Recompiling function" in line]
    assert len(recompiles) == 2, compiled.stderr[-3000:]
    assert "size mismatch at index 0. expected 32, actual 16" in compiled.stderr
    assert "GLOBAL_STATE changed: grad_mode" in compiled.stderr
    weights = load_weights(tmp_path / "compiled/epoch_1/model.safetensors")
    assert not any(k.startswith("_orig_mod.") for k in weights)
    assert weights.keys() == load_weights(tmp_path / "eager/epoch_1/model.safetensors").keys()


def test_progress_bar_shows_only_when_asked(cifar_dir, tmp_path):
    args = TINY + ["--data_dir", cifar_dir, "--epochs", "1", "--batch_size", "64"]
    shown = train_here([a for a in args if a != "--no-progress"] + ["--progress", "--save_dir", tmp_path / "on"])
    hidden = train_here(args + ["--save_dir", tmp_path / "off"])
    assert "epoch 1/1: 100%" in shown.stderr and "loss=" in shown.stderr  # tqdm with the interval's loss
    assert "epoch 1/1: " not in hidden.stderr


def test_compiled_full_steps_after_the_short_last_step_still_run_the_static_full_step_graph(cifar_dir, tmp_path,
                                                                                             monkeypatch):
    # Without static shapes, the short last step (32 of 288 images at 64 per step) makes dynamo recompile with a
    # symbolic batch size and try that newest graph first: every full step of the next epoch ran the slower
    # dynamic-shape graph. Dynamo's "eager" backend, recording each graph and each call, stands in for inductor.
    symbolic, calls = [], []  # per compiled graph: whether a size is symbolic; per forward: the graph it ran

    def recording_backend(graph_module, example_inputs):
        index = len(symbolic)
        symbolic.append(any(isinstance(size, torch.SymInt) for x in example_inputs
                            for size in (x.shape if isinstance(x, torch.Tensor) else [x])))

        def forward(*args):
            calls.append(index)
            return graph_module.forward(*args)
        return forward
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: compile_(
        model, **{**options, "backend": recording_backend, "mode": None}))
    torch._dynamo.reset()
    trainer = make_trainer(cifar_dir, tmp_path, epochs=2, batch_size=64, compile=True)
    try:
        for epoch in range(2):
            trainer.progress.step_in_epoch = 0  # as train_epochs does between epochs
            trainer.train_epoch(epoch)
    finally:
        torch._dynamo.reset()
    assert not any(symbolic), symbolic
    full, short = calls[0], calls[4]
    assert full != short and calls == [full] * 4 + [short] + [full] * 4 + [short], calls


def test_an_epoch_with_no_step_left_ends_without_training(cifar_dir, tmp_path):
    # A session that starts at its epoch's end (step_in_epoch == steps_per_epoch) trains nothing and ends the epoch
    # with the loss it carried; it used to fail with UnboundLocalError on the learning rate of the last step.
    from accelerate.state import AcceleratorState

    from trainer.config import TrainConfig
    from trainer.loop import Trainer
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(TrainConfig(model="test_vit", pretrained=False, data_dir=str(cifar_dir), download=False,
                                  device="cpu", mixed_precision="no", epochs=1, warmup_epochs=0, batch_size=64,
                                  augment="none", progress=False, save_dir=str(tmp_path)))
    progress = trainer.progress
    progress.step_in_epoch = progress.global_step = trainer.steps_per_epoch
    progress.epoch_loss_sum = 2.0 * trainer.num_train
    weights = [w.detach().clone() for w in trainer.plain_model.parameters()]
    try:
        trained = trainer.train_epoch(0)
    finally:
        trainer.accelerator.end_training()
    assert not trained.stopped
    assert trained.metrics["train_loss"] == pytest.approx(2.0) and trained.metrics["lr"] == trainer.lr_in_use()
    assert progress.global_step == trainer.steps_per_epoch  # no step taken, no weight written
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.plain_model.parameters()))


def test_a_run_without_deepspeed_unwraps_its_model_without_asking_accelerate(cifar_dir, tmp_path, monkeypatch):
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed (1.7 s of every process's start): a run
    without DeepSpeed unwraps its model itself (Runtime.bare_model), for its step and for its saves."""
    from accelerate import Accelerator

    def unwrap_model(*args, **kwargs):
        raise AssertionError("accelerate's unwrap_model was called")
    monkeypatch.setattr(Accelerator, "unwrap_model", unwrap_model)
    train_here(TINY + ["--data_dir", cifar_dir, "--save_dir", tmp_path / "run", "--epochs", "1", "--batch_size", "64"])
    timm_model = timm.create_model("test_vit", num_classes=100, img_size=32)
    timm_model.load_state_dict(load_weights(tmp_path / "run/epoch_1/model.safetensors"))  # timm's names, all there


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_the_compiled_model_uses_the_backend_asked_for(cifar_dir, tmp_path, backend):
    from accelerate.utils import DynamoBackend
    trainer = make_trainer(cifar_dir, tmp_path, compile=True, compile_backend=backend)
    assert trainer.accelerator.state.dynamo_plugin.backend == DynamoBackend[backend.upper()]
    assert trainer.model._orig_mod is not None  # compiled (lazily: nothing is generated until a forward)
    trainer.accelerator.end_training()
