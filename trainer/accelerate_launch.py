"""`accelerate launch` as launch.sh runs it for several processes: the same arguments, the same launcher (torch's
elastic agent, in this process), and two changes to what a failure prints.

    python trainer/accelerate_launch.py [accelerate launch options] trainer/main.py [trainer options]

- When every trainer process of this node left its exit status in TRAINER_EXIT_STATUS_DIR (2: it refused its
  input, the line beside it; 75: it saved and stopped for preemption), the agent's ChildFailedError (a traceback
  and a table of some 40 lines, exit 1) explains nothing more: it exits 1 without them, and launch.sh reports
  the statuses (the line once, exit 2; or exit 75).
- When this node cannot reach the master node (the static rendezvous's connection timeout, torch's
  DistNetworkError), one line names MASTER_ADDR, MASTER_PORT and NODE_RANK (exit 1).
Anything else fails exactly as `accelerate launch` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this folder's modules (config, data, ...) must not shadow others
    sys.path[0] = str(Path(__file__).resolve().parent.parent)


def statuses(folder: str | None) -> list[str]:
    """The exit statuses the trainer processes of this node left (trainer/main.py tell_launch_sh)."""
    if not folder:
        return []
    return [path.read_text().split("\n", 1)[0] for path in sorted(Path(folder).glob("local_rank_*"))]


def main(argv=None) -> int:
    import torch.distributed as dist
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError:
        local = args.num_processes // max(args.num_machines or 1, 1)
        found = statuses(os.environ.get("TRAINER_EXIT_STATUS_DIR"))
        if len(found) == local and set(found) <= {"2", "75"}:
            return 1
        raise
    except subprocess.CalledProcessError as error:  # one process (accelerate's simple launcher): it said why itself
        return error.returncode
    except dist.DistNetworkError as error:
        print(f"error: node NODE_RANK={args.machine_rank} of NNODES={args.num_machines} could not reach the master "
              f"node at MASTER_ADDR={args.main_process_ip} MASTER_PORT={args.main_process_port} "
              f"({str(error).splitlines()[0]}); check that MASTER_ADDR is node 0's address, that node 0 was started "
              f"(NODE_RANK=0) and that the port is open", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from trainer.errors import exit_process
    exit_process(main())
