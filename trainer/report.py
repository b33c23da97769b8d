"""The report of a study: a table of every run's results, the reference study's results beside them, and
figures of the training curves.

    python -m trainer.report runs/study/nfnet_adamw_cosine runs/study/vit_adamw_cosine
    python -m trainer.report machine_a/run1 machine_b/run2 --out report --study my_study.yaml

Writes `report.md` and PNG figures into --out (default: `report/` beside the first run folder): one
figure per run, and one overlaid figure per comparison of the study file that has runs of at least two
of its experiments. It reads only each run's config.json, metrics.jsonl, steps.jsonl and evaluation/, so it
works on unfinished runs and on runs copied from other machines, and needs no GPU (nor torch). Where a run
folder holds an `evaluation/` of its final checkpoint (`python -m trainer.evaluate` writes it, the study
runner calls it), the report also shows its top-1, its 5 lowest classes and its confusion figure.

A run belongs to the study experiment whose name is its folder's name, or else to the experiment whose own
options (model, optimizer, scheduler) it shares. Its reference result is shown only when every setting the
study file names equals the run's; otherwise a footnote says what differs.

Exit status: 0 done; 2 a folder that is not a run, or a bad study file (one line on stderr).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from .config import MODEL_PRESETS, OneLineArgumentParser
from .errors import UserError, run_command
from .export import ExportError, check_out
from .records import PREDICTIONS_FILE, read_lines
from .study import DEFAULT_STUDY, EVALUATION_DIR, Study, load_study


class ReportError(UserError, ValueError):
    """A run folder or report the user can fix (see UserError)."""


def timm_name(model: str) -> str:
    return MODEL_PRESETS.get(model, (model, {}))[0]


# --- run folders --------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """One JSON value per line; a run killed while appending may leave a partial last line, which is skipped."""
    try:
        return read_lines(path)
    except ValueError as error:
        raise ReportError(str(error)) from None


@dataclasses.dataclass
class Run:
    path: Path
    name: str                  # unique among the report's runs: the folder name, or parent_folder when repeated
    config: dict               # config.json
    metrics: list[dict]        # metrics.jsonl: one line per finished epoch
    steps: list[dict]          # steps.jsonl: one line per log interval
    experiment: Optional[str] = None
    reference: Optional[dict] = None   # the experiment's reference result, when the settings match
    note: Optional[str] = None         # why the reference is not shown, or why it is not comparable yet
    evaluation: Optional[dict] = None  # evaluation/metrics.json of trainer.evaluate, when there is one
    per_class: list = dataclasses.field(default_factory=list)  # evaluation/per_class.csv rows

    @property
    def options(self) -> dict:
        return self.config.get("options", {})

    @property
    def resolved(self) -> dict:
        return self.config.get("resolved", {})

    def describe(self) -> str:
        o = self.options
        model = self.resolved.get("timm_model", o.get("model", "?"))
        return f"{model}, {o.get('optimizer', '?')}, {o.get('scheduler', '?')}"


# The numbers the tables and figures read from each record; a line without one (or with null, text, a bool) is
# refused naming the file and line, instead of a KeyError or TypeError half-way through the report.
METRICS_KEYS = ("epoch", "train_loss", "val_acc1", "val_acc5", "epoch_time_s", "images_per_s")
STEPS_KEYS = ("step", "train_loss", "lr")
EVALUATION_KEYS = ("val_acc1", "val_acc5", "val_loss", "val_images")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_numbers(path: Path, entries: list, keys) -> None:
    for number, entry in enumerate(entries, 1):
        bad = [k for k in keys if not isinstance(entry, dict) or not _number(entry.get(k))]
        if bad:
            got = entry.get(bad[0]) if isinstance(entry, dict) else entry
            raise ReportError(f"{path}: line {number} has no number {bad[0]} (got {got!r}); the record is damaged")


def load_evaluation(run: Run) -> None:
    """The run's evaluation/ of trainer.evaluate, when there is one; refused in one line when it is damaged."""
    folder = run.path / EVALUATION_DIR
    metrics, per_class = folder / "metrics.json", folder / "per_class.csv"
    if not metrics.is_file():
        return
    try:
        evaluation = json.loads(metrics.read_text())
    except (OSError, ValueError) as error:
        raise ReportError(f"{metrics} is not readable JSON ({str(error).splitlines()[0]}); run trainer.evaluate "
                          f"again or delete {folder}") from None
    check_numbers(metrics, [evaluation], EVALUATION_KEYS)
    run.evaluation = evaluation
    if not per_class.is_file():
        return
    try:
        with open(per_class, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:  # "" is the accuracy of a class absent from the test set
            int(row["class"]), str(row["name"]), int(row["correct"]), int(row["images"])
            float(row["accuracy"]) if row["accuracy"] else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReportError(f"{per_class} is damaged ({type(error).__name__}: {error}); run trainer.evaluate again "
                          f"or delete {folder}") from None
    run.per_class = rows


def load_run(path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    metrics = read_jsonl(path / "metrics.jsonl")
    if not metrics:
        raise ReportError(f"{path} has no metrics.jsonl lines: not a run folder, or no epoch has finished yet")
    check_numbers(path / "metrics.jsonl", metrics, METRICS_KEYS)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise ReportError(f"{path} has metrics.jsonl but no readable config.json") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("options", "resolved")):
        raise ReportError(f"{path / 'config.json'} does not hold the run's options (a mapping with `options` and "
                          f"`resolved`); the record is damaged")
    steps = read_jsonl(path / "steps.jsonl")
    check_numbers(path / "steps.jsonl", steps, STEPS_KEYS)
    run = Run(path, path.name, config, metrics, steps)
    load_evaluation(run)
    return run


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def differences(run: Run, wanted: dict) -> list[str]:
    """`key value (reference value)` for every wanted setting the run does not share; models by timm name."""
    out = []
    for key, value in wanted.items():
        have = run.resolved.get("timm_model") if key == "model" else run.options.get(key)
        if key == "data" and have is None:  # recorded from the version that added --data on; CIFAR-100 before
            have = "cifar100"
        if key == "model":
            value = timm_name(value)
        if not _same(have, value):
            out.append(f"{key} {'not recorded' if have is None else have} (reference {value})")
    return out


def attach_study(run: Run, study: Study) -> None:
    """Find the run's experiment and decide whether its reference result is comparable."""
    if run.path.name in study.experiments:
        run.experiment = run.path.name
    elif run.path.name.startswith("seed_") and run.path.parent.name in study.experiments:  # a study's --seeds
        run.experiment = run.path.parent.name
    else:
        run.experiment = next((n for n, e in study.experiments.items() if not differences(run, e["options"])), None)
    if run.experiment is None:
        run.note = f"no experiment of {study.path.name} uses {run.describe()}"
        return
    # A study file's reference results are CIFAR-100's unless its options name another --data.
    diff = differences(run, {"data": "cifar100", **study.settings(run.experiment)})
    if diff:
        run.note = f"settings differ from the reference {run.experiment}: {', '.join(diff)}"
    elif not study.experiments[run.experiment]["reference"]:
        run.note = f"{study.path.name} gives no reference result for {run.experiment}"
    else:
        run.reference = study.experiments[run.experiment]["reference"]
        done, planned = run.metrics[-1]["epoch"], run.options.get("epochs")
        if done != planned:
            run.note = f"unfinished: {done} of {planned} epochs, so the run's values are not final"


def load_runs(paths, study: Study) -> list[Run]:
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # e.g. the same experiment run on two machines
            run.name = f"{run.path.resolve().parent.name}_{run.name}"
        attach_study(run, study)
    # The name is the run's row and its figure's file: two runs must never share one (the same folder given twice,
    # or a/x/run and b/x/run). Numbered in the order given.
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    counts: dict[str, int] = {}
    for run in runs:
        if seen[run.name] > 1:
            counts[run.name] = counts.get(run.name, 0) + 1
            run.name = f"{run.name}_{counts[run.name]}"
    return runs


def link(file: str) -> str:
    """A Markdown link target: percent-encoded, so a file name with spaces or parentheses stays one link (a bare
    CommonMark destination ends at a space); a plain name is unchanged."""
    from urllib.parse import quote
    return quote(file)


# --- tables -------------------------------------------------------------------------------------

def summarize(run: Run) -> dict:
    m, last = run.metrics, run.metrics[-1]
    best = max(m, key=lambda e: e["val_acc1"])
    return {"epochs_done": last["epoch"], "train_loss": last["train_loss"], "acc1": last["val_acc1"],
            "best_acc1": best["val_acc1"], "best_epoch": best["epoch"], "acc5": last["val_acc5"],
            "wall_s": sum(e["epoch_time_s"] for e in m),
            "images_per_s": sum(e["images_per_s"] for e in m) / len(m)}


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def results_table(runs: list[Run]) -> list[str]:
    header = ["run", "model (timm)", "optimizer", "scheduler", "epochs done / planned", "final train loss",
              "final top-1 (%)", "best top-1 (%) (epoch)", "final top-5 (%)", "wall time (h:mm:ss)",
              "images/s (mean)", "hardware", "processes / global batch"]
    rows = []
    for run in runs:
        s, o, r = summarize(run), run.options, run.resolved
        rows.append([run.name, r.get("timm_model", o.get("model", "?")), o.get("optimizer", "?"),
                     o.get("scheduler", "?"), f"{s['epochs_done']} / {o.get('epochs', '?')}",
                     f"{s['train_loss']:.4f}", f"{s['acc1']:.2f}", f"{s['best_acc1']:.2f} ({s['best_epoch']})",
                     f"{s['acc5']:.2f}", str(timedelta(seconds=round(s["wall_s"]))), f"{s['images_per_s']:,.0f}",
                     run.config.get("hardware", "?"),
                     f"{r.get('processes', '?')} / {r.get('global_batch_size', o.get('batch_size', '?'))}"])
    return _table(header, rows)


def reference_table(runs: list[Run]) -> list[str]:
    header = ["run", "reference experiment", "final train loss", "reference train loss", "final top-1 (%)",
              "reference top-1 (%)"]
    rows, notes = [], []
    for run in runs:
        s, ref, mark = summarize(run), run.reference or {}, ""
        if run.note:
            notes.append(f"[^{len(notes) + 1}]: {run.name}: {run.note}.")
            mark = f"[^{len(notes)}]"
        # The note goes on the empty reference cells it explains, or on the run when the reference is shown.
        run_mark, ref_mark = (mark, "") if run.reference else ("", mark)
        rows.append([run.name + run_mark, run.experiment or "-", f"{s['train_loss']:.4f}",
                     f"{ref['train_loss']:.4f}" if "train_loss" in ref else "-" + ref_mark, f"{s['acc1']:.2f}",
                     f"{ref['val_acc1']:.2f}" if "val_acc1" in ref else "-" + ref_mark])
    return _table(header, rows) + ([""] + notes if notes else [])


def evaluation_lines(run: Run, figure: Optional[str]) -> list[str]:
    """The evaluation of the run's final checkpoint: its numbers, its 5 lowest classes, its confusion figure."""
    e = run.evaluation
    lines = [f"**{run.name}** (`{Path(e.get('source', '?')).name}`): top-1 {e['val_acc1']:.2f} %, top-5 "
             f"{e['val_acc5']:.2f} %, loss {e['val_loss']:.4f} on {e['val_images']} test images."]
    rated = [r for r in run.per_class if r.get("accuracy")]  # a class absent from the test set has no accuracy
    if rated:
        worst = sorted(rated, key=lambda r: (float(r["accuracy"]), int(r["class"])))[:5]
        lines[0] += " Lowest classes: " + ", ".join(
            f"{r['name']} {float(r['accuracy']):.2f} % ({r['correct']}/{r['images']})" for r in worst) + "."
    if figure:
        lines += ["", f"![{run.name}: confusion matrix of the final checkpoint]({link(figure)})"]
    return lines + [""]


# --- seeds and intervals ----------------------------------------------------------------------------

def final_numbers(run: Run) -> dict:
    """Top-1, top-5 (%) and loss of the run's final checkpoint: its evaluation, else its last epoch's line."""
    source = run.evaluation or run.metrics[-1]
    return {key: source.get(key) for key in ("val_acc1", "val_acc5", "val_loss")}


def load_correct(run: Run):
    """[images] of 0/1 (top-1 right) from the run's evaluation/predictions.csv, with its labels; None without it."""
    import numpy as np
    path = run.path / EVALUATION_DIR / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        if table.shape[1] != 3 or not np.array_equal(table[:, 0], np.arange(len(table))):
            raise ValueError("expected the columns image, label, prediction, one row per image in order")
    except (OSError, ValueError) as error:
        raise ReportError(f"{path} is damaged ({str(error).splitlines()[0]}); run trainer.evaluate again or "
                          f"delete {path.parent}") from None
    return table[:, 1], (table[:, 1] == table[:, 2]).astype(np.uint8)


def seeds_lines(runs: list[Run], study: Study) -> list[str]:
    """Each experiment's mean and spread over its runs, and each comparison's difference with its interval and
    McNemar's test (trainer/stats.py), on the runs' per-image predictions."""
    import numpy as np

    from .stats import compare, mean_and_spread
    groups: dict[str, list[Run]] = {}
    unfinished = []  # a run still training (e.g. --report_only while array tasks run) is not mixed with final ones
    for run in runs:
        if run.experiment is not None and run.metrics[-1]["epoch"] != run.options.get("epochs"):
            unfinished.append(run.name)
        elif run.experiment is not None:
            groups.setdefault(run.experiment, []).append(run)
    rows = []
    for name, members in groups.items():
        numbers = [final_numbers(r) for r in members]
        cells = []
        for key, digits in (("val_acc1", 2), ("val_acc5", 2), ("val_loss", 4)):
            values = [n[key] for n in numbers if _number(n[key])]
            if not values:
                cells.append("-")
                continue
            mean, spread = mean_and_spread(values)
            cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}")
        seeds = sorted(r.options.get("seed", "?") for r in members)
        rows.append([name, len(members), ", ".join(map(str, seeds)), *cells])
    lines = ["Mean ± sample standard deviation over each experiment's runs (seeds), of the final checkpoint's "
             "evaluation (else the last epoch's line).", ""]
    lines += _table(["experiment", "runs", "seeds", "top-1 (%)", "top-5 (%)", "loss"], rows)
    if unfinished:
        lines += ["", f"Not counted, unfinished: {', '.join(unfinished)}."]
    pairs = []  # each comparison's first experiment against each of the others
    for name, comparison in study.comparisons.items():
        first, *others = comparison["experiments"]
        pairs += [(comparison.get("title", name), first, other) for other in others]
    comparisons, images = [], None
    correct: dict[str, list] = {}  # each experiment's files read once, though it may be in several comparisons
    for title, a, b in pairs:
        if a not in groups or b not in groups:
            continue
        for e in (a, b):
            if e not in correct:
                correct[e] = [load_correct(r) for r in groups[e]]
        arms = {e: correct[e] for e in (a, b)}
        if any(x is None for e in arms.values() for x in e):
            comparisons.append([title, a, b, "-", "-", "-", "-", "no predictions.csv in every run's evaluation/"])
            continue
        labels = [x[0] for e in arms.values() for x in e]
        if any(len(lab) != len(labels[0]) or (lab != labels[0]).any() for lab in labels):
            comparisons.append([title, a, b, "-", "-", "-", "-", "not evaluated on the same test images"])
            continue
        images = len(labels[0])
        result = compare(a, np.stack([x[1] for x in arms[a]]), b, np.stack([x[1] for x in arms[b]]))
        comparisons.append([title, a, b, f"{100 * result.difference:+.2f}",
                            f"[{100 * result.low:+.2f}, {100 * result.high:+.2f}]",
                            f"{result.better_a} / {result.better_b}", f"{result.p:.2g}",
                            result.verdict() + (" (one seed: test-image noise only, not seed noise)"
                                                if min(len(arms[a]), len(arms[b])) == 1 else "")])
    if comparisons:
        lines += ["", f"Each comparison: top-1 of A minus B in points, on the same {images or '-'} test images, "
                  "with a 95 % paired bootstrap interval over images and seeds, and McNemar's test on the images "
                  "(images where A's share of correct seeds is higher / where B's is). Resolved: the interval "
                  "excludes 0 and p < 0.05.", ""]
        lines += _table(["comparison", "A", "B", "A - B (points)", "95 % interval", "images A / B better",
                         "McNemar p", "verdict"], comparisons)
    return lines


# --- figures ------------------------------------------------------------------------------------

def plot(runs: list[Run], title: str, path: Path) -> None:
    """Three panels: training loss and learning rate against step, validation top-1 against epoch."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display, no GPU
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # 12 x 4 inches at 100 dpi: 1200 x 400 pixels, readable at README width. No bbox_inches="tight",
    # which would change the size from figure to figure.
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(12, 4), dpi=100, layout="constrained")
    for run in runs:
        steps = run.steps or run.metrics  # a run without steps.jsonl: one point per epoch from metrics.jsonl
        x = [s["step"] for s in steps]
        marker = "." if len(x) < 50 else None  # a line of one or a few points would not show without markers
        (line,) = loss_ax.plot(x, [s["train_loss"] for s in steps], label=run.name, linewidth=1.2, marker=marker)
        color = line.get_color()
        acc_ax.plot([m["epoch"] for m in run.metrics], [m["val_acc1"] for m in run.metrics], marker="o",
                    markersize=3, color=color, label=run.name)
        if run.reference and "val_acc1" in run.reference:
            acc_ax.axhline(run.reference["val_acc1"], color=color, linestyle="--", linewidth=1,
                           label=f"{run.name}: reference {run.reference['val_acc1']:.2f} %")
        lr_ax.plot(x, [s["lr"] for s in steps], color=color, label=run.name, linewidth=1.2, marker=marker)
    loss_ax.set(title="Training loss", xlabel="optimizer step", ylabel="cross-entropy (nats per image)")
    acc_ax.set(title="Validation top-1", xlabel="epoch", ylabel="top-1 accuracy (%)")
    lr_ax.set(title="Learning rate", xlabel="optimizer step", ylabel="learning rate (per global batch)")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))  # steps and epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the report ---------------------------------------------------------------------------------

def write_report(paths, out, study_path=DEFAULT_STUDY) -> Path:
    """Write `out/report.md` and its figures; return the path of report.md."""
    study = load_study(study_path)
    runs = load_runs(paths, study)
    out = Path(out)
    try:
        check_out(out, overwrite=None)  # a file, under a file, not writable, or inside a checkpoint
    except ExportError as error:
        raise ReportError(str(error)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file, under a file, or not writable
        raise ReportError(f"--out {out} cannot be a folder of the report ({error.strerror}: {error.filename})") from None
    figures = []
    for run in runs:
        s = summarize(run)
        title = (f"{run.name}: {run.describe()}, {s['epochs_done']}/{run.options.get('epochs', '?')} epochs, "
                 f"{run.config.get('hardware', '?')}")
        plot([run], title, out / f"{run.name}.png")
        figures.append((title, f"{run.name}.png"))
    for name, comparison in study.comparisons.items():
        members = [r for r in runs if r.experiment in comparison["experiments"]]
        if len({r.experiment for r in members}) >= 2:
            title = comparison.get("title", name)
            plot(members, title, out / f"compare_{name}.png")
            figures.append((title, f"compare_{name}.png"))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["# Report", "",
             f"{len(runs)} run(s), reference results from `{study.path.name}`; written {now} by "
             f"`python -m trainer.report`. Top-1 and top-5 are percent of the test images; wall time sums "
             f"the epochs' times (training and evaluation).", "",
             "## Results", ""] + results_table(runs) + \
            ["", "## Against the reference study", ""] + reference_table(runs) + ["", "## Figures", ""]
    lines += [f"![{title}]({link(file)})\n" for title, file in figures]
    if any(run.experiment for run in runs):
        lines += ["## Seeds and intervals", ""] + seeds_lines(runs, study) + [""]
    evaluated = [run for run in runs if run.evaluation]
    if evaluated:
        lines += ["## Per-class evaluation of the final checkpoint", "",
                  "By `python -m trainer.evaluate`; each figure is the confusion matrix in percent of the true "
                  "class (for CIFAR-100, classes grouped by its 20 superclasses).", ""]
    for run in evaluated:
        figure = None
        if (run.path / EVALUATION_DIR / "confusion.png").is_file():
            figure = f"{run.name}_confusion.png"
            shutil.copyfile(run.path / EVALUATION_DIR / "confusion.png", out / figure)
        lines += evaluation_lines(run, figure)
    report = out / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def main(argv=None) -> int:
    return run_command(report_command, argv)


def report_command(argv) -> int:
    parser = OneLineArgumentParser(prog="python -m trainer.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (a trainer's --save_dir)")
    parser.add_argument("--out", help="output folder (default: report/ beside the first run folder)")
    parser.add_argument("--study", default=str(DEFAULT_STUDY),
                        help="study file with the experiments, reference results and comparisons "
                             "(default: the packaged reference study)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent / "report"
    report = write_report(args.runs, out, args.study)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
