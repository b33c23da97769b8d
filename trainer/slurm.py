"""A study submitted to SLURM as one array job (a task per run) and a report job that waits for it.

    python -m trainer.study --submit slurm --seeds 3 --save_dir runs/study

Each array task runs `python -m trainer.study --task $SLURM_ARRAY_TASK_ID` with the submission's arguments
(slurm/study.sbatch): one run and its evaluation, saved and requeued when preempted or at its time limit (the
trainer reads the job's end time), as slurm/train.sbatch does for one run. The report job runs the same script
without a task: `--report_only` once every task has ended (`afterany`: a failed run is reported as unfinished,
not a lost report). Submitting again submits the same array: complete runs end at once.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import UserError

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "study.sbatch"


class SubmitError(UserError):
    """A submission that cannot be made (see UserError)."""


def sbatch(args: list[str]) -> str:
    """The job id of `sbatch --parsable ARGS`."""
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise SubmitError(f"sbatch failed with exit status {result.returncode}: {said}")
    return result.stdout.strip().split(";")[0]  # --parsable prints jobid[;cluster]


def submit(runs: int, study_args: list[str]) -> tuple[str, str]:
    """Submit the array of `runs` tasks and the report job; return their job ids."""
    if shutil.which("sbatch") is None:
        raise SubmitError("--submit slurm needs sbatch on PATH (run it on a SLURM login node)")
    if not SCRIPT.is_file():
        raise SubmitError(f"--submit slurm needs the repository's {SCRIPT}")
    array = sbatch([f"--array=0-{runs - 1}", str(SCRIPT), *study_args])
    report = sbatch([f"--dependency=afterany:{array}", "--job-name=study-report", str(SCRIPT), *study_args])
    return array, report
