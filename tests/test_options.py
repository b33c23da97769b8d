"""Options that no other test would miss if the trainer ignored them, checked through the real Trainer in this
process (one CPU process, no launch): what the option must change, and that it changes exactly that.

Guarded elsewhere (each checked by ignoring the option on purpose): momentum, nesterov, --layer_decay and the
weight-decay value in test_optim.py; --min_lr in test_optim.py; label smoothing of class labels in
test_augment.py; --model_ema_decay in test_ema.py; --pretrained_file in test_models.py; --grad_clip on 2 DDP
processes and under DeepSpeed and FSDP in test_strategies.py.
"""

import math

import pytest
import timm
import torch

from conftest import make_trainer
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.optim import create_optimizer


def first_step(trainer: Trainer) -> list:
    trainer.train_steps.set_epoch(0)
    return trainer.train_steps[0]


def test_weight_decay_spares_exactly_the_biases_and_norms():
    model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32))
    optimizer = create_optimizer(TrainConfig(weight_decay=0.05), model, fused=False)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norms = (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
    checked = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, norms):
                assert decay[id(p)] == 0.0, (type(module).__name__, name)
                checked += 1
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                assert decay[id(p)] == 0.05, (type(module).__name__, name)
                checked += 1
    assert checked > 20  # every layer's parameters were seen


def test_grad_clip_bounds_the_update(cifar_dir, tmp_path):
    # Plain SGD (no momentum, no decay): the first update is -lr * gradient, so its norm over all parameters is
    # lr * the clipped gradient norm. Two micro-batches: the clipping applies to the accumulated gradient.
    def update_norm(grad_clip):
        trainer = make_trainer(cifar_dir, tmp_path, optimizer="sgdm", momentum=0.0, weight_decay=0.0,
                               learning_rate=1.0, micro_batch_size=16, grad_clip=grad_clip)
        before = [p.detach().clone() for p in trainer.plain_model.parameters()]
        trainer.train_step(first_step(trainer), 32)
        trainer.accelerator.end_training()
        return math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(trainer.plain_model.parameters(), before)))

    unclipped, clipped = update_norm(0.0), update_norm(1e-3)
    assert unclipped > 0.1  # so clipping at 1e-3 really bites
    assert clipped == pytest.approx(1e-3, rel=1e-4)


@pytest.fixture(scope="module")
def plain_step(cifar_dir, tmp_path_factory):
    """The first step's micro-batches without augmentation: what each augmentation option is compared with."""
    trainer = make_trainer(cifar_dir, tmp_path_factory.mktemp("plain"), micro_batch_size=16)
    return first_step(trainer)


def test_reprob_erases_every_image_and_keeps_the_labels(cifar_dir, tmp_path, plain_step):
    erased = first_step(make_trainer(cifar_dir, tmp_path, micro_batch_size=16, reprob=1.0))
    for (x0, y0, _), (x1, y1, _) in zip(plain_step, erased):
        assert torch.equal(y0, y1)
        changed = (x0 != x1).any(dim=1)  # (images, rows, columns): pixels the eraser replaced
        assert changed.flatten(1).any(dim=1).all()  # probability 1: every image has an erased box
        assert not changed.flatten(1).all(dim=1).any()  # a box, not the whole image


@pytest.mark.parametrize("option", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_the_images_and_smooth_the_targets(cifar_dir, tmp_path, plain_step, option):
    # Mixup blends image i with image n-1-i everywhere; cutmix pastes a box of one into the other, pixels unblended.
    mixed = first_step(make_trainer(cifar_dir, tmp_path, micro_batch_size=16, label_smoothing=0.1,
                                    **{option: 0.8 if option == "mixup" else 1.0}))
    for (x0, y0, _), (x1, y1, _) in zip(plain_step, mixed):
        assert y1.shape == (16, 100) and torch.allclose(y1.sum(1), torch.ones(16))
        assert y1.min() == pytest.approx(0.1 / 100)  # --label_smoothing reaches the soft targets
        partner = x0.flip(0)
        own, other = (x1 == x0).all(dim=1), (x1 == partner).all(dim=1)  # per pixel: a copy of either image
        if option == "cutmix":
            assert (own | other).all() and own.any() and other.any()
        else:
            assert not (own | other).any()


def test_eval_batch_size_changes_the_batches_not_the_metrics(cifar_dir, tmp_path):
    metrics = {}
    for size in (7, 64):
        trainer = make_trainer(cifar_dir, tmp_path, eval_batch_size=size)
        assert len(trainer.test_loader) == math.ceil(201 / size)  # the option reaches the loader
        metrics[size] = trainer.evaluate()
        trainer.accelerator.end_training()
    assert metrics[7]["val_images"] == 201
    # The same images counted once each: the same hits; the loss up to float32 sums over other batch shapes
    # (measured 5e-8 relative, 2 CPU cores, torch 2.14.1, 2026-11-28).
    assert {k: metrics[7][k] for k in ("val_acc1", "val_acc5", "val_images")} == \
        {k: metrics[64][k] for k in ("val_acc1", "val_acc5", "val_images")}
    assert metrics[7]["val_loss"] == pytest.approx(metrics[64]["val_loss"], rel=1e-6)


def test_keep_best_keeps_the_best_checkpoint_besides_the_newest(cifar_dir, tmp_path):
    def saved_after(keep_best):
        save_dir = tmp_path / f"keep_best_{keep_best}"
        trainer = make_trainer(cifar_dir, save_dir, keep_last=1, keep_best=keep_best)
        save_dir.mkdir()
        for step, acc in [(1, 40.0), (2, 90.0), (3, 60.0)]:
            trainer.progress.global_step = step
            trainer.checkpoints.save(f"epoch_{step}", acc)
        trainer.accelerator.end_training()
        return sorted(p.name for p in checkpoint.list_checkpoints(save_dir))

    assert saved_after(True) == ["epoch_2", "epoch_3"]  # the best (90 %) and the newest
    assert saved_after(False) == ["epoch_3"]


@pytest.mark.launches
def test_the_trainer_is_freed_as_soon_as_its_run_returns(cifar_dir, tmp_path):
    """No reference cycle through the Trainer: it holds the prepared (under DDP, wrapped) model and so the process
    group, which must go while Python is fully alive; released at interpreter exit instead, gloo's teardown can
    abort the process (seen once while a cycle existed, after a complete 2-process run: exit -6, "terminate called
    without an active exception"). gc is off, as between two automatic collections: only reference counting frees
    it."""
    import gc
    import signal
    import weakref
    trainer = make_trainer(cifar_dir, tmp_path, model_ema=True, keep_last=1)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}  # run() sets them
    gc.disable()
    try:
        trainer.run()
        freed = weakref.ref(trainer)
        del trainer
        assert freed() is None
    finally:
        gc.enable()
        for s, handler in handlers.items():
            signal.signal(s, handler)
