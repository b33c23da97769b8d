"""benchmarks/gpu_check.sh --cpu-smoke: the device check's stages run on the CPU with tiny models, so the script
cannot rot between the rare sessions that have a GPU. What needs CUDA is skipped, saying so."""

import subprocess
import sys

import pytest

from conftest import REPO, child_env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=3000,
                            env=child_env(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_WORK=str(out / "work")))
    return result, out


def test_every_stage_runs_and_passes(smoke):
    result, out = smoke
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    for stage in "abcd":
        assert f"stage {stage}: ok" in summary, summary


def test_correctness_checks_pass_and_cuda_only_ones_say_why_they_were_skipped(smoke):
    _, out = smoke
    lines = (out / "a_correctness.txt").read_text().splitlines()
    passed = [line for line in lines if line.startswith("PASS")]
    assert len(passed) == 2 and "resumed from step_2 vs uninterrupted" in passed[0] and "--num_workers 2" in passed[1]
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum("--cuda_graph vs eager (CUDA graphs need CUDA)" in line for line in lines) == 2
    assert "skipped: cuda_graph rows (CUDA graphs need CUDA)" in (out / "log.txt").read_text()


def test_each_benchmark_stage_leaves_its_table_and_few_files(smoke):
    _, out = smoke
    tables = {name: (out / name / "bench.md").read_text() for name in
              ("b_throughput", "b_throughput_cl", "c_zero2", "d_compile")}
    assert tables["b_throughput"].count("| test_vit |") == 3 and tables["b_throughput"].count("| test_nfnet |") == 3
    assert tables["b_throughput_cl"].count("| eager, channels_last |") == 2
    assert "| zero2 |" in tables["c_zero2"] and "| zero2, 2 micro-steps |" in tables["c_zero2"]
    assert tables["d_compile"].count("| test_vit | raw | compile |") == 1  # the smoke compiles test_vit only
    assert tables["d_compile"].count("| test_vit | trainer | compile |") == 1
    assert not any("failed:" in table for table in tables.values())
    # The device returns at most 8 files from $OUT (its tool's limit); the work folder is removed at the end.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
