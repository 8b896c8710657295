"""One writer per run directory: an advisory lock that the kernel drops when its process dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from layerwise.errors import LayerwiseError

_held: set[int] = set()  # descriptors of the locks this process holds


class RunLock:
    """An advisory lock (flock) on RUN/.lock, held while a process trains the run.

    The kernel releases it when the process ends, however it ends: a run killed with SIGKILL can be resumed at
    once, with no stale lock to delete. The file holds the holder's pid and host, for the error message. flock
    works across nodes on NFS (Linux emulates it with fcntl locks there).
    """

    def __init__(self, path: Path):
        self.path, self.made_folder = path, not path.parent.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LayerwiseError(f"cannot create {path} ({e.strerror}); check --out") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise LayerwiseError(
                f"{path.parent} is being trained by {holder}; wait for it to finish or stop it, then --resume"
            ) from None
        _held.add(self.fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self, undo: bool = False) -> None:
        """Drop the lock; with `undo` (a new run that failed before it started) also remove the folder the lock
        created, if nothing else is in it."""
        if self.fd is None:
            return
        if undo and self.made_folder:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        _held.discard(self.fd)
        os.close(self.fd)  # closing the descriptor drops the lock
        self.fd = None


def release_inherited_locks(*_) -> None:
    """In a forked child (a DataLoader worker): close the parent's lock descriptors. A flock belongs to every
    copy of its descriptor, so a child's copy would keep the run locked after its parent was killed."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
