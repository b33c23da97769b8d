"""CIFAR-100 files, the sharded epoch plan and the crop+flip augmentation."""

import pickle

import numpy as np
import pytest
import torch

from trainer.data import (DataError, EpochPlan, Normalize, Split, TrainSteps, crop_flip, ensure_downloaded,
                          load_cifar100, micro_batch_indices, read_split, steps_per_epoch)
from trainer.synthetic import write_fake_cifar100


@pytest.mark.parametrize("num_images, batch_size, world, accumulation", [
    (288, 64, 1, 4), (288, 64, 2, 2), (288, 64, 4, 1), (258, 64, 2, 2), (50_000, 256, 8, 1), (50_000, 256, 2, 4)])
def test_each_step_is_the_same_images_on_every_topology_and_an_epoch_visits_each_once(
        num_images, batch_size, world, accumulation):
    order = EpochPlan.draw(num_images, seed=3407, epoch=2).order
    seen = []
    for step in range(steps_per_epoch(num_images, batch_size)):
        parts = [micro_batch_indices(order, step, batch_size, rank, world, accumulation) for rank in range(world)]
        step_images = torch.cat([m for rank_parts in parts for m in rank_parts])
        expected = order[step * batch_size:(step + 1) * batch_size]
        assert sorted(step_images.tolist()) == sorted(expected.tolist())  # the same 256, wherever they run
        sizes = [len(m) for rank_parts in parts for m in rank_parts]
        assert max(sizes) - min(sizes) <= 1  # a short last step is spread evenly
        seen += step_images.tolist()
    assert sorted(seen) == list(range(num_images))


def test_cifar100_last_step_holds_80_images():
    assert steps_per_epoch(50_000, 256) == 196
    order = EpochPlan.draw(50_000, 3407, 0).order
    assert sum(len(m) for m in micro_batch_indices(order, 195, 256, 0, 1, 1)) == 80


def test_epoch_plans_differ_by_epoch_and_repeat_by_seed():
    a, b, c = EpochPlan.draw(100, 1, 0), EpochPlan.draw(100, 1, 1), EpochPlan.draw(100, 1, 0)
    assert not torch.equal(a.order, b.order)
    assert torch.equal(a.order, c.order) and torch.equal(a.offsets, c.offsets) and torch.equal(a.flips, c.flips)


def test_crop_flip_crops_within_the_padding_and_mirrors():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    centre, no_flip = torch.full((6, 2), 4), torch.zeros(6, dtype=torch.bool)
    assert torch.equal(crop_flip(images, centre, no_flip), images)
    assert torch.equal(crop_flip(images, centre, ~no_flip), images.flip(-1))
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [7, 1]])
    flips = torch.tensor([False, True, False, True, False, True])
    out = crop_flip(images, offsets, flips)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i, ((dy, dx), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
        expected = padded[i, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[i], expected.flip(-1) if flip else expected)


def _steps(split, augment, rank, world, accumulation):
    steps = TrainSteps(split, Normalize((0.5,) * 3, (0.25,) * 3, 32), augment, seed=5, batch_size=32,
                       rank=rank, world=world, accumulation=accumulation)
    steps.set_epoch(1)
    return steps


def test_an_image_gets_the_same_augmentation_whichever_process_trains_it():
    split = Split(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70) % 100)
    single = _steps(split, "crop_flip", 0, 1, 4)
    pair = [_steps(split, "crop_flip", r, 2, 2) for r in range(2)]
    for step in range(len(single)):
        one = {int(l): x for images, labels, weights in single[step] for x, l, w in zip(images, labels, weights) if w}
        two = {int(l): x for s in pair for images, labels, weights in s[step]
               for x, l, w in zip(images, labels, weights) if w}
        assert one.keys() == two.keys()
        assert all(torch.equal(one[k], two[k]) for k in one)


def test_none_leaves_images_unchanged_and_normalises_with_mean_and_std():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    split = Split(images, torch.arange(40))
    steps = _steps(split, "none", 0, 1, 1)
    (batch, labels, _), = steps[0]
    assert torch.allclose(batch, (images[labels].float() / 255 - 0.5) / 0.25)
    (augmented, labels2, _), = _steps(split, "crop_flip", 0, 1, 1)[0]
    assert augmented.shape == batch.shape and torch.equal(labels, labels2)
    assert not torch.allclose(augmented, batch)


def test_last_step_micro_batches_hold_only_their_real_images():
    # 70 images, batch 32 on 2 processes x 2 micro-steps: the last step has 6 real images for 4 micro-batches of 8.
    split = Split(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70) % 100)
    pair = [_steps(split, "crop_flip", r, 2, 2) for r in range(2)]
    last = [mb for s in pair for mb in s[2]]
    # No padding for BatchNorm to see: each micro-batch is its real images, weight 1.
    assert sorted(len(images) for images, _, _ in last) == [1, 1, 2, 2]
    assert all(weights.tolist() == [1.0] * len(images) == [1.0] * len(labels) for images, labels, weights in last)
    order = EpochPlan.draw(70, 5, 1).order
    assert sorted(int(l) for _, labels, _ in last for l in labels) == sorted(order[64:].tolist())
    assert all(len(w) == 8 and w.sum() == 8 for s in pair for step in (0, 1) for _, _, w in s[step])


def test_a_micro_batch_without_real_images_is_full_size_weight_zero_padding():
    # 66 images, batch 32 on 2 x 2: the last step has 2 real images, so micro-batch 1 of each rank has none. It
    # still runs (to join the all-reduce), at the full size that torch.compile has already seen.
    split = Split(torch.randint(0, 256, (66, 3, 32, 32), dtype=torch.uint8), torch.arange(66) % 100)
    for rank in range(2):
        (real, _, real_weights), (empty, _, empty_weights) = _steps(split, "crop_flip", rank, 2, 2)[2]
        assert real_weights.tolist() == [1.0] and empty.shape == (8, 3, 32, 32) and empty_weights.sum() == 0


def test_pad_keeps_a_static_shape_with_zero_weight_padding():
    # What --cuda_graph gets (one static shape): every micro-batch filled up to 8 with weight-0 copies.
    split = Split(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70) % 100)
    pair = [TrainSteps(split, Normalize((0.5,) * 3, (0.25,) * 3, 32), "crop_flip", seed=5, batch_size=32, rank=r,
                       world=2, accumulation=2, pad=True) for r in range(2)]
    for s in pair:
        s.set_epoch(1)
    last = [mb for s in pair for mb in s[2]]
    assert all(images.shape == (8, 3, 32, 32) and labels.shape == weights.shape == (8,) for images, labels, weights in last)
    assert sorted(int(w.sum()) for _, _, w in last) == [1, 1, 2, 2]
    real = [int(l) for _, labels, weights in last for l, w in zip(labels, weights) if w]
    order = EpochPlan.draw(70, 5, 1).order
    assert sorted(real) == sorted(order[64:].tolist())


def test_normalize_resizes_to_image_size():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = Normalize((0.5,) * 3, (0.5,) * 3, 48)(images)
    assert out.shape == (2, 3, 48, 48) and out.dtype == torch.float32
    assert Normalize((0.5,) * 3, (0.5,) * 3, 32)(images).shape == (2, 3, 32, 32)


def test_generated_files_read_back(tmp_path):
    folder = write_fake_cifar100(tmp_path, num_train=30, num_test=20, num_classes=5)
    train, test, names = load_cifar100(folder)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (20,) and int(train.labels.max()) < 5 and len(names) == 100


def _write(path, entry):
    with open(path, "wb") as f:
        pickle.dump(entry, f)


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "is not a CIFAR-100 pickle"),
    (lambda p: _write(p, {b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4}), r"shape \(N, 3072\)"),
    (lambda p: _write(p, {b"data": np.zeros((4, 3072), np.float32), b"fine_labels": [0] * 4}), "must be uint8"),
    (lambda p: _write(p, {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 100]}), r"\[0, 100\)"),
    (lambda p: _write(p, {b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1]}), "2 labels for 4 images"),
    (lambda p: p.unlink(), "is missing"),
])
def test_corrupt_files_are_refused_naming_the_file(tmp_path, corrupt, message):
    folder = write_fake_cifar100(tmp_path, num_train=8, num_test=8)
    corrupt(folder / "train")
    with pytest.raises(DataError, match=message) as error:
        read_split(folder / "train")
    assert str(folder / "train") in str(error.value)


def test_missing_data_without_download_names_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"--data_dir.*--no-download"):
        ensure_downloaded(str(tmp_path), download=False)


def test_failed_download_says_what_to_do_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        (tmp_path / "partial").mkdir()
        raise RuntimeError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DataError, match=r"could not be downloaded.*Name or service not known.*cifar-100-python"):
        ensure_downloaded(str(tmp_path), download=True)
    assert not (tmp_path / "cifar-100-python").exists()
    assert not list(tmp_path.glob(".download-*"))  # the staging folder is cleaned up


def test_download_is_unpacked_privately_then_moved_into_place(tmp_path, monkeypatch):
    import torchvision.datasets

    def fake_download(root, train, download):
        write_fake_cifar100(root, num_train=4, num_test=4)
        assert root != str(tmp_path)  # never unpacked in place, where another node could see it half-done
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    folder = ensure_downloaded(str(tmp_path), download=True)
    assert folder == tmp_path / "cifar-100-python" and (folder / "train").is_file()
    assert ensure_downloaded(str(tmp_path), download=False) == folder
