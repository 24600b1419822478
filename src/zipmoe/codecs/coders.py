"""Exponent coders: one small contract, a registry keyed by codec id.

Contract (every coder):

* ``codec_id`` names the coded format. Two coders may share an id only if each decodes the other's output.
* ``get_config()`` returns a JSON-able dict that includes ``"id"``; ``coder_from_config(config)`` rebuilds the
  coder from it. The container stores this config for every tensor, so a file decodes from itself alone.
* ``encode_chunks(values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms)`` codes the exponent
  bytes of chunks ``first..last-1`` of ``values`` (uint16 BF16 patterns; chunk ``c`` is
  ``values[c*chunk_values:(c+1)*chunk_values]``) into ``slots[c*slot_nbytes:]``, setting ``sizes[c]`` and the
  chunk's exponent histogram ``histograms[c]``. ``max_payload_nbytes(chunk_values)`` bounds one payload.
* ``decode_chunks(blob, layout, first, last, out, check)`` decodes those chunks of the part whose `ChunkLayout` is
  ``layout`` from ``blob`` and merges them with their sign+mantissa bytes (read from ``layout.plane_buf``, which
  may be ``blob`` itself) into ``out`` (uint16, or uint32 to widen to float32 bit patterns). With ``check`` it
  first verifies each chunk's two checksums. It returns ``(-1, "", "")`` on success, else ``(chunk, stream,
  reason)`` for the first chunk that failed (``stream`` is ``"exponent payload"`` or ``"sign-mantissa bytes"``);
  it never reads outside ``blob`` and ``layout.plane_buf``.

Both calls release the GIL for the bulk of their work, so callers run chunk ranges on several threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import lz4.block
import numpy as np
import zstandard

from zipmoe.codecs import rans
from zipmoe.codecs.bf16 import exponent_histogram, extract_exponents, merge_bf16
from zipmoe.codecs.checksum import xxh64
from zipmoe.errors import UnknownCodecError

_REGISTRY: dict[str, type[ExponentCoder]] = {}
PAYLOAD = "exponent payload"
PLAIN = "sign-mantissa bytes"


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of one bf16-split part lie in a buffer, and their recorded checksums."""

    payload_starts: np.ndarray  # int64[K]
    payload_sizes: np.ndarray  # int64[K]
    payload_xxh64: np.ndarray  # uint64[K]
    plain_xxh64: np.ndarray  # uint64[K]
    sm_start: int  # of the sign-mantissa plane, in `plane_buf`
    chunk_values: int
    n_values: int
    plane_buf: np.ndarray  # the buffer holding the sign-mantissa plane (the payloads' buffer when contiguous)

    def chunk(self, c: int) -> tuple[int, int]:
        """(first value, number of values) of chunk ``c``."""
        lo = c * self.chunk_values
        return lo, min(self.n_values, lo + self.chunk_values) - lo


class ExponentCoder(ABC):
    """A coder for the exponent plane of BF16 tensors (see the module docstring for the contract)."""

    codec_id: ClassVar[str]

    def __init_subclass__(cls, codec_id: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if codec_id is None:  # an abstract intermediate class
            return
        if codec_id in _REGISTRY:
            raise RuntimeError(f"exponent codec id {codec_id!r} registered twice")
        cls.codec_id = codec_id
        _REGISTRY[codec_id] = cls

    @abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able parameters, including ``"id"``."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> ExponentCoder:
        """Rebuild a coder from `get_config`'s output (raises UnknownCodecError for parameters it cannot read)."""

    @abstractmethod
    def max_payload_nbytes(self, chunk_values: int) -> int:
        """Largest payload one chunk of ``chunk_values`` exponents can take."""

    @abstractmethod
    def encode_chunks(self, values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms) -> None:
        """Code chunks ``first..last-1``; see the module docstring."""

    @abstractmethod
    def decode_chunks(
        self, blob: np.ndarray, layout: ChunkLayout, first: int, last: int, out: np.ndarray, check: bool
    ) -> tuple[int, str, str]:
        """Decode and merge chunks ``first..last-1``; see the module docstring."""

    @property
    def label(self) -> str:
        """Short name for tables: ``rans``, ``zstd-3``, ``lz4hc-9``."""
        level = self.get_config().get("level")
        return self.codec_id if level is None else f"{self.codec_id}-{level}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExponentCoder) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"


class RansCoder(ExponentCoder, codec_id="rans"):
    """Interleaved rANS with a 12-bit frequency table per chunk (see `zipmoe.codecs.rans`). The default."""

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "lanes": rans.LANES, "precision_bits": rans.PRECISION_BITS}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RansCoder:
        expected = cls().get_config()
        if config != expected:
            raise UnknownCodecError(
                f"rans exponent coder: unsupported parameters {config} (this zipmoe reads {expected})"
            )
        return cls()

    def max_payload_nbytes(self, chunk_values: int) -> int:
        return rans.max_payload_nbytes(chunk_values)

    def encode_chunks(self, values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms) -> None:
        rans.encode_chunks(values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms)

    def decode_chunks(self, blob, layout, first, last, out, check):
        chunk, status = rans.decode_chunks(
            blob, layout.plane_buf, layout.payload_starts, layout.payload_sizes, layout.payload_xxh64,
            layout.plain_xxh64, layout.sm_start, layout.chunk_values, layout.n_values, first, last, out, check,
        )  # fmt: skip
        if chunk < 0:
            return -1, "", ""
        return (
            int(chunk),
            PLAIN if status == rans.BAD_PLAIN_CHECKSUM else PAYLOAD,
            rans.rans_status_message(int(status)),
        )


class _ByteCoder(ExponentCoder, ABC):
    """A general-purpose byte compressor applied to each chunk's exponent bytes (zstd, lz4)."""

    default_level: ClassVar[int | None] = None
    levels: ClassVar[range | None] = None

    def __init__(self, level: int | None = None) -> None:
        if self.levels is None:
            if level is not None:
                raise UnknownCodecError(f"{self.codec_id} exponent coder takes no level")
        else:
            level = self.default_level if level is None else level
            if level not in self.levels:
                first, last = self.levels.start, self.levels.stop - 1
                raise UnknownCodecError(f"{self.codec_id} exponent coder: level {level} is outside {first}..{last}")
        self.level = level

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.codec_id}
        if self.level is not None:
            config["level"] = self.level
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExponentCoder:
        unknown = set(config) - {"id", "level"}
        if unknown:
            raise UnknownCodecError(f"{cls.codec_id} exponent coder: unknown parameters {sorted(unknown)}")
        return cls(config.get("level"))

    @abstractmethod
    def _compress(self, data: np.ndarray) -> bytes: ...

    @abstractmethod
    def _decompress(self, data: memoryview, n: int) -> bytes: ...

    def encode_chunks(self, values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms) -> None:
        exponents = np.empty(chunk_values, np.uint8)
        for c in range(first, last):
            chunk = values[c * chunk_values : (c + 1) * chunk_values]
            extract_exponents(chunk, exponents[: chunk.size])
            histograms[c] = 0
            exponent_histogram(chunk, histograms[c])
            payload = self._compress(exponents[: chunk.size])
            slots[c * slot_nbytes : c * slot_nbytes + len(payload)] = np.frombuffer(payload, np.uint8)
            sizes[c] = len(payload)

    def decode_chunks(self, blob, layout, first, last, out, check):
        for c in range(first, last):
            lo, n = layout.chunk(c)
            start, size = int(layout.payload_starts[c]), int(layout.payload_sizes[c])
            sm = layout.sm_start + lo
            if check and xxh64(blob, start, start + size) != layout.payload_xxh64[c]:
                return c, PAYLOAD, "checksum mismatch"
            planes = layout.plane_buf
            if check and xxh64(planes, sm, sm + n) != layout.plain_xxh64[c]:
                return c, PLAIN, "checksum mismatch"
            try:
                exponents = self._decompress(memoryview(blob[start : start + size]), n)
            except Exception as exc:  # the libraries raise their own error types for corrupt input
                return c, PAYLOAD, f"{self.codec_id} could not decode the payload ({exc})"
            if len(exponents) != n:
                return c, PAYLOAD, f"{self.codec_id} payload decodes to {len(exponents)} bytes, expected {n}"
            merge_bf16(np.frombuffer(exponents, np.uint8), planes[sm : sm + n], out[lo : lo + n])
        return -1, "", ""


class ZstdCoder(_ByteCoder, codec_id="zstd"):
    """zstd frames (levels 1-22) per chunk; ~70% of BF16 at level 3, slower and larger than rans."""

    default_level = 3
    levels = range(1, 23)

    def max_payload_nbytes(self, chunk_values: int) -> int:
        return chunk_values + (chunk_values >> 7) + 512

    def _compress(self, data: np.ndarray) -> bytes:
        return zstandard.ZstdCompressor(level=self.level).compress(data)

    def _decompress(self, data: memoryview, n: int) -> bytes:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=n)


class Lz4Coder(_ByteCoder, codec_id="lz4"):
    """Raw lz4 blocks per chunk: fast, ~82% of BF16."""

    def max_payload_nbytes(self, chunk_values: int) -> int:
        return chunk_values + chunk_values // 255 + 16

    def _compress(self, data: np.ndarray) -> bytes:
        return lz4.block.compress(data, mode="default", store_size=False)

    def _decompress(self, data: memoryview, n: int) -> bytes:
        return lz4.block.decompress(data, uncompressed_size=n)


class Lz4HcCoder(Lz4Coder, codec_id="lz4hc"):
    """Raw lz4 blocks in high-compression mode (levels 1-12), as the ZipMoE reference uses (level 9)."""

    default_level = 9
    levels = range(1, 13)

    def _compress(self, data: np.ndarray) -> bytes:
        return lz4.block.compress(data, mode="high_compression", compression=self.level, store_size=False)


def coder_from_config(config: Any) -> ExponentCoder:
    """The coder a stored config describes; UnknownCodecError names an id or parameters this version cannot read."""
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise UnknownCodecError(f"exponent coder config must be an object with a string 'id', got {config!r}")
    cls = _REGISTRY.get(config["id"])
    if cls is None:
        raise UnknownCodecError(f"unknown exponent coder {config['id']!r} (known: {', '.join(sorted(_REGISTRY))})")
    return cls.from_config(config)


def parse_coder(spec: str) -> ExponentCoder | None:
    """A coder from its command-line spelling: ``rans``, ``zstd``, ``zstd:19``, ``lz4``, ``lz4hc:12``; ``none``
    (None) stores BF16 uncompressed."""
    name, _, level = spec.strip().partition(":")
    if name == "none" and not level:
        return None
    config: dict[str, Any] = {"id": name}
    if level:
        if not level.isdigit():
            raise UnknownCodecError(f"exponent coder {spec!r}: the level must be an integer")
        config["level"] = int(level)
    if name == "rans":
        if level:
            raise UnknownCodecError("rans exponent coder takes no level")
        return RansCoder()
    return coder_from_config(config)


def known_coders() -> list[str]:
    """Registered codec ids, sorted."""
    return sorted(_REGISTRY)
