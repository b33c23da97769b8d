"""The benchmark runs on the CPU with a tiny model and prints its table (it measures; nothing asserts a speed)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, child_env
from trainer import bench
from trainer.config import TrainConfig


@pytest.mark.launches
def test_benchmark_prints_raw_and_trainer_rows(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.bench", "--models", "test_vit", "--modes", "eager", "--batch_size", "32",
         "--steps", "3", "--repeats", "2", "--no-zero2", "--out", str(tmp_path)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    # The ZeRO-2 rows are left to tests/test_gpu_check.py, whose CPU smoke measures them (stage c).
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model | path | mode | augment | images/s | ms/step | TFLOP/s | trainer/raw |" in result.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    kinds = [(r["path"], r["mode"], r["augment"]) for r in rows]
    assert kinds == [("raw", "eager", "-"), ("trainer", "eager", "crop_flip"), ("trainer", "eager", "none")]
    for row in rows:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["tflops"] > 0
        assert abs(row["images_per_s"] * row["ms_per_step"] / 1000 - 32) < 1e-6  # consistent units
    assert all(r["ratio"] > 0 for r in rows if r["path"] == "trainer")
    assert (tmp_path / "bench.md").read_text().count("| test_vit |") == 3
    assert [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()] == rows


@pytest.mark.launches
def test_each_row_is_on_disk_as_soon_as_it_is_measured(tmp_path):
    # A time limit that stops the run (gpu_check.sh's timeouts) must not lose the rows measured before it.
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.bench", "--models", "test_vit", "--modes", "eager", "--batch_size", "32",
         "--steps", "3", "--repeats", "2", "--no-zero2", "--channels_last", "--out", str(tmp_path)],
        cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows_file = tmp_path / "bench.jsonl"
    try:
        while process.poll() is None and not (rows_file.is_file() and rows_file.read_text().strip()):
            time.sleep(0.05)
        running = process.poll() is None
    finally:
        process.kill()
        process.wait()
    assert running, "the first row reached the disk only when the run ended"
    first = json.loads(rows_file.read_text().splitlines()[0])
    assert (first["path"], first["mode"], first["channels_last"]) == ("raw", "eager", True)
    markdown = (tmp_path / "bench.md").read_text()
    assert "channels_last" in markdown.splitlines()[0]  # the header, written first
    assert "| test_vit | raw | eager, channels_last | - |" in markdown


@pytest.mark.launches
def test_channels_last_puts_the_weights_in_that_layout(monkeypatch, cifar_dir, tmp_path):
    made = []
    create_model = bench.create_model
    monkeypatch.setattr(bench, "create_model", lambda config: made.append(create_model(config)) or made[-1])
    config = TrainConfig(model="test_nfnet", pretrained=False, batch_size=8, image_size=32, data_dir=str(cifar_dir),
                         save_dir=str(tmp_path), epochs=1000, warmup_epochs=0, progress=False, augment="none")
    bench.raw_step_time(config, "eager", torch.device("cpu"), steps=1, repeats=1, channels_last=True)
    # Kernels wider than 1x1 (a 1x1 kernel's weight is contiguous in both layouts).
    convs = [m.weight for m in made[-1].modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)

    from trainer.loop import Trainer
    layouts = []
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: layouts.append(
        [m.weight.is_contiguous(memory_format=torch.channels_last) for m in self.plain_model.modules()
         if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]))
    bench.trainer_step_time(config, steps=1, repeats=1, channels_last=True)
    assert layouts and all(all(epoch) and epoch for epoch in layouts)


def test_raw_and_trainer_rows_run_with_the_same_cudnn_autotuning(monkeypatch, tmp_path):
    # The trainer turns cudnn.benchmark on globally when it is built on a GPU; a benchmark that left it off for the
    # rows measured before the first trainer would compare raw rows without autotuning against trainer rows with it.
    seen = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(bench, "train_flops_per_image", lambda config, device: 1.0)
    monkeypatch.setattr(bench, "raw_step_time", lambda *a, **k: seen.append(("raw", torch.backends.cudnn.benchmark))
                        or 1.0)
    monkeypatch.setattr(bench, "trainer_step_time",
                        lambda *a, **k: seen.append(("trainer", torch.backends.cudnn.benchmark)) or 1.0)
    bench.run(["test_vit"], ["eager"], ["none"], batch_size=8, steps=1, repeats=1, zero2=False, workdir=tmp_path)
    assert seen == [("raw", True), ("trainer", True)]


def test_compile_rows_use_the_backend_asked_for(monkeypatch, tmp_path):
    """--compile_backend reaches the raw row's torch.compile and the trainer row's config (the CPU smoke of
    benchmarks/gpu_check.sh asks for aot_eager)."""
    backends = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **options: backends.append(("raw", options["backend"]))
                        or compile_(model, **options))
    monkeypatch.setattr(bench, "train_flops_per_image", lambda config, device: 1.0)
    monkeypatch.setattr(bench, "time_steps", lambda step, steps, repeats, device: 1.0)  # compiled, never run
    monkeypatch.setattr(bench, "trainer_step_time",
                        lambda config, *a, **k: backends.append(("trainer", config.compile_backend)) or 1.0)
    bench.run(["test_vit"], ["compile"], ["none"], batch_size=8, steps=1, repeats=1, zero2=False, workdir=tmp_path,
              compile_backend="aot_eager")
    assert backends == [("raw", "aot_eager"), ("trainer", "aot_eager")]
