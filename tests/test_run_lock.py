"""A run folder has one owner: a second trainer is refused in one line naming it, and changes nothing there; the
lock dies with its holder; on a file system that does not share flock between hosts, the owner's record does."""

import json
import os
import signal
import socket

import pytest

from conftest import TINY, read_jsonl, refused, run_trainer, start_trainer, wait_while_running
from trainer import checkpoint, run_lock
from trainer.run_lock import FolderInUse, RunLock

HOST = socket.gethostname()


def args_for(cifar_dir, save_dir, *extra, epochs=2):
    return [str(a) for a in TINY + ["--data_dir", cifar_dir, "--epochs", epochs, "--batch_size", 32,
                                    "--save_epochs", 1, "--save_dir", save_dir, *extra]]


def owned_by(process, run_dir):
    """The trainer `process` holds `run_dir`'s lock (its record names it)."""
    def holds():
        try:
            return json.loads((run_dir / run_lock.LOCK_FILE).read_text()).get("pid") == process.pid
        except (OSError, ValueError):
            return False
    wait_while_running(process, holds, "it took the lock")


@pytest.mark.launches
def test_a_second_trainer_in_a_running_folder_is_refused_naming_the_owner(cifar_dir, tmp_path):
    first = start_trainer(args_for(cifar_dir, tmp_path, epochs=3))
    owned_by(first, tmp_path)
    wait_while_running(first, lambda: (tmp_path / "epoch_1").is_dir(), "its first checkpoint")
    first.send_signal(signal.SIGSTOP)  # still running (and holding its lock) while the others start, however slow
    try:
        for extra in ([], ["--resume", "auto"], ["--checkpoint", tmp_path / "epoch_1"], ["--overwrite"]):
            line = refused(args_for(cifar_dir, tmp_path, *extra))
            assert line.startswith(f"error: --save_dir {tmp_path} is in use by another trainer (process {first.pid} "
                                   f"on host {HOST}, started 20"), line
    finally:
        first.send_signal(signal.SIGCONT)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    assert [m["epoch"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [s["step"] for s in read_jsonl(tmp_path / "steps.jsonl")] == list(range(1, 28))
    checkpoint.verify(tmp_path / "epoch_3")
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


@pytest.mark.launches
def test_a_refused_start_leaves_the_owners_save_in_progress_alone(cifar_dir, tmp_path):
    first = start_trainer(args_for(cifar_dir, tmp_path))
    owned_by(first, tmp_path)
    wait_while_running(first, lambda: any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()), "it was saving")
    first.send_signal(signal.SIGSTOP)  # frozen mid-save, its staging folder on disk
    try:
        (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
        before = sorted(p.relative_to(tmp_path) for p in staging.rglob("*"))
        for extra in ([], ["--resume", "auto"], ["--overwrite"]):
            assert "is in use by another trainer" in refused(args_for(cifar_dir, tmp_path, *extra))
            assert sorted(p.relative_to(tmp_path) for p in staging.rglob("*")) == before
    finally:
        first.send_signal(signal.SIGCONT)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    for epoch in (1, 2):
        checkpoint.verify(tmp_path / f"epoch_{epoch}")


@pytest.mark.launches
@pytest.mark.launches
def test_the_lock_of_a_killed_trainer_is_taken_over(cifar_dir, tmp_path):
    args = args_for(cifar_dir, tmp_path, "--resume", "auto")
    first = start_trainer(args)
    owned_by(first, tmp_path)
    wait_while_running(first, lambda: (tmp_path / "epoch_1").is_dir(), "its first checkpoint")
    first.kill()
    first.wait()
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == first.pid  # left behind
    second = run_trainer(args)
    assert f"taking over from the trainer that held it (process {first.pid} on host {HOST}" in second.stdout
    assert "resumed from" in second.stdout
    checkpoint.verify(tmp_path / "epoch_2")
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


# --- a shared file system whose flock does not reach other hosts (NFS with local_lock) --------------------------

@pytest.fixture()
def other_host(monkeypatch):
    """This process plays a trainer on another host that gets every flock (the file system does not share them)."""
    monkeypatch.setattr(run_lock, "FOREIGN_WATCH_S", 1.0)
    monkeypatch.setattr(run_lock, "WATCH_POLL_S", 0.05)
    monkeypatch.setattr(run_lock.socket, "gethostname", lambda: "node-b")
    monkeypatch.setattr(run_lock.fcntl, "flock", lambda fd, operation: None)


def test_a_live_owner_on_another_host_is_refused_by_its_record(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    owner = RunLock(tmp_path)
    owner.acquire()  # this host, a real flock and its heartbeat
    try:
        with monkeypatch.context() as m:
            m.setattr(run_lock, "FOREIGN_WATCH_S", 1.0)
            m.setattr(run_lock, "WATCH_POLL_S", 0.05)
            m.setattr(run_lock.socket, "gethostname", lambda: "node-b")
            m.setattr(run_lock.fcntl, "flock", lambda fd, operation: None)
            said = []
            with pytest.raises(FolderInUse, match=f"in use by another trainer \\(process {os.getpid()} on host "
                                                  f"{HOST}, started .*; its lock file is alive"):
                RunLock(tmp_path).acquire(said.append)
            assert "names a trainer on another host" in said[0]
        assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["pid"] == os.getpid()  # still the owner's
    finally:
        owner.release()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_owner_on_another_host_is_taken_over(tmp_path, other_host):
    (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps({"host": "node-a", "pid": 4242, "started": "earlier"}))
    said = []
    lock = RunLock(tmp_path)
    lock.acquire(said.append)
    try:
        assert said[-1].endswith("that trainer is gone (its record did not change); taking over")
        record = json.loads((tmp_path / run_lock.LOCK_FILE).read_text())
        assert (record["host"], record["pid"]) == ("node-b", os.getpid())
    finally:
        lock.release()


def test_a_lock_still_held_by_a_killed_owners_workers_is_waited_for(tmp_path, monkeypatch):
    # The owner was SIGKILLed, but its forked DataLoader workers still hold the flock (it belongs to the open file,
    # which they inherited) until torch's watchdog ends them: the next start waits for them rather than refusing.
    import fcntl
    import threading
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a process of this host that no longer exists
    lock_path = tmp_path / run_lock.LOCK_FILE
    lock_path.write_text(json.dumps({"host": HOST, "pid": pid, "started": "then"}))
    held = os.open(lock_path, os.O_RDWR)  # another open file: the workers' copy
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [held]).start()  # the watchdog ends them
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(lines.append)
    try:
        assert lines == [f"{tmp_path}: taking over from the trainer that held it (process {pid} on host {HOST}, "
                         f"started then), which ended without releasing it"]
    finally:
        lock.release()
    # A live owner's lock is refused at once, not waited for.
    monkeypatch.setattr(run_lock, "ORPHANS_WAIT_S", 60.0)
    lock_path.write_text(json.dumps({"host": HOST, "pid": os.getpid(), "started": "now"}))
    held = os.open(lock_path, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with pytest.raises(FolderInUse, match=f"process {os.getpid()} on host {HOST}, started now"):
            RunLock(tmp_path).acquire(lines.append)
    finally:
        os.close(held)
