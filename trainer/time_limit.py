"""A stop that knows the time limit: the run saves and exits 75 before its job's end, with no warning signal.

The end comes from `--time_limit` (counted from the trainer's start), or under SLURM from the job's end time:
`SLURM_JOB_END_TIME` (a Unix time, set by recent SLURM releases) where set, else `squeue -h -j $SLURM_JOB_ID -o
%e` (the cluster's local time, e.g. 2026-12-04T18:00:00); the earlier of the two wins. The trainer asks "stop
now?" once per optimizer step and once after each epoch's evaluation (preemption.py's vote), and the longest
interval between two such questions measures everything that can come between them: a step, an evaluation, a
checkpoint save, a DataLoader's start. The stop is voted one step late and then saved, so the run stops once
what is left is under twice that interval plus the margin, which covers the first save (before one is measured)
and the exit.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
# SLURM's --time forms, a bare number of minutes aside: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_CLOCK = re.compile(r"(\d+):(\d+)|(\d+):(\d+):(\d+)|(\d+)-(\d+)(?::(\d+))?(?::(\d+))?")


def parse_duration(text: str) -> Optional[float]:
    """Seconds in `3h50m`, `90m`, `45s`, `1d2h` or SLURM's `HH:MM:SS`, `MM:SS`, `D-HH[:MM[:SS]]`; None when it is
    neither (a bare number too: SLURM reads it as minutes, a reader might take seconds)."""
    text = text.strip().lower()
    match = _DURATION.fullmatch(text)
    if text and match and any(match.groups()):
        return sum(float(v) * _UNITS[u] for v, u in zip(match.groups(), "dhms") if v)
    match = _CLOCK.fullmatch(text)
    if not match:
        return None
    mm_ss, hh_mm_ss, with_days = match.groups()[0:2], match.groups()[2:5], match.groups()[5:]
    if mm_ss[0] is not None:
        days, (hours, minutes, seconds) = 0, (0, *map(int, mm_ss))
    elif hh_mm_ss[0] is not None:
        days, (hours, minutes, seconds) = 0, map(int, hh_mm_ss)
    else:
        days, hours, minutes, seconds = (int(v or 0) for v in with_days)
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# No process of this trainer started after this module was imported: process_start() is never later.
_IMPORTED = time.time()


def process_start() -> float:
    """When this process started, so that --time_limit counts the imports, the data and the model too.

    Linux's /proc/self/stat gives the start in clock ticks of the boot clock (CLOCK_BOOTTIME), so the process's
    age is that clock now less the start, and the start is the wall clock less the age. /proc/stat's `btime` is
    not used: it is whole seconds, and it moves when the wall clock is stepped, as after a virtual machine is
    paused or restored from a snapshot (a CI machine read a start 28 s after this module's import). The boot
    clock does not count such a pause either, so the answer is capped at this module's import. Elsewhere: the
    import."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    return started_at(time.time(), age)


def started_at(now: float, age: float) -> float:
    """The wall-clock start of a process `age` seconds old, never after this module's import."""
    return min(now - max(age, 0.0), _IMPORTED)


def squeue_end_time(job_id: str) -> Optional[float]:
    """The job's end as squeue reports it (local time of the cluster), or None (no squeue, no answer, no limit)."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return datetime.datetime.fromisoformat(result.stdout.strip()).timestamp()
    except ValueError:  # N/A, Unknown, NONE, an error message
        return None


def job_end_time(environ=os.environ, squeue: Callable[[str], Optional[float]] = squeue_end_time
                 ) -> tuple[Optional[float], str]:
    """(Unix time the SLURM job ends, where that was read) or (None, why there is none)."""
    if not environ.get("SLURM_JOB_ID"):
        return None, "not a SLURM job"
    value = environ.get("SLURM_JOB_END_TIME", "").strip()
    if value:
        try:
            return float(value), "SLURM_JOB_END_TIME"
        except ValueError:
            pass
    # One squeue per node, not one per process against the SLURM controller: the other processes of the node stop
    # with the first, whose stop every process follows (preemption.py's vote).
    if environ.get("LOCAL_RANK", "0") != "0":
        return None, "squeue asked by the node's first process only"
    end = squeue(environ["SLURM_JOB_ID"])
    return (end, "squeue") if end is not None else (None, "no end time from SLURM_JOB_END_TIME or squeue")


class TimeLimit:
    """When the run must stop to save before its end (`deadline`, a Unix time; None: no limit)."""

    def __init__(self, deadline: Optional[float], source: str, margin: float, clock: Callable[[], float] = time.time):
        self.deadline, self.source, self.margin, self.clock = deadline, source, margin, clock
        self.last_check: Optional[float] = None
        self.longest_interval = 0.0  # between two stop checks: a step, or a step with evaluation and save

    @classmethod
    def resolve(cls, time_limit: Optional[str], margin: float, environ=os.environ,
                squeue: Callable[[str], Optional[float]] = squeue_end_time,
                clock: Callable[[], float] = time.time, started: Optional[float] = None) -> "TimeLimit":
        ends = []
        if time_limit:
            start = process_start() if started is None else started
            ends.append((start + parse_duration(time_limit), f"--time_limit {time_limit}"))
        end, source = job_end_time(environ, squeue)
        if end is not None:
            ends.append((end, f"the SLURM job's end ({source})"))
        if not ends:
            return cls(None, "no time limit", margin, clock)
        deadline, source = min(ends)
        return cls(deadline, source, margin, clock)

    def ends_at(self) -> str:
        return datetime.datetime.fromtimestamp(self.deadline, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    def describe(self) -> str:
        if self.deadline is None:
            return "none"
        return f"{self.ends_at()} ({self.source}, {self.deadline - self.clock():.0f} s from now)"

    def due(self) -> bool:
        """Whether what is left is too little for two more check intervals, the save and the margin. Call it at
        every stop check: it measures the interval since the last one."""
        if self.deadline is None:
            return False
        now = self.clock()
        if self.last_check is not None:
            self.longest_interval = max(self.longest_interval, now - self.last_check)
        self.last_check = now
        return self.deadline - now < 2 * self.longest_interval + self.margin

    def reason(self) -> str:
        left = self.deadline - self.clock()
        return (f"the time limit ({left:.0f} s left until {self.ends_at()}, {self.source}; it needs 2 x "
                f"{self.longest_interval:.1f} s, the longest step or epoch end so far, + {self.margin:g} s margin)")
