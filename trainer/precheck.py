"""A launch's checks made once, in one process, before launch.sh starts the workers.

    python trainer/main.py --check_launch PROCESSES STRATEGY [trainer options]     # what launch.sh runs
    python trainer/main.py --check_launch PROCESSES STRATEGY --runs JSON           # the study: a list of runs

Inside the workers a refusal is printed by every process and reported by torch's elastic agent as a
ChildFailedError traceback (exit 1). Here it is one line and exit 2, before any worker starts: the options and
config file, --save_dir, what the process count and strategy allow (runtime.check_layout, the workers' own
check), the data (downloaded here, once per node, when missing: the workers then read it), and the model with
its weights (models.create_model and check_trainable, the workers' own). What needs the process group (the
accelerator, a checkpoint's resume) is still checked by the workers.
"""

from __future__ import annotations

import json

from .config import ConfigError, check_writable_folder, parse_config


def main(argv: list[str]) -> None:
    """`PROCESSES STRATEGY [trainer options]`, or `PROCESSES STRATEGY --runs JSON` (a list of trainer argument
    lists, each checked in turn in this one process: the study checks all its runs before the first starts)."""
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        raise ConfigError("--check_launch needs PROCESSES STRATEGY before the trainer's options")
    processes, strategy, rest = int(argv[0]), argv[1], argv[2:]
    runs = json.loads(rest[1]) if rest[:1] == ["--runs"] and len(rest) == 2 else [rest]
    for run in runs:
        check_launch([str(a) for a in run], processes, strategy)


def check_launch(argv: list[str], processes: int, strategy: str) -> None:
    """ConfigError, DataError or CheckpointError for what the launch of `processes` workers under `strategy`
    (launch.sh's: single, ddp, zero1, zero2, zero3, zero2_offload, zero3_offload, fsdp) would refuse."""
    config = parse_config(argv)  # first, before torch is imported: the options' own refusals in a fraction of a second
    check_writable_folder(config.save_dir, "--save_dir")
    from .data import load_data
    from .models import check_trainable, create_model
    from .runtime import check_batch_fits, check_layout, runs_on_cpu

    _, accumulation = check_layout(config, processes, strategy, runs_on_cpu(config.device))
    data = load_data(config.data, config.data_dir, config.image_size, fetch=True, download=config.download,
                     decode=config.decode, threads=config.num_workers)
    check_batch_fits(config.batch_size, len(data.train.labels), data.train_source)
    check_trainable(create_model(config, data.num_classes), config, len(data.train.labels), processes, accumulation)
