"""Which process of a job does what, the one place that decides it: the main process of the whole job writes the run's
files and speaks (accelerate's own `print` speaks once per node), downloads first while the others wait, and does
the work whose result, or refusal, every process then receives by broadcast. The run logger (run_log.py), the
checkpoint code (checkpoint.py, checkpoint_folder.py) and trainer.evaluate ask it.
"""

from __future__ import annotations

import contextlib


class Ranks:
    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (and speaks): the main process of the whole job."""
        return self.accelerator.is_main_process

    def say(self, *args) -> None:
        """A line on the console, once per job."""
        if self.is_main:
            print(*args, flush=True)

    @staticmethod
    def say_here(*args) -> None:
        """A line about this process alone (the signal it received), from every process it happens on."""
        print(*args, flush=True)

    @contextlib.contextmanager
    def first_on_main(self, per_node: bool = False):
        """The main process (of the job, or of each node with `per_node`) runs the block first, the others
        after it (accelerate's main_process_first): a download into a shared cache or data folder happens once.
        Yields whether this process is that one (the one that downloads)."""
        if per_node:
            with self.accelerator.local_main_process_first():
                yield self.accelerator.is_local_main_process
        else:
            with self.accelerator.main_process_first():
                yield self.is_main

    def on_main(self, work, passed_on: tuple[type[Exception], ...] = ()):
        """Run `work` (reading, hashing or writing the run's files) on the main process only and hand every
        process its result; an error of a `passed_on` type raised there is raised on every process, which would
        otherwise wait for the main one in the next collective."""
        from accelerate.utils import broadcast_object_list
        outcome = [None]
        if self.is_main:
            try:
                outcome[0] = (None, work())
            except passed_on as error:
                outcome[0] = ((type(error), str(error)), None)
        broadcast_object_list(outcome)
        error, result = outcome[0]
        if error is not None:
            kind, message = error
            raise kind(message)
        return result
