"""Fine-tune a timm model on CIFAR-100 with Hugging Face Accelerate.

    python trainer/main.py --model vit                      # one process: a GPU if present, else the CPU
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml trainer/main.py --model nfnet
    accelerate launch --multi_gpu --num_processes 2 trainer/main.py --device cpu --model test_vit
    ./launch.sh --strategy zero2 --model vit                # picks the config for the GPUs it finds

Exit status: 0 done; 2 bad input (one line on stderr); 75 stopped by the preemption signal (or Ctrl-C) after
saving a checkpoint (run the same command with --resume auto to continue); 130 Ctrl-C before training started
(one line, nothing to save); 1 a non-finite loss or anything unexpected (with its traceback), or a checkpoint
that could not be written.
"""

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python trainer/main.py`, `accelerate launch trainer/main.py`): import the package,
    # not this folder's modules as top-level names that could shadow other libraries.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv=None) -> int:
    try:
        from trainer.checkpoint import CheckpointError, SaveError
        from trainer.config import PREEMPTED_EXIT_CODE, ConfigError, check_writable_folder, parse_config
        from trainer.data import DataError
        from trainer.loop import Preempted, Trainer
    except KeyboardInterrupt:  # Ctrl-C while torch & co. load
        return interrupted()

    try:
        config = parse_config(argv)
        check_writable_folder(config.save_dir, "--save_dir")  # before anything is downloaded, built or written
        Trainer(config).run()
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(stop, file=sys.stderr)
        tell_launch_sh(PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C before the run installed its handler (which saves like preemption)
        return interrupted()
    except (FloatingPointError, SaveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def interrupted() -> int:
    print("interrupted (Ctrl-C) before training started: nothing to save", file=sys.stderr)
    return 130


def tell_launch_sh(status: int) -> None:
    """Leave this process's exit status where launch.sh looks: torch's elastic agent (accelerate launch) reports
    its workers' 75 only as a failure (exit 1), and as nothing at all when it was signalled itself."""
    folder = os.environ.get("TRAINER_EXIT_STATUS_DIR")
    if folder:
        Path(folder, f"local_rank_{os.environ.get('LOCAL_RANK', '0')}").write_text(f"{status}\n")


if __name__ == "__main__":
    sys.exit(main())
