"""Checks of command-line inputs that cost nothing and run before a command loads its kernels or a model.

A mistyped path then fails in milliseconds, with the message the container reader gives (`zipmoe.formats.reader`,
which needs numba to read a file). Checkpoint sources are checked by `zipmoe.formats.checkpoint.check_source`.
"""

from __future__ import annotations

import os
from pathlib import Path

from zipmoe.errors import FormatError


def check_container(path: str | os.PathLike[str]) -> None:
    """Fail with the reader's one line when ``path`` does not exist or is a directory.

    Raises:
        FormatError: ``PATH: no such file`` or ``PATH: is a directory, not a container file``.
    """
    if not Path(path).exists():
        raise FormatError(f"{path}: no such file")
    if Path(path).is_dir():
        raise FormatError(f"{path}: is a directory, not a container file")
