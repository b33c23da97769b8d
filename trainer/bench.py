"""Throughput benchmark: the raw training step against the full trainer, per model and mode, in one process.

    python -m trainer.bench                                   # GPU: nfnet and vit, every mode
    python -m trainer.bench --models test_vit --steps 5      # CPU: a tiny model, quickly

raw      the model's forward, backward and fused optimizer step on synthetic data already on the device;
trainer  Trainer.train_epoch on generated CIFAR-format files: data (GPU-resident when on a GPU), augmentation,
         step, schedule and logging; evaluation excluded.
Modes: eager, compile (torch.compile), cuda_graph (the whole step as one CUDA graph, GPU only), and the trainer
under DeepSpeed ZeRO-2 (`zero2`, eager) or FSDP2 (`fsdp`, eager, with --fsdp) at world size 1. Each figure is the median of --repeats timings
after a warm-up that absorbs compilation and capture. This is a measurement, not a test: nothing asserts a speed.
`--channels_last` runs every row with the model's weights (and the raw step's images) in channels-last layout,
an A/B switch for convolutional models. With `--out`, each row is appended to bench.md and bench.jsonl the
moment it is measured, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError, OneLineArgumentParser, TrainConfig
from .errors import run_command
from .graphs import CudaGraphStep
from .models import create_model
from .optim import create_optimizer
from .synthetic import write_fake_cifar100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_image(config: TrainConfig, device: torch.device) -> float:
    """Forward + backward FLOPs of one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    model = create_model(config).to(device)
    images = torch.randn(2, 3, config.image_size, config.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def time_steps(step, steps: int, repeats: int, device: torch.device) -> float:
    """Median seconds per step over `repeats` timings of `steps` steps, after as many untimed warm-up steps
    (the trainer's warm-up is one epoch of `steps` steps too)."""
    for _ in range(steps):
        step()
    sync(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        timings.append((time.perf_counter() - start) / steps)
    return statistics.median(timings)


def raw_step_time(config: TrainConfig, mode: str, device: torch.device, steps: int, repeats: int,
                  channels_last: bool = False) -> float:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(config).to(device, memory_format=layout)
    optimizer = create_optimizer(config, model, fused=device.type == "cuda", capturable=mode == "cuda_graph")
    batch = config.batch_size
    images = torch.randn(batch, 3, config.image_size, config.image_size, device=device).to(memory_format=layout)
    labels = torch.randint(0, 100, (batch,), device=device)
    bf16 = device.type == "cuda"
    if mode == "cuda_graph":
        graphed = CudaGraphStep(model, optimizer, lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
                                tuple(images.shape), torch.bfloat16 if bf16 else None, 0.0)
        weights = torch.ones(batch, device=device)
        return time_steps(lambda: graphed(images, labels, weights, 1 / batch), steps, repeats, device)
    # As the trainer's (runtime.py): static shapes, the backend asked for.
    forward = torch.compile(model, dynamic=False, backend=config.compile_backend) if mode == "compile" else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = forward(images)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time_steps(step, steps, repeats, device)


def launched_step_time(config: TrainConfig, strategy: str, steps: int, repeats: int,
                       channels_last: bool = False) -> float:
    """The trainer under `strategy` (accelerate_configs/{strategy}.yaml: zero2 or fsdp) at world size 1, in a child
    process of its own.

    DeepSpeed and FSDP need the process group and environment their launcher sets up, and DeepSpeed keeps global
    state that a process which already ran other trainers cannot reset; so they run through the real launcher.
    """
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(repo / "accelerate_configs" / f"{strategy}.yaml"), "--num_processes", "1", "-m", "trainer.bench",
                   "--child_config", json.dumps(vars(config)), "--child_result", result.name,
                   "--steps", str(steps), "--repeats", str(repeats)] + (["--channels_last"] if channels_last else [])
        # The same number of CPU threads as this process (torchrun would set 1), so the rows compare.
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        subprocess.run(command, check=True, cwd=repo, env=env)
        return json.loads(Path(result.name).read_text())["seconds"]


def trainer_step_time(config: TrainConfig, steps: int, repeats: int, channels_last: bool = False) -> float:
    """Median seconds per optimizer step of Trainer.train_epoch (one epoch = `steps` steps)."""
    from accelerate.state import AcceleratorState

    from .loop import Trainer
    # Several trainers with different settings in one process: accelerate keeps one global state, so it
    # is reset between them (as accelerate's own tests do).
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = Trainer(config)
    if channels_last:  # in place, before the first step compiles or captures anything
        trainer.plain_model.to(memory_format=torch.channels_last)
    device = trainer.accelerator.device
    timings = []
    for epoch in range(repeats + 1):  # epoch 0 warms up: compilation, graph capture, cuDNN autotuning
        trainer.progress.step_in_epoch = 0
        sync(device)
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        sync(device)
        timings.append((time.perf_counter() - start) / steps)
    trainer.close()
    return statistics.median(timings[1:])


def run(models: list[str], modes: list[str], augments: list[str], batch_size: int, steps: int, repeats: int,
        zero2: bool, workdir: Path, channels_last: bool = False, written=lambda row: None,
        fsdp: bool = False, compile_backend: str = "inductor") -> list[dict]:
    """Every row, each also handed to `written` the moment it is measured."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The trainer turns cuDNN's autotuning on for its one static training shape (loop.py), globally; set here
    # before any row, so raw and trainer rows, whichever runs first, all run with it.
    torch.backends.cudnn.benchmark = True
    data_dir = workdir / "data"
    write_fake_cifar100(data_dir, num_train=batch_size * steps, num_test=batch_size, num_classes=100)
    (workdir / "run").mkdir()  # the trainer writes steps.jsonl there
    rows = []
    for model in models:
        base = TrainConfig(model=model, pretrained=False, batch_size=batch_size, data_dir=str(data_dir),
                           epochs=1000, warmup_epochs=0, progress=False, save_dir=str(workdir / "run"),
                           log_interval=20, eval_batch_size=batch_size, compile_backend=compile_backend)
        flops = train_flops_per_image(base, device)
        runnable = [m for m in modes if m != "cuda_graph" or device.type == "cuda"]
        raw = {}

        def record(path, mode, augment, measure, raw_mode=None):
            # A mode that fails (say, a compiler error on one model) is reported in its row; the others still run.
            try:
                seconds = measure()
            except Exception as error:  # noqa: BLE001 - the benchmark reports, it does not stop
                row = dict(model=model, path=path, mode=mode, augment=augment, channels_last=channels_last,
                           error=f"{type(error).__name__}: {error}")
            else:
                if path == "raw":
                    raw[mode] = seconds
                base_seconds = raw.get(raw_mode or mode) if path == "trainer" else None
                row = dict(model=model, path=path, mode=mode, augment=augment, channels_last=channels_last,
                           seconds=seconds,
                           images_per_s=batch_size / seconds, ms_per_step=1000 * seconds,
                           tflops=flops * batch_size / seconds / 1e12,
                           ratio=base_seconds / seconds if base_seconds else None)
            rows.append(row)
            print(table([row], header=False), flush=True)
            written(row)

        for mode in runnable:
            record("raw", mode, "-", lambda: raw_step_time(base, mode, device, steps, repeats, channels_last))
        for mode in runnable:
            for augment in augments:
                config = TrainConfig(**{**vars(base), "augment": augment, "compile": mode == "compile",
                                        "cuda_graph": mode == "cuda_graph"})
                record("trainer", mode, augment, lambda: trainer_step_time(config, steps, repeats, channels_last))
        if zero2:
            for label, micro in (("zero2", batch_size), ("zero2, 2 micro-steps", batch_size // 2)):
                config = TrainConfig(**{**vars(base), "micro_batch_size": micro})
                record("trainer", label, base.augment,
                       lambda: launched_step_time(config, "zero2", steps, repeats, channels_last), "eager")
        if fsdp:
            record("trainer", "fsdp", base.augment,
                   lambda: launched_step_time(base, "fsdp", steps, repeats, channels_last), "eager")
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    lines = ["| model | path | mode | augment | images/s | ms/step | TFLOP/s | trainer/raw |",
             "|---|---|---|---|---|---|---|---|"] if header else []
    for r in rows:
        mode = r["mode"] + (", channels_last" if r.get("channels_last") else "")
        if "error" in r:
            lines.append(f"| {r['model']} | {r['path']} | {mode} | {r['augment']} | failed: {r['error'][:200]} |||||")
            continue
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        lines.append(f"| {r['model']} | {r['path']} | {mode} | {r['augment']} | {r['images_per_s']:,.0f} | "
                     f"{r['ms_per_step']:.1f} | {r['tflops']:.2f} | {ratio} |")
    return "\n".join(lines)


def check_arguments(args, split, gpu: bool) -> None:
    """Every bad argument in one line before anything is measured or written (the run takes minutes)."""
    import timm
    from .config import MODEL_PRESETS, check_writable_folder
    unknown = set(split(args.modes)) - {"eager", "compile", "cuda_graph"}
    if unknown or not split(args.modes):
        raise ConfigError(f"--modes {args.modes!r}: give some of eager, compile, cuda_graph"
                          + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
    if "cuda_graph" in split(args.modes) and not gpu:  # a CUDA graph needs a GPU: the row would be missing
        raise ConfigError("--modes cuda_graph needs a CUDA GPU, and none is visible; leave it out on the CPU")
    models = split(args.models)
    bad = [m for m in models if m not in MODEL_PRESETS and not timm.is_model(m)]
    if bad or not models:
        raise ConfigError(f"--models {args.models!r}: {bad[0] if bad else 'no model'} is neither a preset (nfnet, "
                          f"vit) nor a timm model name")
    augments = {"crop_flip", "randaug", "none"}
    if not split(args.augment) or set(split(args.augment)) - augments:
        raise ConfigError(f"--augment {args.augment!r}: give some of {', '.join(sorted(augments))}")
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.out is not None:
        check_writable_folder(str(args.out), "--out")


def main(argv=None) -> int:
    return run_command(bench_command, argv)


def bench_command(argv) -> int:
    parser = OneLineArgumentParser(prog="python -m trainer.bench", description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--models", default="nfnet,vit" if gpu else "test_vit",
                        help="comma-separated presets or timm names (default: nfnet,vit on GPU, test_vit on CPU)")
    parser.add_argument("--modes", default="eager,compile,cuda_graph" if gpu else "eager",
                        help="comma-separated: eager, compile, cuda_graph")
    parser.add_argument("--augment", default="crop_flip,none", help="comma-separated trainer augmentations")
    parser.add_argument("--batch_size", type=int, default=256, help="images per step")
    parser.add_argument("--steps", type=int, default=50, help="steps per timing (and per trainer epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the median is reported")
    parser.add_argument("--zero2", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the trainer under DeepSpeed ZeRO-2 at world size 1 (needs deepspeed)")
    parser.add_argument("--fsdp", action="store_true",
                        help="also time the trainer under FSDP2 at world size 1 (accelerate_configs/fsdp.yaml)")
    parser.add_argument("--compile_backend", default="inductor",
                        choices=typing.get_args(typing.get_type_hints(TrainConfig)["compile_backend"]),
                        help="the compile rows' torch.compile backend, as the trainer's --compile_backend (aot_eager: "
                             "the CPU smoke of benchmarks/gpu_check.sh, where inductor's kernels take minutes)")
    parser.add_argument("--channels_last", action="store_true",
                        help="weights (and the raw step's images) in channels-last layout, for an A/B comparison")
    parser.add_argument("--out", type=Path, help="also write the table (bench.md) and the raw figures (bench.jsonl, "
                        "bench.json) here, each row as soon as it is measured")
    parser.add_argument("--child_config", help=argparse.SUPPRESS)  # the ZeRO-2 child: one trainer timing
    parser.add_argument("--child_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_config:
        seconds = trainer_step_time(TrainConfig(**json.loads(args.child_config)), args.steps, args.repeats,
                                    args.channels_last)
        Path(args.child_result).write_text(json.dumps({"seconds": seconds}))
        return 0
    split = lambda text: [item for item in text.split(",") if item]  # noqa: E731
    check_arguments(args, split, gpu)
    from .records import hardware, library_versions
    header = (f"{hardware()}; " + ", ".join(f"{k} {v}" for k, v in library_versions().items())
              + f"; batch {args.batch_size}, {'bf16' if gpu else 'fp32'}, median of {args.repeats} x {args.steps} steps"
              + ", cudnn.benchmark on"
              + (", channels_last" if args.channels_last else "")
              + (f", compile backend {args.compile_backend}" if "compile" in split(args.modes) else ""))
    if args.out:
        # Written as the run goes: the header now, then each row the moment it is measured, so a time limit
        # that stops the run keeps every row measured so far.
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text(header + "\n\n" + table([]) + "\n")
        (args.out / "bench.jsonl").write_text("")

    def written(row: dict) -> None:
        if args.out:
            for name, line in (("bench.md", table([row], header=False)), ("bench.jsonl", json.dumps(row))):
                with open(args.out / name, "a") as f:
                    f.write(line + "\n")
    with tempfile.TemporaryDirectory() as workdir:
        rows = run(split(args.models), split(args.modes), split(args.augment), args.batch_size, args.steps,
                   args.repeats, args.zero2, Path(workdir), args.channels_last, written, args.fsdp,
                   args.compile_backend)
    print(header)
    print(table(rows))
    if args.out:
        (args.out / "bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
