"""timm augmentation in the data pipeline: RandAugment, random erasing, mixup/cutmix, and their randomness."""

import random

import numpy as np
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from conftest import TINY, load_weights, refused, relative_l2, run_trainer, train_here
from trainer.data import EpochPlan, Normalize, Split, TrainSteps, iterate_steps, posterize
from trainer.step import per_image_loss

NUM = 70  # images: batch 32 gives 2 full steps and a last step of 6 real images
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def split():
    # Distinct labels (70 < 100 classes), so a target row names exactly the images it came from.
    return Split(torch.randint(0, 256, (NUM, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                 torch.arange(NUM))


def steps_for(split, augment="none", rank=0, world=1, accumulation=1, **options):
    steps = TrainSteps(split, Normalize(MEAN, STD, 32), augment, seed=5, batch_size=32, rank=rank, world=world,
                       accumulation=accumulation, **options)
    steps.set_epoch(1)
    return steps


def by_image(steps_list, step):
    """{label, which names the image: its augmented image} over the real images of `step` on the given ranks."""
    return {int(label): image for steps in steps_list for images, labels, weights in steps[step]
            for image, label, weight in zip(images, labels, weights) if weight}


OPTIONS = {
    "crop_flip": dict(augment="crop_flip"),
    "randaug": dict(augment="randaug", randaug="rand-m9-mstd0.5-inc1"),
    "reprob": dict(reprob=1.0),
    "mixup": dict(mixup=0.8),
    "cutmix": dict(cutmix=1.0),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_images_and_keeps_shapes_and_labels(split, name):
    plain, augmented = steps_for(split), steps_for(split, **OPTIONS[name])
    for step in range(len(plain)):
        for (x0, y0, w0), (x1, y1, w1) in zip(plain[step], augmented[step]):
            assert x1.shape == x0.shape and x1.dtype == torch.float32 and torch.equal(w0, w1)
            assert not torch.equal(x0, x1)
            if name not in ("mixup", "cutmix"):
                assert torch.equal(y0, y1)
                continue
            # Soft targets over the 100 classes, summing to 1, made of the image's own label and its partner's:
            # image i of the n real ones is paired with image n-1-i (an odd last one, and padding, with itself).
            assert y1.shape == (len(y0), 100) and torch.allclose(y1.sum(1), torch.ones(len(y0)))
            real = int(w0.sum())
            paired = real - real % 2
            for i, row in enumerate(y1):
                partner = paired - 1 - i if i < paired else i
                assert set(row.nonzero().flatten().tolist()) <= {int(y0[i]), int(y0[partner])}


def randaug_changes(split) -> list[bool]:
    """For each real image of the epoch: whether randaug's image differs from crop_flip's at the same seed."""
    crop_flip, randaug = steps_for(split, augment="crop_flip"), steps_for(split, **OPTIONS["randaug"])
    return [not torch.equal(a, b) for step in range(len(crop_flip))
            for (xa, _, w), (xb, _, _) in zip(crop_flip[step], randaug[step]) for a, b, weight in zip(xa, xb, w) if weight]


def test_randaug_changes_what_crop_flip_gives_at_the_same_seed(split):
    """Crop and flip are drawn alike under both (per image, from seed and epoch), so the difference is RandAugment's
    own work: a RandAugment that returned its input would give crop_flip's images exactly (compared with `none`,
    as above, the crop alone would make every image differ)."""
    changes = randaug_changes(split)
    # 55 of the 70 change with timm 1.0.31 (two ops per image, some of them mild at their drawn magnitude); 0 for a no-op.
    assert len(changes) == NUM and sum(changes) >= NUM // 2, f"{sum(changes)} of {NUM} images changed"


def test_none_leaves_images_unchanged(split):
    steps = steps_for(split)
    for step in range(len(steps)):
        for images, labels, _ in steps[step]:
            assert torch.equal(images, (split.images[labels].float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("options", [OPTIONS["randaug"], dict(OPTIONS["crop_flip"], reprob=0.5),
                                     dict(OPTIONS["randaug"], reprob=0.5)], ids=["randaug", "reprob", "both"])
def test_randaug_and_erasing_are_the_same_for_an_image_on_one_and_two_ranks(split, options):
    single = steps_for(split, accumulation=4, **options)
    pair = [steps_for(split, rank=r, world=2, accumulation=2, **options) for r in range(2)]
    for step in range(len(single)):
        one, two = by_image([single], step), by_image(pair, step)
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one)
    # ... and in DataLoader worker processes, which have random states of their own.
    in_process = [single[s] for s in range(len(single))]
    with_workers = [mb for _, mb in iterate_steps(single, 0, num_workers=2, pin_memory=False)]
    assert all(torch.equal(a[0], b[0]) for s, t in zip(in_process, with_workers) for a, b in zip(s, t))


def test_mixing_depends_on_the_micro_batch_size_not_on_the_process_count(split):
    options = dict(augment="randaug", reprob=0.5, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    single = steps_for(split, accumulation=4, **options)  # micro-batch 8
    pair = [steps_for(split, rank=r, world=2, accumulation=2, **options) for r in range(2)]  # micro-batch 8
    for step in range(len(single)):
        for a in range(2):
            for r in range(2):
                # Micro-batch a of rank r holds the same images as micro-batch a*W + r of the single process.
                mine, theirs = pair[r][step][a], single[step][a * 2 + r]
                assert all(torch.equal(x, y) for x, y in zip(mine, theirs))


@pytest.mark.parametrize("pad", [False, True])
def test_mixup_targets_sum_to_one_and_padding_keeps_weight_zero(split, pad):
    # The last step: 6 real images over 2 micro-batches of 16, so 3 real (an odd count) each, and with pad
    # (--cuda_graph) 13 padding each.
    smoothing = 0.1
    steps = steps_for(split, accumulation=2, mixup=1.0, mixup_prob=1.0, label_smoothing=smoothing, pad=pad)
    order = EpochPlan.draw(NUM, 5, 1).order
    off, on = smoothing / 100, 1 - smoothing + smoothing / 100
    size = 16 if pad else 3
    for images, targets, weights in steps[2]:
        assert weights.tolist() == [1.0] * 3 + [0.0] * (size - 3)
        assert torch.allclose(targets.sum(1), torch.ones(size))
        assert (targets[:2] > off + 1e-6).sum(1).tolist() == [2, 2]  # the first pair is mixed
        filler = int(order[64])
        for row in range(2, size):  # the odd real image and the padding: unmixed, smoothed one-hot targets
            label = filler if row >= 3 else int(targets[row].argmax())
            assert targets[row, label] == pytest.approx(on) and targets[row].min() == pytest.approx(off)
        padding = (split.images[filler].float() / 255 - 0.5) / 0.25
        assert all(torch.equal(images[row], padding) for row in range(3, size))  # never mixed into a real image


def test_augmentation_leaves_the_global_random_streams_alone(split):
    steps = steps_for(split, augment="randaug", reprob=0.5, mixup=0.8)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _ = steps[0]
    after = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert after == (random.random(), np.random.rand(), torch.rand(1).item())


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    # timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which rand-m9-mstd0.5 reaches; Pillow 13 raises there.
    from PIL import Image
    steps = steps_for(Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4)), augment="randaug")
    op = next(op for op in steps.randaug.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    assert np.asarray(op(image)).max() == 0
    assert np.asarray(posterize(image, 1)).max() == 128


def test_losses_are_timms_per_image():
    logits, labels = torch.randn(6, 100), torch.randint(0, 100, (6,))
    hard = per_image_loss(logits, labels, label_smoothing=0.1)
    assert hard.shape == (6,) and hard.mean() == pytest.approx(LabelSmoothingCrossEntropy(0.1)(logits, labels).item())
    targets = torch.softmax(torch.randn(6, 100), 1)
    soft = per_image_loss(logits, targets, label_smoothing=0.1)
    assert soft.shape == (6,) and soft.mean() == pytest.approx(SoftTargetCrossEntropy()(logits, targets).item())


@pytest.mark.launches
def test_one_and_two_processes_train_the_same_with_every_augmentation(cifar_dir, tmp_path):
    args = TINY + ["--data_dir", cifar_dir, "--epochs", "1", "--batch_size", "64", "--micro_batch_size", "16",
                   "--augment", "randaug", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
                   "--label_smoothing", "0.1"]
    train_here(args + ["--save_dir", tmp_path / "one"])
    run_trainer(args + ["--save_dir", tmp_path / "two"], processes=2)
    one, two = (load_weights(tmp_path / d / "epoch_1/model.safetensors") for d in ("one", "two"))
    assert relative_l2(one, two) < 1e-5  # float re-association only (test_train.py); a different mix: ~1e-2


def test_mixup_refuses_an_odd_micro_batch(cifar_dir, tmp_path):
    # In this process: a setup error needs no subprocess.
    line = refused(TINY + ["--data_dir", cifar_dir, "--batch_size", "30", "--micro_batch_size", "15", "--mixup", "0.8",
                           "--save_dir", tmp_path])
    assert line.startswith("error: --mixup/--cutmix pair the images of a micro-batch: the micro-batch must be even, "
                           "got 15"), line
