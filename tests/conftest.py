"""Shared fixtures: generated CIFAR-format data, and running the real trainer through its real launchers."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from trainer.synthetic import write_digits, write_fake_cifar100

REPO = Path(__file__).resolve().parent.parent
MAIN = str(REPO / "trainer" / "main.py")

# Small runs: tiny timm model, a few hundred generated images, fp32 on CPU, no augmentation unless asked.
TINY = ["--model", "test_vit", "--no-pretrained", "--no-progress", "--mixed_precision", "no", "--augment", "none",
        "--warmup_epochs", "0", "--learning_rate", "2e-3", "--eval_batch_size", "50", "--log_interval", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_trainer(args, *, processes: int = 1, config_file: str | None = None, module: bool = False,
                timeout: int = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run trainer/main.py: plain `python` for one process, `accelerate launch` otherwise (or when a config is given)."""
    if config_file is None and processes == 1:
        cmd = [sys.executable, "-m", "trainer"] if module else [sys.executable, MAIN]
        result = subprocess.run(cmd + [str(a) for a in args], cwd=REPO, env=env or child_env(), capture_output=True,
                                text=True, timeout=timeout)
    else:
        config_file = config_file or str(REPO / "accelerate_configs" / "cpu_multi.yaml")
        result = accelerate_launch(["--config_file", config_file, "--num_processes", processes, "--main_process_port",
                                    free_port(), MAIN, *args], env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def accelerate_launch(argv, *, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch ARGV`, run by accelerate's own launch_command in this process, as trainer/accelerate_launch.py
    runs it for launch.sh: the same launcher (torch's elastic agent, or accelerate's simple one for one process), the
    same real worker processes, with `env` (child_env()) and the repository as their environment and folder, and
    their stdout and stderr captured. Only the launcher's interpreter is this one: a launcher process of its own
    costs 2.2 CPU-s more per launch, its imports (measured 11.5 vs 9.3 CPU-s for a 2-process run, 2026-12-05). The
    command-line path itself stays tested: launch.sh starts accelerate_launch.py as a process, and test_strategies'
    zero3_from_flags runs `python -m accelerate.commands.launch`. A failed launch is exit status 1 with the launcher's
    report (torch's ChildFailedError table) on stderr, as the command prints it; after `timeout` seconds the workers
    are killed and the test fails."""
    import tempfile
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    argv = [str(a) for a in argv]
    parsed = launch_command_parser().parse_args(argv)
    env = env or child_env()  # before os.environ is replaced below: child_env() copies it
    # What the launcher changes in its process and does not put back: the environment it patches is restored by
    # accelerate, but torch's agent leaves its own signal handlers installed.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    environ, folder = dict(os.environ), os.getcwd()
    timed_out = threading.Event()

    def kill_workers():
        timed_out.set()
        for pid in descendants(os.getpid())[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    watchdog = threading.Timer(timeout, kill_workers)
    sys.stdout.flush()
    sys.stderr.flush()
    kept = os.dup(1), os.dup(2)
    returncode, report = 0, ""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        os.dup2(out.fileno(), 1)  # the workers inherit these descriptors
        os.dup2(err.fileno(), 2)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(REPO)
        watchdog.start()
        try:
            launch_command(parsed)
        except ChildFailedError as error:
            returncode, report = 1, str(error)
        except subprocess.CalledProcessError as error:  # accelerate's simple launcher (one process)
            returncode = error.returncode
        except SystemExit as error:
            returncode = error.code if isinstance(error.code, int) else int(error.code is not None)
        finally:
            watchdog.cancel()
            os.dup2(kept[0], 1)
            os.dup2(kept[1], 2)
            for fd in kept:
                os.close(fd)
            os.environ.clear()
            os.environ.update(environ)
            os.chdir(folder)
            for s, handler in handlers.items():
                signal.signal(s, handler)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read() + report
    assert not timed_out.is_set(), f"accelerate launch {' '.join(argv)} ran over {timeout} s:\n{stderr[-5000:]}"
    return subprocess.CompletedProcess(["accelerate", "launch", *argv], returncode, stdout, stderr)


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc), the way SLURM's proctrack/linuxproc finds a job step's."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def relative_l2(a: dict, b: dict) -> float:
    """Relative L2 distance over all tensors together (a per-tensor maximum is noisy: Adam amplifies float
    re-association in tensors whose gradient is ~0, ~5e-4 per tensor between two correct topologies where the
    global relative L2 is ~1e-6)."""
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    den = sum((a[k].double() ** 2).sum() for k in a)
    return float((num / den).sqrt())


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """288 train images (4 full steps of 64 + a last step of 32), 201 test images (odd, to test sharding)."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root, num_train=288, num_test=201, num_classes=10)
    return root


@pytest.fixture(scope="session")
def noisy_cifar_dir(tmp_path_factory) -> Path:
    """As cifar_dir, noisier, so that val_acc1 lands mid-range (~36 % and ~66 % after epochs 1 and 2 of test_vit),
    where a difference in training shows, instead of saturating at 100 %."""
    root = tmp_path_factory.mktemp("noisy_cifar")
    write_fake_cifar100(root, num_train=288, num_test=201, num_classes=10, noise=0.8)
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, list[str]]:
    """scikit-learn's digits as an image folder, a parquet data set and CIFAR-10 pickles (trainer.synthetic):
    each source's trainer options."""
    return write_digits(tmp_path_factory.mktemp("digits"))


def warmup_cosine_lr(step: int, warmup_steps: int, total_steps: int, peak: float) -> float:
    """The documented schedule, written out apart from trainer.optim: linear warm-up reaching `peak` at its last
    step, then cosine to 0 one step after the last."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def assert_lrs_follow_the_schedule(steps: list[dict], warmup_steps: int, total_steps: int, peak: float) -> None:
    """steps.jsonl logged at every step: the lr each step used matches the schedule at the end of warm-up,
    mid-cosine and the last step (and everywhere). A scheduler stepped twice per optimizer step, or once per
    micro-batch of an accumulating run, runs ahead of it."""
    assert [s["step"] for s in steps] == list(range(1, total_steps + 1))  # line s holds step s-1's (0-based) lr
    lrs = [s["lr"] for s in steps]
    middle = (warmup_steps + total_steps) // 2
    for index, what in ((warmup_steps - 1, "warm-up end"), (middle, "mid-cosine"), (total_steps - 1, "last step")):
        expected = warmup_cosine_lr(index, warmup_steps, total_steps, peak)
        assert lrs[index] == pytest.approx(expected, rel=1e-12), (what, index, lrs)
    assert lrs == pytest.approx([warmup_cosine_lr(s, warmup_steps, total_steps, peak) for s in range(total_steps)],
                                rel=1e-12)


def record_lines(run_dir) -> dict[str, list[str]]:
    """The raw lines of a run's steps.jsonl and metrics.jsonl, as they are now (before a resume)."""
    files = {name: Path(run_dir) / name for name in ("steps.jsonl", "metrics.jsonl")}
    return {name: path.read_text().splitlines() if path.is_file() else [] for name, path in files.items()}


def assert_resumed(run_dir, folder, before: dict[str, list[str]], output: str) -> None:
    """The run in `run_dir` resumed from checkpoint `folder` and trained only what was left after it.

    `before`: record_lines(run_dir) taken before the resumed run; `output`: that run's stdout.
    - its own startup line names the checkpoint's epoch and step, and the step it trains first;
    - the steps.jsonl lines up to the checkpoint's step and the metrics.jsonl lines up to its epoch are
      byte-for-byte those written before: they hold `images_per_s`, a timing that a run restarted from scratch
      (same seed, same weights) cannot reproduce, so a resume that restored nothing rewrites them;
    - the run's steps.jsonl continues with later steps only, and there was something to keep (steps written
      before the checkpoint), so the check cannot pass vacuously.
    """
    from trainer import checkpoint
    info = checkpoint.read_manifest(folder)
    step, epoch = info["global_step"], info["epoch"]
    assert step > 0, f"{folder} holds no trained step: nothing to prove"
    line = f"resumed from {folder}: epoch {epoch}, step {step}; training from step {step + 1}"
    assert line in output, f"expected {line!r} in the resumed run's output:\n{output[-3000:]}"
    after = record_lines(run_dir)
    kept = {"steps.jsonl": [s for s in before["steps.jsonl"] if json.loads(s)["step"] <= step],
            "metrics.jsonl": [m for m in before["metrics.jsonl"] if json.loads(m)["epoch"] <= epoch]}
    assert kept["steps.jsonl"], f"no steps.jsonl line up to step {step} before the resume: nothing to compare"
    for name, lines in kept.items():
        assert after[name][:len(lines)] == lines, f"{name}: the lines written before {folder} were rewritten"
    later = [json.loads(s)["step"] for s in after["steps.jsonl"][len(kept["steps.jsonl"]):]]
    assert later and later[0] > step, f"steps.jsonl after the kept lines: {later}"


# --- The two tiers -------------------------------------------------------------------------------------------
# `python -m pytest -m "not launches"` is the fast tier: no test in it starts a subprocess (no launcher, no trainer
# subprocess, no shell script), so it answers "did I break something?" in well under a minute. The full suite is
# `python -m pytest`. The mark is checked, not trusted: every subprocess a test starts (in its own body or in the
# fixtures set up for it) goes through subprocess.Popen, and one started by a test without the mark fails that
# test. (Forks inside the test's own process, such as DataLoader workers, are not launches and are allowed.) (LAUNCH_MARKS=record lists such tests in launches_unmarked.txt instead, to mark a whole suite at once.)
import subprocess as _subprocess  # noqa: E402

_current_item = None
_popen_init = _subprocess.Popen.__init__


# Quick commands run in-process: every run records its git commit (records.py); platform.processor() (MLflow
# calls it at import) runs uname.
_NOT_LAUNCHES = {"git", "uname"}


def _checked_popen_init(self, *args, **kwargs):
    item = _current_item
    command = args[0] if args else kwargs.get("args")
    program = Path(command[0] if isinstance(command, (list, tuple)) else str(command).split()[0]).name
    if item is not None and item.get_closest_marker("launches") is None and program not in _NOT_LAUNCHES:
        if os.environ.get("LAUNCH_MARKS") == "record":
            with open(REPO / "launches_unmarked.txt", "a") as f:
                f.write(item.nodeid + "\n")
        else:
            raise AssertionError(f"{item.nodeid} starts a process ({command!r}) "
                                 f"but is not marked @pytest.mark.launches: the fast tier (-m 'not launches') "
                                 f"would run it")
    _popen_init(self, *args, **kwargs)


_subprocess.Popen.__init__ = _checked_popen_init


def launching(fixture_function):
    """Mark a fixture (under its @pytest.fixture) that starts processes: every test that uses it, directly or through
    another fixture, is marked `launches` (a module-scoped fixture starts them for the first such test only, so the
    check above could not see the others)."""
    fixture_function.launches = True
    return fixture_function


# The files that take longest, longest first (worker-seconds in the full suite on 2 cores, 2026-12-05: 390, 215, 180,
# 165, 120, 85; the next file takes 45). With `--dist loadfile --no-loadscope-reorder` (setup.cfg) xdist hands the
# files to its workers in this order, so the suite ends with short files on both workers. Its default order, by
# number of tests, left test_train.py's minute-long compile run for last, on one worker while the other idled.
LONGEST_FIRST = ["test_strategies.py", "test_preempt.py", "test_study.py", "test_gpu_check.py", "test_train.py",
                 "test_checkpoint.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        definitions = getattr(item, "_fixtureinfo", None)
        definitions = definitions.name2fixturedefs.values() if definitions else ()
        if any(getattr(d.func, "launches", False) for defs in definitions for d in defs):
            item.add_marker(pytest.mark.launches)


def pytest_configure(config):
    config.addinivalue_line("markers", "launches: the test starts processes (the full suite only; "
                                       "the fast tier is -m 'not launches')")
    # `datasets` converts a data set into its cache on first read: a temporary one, not the user's ~/.cache.
    import atexit
    import shutil
    import tempfile
    cache = tempfile.mkdtemp(prefix="hf-datasets-cache-")
    os.environ["HF_DATASETS_CACHE"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    # Where torch's JIT-built C++ ops go: empty at the start, so that a test can show that none was built.
    extensions = tempfile.mkdtemp(prefix="torch-extensions-")
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions
    atexit.register(shutil.rmtree, extensions, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    global _current_item
    _current_item = item  # module- and session-scoped fixtures are set up here, for the first test that uses them
    try:
        yield
    finally:
        _current_item = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    global _current_item
    _current_item = item
    try:
        yield
    finally:
        _current_item = None


def _sigint_state() -> tuple[bool, bool]:
    """(SIGINT ignored, SIGINT blocked) in this thread: what every process started from here inherits."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN, signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture(autouse=True)
def sigint_left_as_found():
    """A test must not leave the worker's SIGINT ignored or blocked: every later process started from this worker
    would inherit it and never see Ctrl-C (both Ctrl-C tests of test_preempt.py once failed so in one worker)."""
    before = _sigint_state()
    yield
    assert _sigint_state() == before, \
        f"the test left SIGINT (ignored, blocked) {_sigint_state()}, found {before}"


# --- a trainer in a child process, watched while it runs ------------------------------------------------------
TIMEOUT = 300  # seconds a trainer process may run, as run_trainer's


def start_trainer(args):
    """trainer/main.py in a child process, its output in a pipe, killed after TIMEOUT seconds."""
    process = subprocess.Popen([sys.executable, MAIN, *map(str, args)], cwd=REPO, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The process's timeout, as subprocess.run's: a hung trainer is killed, and whatever waits for it then fails
    # with its output. The waits below have no bound of their own.
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.daemon = True
    timer.start()
    return process


def wait_while_running(process, condition, what: str, log: Path | None = None) -> None:
    """Wait while `process` runs until `condition()` holds; fail with its output (its stdout pipe, else the tail of
    `log`) if it exits first or TIMEOUT seconds pass (a hang guard: a rank that stops alone leaves the others
    waiting in a collective)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        try:
            process.wait(timeout=0.01)  # sleeps between checks, and notices an exit at once
        except subprocess.TimeoutExpired:
            if time.monotonic() < deadline:
                continue
        hung = process.returncode is None
        if hung:
            process.kill()  # hung: its pipe would not reach end-of-file while it runs
            process.wait()
        output = process.stdout.read() if process.stdout else (log.read_text()[-5000:] if log else "")
        raise AssertionError(f"the trainer {'hung' if hung else f'exited ({process.returncode})'} before {what}:\n"
                             f"{output}")


# --- in-process runs of the trainer's entry point -------------------------------------------------------------
def fresh_accelerate_state() -> None:
    """Forget accelerate's process-wide state (mixed precision, device, the dynamo plugin): it is kept once per
    process, so a Trainer made after another in the same test process would otherwise inherit the first one's."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def make_trainer(cifar_dir, save_dir, **options):
    """The real Trainer in this process, from a fresh accelerate state: test_vit on the CPU in fp32, one epoch of
    batch 32 with no warm-up and no augmentation, unless `options` say otherwise."""
    from trainer.config import TrainConfig
    from trainer.loop import Trainer
    fresh_accelerate_state()
    values = dict(model="test_vit", pretrained=False, data_dir=str(cifar_dir), download=False, device="cpu",
                  mixed_precision="no", epochs=1, warmup_epochs=0, batch_size=32, augment="none", progress=False,
                  save_dir=str(save_dir))
    return Trainer(TrainConfig(**{**values, **options}))


def train_here(args, *, check: bool = True) -> subprocess.CompletedProcess:
    """As run_trainer(args) for one process, but trainer/main.py's main() runs in this process, whose imports are
    paid already (they are ~3.5 s of a trainer process's ~4 s in a short run): one intra-op thread, as
    run_trainer's processes have (OMP_NUM_THREADS=1), so that the float sums, and so the runs, are the same; a fresh
    accelerate state; stdout and stderr captured; the stop-signal handlers the run installs put back. For runs that
    need no process of their own (no signal, no kill, no environment, no DataLoader workers, no compilation whose
    caches would outlive the test)."""
    import contextlib
    import io
    from trainer.main import main
    fresh_accelerate_state()
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)}
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"trainer failed ({code}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def train(args, processes: int = 1) -> subprocess.CompletedProcess:
    """A run on `processes` processes: in this process for one (train_here), a real `accelerate launch` for more."""
    return train_here(args) if processes == 1 else run_trainer(args, processes=processes)


def refused(argv) -> str:
    """The trainer in this process (train_here) must exit 2 with exactly one `error: ` line on stderr, returned."""
    result = train_here(argv, check=False)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (result.returncode, err)
    return err[0]


# --- two runs compared --------------------------------------------------------------------------------------
def without_timings(records: list[dict]) -> list[dict]:
    """Record lines without what the clock decides (times, images per second): what two runs can share exactly."""
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in records]


def assert_same_records(run_dir, reference, names=("metrics.jsonl", "steps.jsonl"), rel: float = 0.0) -> None:
    """The same record lines (timings aside) in both run folders: equal, or within `rel` for each number."""
    for name in names:
        got, want = (without_timings(read_jsonl(Path(d) / name)) for d in (run_dir, reference))
        if rel == 0.0:
            assert got == want, name
            continue
        assert [a.keys() for a in got] == [b.keys() for b in want], name
        for a, b in zip(got, want):
            assert all(a[k] == pytest.approx(b[k], rel=rel) for k in a), (name, a, b)


def assert_same_weights(path, reference) -> None:
    """Two safetensors files hold bit-identical tensors under the same names."""
    got, want = load_weights(path), load_weights(reference)
    assert got.keys() == want.keys(), path
    assert all(torch.equal(got[k], want[k]) for k in want), path


def assert_same_run(run_dir, reference, epoch: int, rel: float = 0.0) -> None:
    """Bit-identical weights at `epoch` and the same metrics and step lines (timings aside) as `reference`."""
    run_dir, reference = Path(run_dir), Path(reference)
    assert_same_weights(run_dir / f"epoch_{epoch}" / "model.safetensors",
                        reference / f"epoch_{epoch}" / "model.safetensors")
    assert_same_records(run_dir, reference, rel=rel)


# --- run folders as the trainer writes them, and the report's tables (test_report, test_study, test_refusals) -----
NFNET, VIT = "dm_nfnet_f0.dm_in1k", "vit_base_patch8_224.augreg_in21k_ft_in1k"
REFERENCE = dict(epochs=25, warmup_epochs=5.0, learning_rate=5e-4, weight_decay=1e-2, batch_size=256, seed=3407)
FIGURE_PIXELS = (400, 1200)  # 12 x 4 inches at 100 dpi: rows, columns


def write_run(folder, *, model="nfnet", timm_model=NFNET, optimizer="adamw", scheduler="cosine", acc1=(50.0, 70.5),
              steps_per_epoch=4, hardware="NVIDIA H200", steps=True, **options):
    """A run folder as the trainer writes it, with one metrics line per value of acc1."""
    folder.mkdir(parents=True)
    options = {**REFERENCE, "model": model, "optimizer": optimizer, "scheduler": scheduler, **options}
    (folder / "config.json").write_text(json.dumps({
        "options": options, "hardware": hardware,
        "resolved": {"timm_model": timm_model, "processes": 8, "global_batch_size": options["batch_size"]}}))
    metrics = [{"epoch": e, "step": e * steps_per_epoch, "train_loss": 3.0 / e, "val_loss": 2.5 / e, "val_acc1": a,
                "val_acc5": a + 20, "lr": 1e-4 * e, "epoch_time_s": 100.0 * e, "images_per_s": 1000.0 * e}
               for e, a in enumerate(acc1, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if steps:
        lines = [{"step": s, "epoch": (s - 1) // steps_per_epoch + 1, "lr": 1e-5 * s, "train_loss": 4.0 - 0.1 * s,
                  "images_per_s": 900.0} for s in range(1, len(acc1) * steps_per_epoch + 1)]
        (folder / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    return folder


def markdown_tables(text: str) -> list[list[dict]]:
    """Every table of a Markdown text, as rows of {header: cell}."""
    tables, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---") and \
                not (i and lines[i - 1].startswith("|")):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            tables.append(rows)
    return tables
