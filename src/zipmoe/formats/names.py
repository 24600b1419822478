"""File names a container stores and `unpack` writes: relative POSIX paths of plain components, nothing else.

A name comes from a file someone published, so it is checked before it is used as a path: a name such as
``../../.bashrc``, ``/etc/cron.d/x`` or ``a\\..\\b`` would otherwise make `unpack` write outside its output
directory. docs/FORMAT.md §4 states the rule; the reader, `pack` and `unpack` all apply it.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_CHARS = 1024  # a whole name
MAX_COMPONENT_CHARS = 255  # one path component (NAME_MAX on Linux and macOS)


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a safe relative POSIX path of plain components, or None when it is."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "the name is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"the name has {len(name)} characters (at most {MAX_NAME_CHARS})"
    if name.startswith("/"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash"
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"the control character U+{ord(bad):04X}"
    for component in name.split("/"):
        if component in ("", ".", ".."):
            return f"the path component {component!r}" if component else "an empty path component"
        if len(component) > MAX_COMPONENT_CHARS:
            return f"a path component of {len(component)} characters (at most {MAX_COMPONENT_CHARS})"
    return None


def normalized(name: str) -> str:
    """The form two names must not share: Unicode NFC and case folded (macOS and Windows file systems)."""
    return unicodedata.normalize("NFC", name).casefold()
