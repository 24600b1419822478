"""`unpack`: write the original checkpoint back, byte for byte.

Each safetensors file is rebuilt from its stored header bytes and its data region segment by segment (tensors in
their original order, plus any bytes no tensor covered), so the output has the same SHA-256 as the file that was
packed; that is checked as it is written. Embedded files (config, tokenizer, index) are written verbatim and checked
the same way.

Everything is written into ``OUT.partial/`` (locked, like pack's partial file) and moved into ``OUT`` only when every
file is complete and checked: an interrupted or failed unpack leaves ``OUT`` as it was. Names come from the
container, so besides the reader's rule (`zipmoe.formats.names`) every target is resolved again here and must lie
inside ``OUT`` without passing through a symbolic link.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zipmoe._partial import fsync_dir, open_locked, partial_path
from zipmoe._threads import Workers
from zipmoe.errors import OutputError, VerificationError
from zipmoe.formats.names import name_problem
from zipmoe.formats.reader import Container


@dataclass(frozen=True)
class UnpackedFile:
    name: str
    nbytes: int
    sha256: str


def unpack(
    path: Path,
    out_dir: Path,
    *,
    force: bool = False,
    threads: int | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[UnpackedFile]:
    """Write every file of the packed checkpoint into ``out_dir``; return what was written.

    Raises:
        FormatError / ChecksumError: the container is corrupt (or names a file unsafely).
        OutputError: ``out_dir`` cannot be written, would overwrite files without ``force``, or is being written by
            another process.
        VerificationError: a rebuilt file does not have its recorded SHA-256.
    """
    out_dir = Path(out_dir)
    with Container(path) as container, Workers(threads) as workers:
        m = container.manifest
        names = [f.name for f in m.files] + [s.name for s in m.safetensors]
        _check_output(out_dir, names, force)
        staging = partial_path(out_dir)
        lock = open_locked(staging, directory=True)
        try:
            _empty(staging)  # what an interrupted run left
            if progress_start:
                progress_start(sum(f.blob.size for f in m.files) + sum(s.nbytes for s in m.safetensors))
            written = []
            for f in m.files:
                data = container.read_file(f.name)
                written.append(_write(staging, f.name, [data], f.sha256))
                if progress:
                    progress(len(data))
            for s in m.safetensors:

                def pieces(entry=s):  # decoded lazily, one tensor at a time
                    yield container.read_blob(entry.header, f"header of {entry.name!r}")
                    for kind, value in entry.segments:
                        if kind == "gap":
                            yield container.read_blob(value, f"gap in {entry.name!r}")
                        else:
                            data = container.read_tensor(m.tensors[value].name, workers=workers)
                            if progress:
                                progress(data.size)
                            yield data

                written.append(_write(staging, s.name, pieces(), s.sha256))
            _publish(staging, out_dir, names)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            os.close(lock)
    return written


def _target(root: Path, name: str) -> Path:
    """``root / name``, proven to lie inside ``root`` and to reach it through no symbolic link."""
    problem = name_problem(name)
    if problem:
        raise OutputError(f"refusing to write {name!r}: {problem}")
    target = root / name
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(target.parent)]) != real_root:
        raise OutputError(f"refusing to write {name!r}: it resolves outside {root}")
    directory = root
    for component in Path(name).parts[:-1]:
        directory = directory / component
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise OutputError(f"refusing to write {name!r}: {directory} is a symbolic link or not a directory")
    return target


def _check_output(out_dir: Path, names: list[str], force: bool) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputError(f"cannot write {out_dir}: not a directory")
    parent = out_dir.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out_dir}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (out_dir.exists() and not os.access(out_dir, os.W_OK | os.X_OK)):
        raise OutputError(f"cannot write {out_dir}: directory is not writable")
    if out_dir.exists():
        for name in names:
            target = _target(out_dir, name)
            if os.path.lexists(target) and not force:
                raise OutputError(f"{target} exists (use --force to overwrite)")


def _empty(directory: Path) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _write(staging: Path, name: str, pieces: Iterable, sha256: str) -> UnpackedFile:
    """Write ``pieces`` to ``staging / name`` and check their SHA-256."""
    target = _target(staging, name)
    digest = hashlib.sha256()
    nbytes = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            for piece in pieces:
                view = memoryview(piece if isinstance(piece, bytes) else np.ascontiguousarray(piece)).cast("B")
                f.write(view)
                digest.update(view)
                nbytes += view.nbytes
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    if digest.hexdigest() != sha256:
        raise VerificationError(f"{name}: rebuilt file's SHA-256 differs from the packed file's")
    return UnpackedFile(name, nbytes, sha256)


def _publish(staging: Path, out_dir: Path, names: list[str]) -> None:
    """Move the finished files into ``out_dir``: the whole directory at once when it does not exist yet."""
    try:
        if not os.path.lexists(out_dir):
            os.rename(staging, out_dir)  # the lock goes with the directory and ends when it is closed
            fsync_dir(out_dir.parent)
            return
        for name in names:
            target = _target(out_dir, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)  # replaces a symbolic link itself, never what it points to
        shutil.rmtree(staging)
        fsync_dir(out_dir)
    except OSError as exc:
        raise OutputError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
