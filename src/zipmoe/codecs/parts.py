"""Encoded tensor parts: the byte layout of one stored tensor (or one expert's slice of a fused tensor).

Three encodings, each described by a JSON config stored in the manifest:

``bf16-split`` (BF16 tensors)::

    [directory: n_chunks x 24 bytes][sign-mantissa bytes: n_values][zero pad to 8][payload 0][pad]...[payload K-1][pad]

  Chunk ``c`` covers values ``c*chunk_values .. min(n, (c+1)*chunk_values)``. Its sign+mantissa bytes are that
  slice of the sign-mantissa stream; its exponent bytes are coded on their own by the exponent coder into payload
  ``c``. Payloads follow one another, each padded with zeros to a multiple of 8 bytes.

``fp8-split`` (FP8 E4M3 tensors; `zipmoe.codecs.fp8`): the same layout, with a sign-mantissa *nibble* per value,
  two to a byte (chunk ``c``'s are bytes ``c*chunk_values/2 ..`` of the plane), and the 4-bit exponent fields coded
  by the same exponent coders.

``raw`` (every other dtype, embedded files, safetensors headers)::

    [directory: n_chunks x 24 bytes][bytes]

  Chunk ``c`` covers bytes ``c*chunk_bytes .. min(size, (c+1)*chunk_bytes)`` of the payload.

In an expert record of a version 4 container the sign-mantissa plane is stored apart from the rest ("split"): the
part's stored bytes are then ``[directory][payload 0][pad]...[payload K-1][pad]`` and its plane (with its zero pad
to 8) lies elsewhere, possibly in another buffer (`PartView.plane`, `split_part`). The bytes and checksums are
those of the contiguous layout; only the place of the plane differs.

Directory entry (little-endian, 24 bytes)::

    u32 payload_nbytes   bf16-split: coded exponent bytes of the chunk; raw: bytes of the chunk
    u32 reserved         0
    u64 payload_xxh64    XXH64 of the chunk's payload bytes
    u64 plain_xxh64      bf16-split, fp8-split: XXH64 of the chunk's sign-mantissa bytes; raw: 0

The manifest records each part's offset, size, chunk count and the XXH64 of its directory, so every byte of a part
is covered by a checksum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numba import njit

from zipmoe._threads import Workers
from zipmoe.codecs import fp8
from zipmoe.codecs.bf16 import extract_sign_mantissa, widen_bf16
from zipmoe.codecs.checksum import xxh64
from zipmoe.codecs.coders import PAYLOAD, PLAIN, ChunkLayout, ExponentCoder, RansCoder, coder_from_config
from zipmoe.defaults import DEFAULT_CHUNK_VALUES  # chosen with `zipmoe bench codecs` (docs/BENCHMARKS.md)
from zipmoe.errors import ChecksumError, FormatError, UnknownCodecError

DIRECTORY_ENTRY = np.dtype(
    [("payload_nbytes", "<u4"), ("reserved", "<u4"), ("payload_xxh64", "<u8"), ("plain_xxh64", "<u8")]
)
DEFAULT_CHUNK_BYTES = 1 << 20
_TASK_VALUES = 1 << 19  # values per thread-pool task at least: ~0.3 ms of work, well above the cost of handing it out
MIN_CHUNK = 64
MAX_CHUNK = 1 << 30


def pad8(n: int) -> int:
    return (n + 7) & ~7


def _check_chunk_size(kind: str, size: Any) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_CHUNK <= size <= MAX_CHUNK or size % 64:
        raise FormatError(f"{kind} must be a multiple of 64 between {MIN_CHUNK} and {MAX_CHUNK}, got {size!r}")
    return size


@dataclass(frozen=True)
class _Split:
    """Values split into a raw sign+mantissa plane and chunk-coded exponents (bf16-split, fp8-split)."""

    coder: ExponentCoder = RansCoder()
    chunk_values: int = DEFAULT_CHUNK_VALUES
    encoding_id: ClassVar[str]
    dtype: ClassVar[str]  # the safetensors dtype it encodes

    def __post_init__(self) -> None:
        _check_chunk_size("chunk_values", self.chunk_values)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.encoding_id, "exponent_coder": self.coder.get_config(), "chunk_values": self.chunk_values}

    def n_chunks(self, nbytes: int) -> int:
        return -(-self.n_values(nbytes) // self.chunk_values)

    def n_values(self, nbytes: int) -> int:
        """Values in a part of ``nbytes`` decoded bytes."""
        raise NotImplementedError

    def plane_nbytes(self, nbytes: int) -> int:
        """Bytes of the sign-mantissa plane of a part of ``nbytes`` decoded bytes."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"{self.encoding_id}/{self.coder.label}"


@dataclass(frozen=True)
class Bf16Split(_Split):
    """BF16 values split into raw sign+mantissa bytes and chunk-coded exponent bytes."""

    encoding_id: ClassVar[str] = "bf16-split"
    dtype: ClassVar[str] = "BF16"

    def n_values(self, nbytes: int) -> int:
        return nbytes // 2

    def plane_nbytes(self, nbytes: int) -> int:
        return nbytes // 2  # one byte per value


@dataclass(frozen=True)
class Fp8Split(_Split):
    """FP8 E4M3 values split into raw sign+mantissa nibbles, two per byte, and chunk-coded 4-bit exponent fields
    (`zipmoe.codecs.fp8`); the layout, chunking and checksums of bf16-split."""

    encoding_id: ClassVar[str] = "fp8-split"
    dtype: ClassVar[str] = "F8_E4M3"

    def n_values(self, nbytes: int) -> int:
        return nbytes

    def plane_nbytes(self, nbytes: int) -> int:
        return (nbytes + 1) // 2  # two values per byte


@dataclass(frozen=True)
class Raw:
    """Bytes stored as they are, chunked for checksums."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    encoding_id: ClassVar[str] = "raw"

    def __post_init__(self) -> None:
        _check_chunk_size("chunk_bytes", self.chunk_bytes)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.encoding_id, "chunk_bytes": self.chunk_bytes}

    def n_chunks(self, nbytes: int) -> int:
        return -(-nbytes // self.chunk_bytes)

    @property
    def label(self) -> str:
        return "raw"


Encoding = Bf16Split | Fp8Split | Raw


def encoding_from_config(config: Any) -> Encoding:
    """The encoding a manifest config describes."""
    if not isinstance(config, dict):
        raise FormatError(f"encoding config must be an object, got {config!r}")
    kind = config.get("id")
    for split in (Bf16Split, Fp8Split):
        if kind != split.encoding_id:
            continue
        if set(config) != {"id", "exponent_coder", "chunk_values"}:
            raise FormatError(f"{kind} encoding: expected keys id, exponent_coder, chunk_values, got {sorted(config)}")
        return split(coder_from_config(config["exponent_coder"]), config["chunk_values"])
    if kind == Raw.encoding_id:
        if set(config) != {"id", "chunk_bytes"}:
            raise FormatError(f"raw encoding: expected keys id, chunk_bytes, got {sorted(config)}")
        return Raw(config["chunk_bytes"])
    raise UnknownCodecError(f"unknown tensor encoding {kind!r} (known: bf16-split, fp8-split, raw)")


def size_problem(encoding: Encoding, nbytes: int, size: int, n_chunks: int, plane_apart: bool = False) -> str | None:
    """Why ``nbytes`` stored bytes in ``n_chunks`` chunks cannot decode to ``size`` bytes, or None if they can.

    Checked before anything of ``size`` bytes is allocated: a part decodes to at most twice its stored bytes
    (bf16-split keeps a sign-mantissa byte per value, fp8-split a nibble), so a valid size is bounded by the file
    it lies in. With
    ``plane_apart`` (a split bf16 part) ``nbytes`` covers directory and payloads only; the ``pad8(size / 2)`` bytes
    of the plane, stored elsewhere, are bounded by the caller.
    """
    expected_chunks = encoding.n_chunks(size)
    if n_chunks != expected_chunks:
        return f"{n_chunks} chunks recorded, {expected_chunks} expected for {size} bytes"
    dir_nbytes = n_chunks * DIRECTORY_ENTRY.itemsize
    if isinstance(encoding, Raw):
        if nbytes != dir_nbytes + size:
            return f"a raw part of {size} bytes is {dir_nbytes + size} bytes stored, the manifest records {nbytes}"
    elif isinstance(encoding, Fp8Split):
        if plane_apart or nbytes < dir_nbytes + pad8(encoding.plane_nbytes(size)):
            return f"{nbytes} stored bytes cannot hold {size} bytes of FP8 values"
    elif size % 2 or nbytes < dir_nbytes + (0 if plane_apart else pad8(size // 2)):
        return f"{nbytes} stored bytes cannot hold {size} bytes of BF16 values"
    return None


@dataclass(frozen=True)
class EncodedPart:
    """The bytes of one encoded part and what the manifest records about it."""

    data: np.ndarray  # uint8, the whole part
    n_chunks: int
    directory_xxh64: int
    exponent_histogram: np.ndarray | None  # int64[256] for bf16-split


@dataclass(frozen=True)
class ChunkFailure:
    """One chunk whose bytes do not match their checksum, or that does not decode."""

    chunk: int
    stream: str  # "exponent payload", "sign-mantissa bytes", "bytes", "directory"
    file_offset: int
    reason: str = "checksum mismatch"

    def describe(self) -> str:
        where = "directory" if self.stream == "directory" else f"chunk {self.chunk} {self.stream}"
        return f"{where}: {self.reason} (file offset {self.file_offset})"


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@njit(nogil=True, cache=True)
def _assemble_bf16(
    values,
    chunk_values,
    first,
    last,
    slots,
    slot_nbytes,
    sizes,
    blob,
    sm_start,
    payload_starts,
    payload_xxh64,
    plain_xxh64,
):  # pragma: no cover - compiled
    for c in range(first, last):
        lo = c * chunk_values
        hi = min(values.size, lo + chunk_values)
        extract_sign_mantissa(values[lo:hi], blob[sm_start + lo : sm_start + hi])
        plain_xxh64[c] = xxh64(blob, sm_start + lo, sm_start + hi)
        start = payload_starts[c]
        size = sizes[c]
        blob[start : start + size] = slots[c * slot_nbytes : c * slot_nbytes + size]
        payload_xxh64[c] = xxh64(blob, start, start + size)


@njit(nogil=True, cache=True)
def _find_bad_chunks(buf, starts, sizes, expected, first, last, bad):  # pragma: no cover - compiled
    """Flag chunks whose bytes ``buf[starts[c]:starts[c]+sizes[c]]`` do not hash to ``expected[c]``; count them."""
    n_bad = 0
    for c in range(first, last):
        bad[c] = xxh64(buf, starts[c], starts[c] + sizes[c]) != expected[c]
        n_bad += bad[c]
    return n_bad


@njit(nogil=True, cache=True)
def _find_bad_padding(buf, starts, sizes, first, last, bad):  # pragma: no cover - compiled
    """Flag chunks whose payload is followed by nonzero padding (up to the next multiple of 8); count them."""
    n_bad = 0
    for c in range(first, last):
        end = starts[c] + sizes[c]
        for i in range(end, (end + 7) & ~7):
            if buf[i] != 0:
                bad[c] = True
        n_bad += bad[c]
    return n_bad


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def encode_part(encoding: Encoding, data: np.ndarray, workers: Workers) -> EncodedPart:
    """Encode the raw bytes ``data`` (uint8; little-endian BF16 patterns for bf16-split) of one part."""
    return encode_parts(encoding, [data], workers)[0]


def encode_parts(encoding: Encoding, datas: Sequence[np.ndarray], workers: Workers) -> list[EncodedPart]:
    """Encode several parts at once, the chunks of all of them spread over the worker threads."""
    if isinstance(encoding, Raw):
        return [_encode_raw(encoding, d) for d in datas]
    return _encode_split(encoding, list(datas), workers)


def _finish(blob: np.ndarray, directory: np.ndarray) -> int:
    dir_bytes = directory.view(np.uint8)
    blob[: dir_bytes.size] = dir_bytes
    return int(xxh64(blob, 0, dir_bytes.size))


def _encode_raw(encoding: Raw, data: np.ndarray) -> EncodedPart:
    n_chunks = encoding.n_chunks(data.size)
    directory = np.zeros(n_chunks, DIRECTORY_ENTRY)
    dir_nbytes = directory.nbytes
    blob = np.empty(dir_nbytes + data.size, np.uint8)
    blob[dir_nbytes:] = data
    for c in range(n_chunks):
        lo = dir_nbytes + c * encoding.chunk_bytes
        hi = min(blob.size, lo + encoding.chunk_bytes)
        directory[c]["payload_nbytes"] = hi - lo
        directory[c]["payload_xxh64"] = xxh64(blob, lo, hi)
    return EncodedPart(blob, n_chunks, _finish(blob, directory), None)


def _bf16_layout(
    plane_nbytes: int, payload_nbytes: np.ndarray, plane_apart: bool = False
) -> tuple[int, np.ndarray, int]:
    """(sm_start, payload_starts, total size) of a bf16-split (or fp8-split) part whose sign-mantissa plane holds
    ``plane_nbytes``; with ``plane_apart`` the plane is not between the directory and the payloads (and not counted
    in the total)."""
    sm_start = payload_nbytes.size * DIRECTORY_ENTRY.itemsize
    padded = (payload_nbytes.astype(np.int64) + 7) & ~7
    starts = np.empty(payload_nbytes.size, np.int64)
    first = sm_start + (0 if plane_apart else pad8(plane_nbytes))
    if starts.size:
        starts[0] = first
        np.cumsum(padded[:-1], out=starts[1:])
        starts[1:] += first
    return sm_start, starts, first + int(padded.sum())


def _encode_split(encoding: Bf16Split | Fp8Split, datas: list[np.ndarray], workers: Workers) -> list[EncodedPart]:
    coder, cv = encoding.coder, encoding.chunk_values
    counts = [encoding.n_chunks(d.size) for d in datas]
    if isinstance(encoding, Fp8Split):  # the coders read exponents from uint16 words, where BF16 keeps them
        parts, assemble = datas, fp8.assemble_fp8
        values = [np.empty(d.size, np.uint16) for d in datas]
        workers.run_segments(
            lambda i, a, b: fp8.exponent_words(datas[i][a * cv : b * cv], values[i][a * cv : b * cv]),
            counts,
            max(1, _TASK_VALUES // cv),
        )
    else:
        parts = values = [d.view(np.uint16) for d in datas]
        assemble = _assemble_bf16
    slot_nbytes = pad8(coder.max_payload_nbytes(cv))
    slots = [np.empty(n * slot_nbytes, np.uint8) for n in counts]
    sizes = [np.zeros(n, np.int64) for n in counts]
    histograms = [np.zeros((n, 256), np.int64) for n in counts]
    min_chunks = max(1, _TASK_VALUES // cv)
    workers.run_segments(
        lambda i, a, b: coder.encode_chunks(values[i], cv, a, b, slots[i], slot_nbytes, sizes[i], histograms[i]),
        counts,
        min_chunks,
    )
    layouts = [_bf16_layout(encoding.plane_nbytes(d.size), z) for d, z in zip(datas, sizes)]
    blobs = [np.zeros(total, np.uint8) for _, _, total in layouts]
    directories = [np.zeros(n, DIRECTORY_ENTRY) for n in counts]
    payload_xxh64 = [np.zeros(n, np.uint64) for n in counts]
    plain_xxh64 = [np.zeros(n, np.uint64) for n in counts]
    workers.run_segments(
        lambda i, a, b: assemble(
            parts[i], cv, a, b, slots[i], slot_nbytes, sizes[i], blobs[i], layouts[i][0], layouts[i][1],
            payload_xxh64[i], plain_xxh64[i],
        ),
        counts,
        min_chunks,
    )  # fmt: skip
    encoded = []
    for i, directory in enumerate(directories):
        directory["payload_nbytes"] = sizes[i]
        directory["payload_xxh64"] = payload_xxh64[i]
        directory["plain_xxh64"] = plain_xxh64[i]
        encoded.append(EncodedPart(blobs[i], counts[i], _finish(blobs[i], directory), histograms[i].sum(axis=0)))
    return encoded


def split_part(encoded: EncodedPart, n_values: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut an encoded bf16-split part in two: its exponent piece, as ``[directory, payloads]`` views to write back to
    back (``[directory][payload 0][pad]...``), and its sign-mantissa plane with its zero pad to 8 (a view too: copy
    it to hold it without the rest of the part)."""
    dir_nbytes = encoded.n_chunks * DIRECTORY_ENTRY.itemsize
    plane_end = dir_nbytes + pad8(n_values)
    data = encoded.data
    return [data[:dir_nbytes], data[plane_end:]], data[dir_nbytes:plane_end]


# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class PartView:
    """Where one part lies in a buffer, and what the manifest says about it."""

    encoding: Encoding
    offset: int  # of the part in `buf`
    nbytes: int
    size: int  # decoded bytes
    n_chunks: int
    directory_xxh64: int
    file_offset: int  # of the part in the container file, for messages
    # A split bf16 part: the offset of its sign-mantissa plane in the planes buffer (None: the contiguous layout,
    # the plane right after the directory in `buf`), and the plane's offset in the file, for messages.
    plane: int | None = None
    plane_file_offset: int | None = None


class _Layout:
    """A part's directory, checked against its checksum and the manifest, and the chunk ranges it implies."""

    def __init__(self, buf: np.ndarray, part: PartView, planes: np.ndarray | None = None) -> None:
        enc = part.encoding
        dir_nbytes = part.n_chunks * DIRECTORY_ENTRY.itemsize
        apart = part.plane is not None and isinstance(enc, Bf16Split)
        problem = size_problem(enc, part.nbytes, part.size, part.n_chunks, apart)
        if problem:
            raise FormatError(f"part at file offset {part.file_offset}: {problem}")
        if part.plane is not None and not apart:
            raise FormatError(f"part at file offset {part.file_offset}: only a bf16-split part has a plane apart")
        if part.offset < 0 or part.offset + part.nbytes > buf.size:
            raise FormatError(f"part at file offset {part.file_offset}: its {part.nbytes} bytes lie outside the buffer")
        self.plane_buf = buf if planes is None else planes
        self.to_file = part.file_offset - part.offset  # buffer offset -> file offset
        self.plane_to_file = self.to_file
        if apart:
            plane_file = part.file_offset if part.plane_file_offset is None else part.plane_file_offset
            self.plane_to_file = plane_file - part.plane
            if part.plane < 0 or part.plane + pad8(part.size // 2) > self.plane_buf.size:
                raise FormatError(f"sign-mantissa plane at file offset {plane_file}: lies outside its buffer")
        if int(xxh64(buf, part.offset, part.offset + dir_nbytes)) != part.directory_xxh64:
            raise ChecksumError(f"chunk directory: checksum mismatch (file offset {part.file_offset})")
        self.directory = buf[part.offset : part.offset + dir_nbytes].view(DIRECTORY_ENTRY)
        payload_nbytes = self.directory["payload_nbytes"].astype(np.int64)
        self.payload_xxh64 = np.ascontiguousarray(self.directory["payload_xxh64"])
        self.plain_xxh64 = np.ascontiguousarray(self.directory["plain_xxh64"])
        base = part.offset
        if isinstance(enc, Raw):
            self.plain_starts = None
            chunk_starts = np.arange(part.n_chunks, dtype=np.int64) * enc.chunk_bytes
            expected = np.minimum(part.size - chunk_starts, enc.chunk_bytes)
            if not np.array_equal(payload_nbytes, expected) or part.nbytes != dir_nbytes + part.size:
                raise FormatError(f"raw part at file offset {part.file_offset}: directory sizes do not add up")
            self.payload_starts = base + dir_nbytes + chunk_starts
        else:
            kind = "fp8" if isinstance(enc, Fp8Split) else "bf16"
            n_values = enc.n_values(part.size)
            if (kind == "bf16" and part.size % 2) or payload_nbytes.max(initial=0) > enc.coder.max_payload_nbytes(
                enc.chunk_values
            ):
                raise FormatError(f"{kind} part at file offset {part.file_offset}: inconsistent sizes")
            sm_start, starts, total = _bf16_layout(enc.plane_nbytes(part.size), payload_nbytes, apart)
            if total != part.nbytes:
                raise FormatError(
                    f"{kind} part at file offset {part.file_offset}: directory describes {total} bytes, "
                    f"manifest records {part.nbytes}"
                )
            self.sm_start = part.plane if apart else base + sm_start
            self.payload_starts = base + starts
            chunk_lo = np.arange(part.n_chunks, dtype=np.int64) * enc.chunk_values
            chunk_n = np.minimum(n_values - chunk_lo, enc.chunk_values)
            # The plane bytes of each chunk: a byte per BF16 value, a nibble per FP8 value (chunks of an even count).
            self.plain_starts = self.sm_start + (chunk_lo // 2 if kind == "fp8" else chunk_lo)
            self.plain_sizes = (chunk_n + 1) // 2 if kind == "fp8" else chunk_n
            self.chunks = ChunkLayout(
                self.payload_starts, payload_nbytes, self.payload_xxh64, self.plain_xxh64, self.sm_start,
                enc.chunk_values, n_values, self.plane_buf,
            )  # fmt: skip
        self.payload_sizes = payload_nbytes

        n = part.n_chunks
        self.bad_payload = np.zeros(n, np.bool_)
        self.bad_plain = np.zeros(n, np.bool_) if self.plain_starts is not None else None
        self.bad_padding = np.zeros(n, np.bool_)
        if self.plain_starts is not None and n:  # the zero bytes after the sign-mantissa plane belong to the last chunk
            plane_end = self.sm_start + enc.plane_nbytes(part.size)
            self.bad_padding[-1] = bool(self.plane_buf[plane_end : (plane_end + 7) & ~7].any())
            if isinstance(enc, Fp8Split) and part.size % 2:  # and the unused high nibble of an odd count's last byte
                self.bad_padding[-1] |= bool(self.plane_buf[plane_end - 1] & 0xF0)
        self.min_chunks = max(1, _TASK_VALUES // enc.chunk_values) if not isinstance(enc, Raw) else 1

    def scan(self, buf: np.ndarray, first: int, last: int) -> int:
        """Check the checksums of chunks ``first..last-1`` (flags in ``bad_payload``/``bad_plain``); count failures."""
        n_bad = _find_bad_chunks(
            buf, self.payload_starts, self.payload_sizes, self.payload_xxh64, first, last, self.bad_payload
        )
        if self.bad_plain is not None:
            n_bad += _find_bad_chunks(
                self.plane_buf, self.plain_starts, self.plain_sizes, self.plain_xxh64, first, last, self.bad_plain
            )
            n_bad += _find_bad_padding(buf, self.payload_starts, self.payload_sizes, first, last, self.bad_padding)
        return n_bad


def check_part(
    buf: np.ndarray, part: PartView, workers: Workers, planes: np.ndarray | None = None
) -> list[ChunkFailure]:
    """Every checksum of a part; returns the failing chunks (empty when all match). ``planes`` holds the
    sign-mantissa plane of a split part (default: ``buf``)."""
    try:
        layout = _Layout(buf, part, planes)
    except FormatError as exc:
        return [ChunkFailure(-1, "directory", part.file_offset, str(exc).split(": ", 1)[-1])]
    workers.run_ranges(lambda a, b: layout.scan(buf, a, b), part.n_chunks, layout.min_chunks)
    return _failures(part, layout)


def _failures(part: PartView, layout: _Layout) -> list[ChunkFailure]:
    to_file = layout.to_file
    payload_name = "bytes" if layout.bad_plain is None else PAYLOAD
    failures = [
        ChunkFailure(int(c), payload_name, int(layout.payload_starts[c]) + to_file)
        for c in np.flatnonzero(layout.bad_payload)
    ]
    if layout.bad_plain is not None:
        failures += [
            ChunkFailure(int(c), PLAIN, int(layout.plain_starts[c]) + layout.plane_to_file)
            for c in np.flatnonzero(layout.bad_plain)
        ]
    failures += [
        ChunkFailure(int(c), "padding", int(layout.payload_starts[c]) + to_file, "nonzero alignment padding")
        for c in np.flatnonzero(layout.bad_padding)
    ]
    return sorted(failures, key=lambda f: (f.chunk, f.stream))


def decode_part(
    buf: np.ndarray,
    part: PartView,
    out: np.ndarray,
    workers: Workers,
    *,
    check: bool = True,
    planes: np.ndarray | None = None,
) -> None:
    """Decode one part from ``buf`` (its plane from ``planes``, default ``buf``) into ``out`` (uint8, ``part.size``
    bytes); see `decode_parts`."""
    decode_parts([(buf, part, out, "", planes)], workers, check=check)


def decode_parts(
    items: Sequence[tuple],
    workers: Workers,
    *,
    check: bool = True,
    widen: bool = False,
) -> None:
    """Decode several parts at once, the chunks of all of them spread over the worker threads.

    Args:
        items: ``(buf, part, out, label)`` or ``(buf, part, out, label, planes)``: the part lies in ``buf`` and
            decodes into ``out`` (uint8, ``part.size`` bytes); ``label`` (say, the tensor's name) starts every error
            message about it; ``planes`` (default, or None: ``buf``) holds the sign-mantissa plane of a split part
            at ``part.plane``.
        workers: the threads.
        check: verify every chunk's checksums just before decoding it.
        widen: the parts hold BF16 (or raw 16-bit) values; write them as float32 (``out`` is then ``2 * part.size``
            bytes). Not for fp8-split parts (`zipmoe.runtime.fp8` dequantizes those).

    Raises:
        ChecksumError: a checksum does not match, or a payload does not decode; the message names the part, the
            chunk, the stream and its file offset.
        FormatError: a directory is inconsistent with the manifest.
    """
    items = [(item[0], item[1], item[2], item[3], item[4] if len(item) > 4 else None) for item in items]
    layouts = []
    for buf, part, _, label, planes in items:
        if widen and isinstance(part.encoding, Fp8Split):
            raise FormatError(_labelled(label, "fp8-split parts cannot be widened to float32"))
        try:
            layouts.append(_Layout(buf, part, planes))
        except FormatError as exc:
            raise type(exc)(_labelled(label, str(exc))) from None

    def decode(i: int, first: int, last: int) -> tuple[int, str, str]:
        buf, part, out, _, _ = items[i]
        layout = layouts[i]
        enc = part.encoding
        if isinstance(enc, Raw):
            if check and layout.scan(buf, first, last):
                return first + int(np.flatnonzero(layout.bad_payload[first:last])[0]), "bytes", "checksum mismatch"
            lo, hi = first * enc.chunk_bytes, min(part.size, last * enc.chunk_bytes)
            start = part.offset + layout.directory.nbytes
            if widen:
                widen_bf16(buf[start + lo : start + hi].view(np.uint16), out.view(np.uint32)[lo // 2 : hi // 2])
            else:
                out[lo:hi] = buf[start + lo : start + hi]
            return -1, "", ""
        if isinstance(enc, Fp8Split):
            return fp8.decode_chunks(enc.coder, buf, layout.chunks, first, last, out, check)
        return enc.coder.decode_chunks(
            buf, layout.chunks, first, last, out.view(np.uint32 if widen else np.uint16), check
        )

    counts = [item[1].n_chunks for item in items]
    min_chunks = min((layout.min_chunks for layout in layouts), default=1)
    results = workers.run_segments(lambda i, a, b: (i, decode(i, a, b)), counts, min_chunks)
    for i, (chunk, stream, reason) in results:
        if chunk >= 0:
            label = items[i][3]
            layout = layouts[i]
            if stream == PLAIN:
                offset = int(layout.plain_starts[chunk]) + layout.plane_to_file
            else:
                offset = int(layout.payload_starts[chunk]) + layout.to_file
            raise ChecksumError(_labelled(label, f"chunk {chunk} {stream}: {reason} (file offset {offset})"))


def _labelled(label: str, message: str) -> str:
    return f"{label}: {message}" if label else message


def warm_up() -> None:
    """Compile, or load from numba's on-disk cache, every kernel variant that pack, verify and unpack run.

    The first call after installing takes a while (numba compiles the kernels); later processes load them in a
    fraction of a second. Calling this first keeps compilation out of timings and progress bars.
    """
    workers = Workers(1)
    values = (np.arange(4096, dtype=np.uint16) * 7919) & 0x3FFF | 0x3C00
    fp8_data = (values & 0xFF).astype(np.uint8)[:4095]  # an odd count: the half-filled last nibble byte too
    for encoding in (Bf16Split(RansCoder(), 1024), Raw(1024), Fp8Split(RansCoder(), 1024)):
        data = fp8_data if isinstance(encoding, Fp8Split) else values.view(np.uint8)
        part = encode_part(encoding, data, workers)
        for writable in (True, False):  # containers are read through read-only memory maps
            buf = part.data.copy()
            buf.setflags(write=writable)
            view = PartView(encoding, 0, buf.size, data.size, part.n_chunks, part.directory_xxh64, 0)
            for widen in (False, True) if not isinstance(encoding, Fp8Split) else (False,):  # BF16 -> float32
                decode_parts([(buf, view, np.empty(data.size * (1 + widen), np.uint8), "")], workers, widen=widen)
            check_part(buf, view, workers)
        if isinstance(encoding, Bf16Split):  # split records: exponents and planes in buffers of either kind
            pieces, plane = split_part(part, values.size)
            exponents = np.concatenate(pieces)
            split = PartView(encoding, 0, exponents.size, data.size, part.n_chunks, part.directory_xxh64, 0, 0, 0)
            for exp_writable in (True, False):
                for plane_writable in (True, False):
                    buf, planes = exponents.copy(), plane.copy()
                    buf.setflags(write=exp_writable)
                    planes.setflags(write=plane_writable)
                    for widen in (False, True):
                        out = np.empty(data.size * (1 + widen), np.uint8)
                        decode_parts([(buf, split, out, "", planes)], workers, widen=widen)
                    check_part(buf, split, workers, planes)
