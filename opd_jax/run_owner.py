"""One owner per run directory: a job claims its run directory before it looks at it and holds the claim until it
ends, so a second job on the same directory (a requeue after a false preemption, two launches) fails at once with one
line naming the owner (host, pid, start time), and changes nothing.

The claim lives beside the directory (`<parent>/.<name>.owner`), not in it, so taking it writes nothing into the run
directory. On a local file system it is an `fcntl` lock, which the kernel drops when the owner's process dies: a
stale claim is simply taken over, and the log says whose it was. On an object store (`gs://`), where no lock exists,
it is a lease the owner renews from a background thread every third of its length; another job may take it over
once it has expired. Multi-host runs claim it once, on process 0, and every process raises together when it is taken.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time

import jax
from etils import epath

from opd_jax.config import ExperimentConfig
from opd_jax.errors import RunDirError


class RunDirInUseError(RunDirError):
    """Another live job owns the run directory."""


_LOCKS: dict[str, list] = {}  # owner file -> [fd, holders]: the claims this process holds (fcntl locks are per file
# description, so a second open in the same process would refuse the job its own directory)


def owner_path(run_dir: str) -> str:
    """Where the claim on `run_dir` lives: `<parent>/.<name>.owner`, beside the directory."""
    base = run_dir.rstrip("/")
    if "://" in base:
        head, _, name = base.rpartition("/")
        return f"{head}/.{name}.owner"
    parent, name = os.path.split(os.path.abspath(base))
    return os.path.join(parent, f".{name}.owner")


class RunDirOwner:
    """The claim of one job on one run directory (module docstring). `acquire()` returns a line to log when it
    took over a stale claim ("" otherwise) and raises `RunDirInUseError` naming the live owner (host, pid, start
    time); `release()` gives it up. mode: "lock" (local paths: fcntl) or "lease" (remote paths; `lease_s` seconds,
    renewed every third of that while held)."""

    def __init__(self, run_dir: str, *, mode: str | None = None, lease_s: float = 600.0):
        self.run_dir, self.path = run_dir, owner_path(run_dir)
        self.mode = mode or ("lease" if "://" in run_dir else "lock")
        self.lease_s = lease_s
        now = time.time()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": now,
                   "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds")}
        self._fd: int | None = None
        self._stop: threading.Event | None = None
        self._held = False

    def _describe(self, owner: dict) -> str:
        return f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}"

    # ---- local: an fcntl lock -----------------------------------------------------------------------------------
    def _acquire_lock(self) -> str:
        if self.path in _LOCKS:  # this process holds it already (another Trainer of the same job): share it
            _LOCKS[self.path][1] += 1
            self._fd = _LOCKS[self.path][0]
            return ""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only file system, no permission
            raise RunDirError(f"run_dir {self.run_dir} cannot be written: {e.strerror} ({e.filename})",
                              hint="point run_dir at a writable location") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirInUseError(
                f"run_dir {self.run_dir} is in use by another job ({self._describe(self._read())})",
                hint="wait for it to end or stop it; a job that died releases it by itself") from None
        previous = self._read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.me).encode(), 0)
        self._fd = fd
        _LOCKS[self.path] = [fd, 1]
        if previous and (previous.get("host"), previous.get("pid")) != (self.me["host"], self.me["pid"]):
            return (f"run_dir {self.run_dir}: took over the claim of a job that is gone ({self._describe(previous)}; "
                    "it did not release it)")
        return ""

    def _read(self, fd: int | None = None) -> dict:
        try:
            if fd is not None:
                raw = os.pread(fd, 4096, 0)
            else:
                with open(self.path, "rb") as f:
                    raw = f.read(4096)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    # ---- remote: a lease ------------------------------------------------------------------------------------
    def _lease(self) -> dict:
        path = epath.Path(self.path)
        try:
            return json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            return {}

    def _write_lease(self) -> None:
        epath.Path(self.path).write_text(json.dumps({**self.me, "expires": time.time() + self.lease_s}))

    def _acquire_lease(self) -> str:
        held = self._lease()
        mine = (held.get("host"), held.get("pid"), held.get("start")) == (self.me["host"], self.me["pid"],
                                                                        self.me["start"])
        if held and not mine and held.get("expires", 0) > time.time():
            raise RunDirInUseError(
                f"run_dir {self.run_dir} is in use by another job ({self._describe(held)}; its lease runs until "
                f"{datetime.datetime.fromtimestamp(held['expires']).isoformat(timespec='seconds')})",
                hint=f"wait for it to end or stop it; a job that died loses the claim when its lease expires "
                     f"({self.lease_s:.0f} s after its last renewal)")
        self._write_lease()
        time.sleep(min(1.0, self.lease_s / 10))  # two jobs writing at once: the last writer wins, the other sees it
        if (self._lease().get("pid"), self._lease().get("host")) != (self.me["pid"], self.me["host"]):
            raise RunDirInUseError(f"run_dir {self.run_dir}: another job claimed it at the same moment "
                                   f"({self._describe(self._lease())})")
        self._stop = threading.Event()
        threading.Thread(target=self._renew, args=(self._stop,), daemon=True, name="opd_jax-run-dir-lease").start()
        if held and not mine:
            return (f"run_dir {self.run_dir}: took over the expired lease of a job that is gone "
                    f"({self._describe(held)})")
        return ""

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease_s / 3):
            try:
                self._write_lease()
            except OSError as e:  # a transient store error: the next renewal retries
                print(f"warning: could not renew the claim on run_dir {self.run_dir}: {e}")

    # ---- both ------------------------------------------------------------------------------------------------
    def acquire(self) -> str:
        note = self._acquire_lock() if self.mode == "lock" else self._acquire_lease()
        self._held = True
        return note

    def release(self) -> None:
        """Give the claim up (idempotent)."""
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            self._fd = None
            entry = _LOCKS[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del _LOCKS[self.path]
                os.ftruncate(entry[0], 0)  # a clean end: the next job takes it over without a word
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            if self._lease().get("pid") == self.me["pid"]:
                epath.Path(self.path).unlink(missing_ok=True)


def claim_run_dir(cfg: ExperimentConfig) -> RunDirOwner | None:
    """Process 0 claims `cfg.run_dir` (printing a takeover of a stale claim); every process raises
    `RunDirInUseError` together when another job owns it. Returns the claim (None on other processes)."""
    owner, err = None, None
    if jax.process_index() == 0:
        owner = RunDirOwner(cfg.run_dir)
        try:
            note = owner.acquire()
            if note:
                print(note)
        except RunDirInUseError as e:
            owner, err = None, e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
        if not ok and err is None:
            raise RunDirInUseError(f"run_dir {cfg.run_dir} is in use by another job (process 0 names it)")
    if err is not None:
        raise err
    return owner


__all__ = ["RunDirInUseError", "RunDirOwner", "claim_run_dir", "owner_path"]
