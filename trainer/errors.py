"""How a command of the package ends: on a mistake the user can fix, one line, `error: <message>`, on stderr and exit
status 2, without a traceback; run as a program, through exit_process. Here, in a module without torch, so that the
study runner and the report can use it.
"""

from __future__ import annotations

import gc
import sys
from typing import NoReturn

# The exit status of a refusal (bad options, files, folders, data or checkpoints), as argparse's own errors.
USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix (an option, a file or folder, the data, a checkpoint); the command prints
    `error: <message>` as one line on stderr and exits 2 (run_command). Each command's own kind (ConfigError,
    CheckpointError, ...) derives from it and keeps its older base (ValueError or RuntimeError), which callers catch."""


def refuse(error: Exception) -> int:
    """How every command ends on bad input: one line `error: ...` on stderr, exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def run_command(work, *args, tell=None) -> int:
    """`work(*args)`, a command's body returning its exit status, with a UserError raised anywhere in it ended as
    refuse() does: the one wrapper of every entry point. `tell(status, line)`: where the line goes instead of stderr
    when it returns True (the trainer under launch.sh, which prints it once for all the processes of its node)."""
    try:
        return work(*args)
    except UserError as error:
        if tell is not None and tell(USER_ERROR_EXIT_CODE, f"error: {error}"):
            return USER_ERROR_EXIT_CODE
        return refuse(error)


def exit_process(status: int) -> NoReturn:
    """End this process with `status`: how every command of the package ends when it runs as a program (its
    `__main__`, `python -m trainer`, the `cifar-train` script), never when a main() is called in another program.

    gc.freeze() first: at exit the interpreter's last garbage collections walk every object still alive, which
    with torch and timm imported (torch._dynamo and sympy among them) is most of the ~0.9 s of CPU a process spent
    exiting: `python -c "import torch, timm"` used 3.6 CPU-s, 2.7 when it ended with os._exit, 2.9 with the freeze
    (2026-12-05, torch 2.14.1, timm 1.0.31, Python 3.11.7, 2-core CPU machine). Frozen objects are still freed by
    reference counting as the interpreter clears its modules; only reference cycles left at exit are not collected,
    and the memory goes back with the process. The exit handlers still run, and the commands have closed what they
    write (with-blocks, Trainer.close) before this."""
    gc.freeze()
    raise SystemExit(status)
