"""The EMA of the weights (--model_ema): updated once per optimizer step, evaluated, saved, resumed exactly.

The end-to-end run also turns on every timm augmentation and layer decay, so the resume check covers
their randomness too (RandAugment and random erasing in DataLoader workers on the resumed run).
"""

import json
import re
import shutil

import pytest
import timm
import torch

from conftest import (REPO, TINY, assert_resumed, assert_same_records, assert_same_weights, load_weights,
                      make_trainer, read_jsonl, record_lines, refused, relative_l2, run_trainer, train_here)
from trainer import checkpoint

EPOCHS = 3


def args_for(cifar_dir, save_dir, *extra):
    return TINY + ["--data_dir", cifar_dir, "--epochs", EPOCHS, "--batch_size", 32, "--micro_batch_size", 16,
                   "--save_epochs", 1, "--save_dir", save_dir, "--model_ema", "--model_ema_decay", "0.9",
                   "--augment", "randaug", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
                   "--label_smoothing", "0.1", "--layer_decay", "0.75", *extra]


@pytest.fixture(scope="module")
def ema_run(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    train_here(args_for(cifar_dir, root))
    return root


def test_ema_weights_differ_from_the_model_and_are_evaluated(ema_run):
    for epoch in range(1, EPOCHS + 1):
        model = load_weights(ema_run / f"epoch_{epoch}/model.safetensors")
        ema = load_weights(ema_run / f"epoch_{epoch}/model_ema.safetensors")
        assert ema.keys() == model.keys()
        assert relative_l2(model, ema) > 1e-3
    options = json.loads((ema_run / "config.json").read_text())["options"]
    assert (options["model_ema"], options["model_ema_decay"], options["mixup"]) == (True, 0.9, 0.8)
    metrics = read_jsonl(ema_run / "metrics.jsonl")
    assert len(metrics) == EPOCHS
    for m in metrics:
        assert 0 <= m["val_acc1_ema"] <= m["val_acc5_ema"] <= 100 and m["val_loss_ema"] > 0
        assert (m["val_loss_ema"], m["val_acc1_ema"]) != (m["val_loss"], m["val_acc1"])


def test_ema_checkpoint_is_in_the_manifest_and_loads_in_timm(ema_run):
    folder = ema_run / f"epoch_{EPOCHS}"
    checkpoint.verify(folder)
    manifest = checkpoint.read_manifest(folder)
    assert manifest["model_ema"] is True and checkpoint.MODEL_EMA_FILE in manifest["files"]
    path = folder / checkpoint.MODEL_EMA_FILE
    model = timm.create_model("test_vit", pretrained=True, num_classes=100, img_size=(32, 32),
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=100))
    saved = load_weights(path)
    assert saved.keys() == model.state_dict().keys()  # plain timm keys
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


@pytest.mark.launches
def test_resumed_run_ends_with_bit_identical_model_and_ema(cifar_dir, ema_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ema_run, run_dir)
    for epoch in range(2, EPOCHS + 1):
        shutil.rmtree(run_dir / f"epoch_{epoch}")
    before = record_lines(run_dir)
    resumed = run_trainer(args_for(cifar_dir, run_dir, "--checkpoint", run_dir / "epoch_1", "--num_workers", 2))
    assert_resumed(run_dir, run_dir / "epoch_1", before, resumed.stdout)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert_same_weights(run_dir / f"epoch_{EPOCHS}" / name, ema_run / f"epoch_{EPOCHS}" / name)
    assert_same_records(run_dir, ema_run, names=("metrics.jsonl",))


def test_resume_with_model_ema_from_a_checkpoint_without_one_is_refused(cifar_dir, ema_run, tmp_path):
    folder = tmp_path / "epoch_1"
    shutil.copytree(ema_run / "epoch_1", folder)
    (folder / checkpoint.MODEL_EMA_FILE).unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"][checkpoint.MODEL_EMA_FILE]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # In this process: the refusal comes before any training, so no subprocess is needed to see it.
    line = refused(args_for(cifar_dir, tmp_path / "run", "--checkpoint", folder))
    assert line.startswith(f"error: {folder} holds no model_ema.safetensors (saved without --model_ema)"), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ema_is_updated_once_per_optimizer_step(cifar_dir, tmp_path):
    # In this process, as trainer.bench does: 9 steps of 2 micro-batches each; decay 0 makes the EMA the model.
    trainer = make_trainer(cifar_dir, tmp_path, augment="crop_flip", micro_batch_size=16, model_ema=True,
                           model_ema_decay=0.0)
    updates = []
    update = trainer.ema.update
    trainer.ema.update = lambda model: (updates.append(trainer.progress.global_step), update(model))
    trainer.train_epoch(0)
    trainer.accelerator.end_training()
    assert trainer.accumulation == 2 and updates == list(range(9))
    model, ema = trainer.plain_model.state_dict(), trainer.ema.module.state_dict()
    assert all(torch.equal(model[k], ema[k]) for k in model)
    plain, averaged = trainer.evaluate(), trainer.evaluate(trainer.ema.module)
    assert averaged == {f"{k}_ema": plain[k] for k in ("val_loss", "val_acc1", "val_acc5")}


@pytest.mark.launches
def test_model_ema_is_refused_under_zero3(cifar_dir, tmp_path):
    result = run_trainer(TINY + ["--data_dir", cifar_dir, "--epochs", 1, "--batch_size", 32, "--model_ema",
                                 "--save_dir", tmp_path],
                         config_file=str(REPO / "accelerate_configs" / "zero3.yaml"), check=False)
    # accelerate launch exits 1 whenever a process fails; the process's own status is in torch's report (the
    # ChildFailedError table: "exitcode  : 2 (pid: ...)").
    assert result.returncode == 1 and re.search(r"exitcode\s*: 2 ", result.stderr), result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --model_ema is not supported under DeepSpeed ZeRO-3 (each process holds a slice "
                      "of the weights); use ZeRO-1/2 or DDP"]


def test_a_float32_ema_follows_a_bf16_model_with_the_timm_the_project_requires():
    # DeepSpeed bf16/fp16 casts the prepared module to half precision while the EMA, made before prepare(), stays
    # float32. timm before 1.0.31 raised here ("expected dtype float for 'end' but got dtype c10::BFloat16").
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32))
    ema = ModelEmaV3(model, decay=0.75)
    model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)
    for key, value in ema.module.state_dict().items():
        assert value.dtype == torch.float32
        expected = before[key] * 0.75 + model.state_dict()[key].float() * 0.25
        assert torch.allclose(value, expected, atol=1e-6), key


@pytest.mark.parametrize("timm_version, deepspeed, precision, refused", [
    ("1.0.30", True, "bf16", True), ("1.0.20", True, "fp16", True), ("1.0.31", True, "bf16", False),
    ("1.0.30", False, "bf16", False), ("1.0.30", True, "no", False)])
def test_model_ema_under_deepspeed_half_precision_is_refused_with_an_older_timm(timm_version, deepspeed, precision,
                                                                               refused):
    from trainer.config import ConfigError
    from trainer.runtime import check_ema_precision
    if not refused:
        check_ema_precision(True, deepspeed, precision, timm_version)
        return
    with pytest.raises(ConfigError, match=rf"--model_ema under DeepSpeed {precision} needs timm >= 1.0.31 "
                                          rf"\(installed: {timm_version}\)"):
        check_ema_precision(True, deepspeed, precision, timm_version)


def test_a_step_the_gradient_scaler_skipped_advances_neither_the_schedule_nor_the_ema(cifar_dir, tmp_path,
                                                                                      monkeypatch):
    # fp16 needs a GPU, so accelerate's own report of a skipped step (AcceleratedOptimizer.step_was_skipped, set
    # when the scaler found inf/NaN gradients and did not call optimizer.step) is stood in for.
    from accelerate.optimizer import AcceleratedOptimizer
    trainer = make_trainer(cifar_dir, tmp_path, augment="crop_flip", epochs=2, warmup_epochs=1, model_ema=True,
                           model_ema_decay=0.5)
    trainer.train_steps.set_epoch(0)
    ema = lambda: {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}  # noqa: E731
    for skipped in (True, False):
        monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: skipped))
        lr, scheduled, averaged = trainer.lr_in_use(), trainer.scheduler.last_epoch, ema()
        trainer.train_step(trainer.train_steps[0], 32)
        ema_moved = any(not torch.equal(v, averaged[k]) for k, v in ema().items())
        assert (trainer.scheduler.last_epoch - scheduled, trainer.lr_in_use() != lr, ema_moved) == \
            ((0, False, False) if skipped else (1, True, True)), skipped
    trainer.accelerator.end_training()
