"""The epoch's short last step: its gradient is the mean over its real images only, on every topology.

The expected weights are computed here in plain PyTorch (the same timm model from the same seed, torch's SGD
with the same momentum and learning rates, the images of each step taken from the trainer's own epoch plan)
and compared with what the real trainer saved after that step. SGD with momentum, not AdamW: Adam divides a
gradient by its own running scale, so a short step scaled by batch_size instead of its real image count
would barely move AdamW's update, while SGD's update is proportional to it.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from conftest import TINY, load_weights, relative_l2, train
from trainer.data import EpochPlan, load_cifar100, micro_batch_indices
from trainer.synthetic import write_fake_cifar100

NUM_TRAIN, BATCH = 104, 64  # one full step of 64 images, then a short step of 40
SEED, LR, MOMENTUM = 11, 0.05, 0.9
OPTIONS = ["--epochs", "1", "--warmup_epochs", "0", "--batch_size", BATCH, "--optimizer", "sgdm",
           "--momentum", MOMENTUM, "--weight_decay", "0", "--learning_rate", LR, "--min_lr", "0",
           "--seed", SEED, "--label_smoothing", "0"]
# Measured (2 CPU cores, torch 2.14.1, timm 1.0.31, accelerate 1.15.0, 2026-11-28), relative L2 of the
# update against the plain computation, on 1 and on 2 processes alike: 3.4e-7 (float re-association);
# with the padding images weighted like real ones 0.33; with the short step scaled by batch_size 0.060.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("last_step")
    write_fake_cifar100(root, num_train=NUM_TRAIN, num_test=10, num_classes=10)
    return root


def create_model():
    set_seed(SEED)  # what the trainer does right before timm.create_model
    return timm.create_model("test_vit", pretrained=False, num_classes=100, img_size=(32, 32))


@pytest.fixture(scope="module")
def expected(data_dir):
    """(initial weights, weights after the epoch's two steps) computed in plain PyTorch."""
    model = create_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train, _, _ = load_cifar100(data_dir / "cifar-100-python")
    mean = torch.tensor(model.pretrained_cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1)
    order = EpochPlan.draw(NUM_TRAIN, SEED, 0).order
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model.train()
    for step in range(math.ceil(NUM_TRAIN / BATCH)):
        (index,) = micro_batch_indices(order, step, BATCH, rank=0, world=1, accumulation=1)  # the step's real images
        assert len(index) == (BATCH if step == 0 else NUM_TRAIN - BATCH)
        # Cosine from LR to 0 over 2 steps, no warm-up: step 0 at LR, step 1 half-way down, at LR / 2.
        optimizer.param_groups[0]["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / 2))
        images = (train.images[index].float() / 255 - mean) / std
        loss = F.cross_entropy(model(images), train.labels[index])  # the mean over the real images
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return initial, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("processes, micro_batch", [(1, 16), (2, 16)], ids=["1proc_x4_accumulation", "2proc_x2_accumulation"])
@pytest.mark.launches
def test_short_last_step_is_the_mean_over_its_real_images(data_dir, expected, tmp_path, processes, micro_batch):
    initial, final = expected
    args = TINY + OPTIONS + ["--data_dir", data_dir, "--micro_batch_size", micro_batch, "--save_dir", tmp_path]
    result = train(args, processes)
    assert "2 steps per epoch (last step 40 images)" in result.stdout
    trained = load_weights(tmp_path / "epoch_1" / "model.safetensors")
    assert trained.keys() == initial.keys()
    got = {k: trained[k] - initial[k] for k in initial}
    want = {k: final[k] - initial[k] for k in initial}
    distance = relative_l2(want, got)
    print(f"{processes} process(es): update vs plain PyTorch, relative L2 {distance:.3g}")
    assert distance < TOLERANCE, distance
