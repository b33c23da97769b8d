"""The stop that knows the time limit (trainer/time_limit.py): when it comes due, and where the end is read.
The real run that stops on it, under slurm/train.sbatch with no signal, is in test_preempt.py."""

import time

import pytest

from conftest import TINY, make_trainer, refused
from trainer import time_limit
from trainer.time_limit import TimeLimit, job_end_time, parse_duration, process_start, started_at

IMPORTED = time.time()


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("text, seconds", [("3h50m", 13800), ("230m", 13800), ("45s", 45), ("1d2h", 93600),
                                           ("1.5h", 5400), ("03:50:00", 13800), ("1-00:00:00", 86400),
                                           ("10:00", 600), ("1-02", 93600),
                                           ("1-02:00", 93600), ("1-02:00:30", 93630), ("90", None), ("soon", None), ("", None)])
def test_durations_are_read_as_slurm_and_people_write_them(text, seconds):
    # A bare number is refused: SLURM reads --time=90 as minutes, a reader might take seconds.
    assert parse_duration(text) == seconds


def test_the_limit_comes_due_when_what_is_left_is_under_two_intervals_and_the_margin():
    clock = Clock(1000.0)
    limit = TimeLimit(deadline=1100.0, source="test", margin=10.0, clock=clock)
    # (seconds since the last check, due?): 100 s left and nothing measured; a 5 s step; an epoch end (last step,
    # evaluation, save) of 20 s, 75 s left >= 2 x 20 + 10; 55 s left; 49 s left < 50: due.
    for interval, due in ((0.0, False), (5.0, False), (20.0, False), (20.0, False), (6.0, True)):
        clock.now += interval
        assert limit.due() == due, (clock.now, limit.longest_interval)
    assert limit.longest_interval == 20.0
    assert "the time limit (49 s left" in limit.reason() and "2 x 20.0 s" in limit.reason()


def test_no_limit_never_comes_due():
    limit = TimeLimit.resolve(None, 60.0, environ={}, clock=Clock())
    assert limit.deadline is None and not limit.due() and limit.describe() == "none"


def test_the_earlier_of_time_limit_and_the_slurm_jobs_end_wins():
    clock = Clock(1000.0)
    environ = {"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "5000"}
    # --time_limit counts from the process's start (here: 1000), imports and data loading included.
    assert TimeLimit.resolve("1h", 60.0, environ=environ, clock=clock, started=1000.0).deadline == 4600.0
    limit = TimeLimit.resolve("2h", 60.0, environ=environ, clock=clock, started=1000.0)
    assert (limit.deadline, limit.source) == (5000.0, "the SLURM job's end (SLURM_JOB_END_TIME)")


def test_the_slurm_jobs_end_comes_from_squeue_where_the_environment_has_none():
    asked = []
    squeue = lambda job: asked.append(job) or 4242.0  # noqa: E731
    assert job_end_time({"SLURM_JOB_ID": "7"}, squeue) == (4242.0, "squeue")
    assert job_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "99"}, squeue) == (99.0, "SLURM_JOB_END_TIME")
    assert asked == ["7"]
    assert job_end_time({"SLURM_JOB_ID": "7"}, lambda job: None)[0] is None  # unlimited, or squeue unreachable
    assert job_end_time({}, squeue) == (None, "not a SLURM job")
    # One squeue per node: the node's other processes follow its first one's stop (the vote).
    assert job_end_time({"SLURM_JOB_ID": "7", "LOCAL_RANK": "1"}, squeue)[0] is None and asked == ["7"]


def test_the_time_limit_counts_from_the_processs_start():
    # This process started before this module was imported (and within a day of it), not when asked.
    assert IMPORTED - 86400 < process_start() <= IMPORTED


def test_a_wall_clock_stepped_after_a_pause_does_not_move_the_start_past_the_import():
    # A virtual machine paused for 28 s and restored: the wall clock is stepped on, the boot clock is not, so
    # now - age lands after the process had already started importing. The import caps it.
    imported = time_limit._IMPORTED
    assert started_at(imported + 30.0, 2.0) == imported
    assert started_at(imported + 30.0, 100.0) == imported - 70.0  # an honest age is taken as it is
    assert started_at(imported, -1.0) == imported  # a negative age (clocks read out of order) is no age


@pytest.mark.parametrize("extra, message", [
    (["--time_limit", "90"], "--time_limit '90' is not a duration such as 3h50m, 230m, 45s or 03:50:00"),
    (["--time_limit", "0s"], "--time_limit '0s' is not a duration"),
    (["--time_limit_margin", "-1"], "--time_limit_margin must be >= 0 seconds"),
])
def test_a_time_limit_that_is_not_a_duration_is_refused(tmp_path, extra, message):
    assert message in refused(TINY + ["--data_dir", tmp_path / "data", "--save_dir", tmp_path / "run"] + extra)


def test_the_trainer_takes_its_time_limit_and_margin_from_the_options(cifar_dir, tmp_path):
    trainer = make_trainer(cifar_dir, tmp_path, time_limit="1h", time_limit_margin=7.0)
    limit = trainer.stop.time_limit
    assert limit.margin == 7.0 and limit.source == "--time_limit 1h"
    assert limit.deadline == pytest.approx(process_start() + 3600, abs=2)
    trainer.close()
