"""The fixed 64-byte file header.

Layout (little-endian)::

    offset size field
    0      8    magic            b"\\x89ZIPMOE\\n"
    8      4    format_version   u32, 1 to 4 (docs/FORMAT.md §7)
    12     4    alignment        u32, power of two >= 64 (4096 by default)
    16     8    file_nbytes      u64, size of the whole file
    24     8    manifest_offset  u64, multiple of alignment
    32     8    manifest_nbytes  u64, manifest_offset + manifest_nbytes == file_nbytes
    40     8    manifest_xxh64   u64, XXH64 of the manifest bytes
    48     8    reserved         zero
    56     8    header_xxh64     u64, XXH64 of bytes 0..55

Bytes 0..11 keep this meaning in every future version, so any reader can say which version a file has.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from zipmoe.codecs.checksum import checksum
from zipmoe.errors import ChecksumError, FormatError
from zipmoe.formats.constants import FORMAT_VERSION, HEADER_NBYTES, MAGIC, READABLE_VERSIONS

_STRUCT = struct.Struct("<8sIIQQQQQ")  # everything but header_xxh64
assert _STRUCT.size + 8 == HEADER_NBYTES


@dataclass(frozen=True)
class FileHeader:
    """The decoded file header."""

    alignment: int
    file_nbytes: int
    manifest_offset: int
    manifest_nbytes: int
    manifest_xxh64: int
    format_version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        """The 64 header bytes, checksum included."""
        body = _STRUCT.pack(
            MAGIC,
            self.format_version,
            self.alignment,
            self.file_nbytes,
            self.manifest_offset,
            self.manifest_nbytes,
            self.manifest_xxh64,
            0,
        )
        return body + struct.pack("<Q", checksum(body))

    @classmethod
    def unpack(cls, data: bytes, file_nbytes: int, name: str, *, unpublished: bool = False) -> FileHeader:
        """Parse and validate the header of a file of ``file_nbytes`` bytes (``name`` is used in messages).

        A writer leaves the magic zero until the finished file has been checked (docs/FORMAT.md §6); with
        ``unpublished`` such a file is read (the checksum covers the magic it will have), and only such a file.

        Raises:
            FormatError: not a container, an unsupported version, a truncated or inconsistent file.
            ChecksumError: the header bytes are corrupt.
        """
        if file_nbytes < HEADER_NBYTES or len(data) < HEADER_NBYTES:
            raise FormatError(f"{name}: truncated: {file_nbytes} bytes is smaller than the {HEADER_NBYTES}-byte header")
        if unpublished:
            if data[: len(MAGIC)] != bytes(len(MAGIC)):
                raise FormatError(f"{name}: not an unpublished container (its magic is not zero)")
            data = MAGIC + data[len(MAGIC) :]
        magic, version, alignment, recorded_nbytes, m_offset, m_nbytes, m_xxh64, reserved = _STRUCT.unpack_from(data)
        if magic != MAGIC:
            unfinished = " (an unfinished file: its magic is written last)" if magic == bytes(len(MAGIC)) else ""
            raise FormatError(f"{name}: not a zipmoe container (bad magic {magic!r}, expected {MAGIC!r}){unfinished}")
        if version not in READABLE_VERSIONS:
            *first, last = READABLE_VERSIONS
            readable = f"{', '.join(map(str, first))} and {last}"
            raise FormatError(f"{name}: unsupported format version {version} (this zipmoe reads versions {readable})")
        (stored_xxh64,) = struct.unpack_from("<Q", data, _STRUCT.size)
        if checksum(data[: _STRUCT.size]) != stored_xxh64:
            raise ChecksumError(f"{name}: header checksum mismatch (file offset 0..{HEADER_NBYTES - 1})")
        if alignment < 64 or alignment & (alignment - 1) or reserved:
            raise FormatError(f"{name}: invalid header (alignment {alignment}, reserved {reserved})")
        if recorded_nbytes != file_nbytes:
            state = "truncated" if file_nbytes < recorded_nbytes else "has trailing bytes"
            raise FormatError(f"{name}: {state}: the file is {file_nbytes} bytes, its header says {recorded_nbytes}")
        if m_offset % alignment or m_offset < HEADER_NBYTES or m_offset + m_nbytes != file_nbytes:
            raise FormatError(
                f"{name}: manifest range {m_offset}..{m_offset + m_nbytes} does not end the {file_nbytes}-byte file"
            )
        return cls(alignment, recorded_nbytes, m_offset, m_nbytes, m_xxh64, version)
