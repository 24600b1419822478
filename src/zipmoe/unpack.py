"""`unpack`: write the original checkpoint back, byte for byte.

Each safetensors file is rebuilt from its stored header bytes and its data region segment by segment (tensors in
their original order, plus any bytes no tensor covered), so the output has the same SHA-256 as the file that was
packed; that is checked before the file is renamed into place. Embedded files (config, tokenizer, index) are
written verbatim and checked the same way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zipmoe._threads import Workers
from zipmoe.errors import OutputError, VerificationError
from zipmoe.formats.reader import Container
from zipmoe.formats.writer import partial_path


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
        FormatError / ChecksumError: the container is corrupt.
        OutputError: ``out_dir`` cannot be written, or would overwrite files without ``force``.
        VerificationError: a rebuilt file does not have its recorded SHA-256.
    """
    out_dir = Path(out_dir)
    with Container(path) as container, Workers(threads) as workers:
        m = container.manifest
        names = [f.name for f in m.files] + [s.name for s in m.safetensors]
        _prepare(out_dir, names, force)
        if progress_start:
            progress_start(sum(f.blob.size for f in m.files) + sum(s.nbytes for s in m.safetensors))
        written = []
        for f in m.files:
            data = container.read_file(f.name)
            written.append(_publish(out_dir / f.name, [data], f.sha256))
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

            written.append(_publish(out_dir / s.name, pieces(), s.sha256))
    return written


def _prepare(out_dir: Path, names: list[str], force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"cannot write {out_dir}: not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out_dir}: directory is not writable")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not force:
        raise OutputError(f"{out_dir / existing[0]} exists (use --force to overwrite)")


def _publish(target: Path, pieces, sha256: str) -> UnpackedFile:
    """Write ``pieces`` to ``target.partial``, check the SHA-256, then rename to ``target``."""
    tmp = partial_path(target)
    digest = hashlib.sha256()
    nbytes = 0
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                view = memoryview(piece if isinstance(piece, bytes) else np.ascontiguousarray(piece)).cast("B")
                f.write(view)
                digest.update(view)
                nbytes += view.nbytes
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise VerificationError(f"{target.name}: rebuilt file's SHA-256 differs from the packed file's")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return UnpackedFile(target.name, nbytes, sha256)
