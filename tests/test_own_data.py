"""--data: CIFAR-10, image folders and Hugging Face data sets, with the same guarantees as CIFAR-100's pickles.

The images are real ones a package ships: scikit-learn's handwritten digits, written by trainer.synthetic as an
image folder of grey PNGs, a parquet data set and CIFAR-10 pickles (tests/conftest.py's `digits`).
"""

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (TINY, assert_same_run, assert_same_weights, load_weights, refused, relative_l2,
                      run_trainer, start_trainer, train_here, wait_while_running)
from trainer import checkpoint, records
from trainer.data import DataError, load_data
from trainer.synthetic import DIGIT_CLASSES

# 1,437 training digits in 12 steps of 128 (the last of 29), crop and flip drawn by the epoch plan.
DIGITS = TINY + ["--batch_size", 128, "--augment", "crop_flip", "--eval_batch_size", 90]
STEPS_PER_EPOCH = 12


def options(digits, source, save_dir, *extra):
    return DIGITS + digits[source] + ["--save_dir", save_dir, *extra]


def source_of(digits, source):
    """load_data's arguments for one of the digits' sources."""
    args = digits[source]
    data_dir = args[args.index("--data_dir") + 1] if "--data_dir" in args else "./data"
    return args[1], data_dir


# --- reading ---------------------------------------------------------------------------------------------

def test_the_digits_read_the_same_from_a_folder_a_parquet_data_set_and_cifar10(digits):
    """The three readers give the same tensors, labels and class names: so a run gives the same weights."""
    loaded = [load_data(*source_of(digits, s), image_size=32, fetch=False, download=False)
              for s in ("cifar10", "folder", "parquet")]
    reference = loaded[0]
    assert reference.class_names == DIGIT_CLASSES and len(reference.train.labels) == 1437
    for data in loaded[1:]:
        assert data.class_names == DIGIT_CLASSES
        for split, want in ((data.train, reference.train), (data.test, reference.test)):
            assert torch.equal(split.images, want.images) and torch.equal(split.labels, want.labels)
    assert loaded[1].notes == [f"{digits['folder'][1].split(':', 1)[1]}: converted to RGB as timm's loader does: "
                               f"1797 grey image(s)"]


def test_images_of_any_size_and_mode_become_rgb_squares_as_torchvisions_resize_and_center_crop_make_them(tmp_path):
    from torchvision import transforms
    sizes = {"L": (40, 60), "RGBA": (64, 48), "CMYK": (32, 32), "P": (50, 50), "RGB": (33, 90)}
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, (mode, (w, h)) in enumerate(sizes.items()):
            folder = tmp_path / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(
                folder / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    data = load_data(f"imagefolder:{tmp_path}", "./data", image_size=24, fetch=False)
    expected = transforms.Compose([transforms.Resize(24, transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(24), transforms.PILToTensor()])
    files = sorted((tmp_path / "train").rglob("*.*"))  # ImageFolder's order: class b after a, names sorted
    for image, path in zip(data.train.images, files):
        assert torch.equal(image, expected(Image.open(path).convert("RGB"))), path
    assert data.train.images.shape == (5, 3, 24, 24) and data.class_names == ["a", "b"]
    assert data.notes == [f"{tmp_path}: converted to RGB as timm's loader does: 2 CMYK, 2 grey, 2 palette, 2 RGBA "
                          f"image(s)"]


def test_cifar10_is_downloaded_by_torchvisions_cifar10_into_its_own_folder(tmp_path, monkeypatch):
    import pickle

    import torchvision.datasets

    def fake_download(root, train, download):  # what torchvision's CIFAR10 unpacks: cifar-10-batches-py/
        folder = Path(root) / "cifar-10-batches-py"
        folder.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": np.full((2, 3072), 7, np.uint8), b"labels": [0, 9]}, f)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [b"airplane"] + [f"c{i}".encode() for i in range(1, 10)]}, f)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    data = load_data("cifar10", str(tmp_path), image_size=32, fetch=True)
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()
    assert len(data.train.labels) == 10 and len(data.test.labels) == 2 and data.class_names[0] == "airplane"
    assert data.title == "CIFAR-10" and data.superclasses() is None


# --- bad data: one line naming the file, exit 2, before training -----------------------------------------------

def image_folder(root, classes=("cat", "dog"), val_classes=None, per_class=3):
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")
    return root


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "train" / "empty").mkdir()
    message = refused(TINY + ["--data", f"imagefolder:{root}", "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert message.startswith(f"error: {root / 'train'}: Found no valid file for the classes empty.")
    assert not (tmp_path / "run").exists()


def test_a_truncated_image_is_refused_naming_the_file(tmp_path):
    root = image_folder(tmp_path / "data")
    broken = root / "val" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    message = refused(TINY + ["--data", f"imagefolder:{root}", "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert message.startswith(f"error: {broken} is not a readable image (") and message.endswith("remove or replace it")


def test_a_validation_class_that_training_lacks_is_refused(tmp_path):
    root = image_folder(tmp_path / "data", val_classes=("cat", "cow"))
    message = refused(TINY + ["--data", f"imagefolder:{root}", "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert message == (f"error: {root / 'val' / 'cow'}: class 'cow' has no folder in {root / 'train'}; the labels "
                       f"come from the training classes, so add its training images or remove it")


def test_a_folder_without_train_and_val_is_refused(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    message = refused(TINY + ["--data", f"imagefolder:{tmp_path / 'data'}", "--save_dir", tmp_path / "run"])
    assert "must hold train/<class>/ and val/<class>/" in message


def test_a_hidden_folder_a_folder_link_loop_and_an_unreadable_folder_are_refused(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / ".ipynb_checkpoints" / "0.png")
    with pytest.raises(DataError, match=r"train/.ipynb_checkpoints: a hidden folder would be a class of its own"):
        load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False)
    shutil.rmtree(root / "train" / ".ipynb_checkpoints")
    (root / "train" / "cat" / "again").symlink_to(root / "train" / "cat")  # ImageFolder follows folder links
    with pytest.raises(DataError, match=r"cat/again/0.png is .*cat/0.png again \(a folder link that loops"):
        load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False)
    (root / "train" / "cat" / "again").unlink()
    import os

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(os, "scandir", unreadable)  # as root every folder is readable: the error torchvision meets
    with pytest.raises(DataError, match=r"train: \[Errno 13\] Permission denied: .*train"):
        load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False)


def test_a_16_bit_grey_image_is_refused_rather_than_clipped(tmp_path):
    root = image_folder(tmp_path / "data")
    deep = root / "val" / "cat" / "deep.png"
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(deep)
    assert Image.open(deep).mode.startswith("I;16")
    with pytest.raises(DataError, match=r"deep.png is a 16-bit grey \(I;16\) image, whose values PIL's conversion "
                                        r"to RGB would clip to 0-255 rather than scale; save it as 8-bit"):
        load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False)


@pytest.mark.parametrize("spec, message", [
    ("imagenet", "--data 'imagenet' is not one of: cifar100, cifar10, imagefolder:PATH, hf:PATH_OR_NAME"),
    ("imagefolder:", "--data 'imagefolder:' is not one of"),
    ("imagefolder:/no/such/folder", "--data imagefolder:/no/such/folder: no such folder"),
])
def test_a_bad_data_option_is_refused_before_anything_is_read(tmp_path, spec, message):
    assert message in refused(TINY + ["--data", spec, "--save_dir", tmp_path / "run"])


def parquet_data_set(root, labels, names=("cat", "dog"), label_feature=True):
    import datasets
    datasets.disable_progress_bars()  # its bars go to stderr, where the refusal must be the only line
    label = datasets.ClassLabel(names=list(names)) if label_feature else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    for split in ("train", "validation"):
        rows = {"image": [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(labels))], "label": labels}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-0.parquet"))
    return root


@pytest.mark.parametrize("missing", [-1, None])  # datasets' two spellings of "no label"
def test_an_unlabelled_row_of_a_hugging_face_data_set_is_refused_naming_its_row(tmp_path, missing):
    root = parquet_data_set(tmp_path / "hf", [0, 1, missing, 0])
    message = refused(TINY + ["--data", f"hf:{root}", "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert message.startswith(f"error: --data hf:{root} train split, row 2: label {missing} is not one of the 2 "
                              f"classes")


def test_a_hugging_face_data_set_without_class_names_is_refused(tmp_path):
    root = parquet_data_set(tmp_path / "hf", [0, 1, 1, 0], label_feature=False)
    message = refused(TINY + ["--data", f"hf:{root}", "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert "must have one label column with class names (a ClassLabel feature), found none among image, label" \
        in message


def test_a_hugging_face_row_without_an_image_and_a_data_set_without_its_splits_are_refused(tmp_path):
    import datasets
    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"image": [Image.new("RGB", (8, 8)), None], "label": [0, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "a")
    with pytest.raises(DataError, match=r"hf:.*/a train split, row 1 has no image; remove the row"):
        load_data(f"hf:{tmp_path / 'a'}", "./data", image_size=8, fetch=False)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "b")
    with pytest.raises(DataError, match=r"needs a validation split \(validation or val or test\), found train"):
        load_data(f"hf:{tmp_path / 'b'}", "./data", image_size=8, fetch=False)
    two = datasets.Features({"image": datasets.Image(), "also": datasets.Image(), "label": features["label"]})
    datasets.DatasetDict({s: datasets.Dataset.from_dict({**rows, "also": rows["image"]}, features=two)
                          for s in ("train", "test")}).save_to_disk(tmp_path / "c")
    with pytest.raises(DataError, match=r"must have one image column \(an Image feature\), found image, also"):
        load_data(f"hf:{tmp_path / 'c'}", "./data", image_size=8, fetch=False)


def test_evaluation_reads_only_the_validation_images(tmp_path):
    """trainer.evaluate loads with evaluation_only: a training image, even a broken one, is never decoded."""
    root = image_folder(tmp_path / "data")
    (root / "train" / "dog" / "1.png").write_bytes(b"not an image")
    data = load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False, evaluation_only=True)
    assert data.train is None and data.test.images.shape == (6, 3, 8, 8) and data.class_names == ["cat", "dog"]
    with pytest.raises(DataError, match=r"dog/1.png is not a readable image"):  # training reads it, and refuses
        load_data(f"imagefolder:{root}", "./data", image_size=8, fetch=False)


def test_a_data_set_larger_than_memory_is_decoded_per_step_or_refused_with_decode_once(tmp_path, monkeypatch):
    from trainer.data import images
    root = image_folder(tmp_path / "data")
    in_memory = load_data(f"imagefolder:{root}", "./data", image_size=24, fetch=False)
    monkeypatch.setattr(images, "total_memory", lambda: 1000)
    with pytest.raises(DataError, match=r"decoding its 12 images at 24x24 needs 0.0 GiB of memory \(1 process\(es\) "
                                        r"on this node, one copy each\), more than half of the node's 0.0 GiB; use "
                                        r"--decode per_step"):
        load_data(f"imagefolder:{root}", "./data", image_size=24, fetch=False, decode="once")
    streamed = load_data(f"imagefolder:{root}", "./data", image_size=24, fetch=False)  # auto
    assert isinstance(streamed.train.images, images.ImageFiles)
    assert streamed.notes[0].endswith("decoding each step's images as it is prepared instead (--decode per_step; "
                                      "--num_workers N processes prepare the steps)")
    index = torch.tensor([5, 0, 4, 5])  # images 0 and 4 differ (see image_folder)
    assert torch.equal(streamed.train.images[index], in_memory.train.images[index])
    assert torch.equal(streamed.test.images[3], in_memory.test.images[3])


@pytest.mark.parametrize("decode", ["once", "per_step"])
def test_a_truncated_image_is_refused_before_training_whichever_the_decoding(tmp_path, decode):
    root = image_folder(tmp_path / "data")
    broken = root / "train" / "cat" / "2.png"
    broken.write_bytes(broken.read_bytes()[:40])  # the header whole, the pixel data cut
    message = refused(TINY + ["--data", f"imagefolder:{root}", "--decode", decode, "--num_workers", 2,
                              "--batch_size", 2, "--save_dir", tmp_path / "run"])
    assert message.startswith(f"error: {broken} is not a readable image (")
    assert not (tmp_path / "run").exists()


def test_decode_is_refused_with_cifar(tmp_path):
    assert refused(TINY + ["--decode", "per_step", "--save_dir", tmp_path / "run"]) == (
        "error: --decode per_step applies to --data imagefolder: and hf: (CIFAR's pickles are read whole)")


def test_the_study_checks_cifar10_files_and_leaves_other_data_to_the_trainer(tmp_path):
    from trainer.config import parse_config
    from trainer.study import StudyError, check_data
    check_data(parse_config(["--data", f"imagefolder:{image_folder(tmp_path / 'data')}"]))
    with pytest.raises(StudyError, match="CIFAR-10 not found in .*cifar-10-batches-py/data_batch_1 is missing"):
        check_data(parse_config(["--data", "cifar10", "--data_dir", str(tmp_path), "--no-download"]))


# --- training: the same weights from every source, evaluated and exported with the data's class names ------------

@pytest.fixture(scope="module")
def one_epoch_each(digits, tmp_path_factory):
    """One epoch of test_vit on each source of the digits, in this process."""
    root = tmp_path_factory.mktemp("sources")
    runs = {source: (source, []) for source in ("cifar10", "folder", "parquet")}
    # The parquet rows decoded as each step is prepared, by two DataLoader processes, not once into memory.
    runs["per_step"] = ("parquet", ["--decode", "per_step", "--num_workers", 2])
    for name, (source, extra) in runs.items():
        train_here(options(digits, source, root / name, "--epochs", 1, *extra))
    return root


def test_every_source_trains_the_same_weights(one_epoch_each):
    for source in ("folder", "parquet", "per_step"):
        assert_same_weights(one_epoch_each / source / "epoch_1" / "model.safetensors",
                            one_epoch_each / "cifar10" / "epoch_1" / "model.safetensors")
    resolved = json.loads((one_epoch_each / "folder" / "config.json").read_text())["resolved"]
    assert resolved["num_classes"] == 10 and resolved["class_names"] == DIGIT_CLASSES and resolved["decoded"] == "once"
    assert json.loads((one_epoch_each / "per_step" / "config.json").read_text())["resolved"]["decoded"] == "per_step"
    assert resolved["train_images"] == 1437 and resolved["steps_per_epoch"] == STEPS_PER_EPOCH
    head = load_weights(one_epoch_each / "folder" / "epoch_1" / "model.safetensors")["head.weight"]
    assert head.shape[0] == 10  # the head has the data's classes


def test_evaluation_and_export_name_the_data_sets_classes(one_epoch_each, digits, tmp_path):
    from trainer import evaluate, export
    run = one_epoch_each / "folder" / "epoch_1"
    assert evaluate.main([str(run), "--out", str(tmp_path / "eval")]) == 0  # on the run's own --data
    rows = (tmp_path / "eval" / "per_class.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == DIGIT_CLASSES
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    logged = records.read_lines(one_epoch_each / "folder" / "metrics.jsonl")[-1]
    assert metrics["val_images"] == 360 and metrics["val_acc1"] == pytest.approx(logged["val_acc1"])
    assert export.main([str(run), "--out", str(tmp_path / "exported")]) == 0
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["label_names"] == DIGIT_CLASSES and config["num_classes"] == 10
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "**Dataset:** image folder " in card and "CIFAR-100" not in card
    # The exported folder, evaluated on the parquet copy of the same images: the same numbers (the loss within
    # float32 rounding: the export writes the normalisation as JSON numbers).
    assert evaluate.main([str(tmp_path / "exported"), "--data", digits["parquet"][1],
                          "--out", str(tmp_path / "eval_parquet")]) == 0
    again = json.loads((tmp_path / "eval_parquet" / "metrics.json").read_text())
    assert again["val_acc1"] == metrics["val_acc1"] and again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    # Evaluation decodes the validation images only: a broken training image does not stop it.
    copy = shutil.copytree(digits["folder"][1].split(":", 1)[1], tmp_path / "broken_train")
    next((copy / "train" / "digit_3").iterdir()).write_bytes(b"not an image")
    assert evaluate.main([str(run), "--data", f"imagefolder:{copy}", "--out", str(tmp_path / "eval_copy")]) == 0
    assert json.loads((tmp_path / "eval_copy" / "metrics.json").read_text())["val_acc1"] == metrics["val_acc1"]


def test_a_model_of_other_classes_is_refused_by_evaluate(one_epoch_each, digits, cifar_dir, tmp_path, capsys):
    from trainer import evaluate
    code = evaluate.main([str(one_epoch_each / "folder" / "epoch_1"), "--data", "cifar100", "--data_dir",
                          str(cifar_dir), "--out", str(tmp_path / "refused")])
    assert code == 2
    assert "was trained on other classes than CIFAR-100's (10 classes -> 100): evaluate it on the data it was " \
           "trained on (--data)" in capsys.readouterr().err
    # As many classes, one of another name: the checkpoint's recorded names tell.
    other = shutil.copytree(digits["folder"][1].split(":", 1)[1], tmp_path / "other")
    for split in ("train", "val"):
        (other / split / "digit_9").rename(other / split / "nine")
    code = evaluate.main([str(one_epoch_each / "folder" / "epoch_1"), "--data", f"imagefolder:{other}",
                          "--out", str(tmp_path / "refused_names")])
    assert code == 2 and "(class 9 'digit_9' -> 'nine')" in capsys.readouterr().err


# --- several processes and resume, launched ------------------------------------------------------------------------

EPOCHS = 2


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder_run")
    train_here(options(digits, "folder", root, "--epochs", EPOCHS))
    return root


@pytest.mark.launches
def test_two_processes_train_an_image_folder_to_the_weights_of_one(digits, uninterrupted, tmp_path):
    run_trainer(options(digits, "folder", tmp_path, "--epochs", EPOCHS), processes=2)
    weights = [load_weights(d / f"epoch_{EPOCHS}" / "model.safetensors") for d in (tmp_path, uninterrupted)]
    assert relative_l2(*weights) < 1e-5


@pytest.mark.launches
def test_an_image_folder_run_stopped_mid_epoch_resumes_to_the_same_run_from_a_copy_elsewhere(digits, uninterrupted,
                                                                                            tmp_path):
    """Stopped by SIGTERM mid-epoch, then resumed with the image folder copied to another path (as to a node's
    local disk): the uninterrupted run's weights, bit for bit."""
    run_dir = tmp_path / "run"
    args = options(digits, "folder", run_dir, "--epochs", EPOCHS, "--resume", "auto")
    process = start_trainer(args)

    def reached():
        lines = records.read_lines(run_dir / "steps.jsonl")
        return bool(lines) and lines[-1]["step"] >= STEPS_PER_EPOCH + 4
    wait_while_running(process, reached, f"step {STEPS_PER_EPOCH + 4}")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output
    (saved,) = [p for p in checkpoint.list_checkpoints(run_dir) if p.name.startswith("step_")]
    assert 0 < checkpoint.read_manifest(saved)["step_in_epoch"] < STEPS_PER_EPOCH
    moved = shutil.copytree(digits["folder"][1].split(":", 1)[1], tmp_path / "local_copy")
    train_here(options(digits, "folder", run_dir, "--epochs", EPOCHS, "--resume", "auto", "--data",
                       f"imagefolder:{moved}"))
    assert_same_run(run_dir, uninterrupted, EPOCHS, rel=1e-9)


def test_a_checkpoint_resumed_on_data_of_other_classes_is_refused(digits, uninterrupted, tmp_path):
    other = shutil.copytree(digits["folder"][1].split(":", 1)[1], tmp_path / "other")
    for split in ("train", "val"):
        (other / split / "digit_9").rename(other / split / "nine")
    shutil.copytree(uninterrupted, tmp_path / "run")
    result = train_here(options(digits, "folder", tmp_path / "run", "--epochs", EPOCHS + 1, "--resume", "auto",
                                "--data", f"imagefolder:{other}"), check=False)
    assert result.returncode == 2
    assert "cannot be resumed with class 9 'digit_9' -> 'nine': resume with the checkpoint's values" in result.stderr


def test_a_training_set_goes_on_the_gpu_only_where_it_fits():
    from trainer.runtime import training_set_fits
    gib = 2**30
    assert training_set_fits(1 * gib, 40 * gib, "auto", "x")             # CIFAR-size: on the GPU
    assert not training_set_fits(20 * gib, 40 * gib, "auto", "x")        # stays on the CPU
    assert training_set_fits(20 * gib, 40 * gib, "accelerator", "x")     # asked for, and fits
    with pytest.raises(DataError, match=r"needs 39.0 GiB and the GPU holds 40.0 GiB; use --data_device cpu"):
        training_set_fits(39 * gib, 40 * gib, "accelerator", "image folder /d")


def test_a_data_set_of_fewer_than_five_classes_is_evaluated_with_top_k_of_all_its_classes():
    from accelerate import Accelerator

    from trainer.data import Normalize
    from trainer.evaluation import evaluate_model
    images, labels = torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 1])

    class Fixed(torch.nn.Module):  # class 0 first, then 1, then 2, for every image
        def forward(self, x):
            return torch.tensor([[3.0, 2.0, 1.0]]).expand(len(x), 3)
    totals, confusion, *_ = evaluate_model(Accelerator(cpu=True), Fixed(), [(images, labels)],
                                           Normalize((0.5,) * 3, (0.5,) * 3, 2), 3)
    assert totals[1:].tolist() == [1, 4, 4]  # top-1 hits, "top-5" hits (all 3 classes), images
    assert confusion.tolist() == [[1, 0, 0], [2, 0, 0], [1, 0, 0]]


def test_synthetic_digits_refuses_a_folder_that_is_not_new_and_a_second_target(tmp_path, capsys):
    from trainer.synthetic import main as synthetic
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert synthetic(["--digits", str(tmp_path / "full")]) == 2
    assert synthetic([str(tmp_path / "cifar"), "--digits", str(tmp_path / "new")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --digits {tmp_path / 'full'} exists and is not an empty folder; name a new one",
        "error: give DATA_DIR (generated CIFAR-100) or --digits DIR, one of the two"]
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["mine.txt"] and not (tmp_path / "new").exists()
