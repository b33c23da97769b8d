"""One owner per run folder: a trainer holds `{save_dir}/.lock` for its whole run, from before it reads, cleans,
deletes or writes anything there; a second trainer in the same folder (fresh, --resume auto or --checkpoint) is
refused in one line naming the owner.

The lock is `fcntl.flock` on that file, taken by the main process only (the caller hands the refusal to the other
processes). The kernel releases a flock when its holder dies, SIGKILL included, so a requeued job takes the folder
over without a human. The file also records the owner (host, process id, start time) for the refusal to name,
and the owner rewrites it every HEARTBEAT_S seconds: on a shared file system that does not honour flock across
machines (NFS mounted with `local_lock=flock|all`, or `nolock`), a trainer on another host gets the flock anyway,
finds that record, and watches it for FOREIGN_WATCH_S: a record that changes belongs to a live owner (refused),
one that does not is taken over. The file is removed when the run ends, so a record found at the start names a
holder that did not end cleanly.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"  # hidden: not one of the run's entries (a fresh start and --overwrite ignore it)
HEARTBEAT_S = 30.0
# Longer than two heartbeats plus NFS's attribute cache (acregmax, 60 s by default): the file is re-opened for
# each read, and NFS's close-to-open consistency makes an open see the owner's last write.
FOREIGN_WATCH_S = 100.0
WATCH_POLL_S = 2.0
# A flock belongs to the open file, which the owner's forked DataLoader workers inherit: after the owner is
# SIGKILLed they hold it until torch's watchdog ends them (they check their parent every 5 s). A start that finds
# the lock held by a record naming a process of this host that no longer exists waits this long for them.
ORPHANS_WAIT_S = 15.0


class FolderInUse(ConfigError):
    """Another trainer owns the run folder: one line, exit status 2."""


def describe(record: dict) -> str:
    return (f"process {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')}")


class RunLock:
    def __init__(self, save_dir) -> None:
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / LOCK_FILE
        self.fd: int | None = None
        self.created_dir = False
        self.record: dict = {}
        self.beats = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- taking it ------------------------------------------------------------------------------------
    def acquire(self, say=print) -> None:
        """Own the folder (creating it), or raise FolderInUse naming its owner."""
        self.created_dir = not self.save_dir.exists()
        self.save_dir.mkdir(parents=True, exist_ok=True)
        orphans_end = time.monotonic() + ORPHANS_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                if _gone_from_this_host(owner) and time.monotonic() < orphans_end:
                    time.sleep(0.2)  # its workers still hold the flock (see ORPHANS_WAIT_S)
                    continue
                raise FolderInUse(
                    f"--save_dir {self.save_dir} is in use by another trainer ({describe(owner)}): wait until it "
                    f"ends, stop it, or choose another --save_dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder before us removed the file as it ended, after we opened it: our lock is on a file that
            # is no longer the folder's. Lock the one now at that path.
            os.close(fd)
        self.fd = fd
        try:
            self._take_over(os.pread(fd, 1 << 16, 0), say)
        except BaseException:
            self._close()
            raise
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _take_over(self, left: bytes, say) -> None:
        """We hold the flock, and the file still names a holder that did not release it."""
        if not left.strip():
            return
        previous = _parse(left)
        if previous.get("host") == socket.gethostname():
            # One kernel: its flock is authoritative, so that holder is gone (killed, or its node was lost).
            say(f"{self.save_dir}: taking over from the trainer that held it ({describe(previous)}), which ended "
                f"without releasing it")
            return
        # Another host: flock may not reach across machines (NFS without shared locks). A live owner rewrites
        # the record every HEARTBEAT_S; watch it.
        say(f"{self.save_dir}: {LOCK_FILE} names a trainer on another host ({describe(previous)}); checking for "
            f"{FOREIGN_WATCH_S:.0f} s whether it is still running")
        end = time.monotonic() + FOREIGN_WATCH_S
        while time.monotonic() < end:
            time.sleep(WATCH_POLL_S)
            try:
                now = self.path.read_bytes()  # a fresh open each time (NFS close-to-open consistency)
            except FileNotFoundError:
                now = b""
            if now != left:
                raise FolderInUse(
                    f"--save_dir {self.save_dir} is in use by another trainer ({describe(previous)}; its lock "
                    f"file is alive, and this file system does not share flock locks between hosts): wait until "
                    f"it ends, stop it, or choose another --save_dir")
        say(f"{self.save_dir}: that trainer is gone (its record did not change); taking over")

    # --- holding it -----------------------------------------------------------------------------------
    def _write(self) -> None:
        # The count makes every write differ from the last, whatever the clock's resolution: a watcher compares bytes.
        self.beats += 1
        data = (json.dumps({**self.record, "heartbeat": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "beats": self.beats}) + "\n").encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        os.fsync(self.fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError:  # a full disk must not kill the run through its lock; the flock still holds
                pass

    # --- letting go -----------------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the lock file (and the folder, when this run created it and left it empty); a no-op where the
        lock was not taken. The file goes before the flock: acquire() checks that it locked the file at the path."""
        if self.fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        self.path.unlink(missing_ok=True)
        self._close()
        if self.created_dir:
            try:
                self.save_dir.rmdir()  # a refused start leaves no folder behind
            except OSError:
                pass

    def _close(self) -> None:
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None


def _gone_from_this_host(record: dict) -> bool:
    """The record names a process of this host that no longer exists."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's: PermissionError)
        return False
    return False


def _parse(data: bytes) -> dict:
    try:
        record = json.loads(data.decode(errors="replace"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
