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

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`python trainer/main.py`, `accelerate launch trainer/main.py`): import the package,
    # not this folder's modules as top-level names that could shadow other libraries.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def main(argv=None) -> int:
    try:
        from trainer.checkpoint import SaveError
        from trainer.config import PREEMPTED_EXIT_CODE, check_writable_folder, parse_config
        from trainer.errors import run_command
        from trainer.loop import Preempted, Trainer
    except KeyboardInterrupt:  # Ctrl-C while torch & co. load
        return interrupted()

    def train(argv: list[str]) -> int:
        """A launch's checks (--check_launch) or a run; every exit status but a UserError's 2."""
        try:
            if argv[:1] == ["--check_launch"]:  # launch.sh and the study, before they start a run (precheck.py)
                from trainer import precheck
                precheck.main(argv[1:])
                return 0
            config = parse_config(argv)
            check_writable_folder(config.save_dir, "--save_dir")  # before anything is downloaded, built or written
            trainer = Trainer(config)
            trainer.run()
            trainer.close()
        except Preempted as stop:  # raised by trainer.run(), on every process after the same step
            print(stop, file=sys.stderr)
            tell_launch_sh(PREEMPTED_EXIT_CODE)
            trainer.close()  # after the status is left: launch.sh then has it whatever the teardown takes
            return PREEMPTED_EXIT_CODE
        except KeyboardInterrupt:  # Ctrl-C before the run installed its handler (which saves like preemption)
            return interrupted()
        except (FloatingPointError, SaveError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # A UserError (bad options, data, checkpoint): one line, exit 2. Under launch.sh the line goes to launch.sh,
    # which prints it once for all the processes of its node.
    return run_command(train, argv, tell=tell_launch_sh)


def interrupted() -> int:
    print("interrupted (Ctrl-C) before training started: nothing to save", file=sys.stderr)
    return 130


def tell_launch_sh(status: int, line: str | None = None) -> bool:
    """Leave this process's exit status (and the line that explains it) where launch.sh looks; False when not
    started by launch.sh. torch's elastic agent (accelerate launch) reports its workers' 75 only as a failure
    (exit 1), and as nothing at all when it was signalled itself; a refusal (2) as a ChildFailedError traceback."""
    folder = os.environ.get("TRAINER_EXIT_STATUS_DIR")
    if not folder:
        return False
    path = Path(folder, f"local_rank_{os.environ.get('LOCAL_RANK', '0')}")
    temporary = path.with_name(f".{path.name}")
    temporary.write_text(f"{status}\n" + (f"{line}\n" if line else ""))
    temporary.replace(path)  # launch.sh never reads half a file
    if status == 2:
        # The agent stops the other workers as soon as one exits non-zero, before they could leave their status:
        # wait (a few seconds at most) until every process of this node refused too, as they do when the refusal
        # is the same for all (the options, the data, a checkpoint: every worker checks them).
        import time
        expected, deadline = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), time.monotonic() + REFUSAL_WAIT_S
        while len(list(Path(folder).glob("local_rank_*"))) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
    return True


# How long a refusing worker waits for the other processes of its node to refuse too (see tell_launch_sh).
REFUSAL_WAIT_S = 5.0


def console() -> None:
    """The `cifar-train` command (setup.cfg's console script): main(), then the end every command has as a program."""
    from trainer.errors import exit_process
    exit_process(main())


if __name__ == "__main__":
    console()
