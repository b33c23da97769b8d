"""Export as a timm model folder: what timm's save_for_hf writes, loaded back by timm in a fresh process."""

import json
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from conftest import REPO, TINY, child_env, free_port, load_weights, run_trainer, launching
from trainer import checkpoint
from trainer.data import CIFAR100_CLASSES, read_class_names
from trainer.export import main as export_main

EPOCHS = 2


@pytest.fixture(scope="module")
@launching
def run(cifar_dir, tmp_path_factory):
    """A DDP run on 2 CPU processes with an EMA that differs from the weights (decay 0.5)."""
    root = tmp_path_factory.mktemp("export_run")
    run_trainer(TINY + ["--data_dir", cifar_dir, "--epochs", EPOCHS, "--batch_size", 64, "--model_ema",
                        "--model_ema_decay", 0.5, "--save_dir", root], processes=2)
    return root


def export(*args):
    return subprocess.run([sys.executable, "-m", "trainer.export", *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def one_line_error(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Run in a fresh process: timm alone, given only the folder, builds the model and its preprocessing.
LOAD = """
import json, sys, timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
cfg = timm.data.resolve_data_config({}, model=model)
images = torch.load(sys.argv[2])
x = (images.float() / 255 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
print(json.dumps({"num_classes": model.num_classes, "input_size": list(cfg["input_size"]),
                  "label_names": list(model.pretrained_cfg["label_names"])}))
"""


def checkpoint_logits(folder, weights_file, images):
    """The trainer's model: rebuilt from the manifest, normalised as config.json says the run did."""
    info = checkpoint.read_manifest(folder)
    model = timm.create_model(info["timm_model"], num_classes=100, **info["model_kwargs"]).eval()
    model.load_state_dict(load_weights(folder / weights_file))
    resolved = json.loads((folder.parent / "config.json").read_text())["resolved"]
    mean, std = (torch.tensor(resolved[k]).view(1, 3, 1, 1) for k in ("normalize_mean", "normalize_std"))
    with torch.no_grad():
        return model((images.float() / 255 - mean) / std)


@pytest.mark.parametrize("ema", [False, True])
def test_timm_loads_the_export_in_a_fresh_process_with_the_trained_logits_and_cifar_labels(run, cifar_dir, tmp_path,
                                                                                          ema):
    folder = run / f"epoch_{EPOCHS}"
    out = tmp_path / "exported"
    result = export(folder, "--out", out, *(["--ema"] if ema else []))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.save(images, tmp_path / "images.pt")
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "images.pt"),
                             str(tmp_path / "logits.pt")], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["num_classes"] == 100 and info["input_size"] == [3, 32, 32]
    # The run's data folder is still there: its own meta pickle names the classes.
    assert info["label_names"] == read_class_names(cifar_dir / "cifar-100-python" / "meta")
    weights = checkpoint.MODEL_EMA_FILE if ema else checkpoint.MODEL_FILE
    expected = checkpoint_logits(folder, weights, images)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
    other = checkpoint_logits(folder, checkpoint.MODEL_FILE if ema else checkpoint.MODEL_EMA_FILE, images)
    assert not torch.allclose(other, expected, rtol=1e-3, atol=1e-3)  # --ema chose the other weights

    card = (out / "README.md").read_text()
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    key = "val_acc1_ema" if ema else "val_acc1"
    assert f"val_acc1: {final[key]}" in card and "learning_rate: 0.002" in card
    assert ("EMA" in card) == ema


def test_label_names_come_from_the_checkpoint_and_for_older_ones_fall_back_to_cifar100s(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / f"epoch_{EPOCHS}", copy / f"epoch_{EPOCHS}")
    config = json.loads((run / "config.json").read_text())
    config["options"]["data_dir"] = str(tmp_path / "moved")  # the run's data is gone
    (copy / "config.json").write_text(json.dumps(config))
    assert export_main([str(copy / f"epoch_{EPOCHS}"), "--out", str(tmp_path / "out")]) == 0
    names = json.loads((tmp_path / "out" / "config.json").read_text())["label_names"]
    assert names == [f"class_{i}" for i in range(100)]  # the generated data's names, recorded in the checkpoint
    # A checkpoint from before the class names were recorded (always CIFAR-100), its data gone: CIFAR-100's names.
    manifest = copy / f"epoch_{EPOCHS}" / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "class_names"}))
    assert export_main([str(copy / f"epoch_{EPOCHS}"), "--out", str(tmp_path / "out_old")]) == 0
    names = json.loads((tmp_path / "out_old" / "config.json").read_text())["label_names"]
    assert names == list(CIFAR100_CLASSES) and names[0] == "apple" and names[99] == "worm" and len(set(names)) == 100


def test_out_that_is_a_file_inside_a_checkpoint_or_a_foreign_folder_is_refused_in_one_line(run, tmp_path, capsys):
    # In this process (main's return value is the exit status): six exports need no six interpreters.
    def export(*args):
        status = export_main([str(a) for a in args])
        return subprocess.CompletedProcess(args, status, *capsys.readouterr())

    folder = run / f"epoch_{EPOCHS}"
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    for out, says in ((tmp_path / "file", "is a file"), (folder / "state", "lies inside the checkpoint"),
                      (folder / "new", "lies inside the checkpoint"),
                      (tmp_path / "foreign", "holds other files than a previous export")):
        assert says in one_line_error(export(folder, "--out", out))
    checkpoint.verify(folder)  # untouched
    assert not (folder / "new").exists() and (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    # A previous export is replaced.
    assert export(folder, "--out", tmp_path / "again").returncode == 0
    assert export(folder, "--out", tmp_path / "again").returncode == 0


def test_push_to_hub_without_network_stops_in_one_line_before_writing(run, tmp_path):
    folder = run / f"epoch_{EPOCHS}"
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "trainer.export", str(folder), "--out", str(tmp_path / "out"),
                             "--push_to_hub", "someone/cifar100-test-vit"], cwd=REPO,
                            # HF_HUB_OFFLINE=0: many clusters set it to 1, which makes the hub client report offline
                            # mode instead of the unreachable address (the second case below).
                            env=child_env(HF_ENDPOINT=unreachable, HF_HUB_OFFLINE="0"), capture_output=True, text=True,
                            timeout=120)
    assert "cannot be reached" in one_line_error(result)
    offline = subprocess.run([sys.executable, "-m", "trainer.export", str(folder), "--out", str(tmp_path / "out"),
                              "--push_to_hub", "someone/cifar100-test-vit"], cwd=REPO,
                             env=child_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert "HF_HUB_OFFLINE" in one_line_error(offline)
    assert not (tmp_path / "out").exists()
