"""One writer per run directory: an advisory lock that the kernel drops when its process dies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from layerwise.errors import LayerwiseError
from layerwise.safe_io import open_lock_file, reason

log = logging.getLogger("layerwise")

_held: set[int] = set()  # descriptors of the locks this process holds

NO_LOCK = "LAYERWISE_NO_LOCK"
"""Set to 1 to train where the filesystem cannot lock (flock fails with ENOLCK, ENOSYS or EOPNOTSUPP); the
one-writer check is then yours to keep."""

HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
"""What flock(LOCK_NB) fails with when another process holds the lock; any other errno means it cannot lock."""


def lock_unsupported(path: Path, e: OSError) -> LayerwiseError:
    return LayerwiseError(
        f"cannot lock {path}: its filesystem does not support flock ({errno.errorcode.get(e.errno, e.errno)}: "
        f"{e.strerror}); make sure no other process trains this run and set {NO_LOCK}=1 to go on without the lock"
    )


class RunLock:
    """An advisory lock (flock) on RUN/.lock, held while a process trains the run.

    The kernel releases it when the process ends, however it ends: a run killed with SIGKILL can be resumed at
    once, with no stale lock to delete. The file holds the holder's pid and host, for the error message, which
    names them only when the lock is held. docs/security.md says what flock gives on NFS and Lustre.
    """

    def __init__(self, path: Path):
        self.path, self.made_folder = path, not path.parent.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = open_lock_file(path)
        except OSError as e:
            raise LayerwiseError(f"cannot create {path} ({reason(e)}); check --out") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in HELD:
                holder = os.read(self.fd, 200).decode(errors="replace").strip() or "another process"
                os.close(self.fd)
                raise LayerwiseError(
                    f"{path.parent} is being trained by {holder}; wait for it to finish or stop it, then --resume"
                ) from None
            if os.environ.get(NO_LOCK) != "1":
                os.close(self.fd)
                raise lock_unsupported(path, e) from None
            log.warning("%s cannot be locked (%s); going on without the lock, as %s=1 asks", path, e.strerror, NO_LOCK)
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


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold a blocking flock on the file at path for the duration: concurrent read-modify-writes of one file
    (eval.json) then take turns. Where the filesystem cannot lock, they go on unlocked, with a warning."""
    fd = open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("%s cannot be locked (%s): concurrent writers may lose a result", path, e.strerror)
        yield
    finally:
        os.close(fd)


def release_inherited_locks(*_) -> None:
    """In a forked child (a DataLoader worker): close the parent's lock descriptors. A flock belongs to every
    copy of its descriptor, so a child's copy would keep the run locked after its parent was killed."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()
