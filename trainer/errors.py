"""How a command of the package ends on a mistake the user can fix: one line, `error: <message>`, on stderr and exit
status 2, without a traceback. Here, in a module without torch, so that the study runner and the report can use it.
"""

from __future__ import annotations

import sys

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
