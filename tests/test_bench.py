"""The benchmark runs on the CPU with a tiny model and prints its table (it measures; nothing asserts a speed)."""

import json
import subprocess
import sys

from conftest import REPO, child_env


def test_benchmark_prints_raw_and_trainer_rows(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.bench", "--models", "test_vit", "--modes", "eager", "--batch_size", "32",
         "--steps", "3", "--repeats", "2", "--out", str(tmp_path)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| model | path | mode | augment | images/s | ms/step | TFLOP/s | trainer/raw |" in result.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    kinds = [(r["path"], r["mode"], r["augment"]) for r in rows]
    assert kinds == [("raw", "eager", "-"), ("trainer", "eager", "crop_flip"), ("trainer", "eager", "none"),
                     ("trainer", "zero2", "crop_flip"), ("trainer", "zero2, 2 micro-steps", "crop_flip")]
    for row in rows:
        assert "error" not in row, row
        assert row["images_per_s"] > 0 and row["ms_per_step"] > 0 and row["tflops"] > 0
        assert abs(row["images_per_s"] * row["ms_per_step"] / 1000 - 32) < 1e-6  # consistent units
    assert all(r["ratio"] > 0 for r in rows if r["path"] == "trainer")
    assert (tmp_path / "bench.md").read_text().count("| test_vit |") == 5
