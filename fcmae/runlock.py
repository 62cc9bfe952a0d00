"""An exclusive lock on a run folder, so two jobs never train into the same checkpoints.

A killed or requeued job can outlive its Slurm record for a while (until the scheduler's
kill timeout); the new job then waits here until the old one has exited.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"


class RunLockTimeout(RuntimeError):
    """Raised when another process holds a run folder's lock for longer than the timeout."""


class RunLock:
    """fcntl lock on OUTPUT_DIR/.run.lock, held from acquire() until release() or process exit."""

    def __init__(self, output_dir: str | Path, timeout_s: float = 600.0, poll_s: float = 1.0):
        self.path = Path(output_dir) / LOCK_FILE
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno == errno.ENOLCK:
                    logger.warning("the file system of %s does not support locks; nothing stops two jobs from "
                                   "writing this run folder at once", self.path.parent)
                    return
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not waiting:
                logger.warning("run folder %s is locked by %s; waiting up to %.0f s for it to exit",
                               self.path.parent, self._holder(), self.timeout_s)
                waiting = True
            if time.monotonic() > deadline:
                raise RunLockTimeout(f"run folder {self.path.parent} is still locked by {self._holder()} after "
                                     f"{self.timeout_s:.0f} s; stop that job or choose another --output_dir")
            time.sleep(self.poll_s)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
