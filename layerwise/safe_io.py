"""Files in folders that others may write to (a shared run directory): writes never follow a symbolic link, temp
names never collide, reads are sized first.

A run directory can be shared (`/shared/runs`) or received from someone else. A link planted at a file name
(`RUN/report.html -> ~/.bashrc`) or a folder name (`RUN/checkpoints -> /elsewhere`) must not redirect a write.
So every write opens its folder from the run directory down, one name at a time, with O_NOFOLLOW relative to
the folder above (dir_fd), creates a temporary file of a fresh random name with O_EXCL (which never follows a
link either), and renames it over the target: the rename replaces a link at the target name, never what it
points to. The run directory itself may be a link (`runs/k3 -> /big/k3`): the user named it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from layerwise.errors import LayerwiseError
from layerwise.limits import check_file_size

NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


FULL = "the disk is full or over quota"


def reason(e: BaseException) -> str:
    """What an OSError (or torch.save's RuntimeError) says, for a one-line message."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return FULL
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FULL if "No space left" in text or "quota exceeded" in text.lower() else text


def advice(cause: str) -> str:
    if cause == FULL:
        return "; free disk space, then run the command again (a training run: with --resume)"
    if cause in ("Permission denied", "Read-only file system", "Operation not permitted"):
        return "; check that you may write there"
    return ""


@contextlib.contextmanager
def folder(root: Path, rel: Path | str = "", create: bool = False) -> Iterator[int]:
    """A descriptor of root/rel, opened one name at a time below root without following a link (ELOOP on one);
    with `create`, missing folders are made on the way."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(Path(rel).parts):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            try:
                inner = os.open(name, NOFOLLOW_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = root.joinpath(*Path(rel).parts[: i + 1])
                    raise LayerwiseError(
                        f"{where} is a symbolic link or not a folder; layerwise does not write through links inside "
                        "a run directory: replace it with a real folder"
                    ) from None
                raise
            os.close(fd)
            fd = inner
        yield fd
    finally:
        os.close(fd)


def split(path: Path, root: Path | None) -> tuple[Path, Path, str]:
    """(root, folder below root, file name) of path; root defaults to path's own folder."""
    path = Path(os.path.abspath(path))  # absolute (logging makes its file names so), links left as they are
    root = path.parent if root is None else Path(os.path.abspath(root))
    return root, path.parent.relative_to(root), path.name


def atomic_write(path: Path, write: Callable[[BinaryIO], None], root: Path | None = None) -> None:
    """Write `path` (below `root`, default its own folder) as a new file: `write` fills a temporary file beside
    it, which is flushed to disk and renamed over path. A crash or a full disk leaves the old file or the new one,
    never half a file; concurrent writers each rename a whole file of their own (the last one wins)."""
    root, rel, name = split(path, root)
    try:
        with folder(root, rel, create=True) as fd:
            tmp = f".{name}.{secrets.token_hex(8)}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            handle = os.open(tmp, flags, 0o644, dir_fd=fd)
            try:
                with os.fdopen(handle, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                tmp = None
                os.fsync(fd)
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        cause = reason(e)
        raise LayerwiseError(f"could not write {path} ({cause}){advice(cause)}") from None


def write_text(path: Path, text: str, root: Path | None = None) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), root)


def open_append(path: Path, root: Path | None = None) -> BinaryIO:
    """path opened to append (created if missing), refusing a link at the name or at a folder below root."""
    root, rel, name = split(path, root)
    try:
        with folder(root, rel, create=True) as fd:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            handle = os.open(name, flags, 0o644, dir_fd=fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LayerwiseError(f"{path} is a symbolic link; layerwise does not write through it: remove it") from None
        raise LayerwiseError(f"could not open {path} ({reason(e)})") from None
    return os.fdopen(handle, "ab")


def open_lock_file(path: Path) -> int:
    """A read-write descriptor of the lock file at path, created if missing, never through a link."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LayerwiseError(f"{path} is a symbolic link; remove it (layerwise makes its own lock file)") from None
        raise


def read_bytes(path: Path, cap: float | None = None) -> bytes:
    """A regular file's bytes, its size checked against `cap` (default LAYERWISE_MAX_MEMBER_BYTES) first: a FIFO,
    a device or a file larger than the cap is never read."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO would block a plain open
    with os.fdopen(handle, "rb") as f:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise LayerwiseError(f"{path} is not a regular file")
        check_file_size(path, info.st_size, cap)
        return f.read(info.st_size)


def read_text(path: Path, cap: float | None = None) -> str:
    """read_bytes as text; undecodable bytes become U+FFFD (the readers then reject the content)."""
    return read_bytes(path, cap).decode(errors="replace")
