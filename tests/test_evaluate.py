"""python -m trainer.evaluate: a checkpoint's or an exported folder's numbers on the test set, per class too."""

import csv
import json
import struct
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, TINY, accelerate_launch, child_env, free_port, fresh_accelerate_state, read_jsonl,
                      train_here)
from trainer.data import read_split
from trainer.export import main as export_main

EVALUATE = str(REPO / "trainer" / "evaluate.py")


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_run")
    train_here(TINY + ["--data_dir", cifar_dir, "--epochs", 2, "--batch_size", 64, "--save_dir", root])
    return root


def evaluate(*args, processes=1, env=None):
    if processes > 1:
        return accelerate_launch(["--config_file", REPO / "accelerate_configs" / "cpu_multi.yaml", "--num_processes",
                                  processes, "--main_process_port", free_port(), EVALUATE, "--device", "cpu", *args],
                                 env=env)
    return subprocess.run([sys.executable, EVALUATE, *map(str, args)], cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=300)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.launches
def test_a_checkpoint_gives_its_runs_final_metrics_per_class_csv_and_confusion_png(run, cifar_dir, tmp_path,
                                                                                    processes):
    out = tmp_path / "eval"
    result = evaluate(run / "epoch_2", "--out", out, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    final = read_jsonl(run / "metrics.jsonl")[-1]
    got = json.loads((out / "metrics.json").read_text())
    assert got["processes"] == processes
    assert got["val_images"] == final["val_images"] == 201  # each test image once, also when sharded
    assert got["val_acc1"] == final["val_acc1"] and got["val_acc5"] == final["val_acc5"]
    assert got["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)  # summed in another order on 2 processes

    test = read_split(cifar_dir / "cifar-100-python" / "test")
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [int(r["class"]) for r in rows] == list(range(100))
    assert [int(r["images"]) for r in rows] == torch.bincount(test.labels, minlength=100).tolist()
    assert sum(int(r["correct"]) for r in rows) == round(final["val_acc1"] * 201 / 100)
    # The generated data's superclass of fine class c is c // 5 (its test pickle's coarse_labels).
    assert [r["superclass"] for r in rows[:10]] == [str(c // 5) for c in range(10)]
    width, height = png_size(out / "confusion.png")
    assert 600 <= width <= 2000 and 600 <= height <= 2000
    # Each image's label and top-1 class in the test set's order, also when the test set was sharded: the same
    # as the checkpoint's model predicts for each image in this process.
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    assert [int(r["image"]) for r in predictions] == list(range(201))
    assert [int(r["label"]) for r in predictions] == test.labels.tolist()
    assert [int(r["prediction"]) for r in predictions] == predicted_here(run / "epoch_2", test)
    assert sum(r["label"] == r["prediction"] for r in predictions) == sum(int(r["correct"]) for r in rows)


def predicted_here(folder, test) -> list[int]:
    from trainer.checkpoint import load_checkpoint_model
    from trainer.data import Normalize
    from trainer.records import read_run_config
    fresh_accelerate_state()
    model, _ = load_checkpoint_model(folder, ema=False)
    resolved = read_run_config(folder.parent)["resolved"]
    normalize = Normalize(resolved["normalize_mean"], resolved["normalize_std"], 32)
    with torch.no_grad():
        return model.eval()(normalize(test.images).float()).argmax(dim=1).tolist()


@pytest.mark.launches
def test_an_exported_folder_and_its_local_dir_name_give_the_same_numbers(run, tmp_path):
    assert export_main([str(run / "epoch_2"), "--out", str(tmp_path / "exported")]) == 0
    final = read_jsonl(run / "metrics.jsonl")[-1]
    for source in (tmp_path / "exported", f"local-dir:{tmp_path / 'exported'}"):
        result = evaluate(source, "--data_dir", json.loads((run / "config.json").read_text())["options"]["data_dir"],
                          "--eval_batch_size", 50, "--out", tmp_path / "eval")
        assert result.returncode == 0, result.stderr[-3000:]
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["val_acc1"] == final["val_acc1"] and got["val_acc5"] == final["val_acc5"]
        assert got["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)


@pytest.mark.launches
def test_a_source_that_is_no_model_or_cannot_be_downloaded_is_one_line(tmp_path):
    for source, says, env in ((tmp_path / "nothing_here", "nothing_here", {}),
                              ("hf-hub:someone/cifar100-nothing", "cannot be reached",
                               {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})):  # nothing listens there
        result = evaluate(source, "--out", tmp_path / "eval", env=child_env(**env))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    """The trainer's own --device check (runtime.runs_on_cpu), in this process."""
    from trainer.evaluate import main as evaluate_main
    assert evaluate_main(["local-dir:" + str(tmp_path), "--out", str(tmp_path / "eval"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("error: --device cuda was asked for but no CUDA GPU is visible; use --device "
                                       "cpu or auto\n")
    assert not (tmp_path / "eval").exists()


def test_evaluation_counts_every_image_once_in_its_totals_and_confusion_matrix():
    # The counts are accumulated on the device without a host sync per batch (evaluation.py); this checks they are
    # still the plain counts: batches of 7, 7 and 3 images, a model whose logits are fixed per image.
    from accelerate import Accelerator

    from trainer.data import NUM_CLASSES, Normalize
    from trainer.evaluation import evaluate_model
    fresh_accelerate_state()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (17,), generator=generator)
    logits = torch.randn(17, NUM_CLASSES, generator=generator)
    logits[:9, :] -= 100
    logits[torch.arange(9), labels[:9]] = 100  # the first 9 right, the others mostly wrong
    images = torch.arange(17, dtype=torch.uint8)[:, None, None, None].expand(17, 3, 2, 2).contiguous()

    class Lookup(torch.nn.Module):  # the logits of image i, read from its pixel value (undone normalisation)
        def forward(self, x):
            return logits[(x[:, 0, 0, 0] * 0.5 + 0.5).mul(255).round().long()]

    loader = [(images[i:i + 7], labels[i:i + 7]) for i in range(0, 17, 7)]
    totals, confusion, no_labels, no_predictions = evaluate_model(Accelerator(cpu=True), Lookup(), loader,
                                                                   Normalize((0.5,) * 3, (0.5,) * 3, 2), NUM_CLASSES)
    assert no_labels is None and no_predictions is None  # per image only when asked
    per_image = evaluate_model(Accelerator(cpu=True), Lookup(), loader, Normalize((0.5,) * 3, (0.5,) * 3, 2),
                               NUM_CLASSES, per_image=True)
    predicted = logits.argmax(dim=1)
    assert torch.equal(per_image.labels, labels) and torch.equal(per_image.predictions, predicted)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()
    assert totals.tolist() == pytest.approx([loss.item(), (predicted == labels).sum().item(), top5.item(), 17])
    expected = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for true, guess in zip(labels.tolist(), predicted.tolist()):
        expected[true, guess] += 1
    assert torch.equal(confusion, expected)
