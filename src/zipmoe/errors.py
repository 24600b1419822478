"""The one exception hierarchy of zipmoe.

Every error that a user can cause (a bad path, a corrupt file, a wrong flag) is a `ZipmoeError`; the CLI turns it
into a one-line `Error: ...` on stderr and exit status 1. Errors about bad input data are also `ValueError`s, so
library callers can catch them the usual way. Messages name the object and say what was expected and what was found.
"""

from __future__ import annotations


class ZipmoeError(Exception):
    """Base class of every error zipmoe raises on purpose."""


class CheckpointError(ZipmoeError, ValueError):
    """A source checkpoint (local directory, Hub repo, safetensors file) is missing or malformed."""


class FormatError(ZipmoeError, ValueError):
    """A container is malformed: bad magic, unknown version, truncated, inconsistent manifest."""


class ChecksumError(FormatError):
    """Stored bytes do not match their recorded checksum (the container is corrupt)."""


class UnknownCodecError(FormatError):
    """A codec id that this version of zipmoe does not know."""


class VerificationError(ZipmoeError):
    """Decoded data differs from the source it was packed from."""


class OutputError(ZipmoeError):
    """An output path cannot be written (missing directory, not writable, exists without --force)."""
