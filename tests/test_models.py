"""timm models: the study's presets train a step, local pretrained weights load through timm."""

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import TINY, load_weights, read_jsonl, run_trainer
from trainer.config import TrainConfig
from trainer.models import create_model
from trainer.synthetic import write_fake_cifar100


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("few")
    write_fake_cifar100(root, num_train=8, num_test=8)
    return root


@pytest.fixture
def memory_folder(tmp_path):
    """A folder in /dev/shm (memory) where there is one, else tmp_path: a study model's checkpoint is 1.4 GB, which
    the 2-core machine's disk writes at ~80 MB/s (17 of the ViT-B/8 run's 24 s, measured 2026-12-05)."""
    import shutil
    import tempfile
    from pathlib import Path
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="test_models-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("preset, timm_name, parameters", [
    ("nfnet", "dm_nfnet_f0.dm_in1k", 68.0e6), ("vit", "vit_base_patch8_224.augreg_in21k_ft_in1k", 85.0e6)])
@pytest.mark.launches
def test_study_models_train_one_step(few_images, memory_folder, preset, timm_name, parameters):
    args = [a for a in TINY if a not in ("test_vit",)]
    args[args.index("--model") + 1:args.index("--model") + 1] = [preset]
    run_trainer(args + ["--data_dir", few_images, "--epochs", "1", "--batch_size", "8", "--micro_batch_size", "4",
                        "--save_dir", memory_folder], timeout=600)
    (line,) = read_jsonl(memory_folder / "metrics.jsonl")
    assert line["step"] == 1 and line["val_images"] == 8
    import json
    resolved = json.loads((memory_folder / "config.json").read_text())["resolved"]
    assert resolved["timm_model"] == timm_name and resolved["parameters"] > parameters
    assert resolved["accumulation_steps"] == 2
    weights = load_weights(memory_folder / "epoch_1" / "model.safetensors")
    with torch.device("meta"):  # shapes only: no memory, no initialisation of 85M weights
        reference = timm.create_model(timm_name, num_classes=100, **({"img_size": (32, 32)} if preset == "vit" else {}))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_img_size_goes_to_models_that_take_it():
    vit = create_model(TrainConfig(model="test_vit", pretrained=False, image_size=48))
    assert vit.patch_embed.img_size == (48, 48)
    nfnet = create_model(TrainConfig(model="test_nfnet", pretrained=False, image_size=48))  # takes no img_size
    assert nfnet(torch.zeros(1, 3, 48, 48)).shape == (1, 100)


def test_pretrained_file_loads_through_timm_resetting_the_head_and_resampling_positions(tmp_path):
    source = timm.create_model("test_vit", num_classes=1000, img_size=(64, 64))  # 4x4 patches of 16, ImageNet head
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model(TrainConfig(model="test_vit", pretrained_file=str(path)))
    assert model.head.out_features == 100
    assert source.pos_embed.shape[1] == 1 + 4 * 4
    assert model.pos_embed.shape[1] == 1 + 2 * 2  # resampled to 2x2 patches at 32x32
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name, blocks", [("test_vit", ["Block"]), ("test_nfnet", ["NormFreeBlock"]),
                                          ("resnet18", ["BasicBlock"]), ("test_convnext", ["ConvNeXtBlock"])])
def test_fsdp_shards_the_blocks_where_timm_keeps_them(name, blocks):
    """The units FSDP gathers one at a time (runtime.configure_fsdp): the repeated blocks of timm's `blocks`,
    `stages.N`, `stages.N.blocks` and `layerN` containers, not the layers inside them nor the stages around them."""
    from trainer.models import block_classes
    assert block_classes(timm.create_model(name)) == blocks
