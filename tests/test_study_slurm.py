"""The study as a SLURM array (trainer/slurm.py, slurm/study.sbatch), with stand-in sbatch and scontrol: the
submission, each array task's run, a task's requeue after its run saved and stopped, and the report job."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY, child_env, markdown_tables
from trainer.study import main as study_main

SCRIPT = REPO / "slurm" / "study.sbatch"
STUDY = """
defaults: {epochs: 1, warmup_epochs: 0, batch_size: 32}
experiments:
  adamw: {options: {optimizer: adamw}}
  sgdm: {options: {optimizer: sgdm}}
comparisons:
  optimizer: {title: "AdamW vs SGDM", experiments: [adamw, sgdm]}
"""


def stand_ins(folder):
    """sbatch that logs its arguments and answers job ids 101, 102, ...; scontrol that logs its arguments."""
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {folder}/sbatch.log\n'
                                   f'echo $((100 + $(wc -l < {folder}/sbatch.log)))\n')
    (folder / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {folder}/scontrol.log\n')
    for name in ("sbatch", "scontrol"):
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture()
def study_file(tmp_path):
    (tmp_path / "study.yaml").write_text(STUDY)
    return tmp_path / "study.yaml"


@pytest.mark.launches
def test_submit_checks_the_runs_then_submits_an_array_of_one_task_per_run_and_a_report_after_it(
        cifar_dir, study_file, tmp_path):
    bin_dir = stand_ins(tmp_path / "bin")
    save_dir = tmp_path / "study"
    args = ["--study", study_file, "--save_dir", save_dir, "--seeds", "2", *TINY, "--data_dir", cifar_dir]
    result = subprocess.run([sys.executable, "-m", "trainer.study", "--submit", "slurm", *map(str, args)], cwd=REPO,
                            env=child_env(PATH=f"{bin_dir}:{os.environ['PATH']}"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    array, report = (bin_dir / "sbatch.log").read_text().splitlines()
    passed_on = " ".join(map(str, args)) + f" --save_dir {save_dir}"
    assert array == f"--parsable --array=0-3 {SCRIPT} {passed_on}"  # 2 experiments x 2 seeds
    assert report == f"--parsable --dependency=afterany:101 --job-name=study-report {SCRIPT} {passed_on}"
    assert "submitted job array 101 (4 runs" in result.stdout and "report job 102" in result.stdout
    assert not save_dir.exists()  # nothing runs on the login node


@pytest.mark.launches
def test_each_array_task_runs_its_run_a_stopped_one_requeues_and_the_report_job_writes_the_report(
        cifar_dir, study_file, tmp_path):
    bin_dir = stand_ins(tmp_path / "bin")
    save_dir = tmp_path / "study"
    args = ["--study", study_file, "--save_dir", save_dir, *TINY, "--data_dir", cifar_dir]

    def job(*extra, **env):
        return subprocess.run(["bash", str(SCRIPT), *map(str, args), *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=300,
                              env=child_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="555", **env))
    # Task 1's run stops after saving (a launcher that exits 75, as a run at its time limit does): requeued.
    stopped = job("--launcher", f"{sys.executable} -c 'import sys; sys.exit(75)'", SLURM_ARRAY_TASK_ID="1")
    assert stopped.returncode == 75 and (bin_dir / "scontrol.log").read_text() == "requeue 555\n"
    # The requeued task, and task 0: each trains its own run and evaluates it, and writes no report.
    for task in ("1", "0"):
        ran = job(SLURM_ARRAY_TASK_ID=task)
        assert ran.returncode == 0, ran.stderr[-3000:]
        name = ("adamw", "sgdm")[int(task)]
        assert f"study [{int(task) + 1}/2] {name}: starting" in ran.stdout
        assert (save_dir / name / "evaluation" / "predictions.csv").is_file()
        assert not (save_dir / "report").exists()
    again = job(SLURM_ARRAY_TASK_ID="0")  # a task submitted again: its run is complete
    assert again.returncode == 0 and "study [1/2] adamw: skipped, complete" in again.stdout
    reported = job()  # the report job: no array task id
    assert reported.returncode == 0, reported.stderr[-3000:]
    results = markdown_tables((save_dir / "report" / "report.md").read_text())[0]
    assert [r["run"] for r in results] == ["adamw", "sgdm"]


@pytest.mark.parametrize("args, message", [
    (["--task", "7"], "--task 7 is not a run of this study (0 to 1)"),
    (["--submit", "slurm"], "--submit slurm needs sbatch on PATH"),
])
def test_a_bad_task_or_no_sbatch_is_one_line(study_file, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    launcher = ["--launcher", sys.executable]  # no trainer pre-check subprocess for this refusal
    assert study_main(["--study", str(study_file), "--save_dir", str(tmp_path / "study"), *launcher, *args]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {message}"), line


def test_bad_input_is_refused_before_anything_is_submitted(study_file, tmp_path, capsys, monkeypatch):
    bin_dir = stand_ins(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert study_main(["--submit", "slurm", "--study", str(study_file), "--save_dir", str(tmp_path / "study"),
                       "--epochs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --epochs must be at least 1")
    assert not (bin_dir / "sbatch.log").exists()
