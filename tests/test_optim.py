"""Learning-rate schedules as functions of the optimizer step, and the optimizers' settings."""

import math

import pytest
import timm
import torch

from trainer.config import TrainConfig
from trainer.optim import create_optimizer, create_scheduler, lr_at

SPE = 10  # steps per epoch


@pytest.mark.parametrize("scheduler", ["cosine", "linear_decay"])
def test_warmup_is_linear_and_reaches_the_peak(scheduler):
    c = TrainConfig(epochs=4, warmup_epochs=1, learning_rate=0.1, scheduler=scheduler)
    assert [lr_at(s, c, SPE) for s in range(SPE)] == pytest.approx([0.1 * (s + 1) / SPE for s in range(SPE)])


def test_cosine_decays_to_the_floor():
    c = TrainConfig(epochs=4, warmup_epochs=1, learning_rate=0.1, min_lr=0.001)
    total, warmup = 4 * SPE, SPE
    assert lr_at(warmup, c, SPE) == pytest.approx(0.1)
    assert lr_at(total - 1, c, SPE) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert lr_at(total, c, SPE) == pytest.approx(0.001)


def test_linear_decay_falls_to_zero():
    c = TrainConfig(epochs=4, warmup_epochs=1, learning_rate=0.1, scheduler="linear_decay")
    assert lr_at(SPE + 15, c, SPE) == pytest.approx(0.05)
    assert lr_at(4 * SPE - 1, c, SPE) == pytest.approx(0.1 / 30)


def test_scheduler_applies_lr_at_once_per_step():
    c = TrainConfig(epochs=3, warmup_epochs=1, learning_rate=0.1)
    model = torch.nn.Linear(2, 2)
    optimizer = create_optimizer(c, model, fused=False)
    scheduler = create_scheduler(c, optimizer, SPE)
    seen = []
    for _ in range(3 * SPE):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, c, SPE) for s in range(3 * SPE)])


def test_optimizers_follow_the_options():
    model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32))
    adamw = create_optimizer(TrainConfig(weight_decay=0.05), model, fused=False)
    assert isinstance(adamw, torch.optim.AdamW)
    decays = sorted({g["weight_decay"] for g in adamw.param_groups})
    assert decays == [0.0, 0.05]  # timm: no decay on biases and norm weights
    sgd = create_optimizer(TrainConfig(optimizer="sgdm", momentum=0.8), model, fused=False)
    assert isinstance(sgd, torch.optim.SGD)
    assert {(g["momentum"], g["nesterov"]) for g in sgd.param_groups} == {(0.8, False)}
    nesterov = create_optimizer(TrainConfig(optimizer="sgdm", nesterov=True), model, fused=False)
    assert all(g["nesterov"] for g in nesterov.param_groups)


@pytest.mark.parametrize("capturable", [False, True], ids=["float_lr", "tensor_lr"])
def test_layer_decay_scales_each_group_by_its_depth_at_every_step(capturable):
    c = TrainConfig(epochs=3, warmup_epochs=1, learning_rate=0.1, layer_decay=0.75)
    model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32))
    optimizer = create_optimizer(c, model, fused=False, capturable=capturable)
    scheduler = create_scheduler(c, optimizer, SPE)
    head = model.get_classifier().weight
    stem = model.patch_embed.proj.weight
    depth = len(model.blocks) + 1  # timm's layers: the stem 0, the blocks 1..L, the final norm and head L+1
    for step in range(3 * SPE):
        lrs = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        assert lrs[id(head)] == pytest.approx(lr_at(step, c, SPE))  # the logged lr is the head's
        assert lrs[id(stem)] / lrs[id(head)] == pytest.approx(0.75 ** depth)
        optimizer.step()
        scheduler.step()
    assert len({g["lr_scale"] for g in optimizer.param_groups}) == depth + 1


@pytest.mark.parametrize("capturable", [False, True], ids=["float_lr", "tensor_lr"])
def test_the_logged_lr_is_the_one_the_head_group_holds_at_every_step(capturable):
    # Trainer.lr_in_use reads only the trainer's optimizer and scheduler: a bare Trainer with those two suffices.
    from trainer.loop import Trainer
    c = TrainConfig(epochs=3, warmup_epochs=1, learning_rate=0.1, layer_decay=0.75)
    model = timm.create_model("test_vit", num_classes=100, img_size=(32, 32))
    trainer = Trainer.__new__(Trainer)
    trainer.optimizer = create_optimizer(c, model, fused=False, capturable=capturable)
    trainer.scheduler = create_scheduler(c, trainer.optimizer, SPE)
    head = model.get_classifier().weight
    (group,) = [g for g in trainer.optimizer.param_groups if any(p is head for p in g["params"])]
    for _ in range(3 * SPE):
        logged = trainer.lr_in_use()
        assert isinstance(logged, float)
        if capturable:  # a float32 device tensor, filled by the scheduler with the host value logged here
            assert torch.is_tensor(group["lr"]) and logged == pytest.approx(group["lr"].item(), rel=1e-7)
        else:
            assert logged == group["lr"]
        trainer.optimizer.step()
        trainer.scheduler.step()


def test_without_layer_decay_every_group_follows_the_schedule():
    c = TrainConfig(epochs=3, warmup_epochs=1, learning_rate=0.1)
    optimizer = create_optimizer(c, timm.create_model("test_vit", num_classes=100, img_size=(32, 32)), fused=False)
    scheduler = create_scheduler(c, optimizer, SPE)
    for _ in range(SPE + 3):
        optimizer.step()
        scheduler.step()
    assert all(g["lr"] == pytest.approx(lr_at(SPE + 3, c, SPE)) for g in optimizer.param_groups)
