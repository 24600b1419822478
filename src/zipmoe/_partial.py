"""``OUT.partial``: where `pack` and `unpack` write before they publish, held under an exclusive lock.

Two runs writing the same output would otherwise share (and truncate) one partial file: one of them, or both, would
fail in strange ways (a memory-mapped file truncated under a reader dies of SIGBUS). The first run takes an
exclusive ``flock`` on the partial file or directory; a second one is told at once that the output is being
written. A partial path left by a killed run is not locked, so the next run reuses it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from zipmoe.errors import OutputError
from zipmoe.formats.constants import PARTIAL_SUFFIX


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


def open_locked(path: Path, *, directory: bool) -> int:
    """Create (or take over from an interrupted run) ``path`` and lock it exclusively; return its descriptor.

    The lock lasts until the descriptor is closed. ``path`` is never followed if it is a symbolic link.

    Raises:
        OutputError: another process holds the lock, or ``path`` cannot be created.
    """
    for _ in range(8):  # the path can be renamed or removed between opening and locking it; then try again
        try:
            if directory:
                try:
                    os.mkdir(path)
                except FileExistsError:
                    pass
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"{path} is locked: another zipmoe process is writing {path.with_suffix('').name} now"
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OutputError(f"cannot lock {path}: it keeps being replaced by another process")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
