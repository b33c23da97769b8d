"""benchmarks/gpu_check.sh --cpu-smoke: the device check's stages run on the CPU with tiny models, so the script
cannot rot between the rare sessions that have a GPU. What needs CUDA is skipped, saying so."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, child_env, launching


def stand_ins(root, small_folder):
    """A junk wheel (its install fails) and a `df` that reports 1 MB free in `small_folder`: the two ways the check
    failed on its own before (every stage then failed to import `trainer`; every save failed in a small /dev/shm)."""
    wheels, bin_ = root / "wheels", root / "bin"
    wheels.mkdir()
    (wheels / "junk-1.0-py3-none-any.whl").write_text("not a wheel")
    bin_.mkdir()
    real_df = shutil.which("df")
    (bin_ / "df").write_text(f"""#!/bin/sh
for last; do :; done
if [ "$last" = "{small_folder}" ]; then
  echo "Filesystem 1024-blocks Used Available Capacity Mounted on"; echo "tmpfs 1024 0 1024 0% $last"
else exec {real_df} "$@"; fi
""")
    (bin_ / "df").chmod(0o755)
    return dict(GPU_CHECK_WHEELS=str(wheels), PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
                GPU_CHECK_WORK=str(small_folder))


@pytest.fixture(scope="module")
@launching
def smoke(tmp_path_factory):
    """The smoke as two device commands would run it, `--stage a,b` then `--stage c,e,d`: every stage once, and each
    command runs only the stages it names (d last: it takes what time is left). {"ab": (result, out), "ced": ...},
    and the folder reported too small."""
    root = tmp_path_factory.mktemp("stand_ins")
    env = stand_ins(root, root / "small")
    runs = {}
    for stages in ("ab", "ced"):
        out = tmp_path_factory.mktemp(f"gpu_check_{stages}")
        runs[stages] = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", "--stage", ",".join(stages)],
                                      cwd=REPO, capture_output=True, text=True, timeout=3000,
                                      env=child_env(OUT=str(out), PYTHON=sys.executable, **env)), out
    return runs, root / "small"


def test_every_stage_runs_and_passes_in_the_command_that_names_it_only(smoke):
    runs, _ = smoke
    for stages, (result, out) in runs.items():
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
        ran = [line for line in (out / "summary.txt").read_text().splitlines() if line.startswith("stage ")]
        assert [line[:len("stage a: ok")] for line in ran] == [f"stage {s}: ok" for s in stages], ran


@pytest.mark.launches
def test_a_bad_stage_is_one_line(tmp_path):
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--stage", "f"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=child_env(OUT=str(tmp_path / "bad")))
    assert (bad.returncode, bad.stderr) == (2, "error: --stage takes stages a-e, comma-separated (got 'f')\n")


def test_the_preamble_says_what_decides_whether_it_can_run_and_it_runs_despite_bad_wheels_and_a_small_folder(smoke):
    runs, small = smoke
    _, out = runs["ab"]
    summary = (out / "summary.txt").read_text()
    assert "Name: torch\tVersion: " in summary and "Name: timm\tVersion: " in summary  # pip show
    assert "Filesystem" in summary and "nvidia-smi" not in summary.split("Filesystem")[0]  # df before the rest
    assert f"work folder: {small} has 1 MB free, under the 200 MB needed; passed over" in summary
    (chosen,) = [line for line in summary.splitlines() if line.startswith("work folder: /") and "passed" not in line]
    assert not chosen.startswith(f"work folder: {small}"), chosen
    assert "wheels: could not install those of" in summary
    assert f"trainer from {REPO}" in summary  # the repository's trainer, first on the path
    assert any(line.split(":")[0] == f"PYTHONPATH={REPO}" for line in summary.splitlines()), summary


def test_correctness_checks_pass_and_cuda_only_ones_say_why_they_were_skipped(smoke):
    runs, _ = smoke
    (_, out), (_, out_cd) = runs["ab"], runs["ced"]
    lines = (out / "a_correctness.txt").read_text().splitlines()
    passed = [line for line in lines if line.startswith("PASS")]
    assert len(passed) == 2 and "resumed from step_2 vs uninterrupted" in passed[0] and "--num_workers 2" in passed[1]
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum("--cuda_graph vs eager (CUDA graphs need CUDA)" in line for line in lines) == 2
    assert "skipped: cuda_graph rows (CUDA graphs need CUDA)" in (out / "log.txt").read_text()
    assert "skipped: evaluation's synchronising calls (CUDA's sync debug mode needs CUDA)" in lines
    assert (out_cd / "c_zero2_ema.txt").read_text().splitlines()[-1].startswith(
        "PASS test_vit: ZeRO-2 with --model_ema, 1 epoch, the EMA evaluated")
    # Stage e: FSDP against the plain trainer, an FSDP checkpoint finished without FSDP, a ZeRO-2 one under FSDP.
    fsdp = [line for line in (out_cd / "e_fsdp.txt").read_text().splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[1].strip() for line in fsdp] == [
        "FSDP2 (fsdp.yaml, 1 process) vs the plain trainer, per-step losses",
        "FSDP run finished by the plain trainer from epoch 1 vs the FSDP run, steps after 4",
        "ZeRO-2 run finished under FSDP from epoch 1 vs the ZeRO-2 run, steps after 4"]
    assert all(line.startswith("PASS") for line in fsdp), fsdp


def test_each_benchmark_stage_leaves_its_table_and_few_files(smoke):
    runs, _ = smoke
    (_, out_ab), (_, out_cd) = runs["ab"], runs["ced"]
    tables = {name: (out / name / "bench.md").read_text() for out, names in
              ((out_ab, ("b_throughput", "b_throughput_cl")), (out_cd, ("c_zero2", "e_fsdp", "d_compile")))
              for name in names}
    assert tables["b_throughput"].count("| test_vit |") == 3 and tables["b_throughput"].count("| test_nfnet |") == 3
    assert tables["b_throughput_cl"].count("| eager, channels_last |") == 2
    assert "| zero2 |" in tables["c_zero2"] and "| zero2, 2 micro-steps |" in tables["c_zero2"]
    assert "| test_vit | trainer | fsdp | crop_flip |" in tables["e_fsdp"]
    assert tables["d_compile"].count("| test_vit | raw | compile |") == 1  # the smoke compiles test_vit only
    assert tables["d_compile"].count("| test_vit | trainer | compile |") == 1
    assert "compile backend aot_eager" in tables["d_compile"].splitlines()[0]  # inductor: on the GPU only
    assert not any("failed:" in table for table in tables.values())
    # The device returns at most 8 files from $OUT (its tool's limit); the work folder is removed at the end.
    for out in (out_ab, out_cd):
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) <= 8, files
