"""Stopping on a signal (preemption, a time limit, Ctrl-C) so that the run can resume: every process stops
after the same optimizer step, and the trainer saves there and exits 75.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

from .config import PREEMPTED_EXIT_CODE
from .time_limit import TimeLimit


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint."""


class StopVote:
    """Whether any process was asked to stop, agreed by all processes one optimizer step late, with no host sync.

    After each step every process starts a non-blocking all-reduce (MAX) of its own stop flag and reads the
    previous step's result, which is the same on every process, so all stop after the same step, one or two
    steps after the signal, whatever the log interval. torch.distributed offers the collective; accelerate has no
    non-blocking reduce, and DeepSpeed runs on the same default process group. One process reads its own flag.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.pending = None  # (work, tensor, event) of the vote in flight
        # NCCL reduces device tensors only, and reading one is a sync with everything queued before it: the result
        # is copied into pinned host memory behind the collective and read one step later, once the copy's event
        # is done (by then the next step is queued, so the device never waits for the host).
        self.cuda = self.distributed and device.type == "cuda"
        self.host = torch.zeros(1, pin_memory=True) if self.cuda else None

    def exchange(self, stop: bool) -> bool:
        """The previous vote's result; starts this step's vote (with `stop`) unless that result is already stop."""
        if not self.distributed:
            return stop
        agreed = self.finish()
        if not agreed:
            flag = torch.full((1,), float(stop), device=self.device)  # a fill kernel: no host-to-device copy
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
            event = None
            if self.cuda:
                work.wait()  # NCCL: the current stream waits for the collective; the host does not
                self.host.copy_(flag, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                work = None
            self.pending = (work, flag, event)
        return agreed

    def finish(self) -> bool:
        """Waits for the vote in flight, if any, and returns its result."""
        if self.pending is None:
            return False
        work, flag, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
            return bool(self.host.item())
        work.wait()  # gloo (CPU): already done unless another process is behind
        return bool(flag.item())

    def now(self, stop: bool) -> bool:
        """A blocking vote (once per epoch, after evaluation): whether any process was asked to stop by now."""
        self.finish()
        if not self.distributed:
            return stop
        flag = torch.full((1,), float(stop), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class StopRequest:
    """The first stop signal this process received, or its time limit coming due (a flag only: the loop stops
    every process after the same step and saves there). A second signal (a launcher passing the first one on, or
    during the save) changes nothing."""

    def __init__(self, say, time_limit: Optional[TimeLimit] = None):
        self.signal = None
        self.timed_out = None  # why the time limit stopped the run
        self.say = say
        self.time_limit = time_limit

    def install(self, names) -> None:
        for name in set(names):
            signal.signal(getattr(signal, name), self._received)

    def _received(self, signum, frame) -> None:
        if self.signal is None:
            self.say(f"received {signal.Signals(signum).name}: saving a checkpoint within two optimizer steps (or "
                     f"after this epoch's evaluation), then exiting with status {PREEMPTED_EXIT_CODE}; in the "
                     f"last epoch's last step or evaluation the run completes instead (status 0)")
            self.signal = signum

    @property
    def asked(self) -> bool:
        """Read once per optimizer step and once per epoch end (the vote): the time limit measures the interval."""
        if self.signal is None and self.timed_out is None and self.time_limit is not None and self.time_limit.due():
            self.timed_out = self.time_limit.reason()
            self.say(f"{self.timed_out}: saving a checkpoint within two optimizer steps (or after this epoch's "
                     f"evaluation), then exiting with status {PREEMPTED_EXIT_CODE}")
        return self.signal is not None or self.timed_out is not None

    def cause(self) -> str:
        if self.signal:
            return signal.Signals(self.signal).name
        if self.timed_out:
            return "the time limit"
        if self.time_limit is not None and self.time_limit.deadline is not None:
            return "a signal or the time limit on another process"
        return "a signal to another process"
