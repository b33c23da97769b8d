"""Run a study: its experiments one after another, each into `{save_dir}/{experiment}/`, then its report.

    python -m trainer.study                                   # the reference study, one process, runs/study/
    ./launch.sh study --save_dir runs/study --processes 8     # the same, DDP over 8 GPUs of this machine
    python -m trainer.study --study my_study.yaml --launcher "./launch.sh --strategy zero2"
    python -m trainer.study --submit slurm --seeds 3          # a SLURM job array, a task per run (trainer/slurm.py)
    python -m trainer.study --save_dir /tmp/smoke --epochs 1 --warmup_epochs 0 --model test_vit \\
        --no-pretrained --data_dir /tmp/fake_cifar          # a CPU smoke test of the whole pipeline
    python -m trainer.study --data imagefolder:/data/pets --model resnet18  # the study's recipes on your own data

With `--seeds N` (or `seeds: N` in the study file) every experiment runs N times, with seeds --seed, --seed + 1,
..., into `{save_dir}/{experiment}/seed_{seed}/`, and the report shows each experiment's mean and spread and, for
each comparison of the study file, the difference with a 95 % interval and McNemar's test (trainer/stats.py).

Every argument that is not one of the options below is a trainer option (`python trainer/main.py --help`)
given to every run after the study file's values, so it wins over them: `--model test_vit` replaces the
model of all experiments. Run it again with the same arguments after an interruption: a complete run (its
last epoch in metrics.jsonl and its `epoch_N/` checkpoint on disk) is skipped, any other is started, or
resumed with `--resume auto` from its newest valid checkpoint. A run folder started with other values of
the study file's settings (say `--epochs 1` then 25) stops the study instead of being mixed with them. Before the
first run starts, every run still to do is checked as the trainer checks it before training (options, data, model
and weights; not with --launcher, which may run another program): bad input stops the study in one line, exit 2,
with nothing written.

Each run's output is shown and appended to `{save_dir}/{experiment}/train.log`. A run that completes has its
final checkpoint evaluated by `python -m trainer.evaluate` (one process; output in the same log) into
`{save_dir}/{experiment}/evaluation/`: per-class accuracy and the confusion figure. A complete run that is skipped
is evaluated when that folder lacks its metrics.json. The report is written to `{save_dir}/report/` (see
trainer/report.py, which reads the study file through load_study here).

Exit status: 0 done; 2 bad input (one line on stderr); 1 a run or its evaluation failed (named, with its log);
75 a run stopped after saving a checkpoint (a preemption signal or its time limit; run the same command again to
resume it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import yaml

from .checkpoint import final_checkpoint, has_checkpoint
from .config import (PREEMPTED_EXIT_CODE, ConfigError, OneLineArgumentParser, TrainConfig, check_writable_folder,
                     data_source, parse_config, typed_value)
from .errors import UserError, run_command
from .records import CONFIG_FILE, METRICS_FILE, read_lines, read_run_config
from .time_limit import parse_duration

DEFAULT_STUDY = Path(__file__).with_name("study.yaml")
EVALUATION_DIR = "evaluation"  # a run's trainer.evaluate output, which the runner writes and the report shows

LOG_FILE = "train.log"
# trainer/data/cifar.py's folders and files, written out: importing trainer.data imports torch.
CIFAR_FILES = {
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
    "cifar10": ("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
}
# The runner sets these for every run itself; from the command line they would fight it.
RESERVED = {"--checkpoint": "the runner resumes with --resume auto itself",
            "--resume": "the runner resumes with --resume auto itself",
            "--overwrite": "delete a run's folder to start that run again",
            "--config": "put shared options in the study file's `defaults` instead"}


class StudyError(UserError, ValueError):
    """A study the user can fix (see UserError)."""


# --- the study file -----------------------------------------------------------------------------

@dataclasses.dataclass
class Study:
    path: Path
    defaults: dict             # trainer options of every experiment
    experiments: dict          # name -> {"options": {...}, "reference": {...}}
    comparisons: dict          # name -> {"title": str, "experiments": [names]}
    seeds: int = 1             # runs per experiment, with seeds seed, seed + 1, ...

    def settings(self, name: str) -> dict:
        """The trainer options of experiment `name`: the defaults, then its own."""
        return {**self.defaults, **self.experiments[name]["options"]}


def load_study(path) -> Study:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise StudyError(f"study file {path}: {str(error).splitlines()[0]}") from None

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise StudyError(f"study file {path}: {message}")

    need(isinstance(raw, dict) and isinstance(raw.get("experiments"), dict) and raw["experiments"],
         "needs a mapping `experiments` of at least one experiment")
    defaults, experiments = raw.get("defaults") or {}, raw["experiments"]
    comparisons = raw.get("comparisons") or {}
    seeds = raw.get("seeds", 1)
    need(isinstance(defaults, dict), "`defaults` must be a mapping of trainer options")
    need(isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1,
         f"`seeds` must be a whole number of runs per experiment, at least 1 (got {seeds!r})")
    for name, experiment in experiments.items():
        need(isinstance(name, str) and "/" not in name and not name.startswith("."),
             f"experiment name {name!r} is not a folder name")
        need(isinstance(experiment, dict) and isinstance(experiment.get("options"), dict)
             and set(experiment) <= {"options", "reference"},
             f"{name}: needs a mapping `options` of trainer options, and optionally `reference`")
        reference = experiment["reference"] = experiment.get("reference") or {}
        need(set(reference) <= {"train_loss", "val_acc1"}, f"{name}: `reference` holds train_loss and val_acc1")
    hints = typing.get_type_hints(TrainConfig)
    for where, options in [("defaults", defaults)] + [(n, e["options"]) for n, e in experiments.items()]:
        unknown = sorted(set(options) - set(hints))
        need(not unknown, f"{where}: unknown trainer option(s) {', '.join(unknown)}")
        for key, value in options.items():
            # Values become command-line arguments, which have no spelling for null or for lists.
            need(isinstance(value, (str, int, float, bool)), f"{where}: {key} must be a string, number or boolean")
            # The type the trainer's --config files must have too (`epochs: 1.9` must not become 1); YAML's
            # `5e-4` string becomes the number, which the report compares with the runs' numbers.
            try:
                options[key] = typed_value(key, value)
            except ConfigError as error:
                need(False, f"{where}: {error}")
    for name, comparison in comparisons.items():
        names = (comparison or {}).get("experiments")
        need(isinstance(names, list) and set(names) <= set(experiments),
             f"comparison {name}: `experiments` must list experiments of this file")
    return Study(path, defaults, experiments, comparisons, seeds)


def to_args(options: dict) -> list[str]:
    """Trainer command-line arguments for a mapping of options (booleans as --x / --no-x)."""
    args = []
    for key, value in options.items():
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", str(value)]
    return args


def check_overrides(overrides: list[str]) -> None:
    """One clear line for a mistyped option now, not argparse's usage block after hours of earlier runs."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for arg in overrides:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag in RESERVED:
            raise StudyError(f"{flag} cannot be given to a study: {RESERVED[flag]}")
        name = flag[2:].replace("-", "_")
        if name not in known and not (name.startswith("no_") and name[3:] in known):
            raise StudyError(f"{flag} is neither a study option (--study, --save_dir, --processes, --launcher) "
                             f"nor a trainer option (python trainer/main.py --help)")


def launcher(args) -> list[str]:
    """The command that runs one training run; the run's options are appended to it."""
    if args.launcher:
        try:
            command = shlex.split(args.launcher)
        except ValueError as error:  # an unclosed quote
            raise StudyError(f"--launcher {args.launcher!r} does not parse as a command ({error})") from None
        if not command or shutil.which(command[0]) is None:  # found out now, not after the first run's log
            raise StudyError(f"--launcher {args.launcher!r}: {command[0] if command else 'no command'} is not a "
                             f"program that can be run (not on PATH, or not executable)")
        return command
    if args.processes == 1:
        return [sys.executable, str(Path(__file__).with_name("main.py"))]
    # launch.sh picks the accelerate config for the GPUs it finds (or the CPU one); a bare `accelerate
    # launch` would set mixed precision to `no`, which the trainer would follow on GPUs.
    launch_sh = Path(__file__).resolve().parent.parent / "launch.sh"
    if not launch_sh.is_file():
        raise StudyError(f"--processes needs the repository's launch.sh ({launch_sh} is missing); use --launcher")
    return ["env", f"NPROC_PER_NODE={args.processes}", str(launch_sh), "--strategy", "ddp"]


def check_same_settings(run_dir: Path, config: TrainConfig, keys) -> None:
    """Stop when the folder holds a run started with other values of the study's settings."""
    try:
        previous = read_run_config(run_dir)
    except ValueError as error:
        raise StudyError(f"{error}; restore it from a copy, or delete that run's folder to start it again") from None
    if previous is None:
        return
    if not isinstance(previous.get("options", {}), dict):
        raise StudyError(f"{run_dir / CONFIG_FILE} does not hold a run's options; restore it from a copy, or delete "
                         f"that run's folder to start it again")
    previous = previous.get("options", {})
    changed = [f"{k} {previous.get(k)} -> {getattr(config, k)}" for k in keys if previous.get(k) != getattr(config, k)]
    if changed:
        raise StudyError(f"{run_dir} holds a run started with other settings ({', '.join(changed)}); "
                         f"use another --save_dir, or delete that folder to start it again")


def check_data(config: TrainConfig) -> None:
    """A run that would stop on missing CIFAR data stops the study now, before any run folder or log is written
    (an image folder's or a Hugging Face data set's absence is refused by parse_config; their content is read by
    check_runs)."""
    kind, _ = data_source(config.data)
    if kind not in CIFAR_FILES:
        return
    folder_name, files = CIFAR_FILES[kind]
    folder = Path(config.data_dir) / folder_name
    missing = [name for name in files if not (folder / name).is_file()]
    title = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10"}[kind]
    if missing and not config.download:
        raise StudyError(f"{title} not found in {config.data_dir} ({folder / missing[0]} is missing) and "
                         f"--no-download is set; fix --data_dir or allow the download")
    if missing:
        check_writable_folder(config.data_dir, "--data_dir")  # where the first run will download it


def is_complete(run_dir: Path, epochs: int) -> bool:
    try:
        lines = read_lines(run_dir / METRICS_FILE)
    except ValueError as error:  # a damaged line: named in one line
        raise StudyError(str(error)) from None
    return (any(m.get("epoch") == epochs for m in lines)
            and final_checkpoint(run_dir, epochs) is not None)


def run_logged(cmd: list[str], log: Path) -> int:
    """Run cmd, showing its output and appending it to log; pass preemption signals on to it."""
    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    with open(log, "ab") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        # A scheduler that stops this runner must reach the trainer, which then saves before it exits.
        previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum)) for s in forwarded}
        try:
            # Bytes as they come, so progress bars that redraw with \r stay live.
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                f.write(chunk)
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def evaluate_run(head: str, run_dir: Path, epochs: int) -> bool:
    """Evaluate the run's final checkpoint into run_dir/evaluation/; False (after one line) when that fails.
    A subprocess in one process, as the runs are subprocesses: the runner itself never imports torch."""
    out, final = run_dir / EVALUATION_DIR, final_checkpoint(run_dir, epochs)
    print(f"{head}: evaluating {final.name} into {out}", flush=True)
    # By path, as the runs start main.py: it works from any folder the study is started in.
    cmd = [sys.executable, str(Path(__file__).with_name("evaluate.py")), str(final), "--out", str(out)]
    status = run_logged(cmd, run_dir / LOG_FILE)
    if status != 0:
        print(f"error: {head}: evaluating {final.name} failed with exit status {status}; see its log "
              f"{run_dir / LOG_FILE}", file=sys.stderr)
    return status == 0


def check_runs(plans, processes: int) -> None:
    """The checks the trainer makes before it trains (trainer/precheck.py: options, data, model and weights), for
    every run still to do, in one subprocess (the runner never imports torch), before any run folder or log is
    written: a run that would stop on missing data or unreachable weights stops the study now, in one line."""
    runs = [args for _, run_dir, args, epochs in plans if not is_complete(run_dir, epochs)]
    if not runs:
        return
    cmd = [sys.executable, str(Path(__file__).with_name("main.py")), "--check_launch", str(processes),
           "ddp" if processes > 1 else "single", "--runs", json.dumps(runs)]
    result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # stdout shown: a download's progress
    refusal = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    if result.returncode == 2 and refusal:
        raise StudyError(refusal[-1][len("error: "):])
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise StudyError(f"checking the runs' options failed with exit status {result.returncode} (above)")


def seed_runs(study: Study, name: str, save_dir: Path, overrides: list[str], seeds: int):
    """(run folder, trainer arguments) of each seed of experiment `name`: one run in {save_dir}/{name}/, or with
    several seeds one per seed (the experiment's --seed, then the next ones) in {save_dir}/{name}/seed_{seed}/.
    The two layouts are not mixed: seed folders beside a single run's records, or the reverse, are refused."""
    args = to_args(study.settings(name)) + overrides
    if seeds == 1:
        if any((save_dir / name).glob("seed_*/" + CONFIG_FILE)):
            raise StudyError(f"{save_dir / name} holds runs of several seeds (seed_N folders); give --seeds, or use "
                             f"another --save_dir")
        return [(save_dir / name, args + ["--save_dir", str(save_dir / name)])]
    if (save_dir / name / CONFIG_FILE).is_file():
        raise StudyError(f"{save_dir / name} holds a run of one seed; a study with {seeds} seeds puts its runs in "
                         f"seed_N folders: use another --save_dir")
    first = parse_config(args + ["--save_dir", str(save_dir / name)]).seed
    return [(save_dir / name / f"seed_{seed}", args + ["--seed", str(seed), "--save_dir",
                                                       str(save_dir / name / f"seed_{seed}")])
            for seed in range(first, first + seeds)]


def study_deadline(overrides: list[str]) -> float | None:
    """The Unix time the study must end by, from a --time_limit among the trainer options (counted from now): each
    run gets what is left of it, not the whole limit again. The last one given wins, as in the trainer."""
    seconds = None
    for i, arg in enumerate(overrides):
        if arg.startswith("--time_limit="):
            seconds = parse_duration(arg.split("=", 1)[1])
        elif arg == "--time_limit" and i + 1 < len(overrides):
            seconds = parse_duration(overrides[i + 1])
    return None if seconds is None else time.time() + seconds


def plan_study(study: Study, save_dir: Path, overrides: list[str], seeds: int) -> list[tuple]:
    """(label, run folder, trainer arguments, epochs) of every run, in order; every run's options checked."""
    plans = []
    for name in study.experiments:
        for run_dir, args in seed_runs(study, name, save_dir, overrides, seeds):
            config = parse_config(args)
            check_same_settings(run_dir, config, {**study.settings(name), "seed": config.seed})
            check_data(config)
            label = name if seeds == 1 else f"{name} seed {config.seed}"
            plans.append((label, run_dir, args, config.epochs))
    return plans


def run_plan(head: str, plan: tuple, command: list[str], deadline: float | None) -> int:
    """One run of the study, then its evaluation: 0 done (or already complete), 75 stopped after saving, 1 failed."""
    _, run_dir, args, epochs = plan
    if is_complete(run_dir, epochs):
        print(f"{head}: skipped, complete ({epochs} epochs in {run_dir})", flush=True)
        if not (run_dir / EVALUATION_DIR / "metrics.json").is_file() and not evaluate_run(head, run_dir, epochs):
            return 1
        return 0
    print(f"{head}: {'resuming from its newest valid checkpoint' if has_checkpoint(run_dir) else 'starting'}",
          flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / LOG_FILE
    left = [] if deadline is None else ["--time_limit", f"{int(deadline - time.time())}s"]
    if deadline is not None and deadline - time.time() < 1:
        print(f"{head}: the study's --time_limit has passed; run the same command again to go on", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    status = run_logged(command + args + left + ["--resume", "auto"], log)
    if status == PREEMPTED_EXIT_CODE:
        print(f"{head}: stopped after saving a checkpoint (a preemption signal or its time limit); run the same "
              f"command again to resume (log: {log})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if status != 0:
        print(f"error: {head} failed with exit status {status}; see its log {log}", file=sys.stderr)
        return 1
    # Always after a run (re)started, so a resumed run's evaluation is of its new final checkpoint. Not when
    # the final save failed and the trainer went on (--on_save_error continue): there is no checkpoint.
    if is_complete(run_dir, epochs) and not evaluate_run(head, run_dir, epochs):
        return 1
    return 0


def report_study(study: Study, save_dir: Path, plans: list[tuple]) -> int:
    """The report of the runs that have finished an epoch (the others are named), each complete one evaluated."""
    started = []
    for i, (label, run_dir, _, epochs) in enumerate(plans, 1):
        metrics = run_dir / METRICS_FILE
        if not metrics.is_file() or not read_lines(metrics):
            print(f"study: {label} has no finished epoch yet ({run_dir}); not in the report", flush=True)
            continue
        if is_complete(run_dir, epochs) and not (run_dir / EVALUATION_DIR / "metrics.json").is_file() and \
                not evaluate_run(f"study [{i}/{len(plans)}] {label}", run_dir, epochs):
            return 1
        started.append(run_dir)
    if not started:
        raise StudyError(f"no run of the study in {save_dir} has finished an epoch: nothing to report")
    # Imported here: the report reads the study file through this module (load_study), and the two modules do not
    # import each other at load time.
    from .report import write_report
    report = write_report(started, save_dir / "report", study.path)
    print(f"study: done; report {report}", flush=True)
    return 0


def run_study(study: Study, save_dir: Path, command: list[str], overrides: list[str], processes: int = 1,
              run_package_trainer: bool = False, seeds: int | None = None, task: int | None = None) -> int:
    """Every run in order, then the report; with `task`, that run alone (a SLURM array task), no report."""
    plans = plan_study(study, save_dir, overrides, seeds or study.seeds)
    if task is not None and not 0 <= task < len(plans):
        raise StudyError(f"--task {task} is not a run of this study (0 to {len(plans) - 1})")
    todo = list(enumerate(plans, 1)) if task is None else [(task + 1, plans[task])]
    if run_package_trainer:  # every run's own checks before the first one starts
        check_runs([plan for _, plan in todo], processes)
    deadline = study_deadline(overrides)
    for i, plan in todo:
        status = run_plan(f"study [{i}/{len(plans)}] {plan[0]}", plan, command, deadline)
        if status != 0:
            return status
    return 0 if task is not None else report_study(study, save_dir, plans)


def main(argv=None) -> int:
    return run_command(study_command, argv)


def study_command(argv) -> int:
    parser = OneLineArgumentParser(
        prog="python -m trainer.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument is a trainer option given to every run.", allow_abbrev=False)
    parser.add_argument("--study", default=str(DEFAULT_STUDY),
                        help="study file: defaults, experiments, reference results, comparisons "
                             "(default: the packaged reference study, trainer/study.yaml)")
    parser.add_argument("--save_dir", "--save-dir", default="runs/study",
                        help="folder of the study: one subfolder per experiment, and report/ (default: runs/study)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="runs per experiment, with seeds --seed, --seed + 1, ... into {experiment}/seed_N/; the "
                             "report then shows means, spreads and 95 %% intervals of the comparisons (default: the "
                             "study file's `seeds`, else 1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--task", type=int, help="run only run number TASK (from 0, in the study's order) and its "
                                                "evaluation, no report: one task of the SLURM array of --submit")
    mode.add_argument("--report_only", action="store_true",
                      help="run nothing: evaluate the complete runs not yet evaluated, and write the report of "
                           "every run that has finished an epoch")
    mode.add_argument("--submit", choices=["slurm"],
                      help="submit the study to SLURM: a job array of one task per run (slurm/study.sbatch, "
                           "each requeued until its run is complete), then a report job once they have ended")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--processes", type=int, default=1,
                     help="processes per run: 1 runs `python trainer/main.py` (a GPU if there is one); N > 1 "
                          "runs `NPROC_PER_NODE=N ./launch.sh --strategy ddp` (DDP over N GPUs, or N CPU "
                          "processes without GPUs) (default: 1)")
    how.add_argument("--launcher", help="command that runs one training run, the run's options appended, "
                                        "e.g. \"./launch.sh --strategy zero2\" (instead of --processes)")
    args, overrides = parser.parse_known_args(argv)
    if args.processes < 1:
        raise StudyError(f"--processes must be at least 1, got {args.processes}")
    if args.seeds is not None and args.seeds < 1:
        raise StudyError(f"--seeds must be at least 1, got {args.seeds}")
    if importlib.util.find_spec("matplotlib") is None:  # find out now, not after the last run
        raise StudyError("the study's report draws its figures with matplotlib: pip install -e '.[report]'")
    check_overrides(overrides)
    check_writable_folder(args.save_dir, "--save_dir")
    study = load_study(args.study)
    # Absolute: the run folders must not depend on the folder a launcher starts the trainer in.
    save_dir, command = Path(args.save_dir).resolve(), launcher(args)
    if args.report_only:
        return report_study(study, save_dir, plan_study(study, save_dir, overrides, args.seeds or study.seeds))
    if args.submit:
        from .slurm import submit
        # The runs' options, folders and data are checked here; the checks that read the machine (GPUs for
        # --device cuda, --cuda_graph) are each task's, before its run trains: a login node has no GPU to ask.
        plans = plan_study(study, save_dir, overrides, args.seeds or study.seeds)
        argv = sys.argv[1:] if argv is None else argv
        passed_on = [a for i, a in enumerate(argv) if a != "--submit" and not (i and argv[i - 1] == "--submit")
                     and not a.startswith("--submit=")] + ["--save_dir", str(save_dir)]  # wherever a task starts
        array, report = submit(len(plans), passed_on)
        print(f"study: submitted job array {array} ({len(plans)} runs, slurm/study.sbatch) and report job {report} "
              f"(after the array ends); report in {save_dir / 'report'}", flush=True)
        return 0
    # The trainer's own checks of every run first, unless --launcher runs something of the user's.
    return run_study(study, save_dir, command, overrides, args.processes,
                     run_package_trainer=not args.launcher, seeds=args.seeds, task=args.task)


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
