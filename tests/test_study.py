"""The study runner end to end: four tiny runs through the real trainer, skipping, resuming, failing, the report."""

import ast
import csv
import json
import shutil
import signal
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import REPO, TINY, assert_resumed, child_env, read_jsonl, record_lines, launching
from conftest import FIGURE_PIXELS, markdown_tables
from trainer.study import main as study_main

EXPERIMENTS = ["nfnet_adamw_cosine", "vit_adamw_cosine", "nfnet_sgdm_cosine", "nfnet_adamw_linear_decay"]


def study(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trainer.study", *map(str, args)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"study failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
@launching
def tiny_study(cifar_dir, tmp_path_factory):
    """The reference study with test_vit for every model; 2 epochs, a checkpoint after each, so one can resume."""
    save_dir = tmp_path_factory.mktemp("study")
    args = ["--save_dir", save_dir, *TINY, "--data_dir", cifar_dir, "--epochs", "2", "--save_epochs", "1",
            "--batch_size", "32"]
    return save_dir, args, study(*args)


def test_four_runs_with_the_overrides_and_a_report(tiny_study):
    save_dir, _, first = tiny_study
    assert first.stdout.count(": starting") == 4
    for name in EXPERIMENTS:
        config = json.loads((save_dir / name / "config.json").read_text())["options"]
        assert [m["epoch"] for m in read_jsonl(save_dir / name / "metrics.jsonl")] == [1, 2]
        assert (save_dir / name / "epoch_2" / "manifest.json").is_file()
        # The command line wins over the study file: its model, epochs and learning rate replace the study's.
        assert (config["model"], config["epochs"], config["learning_rate"]) == ("test_vit", 2, 2e-3)
        assert (config["optimizer"], config["scheduler"]) == tuple(name.split("_", 2)[1:])
        assert "--resume auto" in (save_dir / name / "train.log").read_text()
    results, reference, *_ = markdown_tables((save_dir / "report" / "report.md").read_text())
    assert [r["run"] for r in results] == EXPERIMENTS
    for row in results:
        last = read_jsonl(save_dir / row["run"] / "metrics.jsonl")[-1]
        assert row["final top-1 (%)"] == f"{last['val_acc1']:.2f}" and row["epochs done / planned"] == "2 / 2"
    assert all(r["reference top-1 (%)"].startswith("-[^") for r in reference)  # test_vit, 2 epochs: not comparable
    # One run per experiment: each comparison says it saw the test images' noise only.
    comparisons = markdown_tables((save_dir / "report" / "report.md").read_text())[-1]
    assert len(comparisons) == 3 and all(r["verdict"].endswith("(one seed: test-image noise only, not seed noise)")
                                         for r in comparisons), comparisons
    figures = EXPERIMENTS + ["compare_cnn_vs_vit", "compare_adamw_vs_sgdm", "compare_cosine_vs_linear_decay"]
    for name in figures:
        assert matplotlib.image.imread(save_dir / "report" / f"{name}.png").shape[:2] == FIGURE_PIXELS


def test_each_final_checkpoint_evaluated_and_its_figure_in_the_report(tiny_study):
    save_dir, _, first = tiny_study
    assert first.stdout.count("evaluating epoch_2 into") == 4
    text = (save_dir / "report" / "report.md").read_text()
    for name in EXPERIMENTS:
        evaluation = save_dir / name / "evaluation"
        got = json.loads((evaluation / "metrics.json").read_text())
        last = read_jsonl(save_dir / name / "metrics.jsonl")[-1]
        assert got["source"] == str(save_dir / name / "epoch_2")
        assert got["val_acc1"] == last["val_acc1"]  # the trainer's own evaluation code, one process, CPU fp32
        with open(evaluation / "per_class.csv", newline="") as f:
            assert sum(int(r["images"]) for r in csv.DictReader(f)) == 201  # conftest's cifar_dir test set
        assert f"**{name}** (`epoch_2`): top-1 {last['val_acc1']:.2f} %" in text
        assert f"]({name}_confusion.png)" in text
        copied = save_dir / "report" / f"{name}_confusion.png"
        assert copied.read_bytes() == (evaluation / "confusion.png").read_bytes()


def test_second_invocation_skips_complete_runs(tiny_study):
    save_dir, args, _ = tiny_study
    files = [save_dir / name / f for name in EXPERIMENTS for f in ("metrics.jsonl", "steps.jsonl")]
    files += [save_dir / name / "evaluation" / "metrics.json" for name in EXPERIMENTS if name != "vit_adamw_cosine"]
    before = [p.stat().st_mtime_ns for p in files]
    shutil.rmtree(save_dir / "vit_adamw_cosine" / "evaluation")  # a run completed before the study evaluated runs
    again = study(*args)
    assert again.stdout.count("skipped, complete") == 4 and "starting" not in again.stdout
    assert [p.stat().st_mtime_ns for p in files] == before
    # Only the complete run without its evaluation is evaluated.
    assert again.stdout.count("evaluating") == 1 and "vit_adamw_cosine: evaluating epoch_2" in again.stdout
    assert (save_dir / "vit_adamw_cosine" / "evaluation" / "metrics.json").is_file()
    assert "report" in again.stdout


def test_run_without_its_last_checkpoint_resumes(tiny_study):
    save_dir, args, _ = tiny_study
    run = save_dir / "nfnet_sgdm_cosine"
    finished = read_jsonl(run / "metrics.jsonl")
    shutil.rmtree(run / "epoch_2")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    before = record_lines(run)
    evaluated = (run / "evaluation" / "metrics.json").stat().st_mtime_ns
    resumed = study(*args)
    assert resumed.stdout.count("skipped, complete") == 3
    assert "nfnet_sgdm_cosine: resuming" in resumed.stdout
    assert_resumed(run, run / "epoch_1", before, resumed.stdout)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and (run / "epoch_2" / "manifest.json").is_file()
    assert metrics[1]["val_acc1"] == finished[1]["val_acc1"]  # deterministic on CPU in fp32
    assert [s["step"] for s in read_jsonl(run / "steps.jsonl")] == list(range(1, 19))  # 2 x 9 steps, none twice
    # The resumed run's new final checkpoint is evaluated again, over the evaluation of the old one.
    assert resumed.stdout.count("evaluating") == 1 and "nfnet_sgdm_cosine: evaluating epoch_2" in resumed.stdout
    assert (run / "evaluation" / "metrics.json").stat().st_mtime_ns != evaluated


def test_changed_settings_stop_before_any_run(tiny_study, capsys):
    save_dir, args, _ = tiny_study
    assert study_main([*map(str, args), "--epochs", "3"]) == 2  # in this process: nothing is launched
    out, err = capsys.readouterr()
    assert "starting" not in out and err.count("\n") == 1
    assert err.startswith(f"error: {save_dir / 'nfnet_adamw_cosine'} holds a run started with other "
                          f"settings (epochs 2 -> 3)")


@pytest.mark.launches
def test_failing_run_stops_the_study_naming_run_and_log(tmp_path):
    # A launcher that prints the arguments it got and fails: no trainer needed.
    launcher = f"{sys.executable} -c 'import sys; print(sys.argv[1:]); sys.exit(3)'"
    result = study("--save_dir", tmp_path, "--launcher", launcher, "--model", "test_vit", check=False)
    log = tmp_path / "nfnet_adamw_cosine" / "train.log"
    assert result.returncode == 1
    assert result.stderr.strip() == \
        f"error: study [1/4] nfnet_adamw_cosine failed with exit status 3; see its log {log}"
    assert not (tmp_path / "vit_adamw_cosine").exists()
    args = ast.literal_eval(log.read_text().splitlines()[-1])  # the list the launcher printed
    assert args.index("nfnet") < args.index("test_vit")  # the override comes later, so it wins
    assert args[-4:] == ["--save_dir", str(tmp_path / "nfnet_adamw_cosine"), "--resume", "auto"]


@pytest.mark.launches
def test_a_time_limit_is_the_whole_studys_each_run_gets_what_is_left(tmp_path):
    # A launcher that prints its arguments and stops as a run stopped by its time limit does (exit 75).
    # Launchers that print their arguments and take 2 s; the first run "finishes" without records (so the report
    # has nothing at the end), and the second is given less time than the first.
    launcher = f"{sys.executable} -c 'import sys, time; print(sys.argv[1:]); time.sleep(2)'"
    study("--save_dir", tmp_path, "--launcher", launcher, "--model", "test_vit", "--time_limit", "2h", check=False)
    left = []
    for name in EXPERIMENTS[:2]:
        args = ast.literal_eval((tmp_path / name / "train.log").read_text().splitlines()[-1])
        given = [args[i + 1] for i, a in enumerate(args) if a == "--time_limit"]
        assert given[0] == "2h" and given[-1].endswith("s"), given  # the last one given wins
        left.append(int(given[-1][:-1]))
    assert 7100 <= left[0] <= 7200 and left[1] <= left[0] - 2, left
    # Past the limit: the next run is not started; exit 75, as a run stopped at its limit.
    stopped = study("--save_dir", tmp_path / "late", "--launcher", launcher, "--model", "test_vit", "--time_limit",
                    "1s", check=False)
    assert stopped.returncode == 75 and "the study's --time_limit has passed" in stopped.stderr
    assert not (tmp_path / "late" / "vit_adamw_cosine").exists()


@pytest.mark.launches
def test_preemption_signal_reaches_the_run_and_exits_75(tmp_path):
    launcher = (f"{sys.executable} -c 'import signal, sys, time; "
                f"signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); print(\"ready\", flush=True); time.sleep(60)'")
    with subprocess.Popen([sys.executable, "-m", "trainer.study", "--save_dir", str(tmp_path), "--launcher", launcher],
                          cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.strip() == "ready":
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=30) == 75
        assert "run the same command again to resume" in proc.stderr.read()


@pytest.mark.launches
def test_the_runner_itself_imports_no_torch():
    """Every run and evaluation is a process of its own; the runner that starts them imports neither torch nor what
    needs it (importing trainer.checkpoint once pulled torch in through full_state.py: 1.7 CPU-s of every study
    command's start, 2026-12-05)."""
    heavy = "torch", "numpy", "timm", "accelerate", "matplotlib"
    result = subprocess.run([sys.executable, "-c", f"import sys, trainer.study; print([m for m in {heavy!r} if m in "
                             f"sys.modules])"], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--epoch", "1"], "--epoch is neither a study option"),
    (["--resume", "auto"], "--resume cannot be given to a study"),
    (["--study", "{tmp}/missing.yaml"], "study file {tmp}/missing.yaml"),
    (["--overwrite"], "--overwrite cannot be given to a study"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    # In this process: a setup error needs no subprocess (the exit status is main's return value).
    save_dir = tmp_path / "study"
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    assert study_main(["--save_dir", str(save_dir), *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not save_dir.exists()


# --- seeds and intervals ---------------------------------------------------------------------------------
SEEDS_STUDY = """
defaults: {epochs: 2, warmup_epochs: 0, batch_size: 32, seed: 1}
seeds: 2
experiments:
  trained: {options: {learning_rate: 2.0e-3}}
  same_recipe: {options: {learning_rate: 2.0e-3, seed: 101}}
  barely_trained: {options: {learning_rate: 1.0e-7}}
comparisons:
  other_seeds: {title: "the same recipe, other seeds", experiments: [trained, same_recipe]}
  training: {title: "trained vs barely trained", experiments: [trained, barely_trained]}
"""
SEED_FOLDERS = {"trained": [1, 2], "same_recipe": [101, 102], "barely_trained": [1, 2]}


@pytest.fixture(scope="module")
@launching
def seeds_study(noisy_cifar_dir, tmp_path_factory):
    """Three experiments x 2 seeds on the noisy generated data (top-1 mid-range, where seeds differ): one recipe
    twice with other seeds, and one that barely trains. The study file's `seeds: 2`."""
    root = tmp_path_factory.mktemp("seeds")
    (root / "study.yaml").write_text(SEEDS_STUDY)
    tiny = [a for a in TINY if a not in ("--learning_rate", "2e-3")]  # the study file's learning rates must win
    study("--study", root / "study.yaml", "--save_dir", root / "study", *tiny, "--data_dir", noisy_cifar_dir)
    return root / "study"


def correct(run_dir):
    with open(run_dir / "evaluation" / "predictions.csv", newline="") as f:
        return [int(r["label"] == r["prediction"]) for r in csv.DictReader(f)]


def test_every_experiment_runs_once_per_seed_into_its_seed_folder(seeds_study):
    for name, seeds in SEED_FOLDERS.items():
        assert sorted(p.name for p in (seeds_study / name).iterdir()) == [f"seed_{s}" for s in seeds]
        for seed in seeds:
            options = json.loads((seeds_study / name / f"seed_{seed}" / "config.json").read_text())["options"]
            assert options["seed"] == seed and options["epochs"] == 2
            assert len(correct(seeds_study / name / f"seed_{seed}")) == 201


def test_the_report_shows_means_spreads_and_which_differences_are_resolved(seeds_study):
    import statistics
    text = (seeds_study / "report" / "report.md").read_text()
    tables = markdown_tables(text)
    (means,) = [t for t in tables if t and "seeds" in t[0]]
    (comparisons,) = [t for t in tables if t and "verdict" in t[0]]
    for row in means:
        seeds = SEED_FOLDERS[row["experiment"]]
        top1 = [read_jsonl(seeds_study / row["experiment"] / f"seed_{s}" / "metrics.jsonl")[-1]["val_acc1"]
                for s in seeds]
        assert (row["runs"], row["seeds"]) == ("2", ", ".join(map(str, seeds)))
        assert row["top-1 (%)"] == f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}"
    by_b = {row["B"]: row for row in comparisons}
    for b, row in by_b.items():
        a_correct = [c for s in SEED_FOLDERS["trained"] for c in correct(seeds_study / "trained" / f"seed_{s}")]
        b_correct = [c for s in SEED_FOLDERS[b] for c in correct(seeds_study / b / f"seed_{s}")]
        assert row["A - B (points)"] == f"{100 * (statistics.mean(a_correct) - statistics.mean(b_correct)):+.2f}"
    low, high = (float(v) for v in by_b["barely_trained"]["95 % interval"].strip("[]").split(","))
    assert 0 < low < high and by_b["barely_trained"]["verdict"] == "resolved: trained is better"
    low, high = (float(v) for v in by_b["same_recipe"]["95 % interval"].strip("[]").split(","))
    assert low < 0 < high and by_b["same_recipe"]["verdict"].startswith("not resolved")


def test_a_study_of_several_seeds_does_not_mix_with_a_single_seed_run(seeds_study, tmp_path, capsys):
    shutil.copytree(seeds_study / "trained" / "seed_1", tmp_path / "trained")  # a single-seed layout
    assert study_main(["--study", str(seeds_study.parent / "study.yaml"), "--save_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'trained'} holds a run of one seed")
    assert study_main(["--study", str(seeds_study.parent / "study.yaml"), "--save_dir", str(seeds_study),
                       "--seeds", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {seeds_study / 'trained'} holds runs of several seeds")
