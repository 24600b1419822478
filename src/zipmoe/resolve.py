"""The MODEL argument of run, chat, eval ppl and plan: a container, a checkpoint directory, or a Hub repo id.

Rules, in order (docs/MODELS.md):

1. An existing file is a container (the reader checks it).
2. An existing directory holding ``config.json`` and ``*.safetensors`` is a checkpoint: its container in the model
   store, packed on first use and again when one of its files changes (a message on stderr says so). Any other
   directory is an error that says what it lacks.
3. Anything else that is a valid Hub repo id ``org/name[@revision]`` (and does not look like a path: no leading
   ``/``, ``.`` or ``~``, no ``.zmoe`` suffix) is the container stored for that repo and revision, pulled on first use
   (downloaded through the Hugging Face cache, packed, verified), as ``ollama run`` and transformers'
   ``from_pretrained`` fetch what they do not have. ``zipmoe pull`` updates a stored revision.
4. Everything else is "no such file or directory".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from zipmoe.errors import CheckpointError

_PATH_PREFIXES = ("/", ".", "~")
_PATH_SUFFIXES = (".zmoe", ".partial", ".safetensors", ".json")


def resolve_model(
    model: str | os.PathLike[str],
    *,
    store=None,
    notify: Callable[[str], None] | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """The container that ``model`` names, packing it into the model store first if it must (see the module).

    Args:
        store: the `zipmoe.store.ModelStore` to use (default: ``$ZIPMOE_HOME``).
        notify: told in one line before a checkpoint is packed or a repo pulled.
        progress_start, progress, warn: as for `zipmoe.pack.pack`, while packing.

    Raises:
        CheckpointError: no such file, directory or repo; a directory that is not a checkpoint; offline and absent.
        OutputError: another process is packing the same model into the store now.
    """
    from zipmoe.pull import pull, store_directory
    from zipmoe.store import ModelStore, looks_like_repo_id, parse_repo_ref

    text = os.fspath(model)
    path = Path(text).expanduser()
    hooks = dict(notify=notify, progress_start=progress_start, progress=progress, warn=warn)
    kind = path_kind(text)
    if kind == "file":
        return path
    if kind == "dir":
        return store_directory(path, store=store, **hooks).model.container
    if kind == "other":
        raise CheckpointError(f"{text}: not a regular file or a directory")
    if not text.startswith(_PATH_PREFIXES) and not text.endswith(_PATH_SUFFIXES) and looks_like_repo_id(text):
        ref = parse_repo_ref(text)
        store = store or ModelStore()
        stored = store.find(ref)
        if stored:
            return stored[-1].container  # the newest
        return pull(text, store=store, **hooks).model.container
    shown = text if len(text) <= 200 else text[:197] + "..."
    raise CheckpointError(
        f"{shown}: no such file or directory (MODEL is a .zmoe container, a checkpoint directory, or a Hub repo id "
        "org/name[@revision])"
    )


def path_kind(text: str) -> str | None:
    """``file`` (regular), ``dir``, ``other``, or None where nothing can be found (also for a name too long to be a
    path, which Path.exists would raise for)."""
    try:
        st = os.stat(os.path.expanduser(text))
    except (OSError, ValueError):
        return None
    return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"
