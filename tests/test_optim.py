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
