"""The JSON manifest: what is stored where, how it is encoded, and the checksums that prove it.

The manifest is the last section of the file and is covered by the header's ``manifest_xxh64``. It is written as
canonical JSON (sorted keys, no spaces, UTF-8), so the same input always gives the same bytes. `Manifest.from_json`
validates every field's type before anything trusts it; `docs/FORMAT.md` lists the fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zipmoe._json import load_json
from zipmoe.codecs.parts import Encoding, encoding_from_config, pad8
from zipmoe.errors import FormatError
from zipmoe.formats.constants import (
    CLASS_DENSE,
    CLASS_EXPERT,
    FORMAT_VERSION,
    MAX_DIMENSION,
    MAX_INDEX,
    MAX_NDIM,
    READABLE_VERSIONS,
    RUNS_VERSION,
    SLICES_VERSION,
    SPLIT_VERSION,
)
from zipmoe.formats.names import name_problem, normalized
from zipmoe.quant.spec import SLICE_KINDS, SliceSpec


@dataclass(frozen=True)
class Blob:
    """An encoded part stored in the file: ``nbytes`` stored bytes at ``offset`` that decode to ``size`` bytes."""

    offset: int
    nbytes: int
    size: int
    n_chunks: int
    directory_xxh64: int
    sha256: str | None = None  # of the decoded bytes: safetensors headers and gaps (tensors record their own)
    # A bf16-split expert part of a split record (format version 4): the file offset of its sign-mantissa plane,
    # stored apart; `nbytes` then covers the directory and the payloads only.
    plane: int | None = None

    @property
    def stored_nbytes(self) -> int:
        """Every stored byte of the blob: ``nbytes``, and the ``pad8(size / 2)`` bytes of a plane stored apart."""
        return self.nbytes + (0 if self.plane is None else pad8(self.size // 2))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offset": self.offset,
            "nbytes": self.nbytes,
            "size": self.size,
            "n_chunks": self.n_chunks,
            "directory_xxh64": f"{self.directory_xxh64:016x}",
        }
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        if self.plane is not None:
            out["plane"] = self.plane
        return out


@dataclass(frozen=True)
class TensorEntry:
    """One source tensor. Dense and per-expert tensors have one part; a fused expert tensor ([E, ...]) has E."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    tensor_class: str  # "expert" or "dense"
    file: int  # index into Manifest.safetensors
    sha256: str  # of the source tensor's bytes
    encoding: int  # index into Manifest.encodings
    parts: tuple[Blob, ...]
    layer: int | None = None
    expert: int | None = None  # per-expert tensors
    fused: bool = False  # parts[e] is expert e's slice along axis 0
    exponent_entropy: float | None = None  # bits per value, BF16 only

    @property
    def size(self) -> int:
        """Decoded bytes of the whole tensor."""
        return sum(p.size for p in self.parts)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the whole tensor (sign-mantissa planes stored apart included)."""
        return sum(p.stored_nbytes for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "class": self.tensor_class,
            "file": self.file,
            "sha256": self.sha256,
            "encoding": self.encoding,
            "parts": [p.to_json() for p in self.parts],
        }
        if self.layer is not None:
            out["layer"] = self.layer
        if self.expert is not None:
            out["expert"] = self.expert
        if self.fused:
            out["fused"] = True
        if self.exponent_entropy is not None:
            out["exponent_entropy"] = round(self.exponent_entropy, 6)
        return out


@dataclass(frozen=True)
class ExpertRecord:
    """The contiguous bytes of one routed expert: its ``members`` (tensor index, part index), in file order.

    A split record (format version 4) holds the exponent pieces of its members in ``[offset, planes)`` and their
    sign-mantissa planes in ``[planes, offset + nbytes)``.
    """

    layer: int
    expert: int
    offset: int
    nbytes: int
    members: tuple[tuple[int, int], ...]
    planes: int | None = None  # file offset of the sign-mantissa section (split records)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer": self.layer,
            "expert": self.expert,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "members": [list(m) for m in self.members],
        }
        if self.planes is not None:
            out["planes"] = self.planes
        return out


@dataclass(frozen=True)
class SliceRecord:
    """The contiguous MSB or LSB slices of one routed expert: ``members`` (tensor index, part index, blob)."""

    layer: int
    expert: int
    kind: str  # "msb" or "lsb"
    offset: int
    nbytes: int
    members: tuple[tuple[int, int, Blob], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "kind": self.kind,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "members": [[t, p, blob.to_json()] for t, p, blob in self.members],
        }


@dataclass(frozen=True)
class EmbeddedFile:
    """A checkpoint file kept verbatim (config, tokenizer, index)."""

    name: str
    role: str
    sha256: str
    blob: Blob

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "sha256": self.sha256, "blob": self.blob.to_json()}


@dataclass(frozen=True)
class SafetensorsEntry:
    """A source safetensors file: its header bytes and its data region, segment by segment, for `unpack`.

    A segment is ``("tensor", tensor_index)`` or ``("gap", Blob)`` for bytes no tensor covers.
    """

    name: str
    nbytes: int
    sha256: str
    header: Blob  # the 8-byte length and the JSON header, verbatim
    segments: tuple[tuple[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "nbytes": self.nbytes,
            "sha256": self.sha256,
            "header": self.header.to_json(),
            "segments": [
                [kind, value.to_json() if isinstance(value, Blob) else value] for kind, value in self.segments
            ],
        }


MAX_ROUTING_EXPERTS = 4096
MAX_ROUTING_LAYERS = 1024


@dataclass(frozen=True)
class RoutingStats:
    """How many tokens of a routing trace each expert of each sparse layer served (``pack --routing``)."""

    num_experts: int
    top_k: int
    num_layers: int
    tokens: int
    counts: tuple[tuple[int, ...], ...]  # [num_layers][num_experts]

    def to_json(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "num_layers": self.num_layers,
                "tokens": self.tokens, "counts": [list(row) for row in self.counts]}  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """Everything the container says about itself."""

    created_by: str
    source: dict[str, Any]
    model: dict[str, Any]
    config: dict[str, Any] | None
    encodings: tuple[dict[str, Any], ...]
    files: tuple[EmbeddedFile, ...]
    safetensors: tuple[SafetensorsEntry, ...]
    tensors: tuple[TensorEntry, ...]
    experts: tuple[ExpertRecord, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    slices: SliceSpec | None = None  # AMAT slices of every expert (format version 2)
    slice_records: tuple[SliceRecord, ...] = ()
    small_tensors: int = 0  # dense tensors stored in raw runs, not listed in `tensors` (format version 3)
    routing: RoutingStats | None = None  # activation counts from a routing trace, for cache planning (optional)

    @property
    def format_version(self) -> int:
        """The lowest version that can hold this manifest: files without slices or runs stay readable by v1 readers."""
        if any(e.planes is not None for e in self.experts):
            return SPLIT_VERSION
        if self.small_tensors:
            return RUNS_VERSION
        return SLICES_VERSION if self.slices is not None else FORMAT_VERSION

    def to_json_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, compact separators, UTF-8)."""
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "created_by": self.created_by,
            "source": self.source,
            "model": self.model,
            "config": self.config,
            "encodings": list(self.encodings),
            "files": [f.to_json() for f in self.files],
            "safetensors": [s.to_json() for s in self.safetensors],
            "tensors": [t.to_json() for t in self.tensors],
            "experts": [e.to_json() for e in self.experts],
            "stats": self.stats,
        }
        if self.slices is not None:
            doc["slices"] = {**self.slices.get_config(), "records": [r.to_json() for r in self.slice_records]}
        if self.small_tensors:
            doc["small_tensors"] = self.small_tensors
        if self.routing is not None:
            doc["routing"] = self.routing.to_json()
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def encoding(self, index: int) -> Encoding:
        return encoding_from_config(self.encodings[index])

    def blobs(self) -> Iterator[tuple[str, Blob, int | None]]:
        """Every stored blob: a label for messages, the blob, its encoding index (None: raw bytes of a file)."""
        for f in self.files:
            yield f"file {f.name!r}", f.blob, None
        for s in self.safetensors:
            yield f"header of {s.name!r}", s.header, None
            for i, (kind, value) in enumerate(s.segments):
                if kind == "gap":
                    yield f"gap {i} of {s.name!r}", value, None
        for t in self.tensors:
            for i, p in enumerate(t.parts):
                yield (f"tensor {t.name!r} part {i}" if t.fused else f"tensor {t.name!r}"), p, t.encoding

    def slice_blobs(self) -> Iterator[tuple[str, Blob]]:
        """Every stored slice (raw-encoded) with a label for messages."""
        for r in self.slice_records:
            for t, p, blob in r.members:
                tensor = self.tensors[t]
                yield f"{r.kind.upper()} slice of {tensor.name!r}" + (f" part {p}" if tensor.fused else ""), blob

    @classmethod
    def from_json_bytes(cls, data: bytes, name: str) -> Manifest:
        """Parse and type-check a manifest (``name`` is the container, for messages)."""
        doc = load_json(data, lambda reason: FormatError(f"{name}: manifest: {reason}"))
        return _Parser(name).manifest(doc)


class _Parser:
    """Typed field access with messages that say where the bad value is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, where: str, message: str) -> FormatError:
        return FormatError(f"{self.name}: manifest {where}: {message}")

    def get(self, obj: Any, key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            if optional:
                return None
            raise self.fail(where, f"missing field {key!r}")
        value = obj[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(f"{where}.{key}", f"expected an integer, got {value!r}")
        if kind is int and value < 0:
            raise self.fail(f"{where}.{key}", f"expected a non-negative integer, got {value}")
        if not isinstance(value, kind):
            raise self.fail(f"{where}.{key}", f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def hex64(self, obj: Any, key: str, where: str) -> int:
        value = self.get(obj, key, str, where)
        if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
            raise self.fail(f"{where}.{key}", f"expected 16 lowercase hex digits, got {value!r}")
        return int(value, 16)

    def sha256(self, obj: Any, key: str, where: str) -> str:
        value = self.get(obj, key, str, where)
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise self.fail(f"{where}.{key}", f"expected a SHA-256 hex digest, got {value!r}")
        return value

    def path_name(self, obj: Any, where: str) -> str:
        """A file name that `unpack` will write: a relative POSIX path of plain components (`names.name_problem`)."""
        value = self.get(obj, "name", str, where)
        problem = name_problem(value)
        if problem:
            raise self.fail(f"{where}.name", f"unsafe file name {value!r}: {problem}")
        return value

    def index(self, obj: Any, key: str, where: str, optional: bool = False) -> int | None:
        """A layer or expert number."""
        value = self.get(obj, key, int, where, optional)
        if value is not None and value >= MAX_INDEX:
            raise self.fail(f"{where}.{key}", f"{value} is out of range (at most {MAX_INDEX - 1})")
        return value

    def blob(self, obj: Any, where: str, plane_allowed: bool = False) -> Blob:
        """A blob; only a tensor part (``plane_allowed``) may have a sign-mantissa plane apart."""
        plane = self.get(obj, "plane", int, where, optional=True)
        if plane is not None and not plane_allowed:
            raise self.fail(f"{where}.plane", "only a bf16-split expert part may have a sign-mantissa plane apart")
        return Blob(
            self.get(obj, "offset", int, where),
            self.get(obj, "nbytes", int, where),
            self.get(obj, "size", int, where),
            self.get(obj, "n_chunks", int, where),
            self.hex64(obj, "directory_xxh64", where),
            self.sha256(obj, "sha256", where) if isinstance(obj, dict) and "sha256" in obj else None,
            plane,
        )

    def manifest(self, doc: Any) -> Manifest:
        where = "root"
        version = self.get(doc, "format_version", int, where)
        if version not in READABLE_VERSIONS:
            raise self.fail("format_version", f"expected one of {list(READABLE_VERSIONS)}, got {version}")
        encodings = tuple(self.get(doc, "encodings", list, where))
        for i, config in enumerate(encodings):
            if not isinstance(config, dict):
                raise self.fail(f"encodings[{i}]", "expected an object")
            encoding_from_config(config)  # raises UnknownCodecError / FormatError
        files = tuple(
            EmbeddedFile(
                self.path_name(f, f"files[{i}]"),
                self.get(f, "role", str, f"files[{i}]"),
                self.sha256(f, "sha256", f"files[{i}]"),
                self.blob(self.get(f, "blob", dict, f"files[{i}]"), f"files[{i}].blob"),
            )
            for i, f in enumerate(self.get(doc, "files", list, where))
        )
        tensors = tuple(
            self.tensor(t, f"tensors[{i}]", len(encodings)) for i, t in enumerate(self.get(doc, "tensors", list, where))
        )
        safetensors = tuple(
            self.safetensors(s, f"safetensors[{i}]", len(tensors))
            for i, s in enumerate(self.get(doc, "safetensors", list, where))
        )
        experts = tuple(
            self.expert(e, f"experts[{i}]", tensors) for i, e in enumerate(self.get(doc, "experts", list, where))
        )
        for i, t in enumerate(tensors):
            if t.file >= len(safetensors):
                raise self.fail(f"tensors[{i}].file", f"index {t.file} out of range ({len(safetensors)} files)")
        config = doc.get("config")
        if config is not None and not isinstance(config, dict):
            raise self.fail("config", "expected an object or null")
        slices, slice_records = None, ()
        if "slices" in doc:
            if version < SLICES_VERSION:
                raise self.fail("slices", f"slices need format version {SLICES_VERSION}, the file says {version}")
            slices = SliceSpec.from_config(doc["slices"])
            records = self.get(doc["slices"], "records", list, "slices")
            slice_records = tuple(self.slice_record(r, f"slices.records[{i}]", tensors) for i, r in enumerate(records))
        elif version == SLICES_VERSION:
            raise self.fail("slices", f"missing: a version {version} file holds slices")
        small_tensors = self.get(doc, "small_tensors", int, where, optional=True) or 0
        if small_tensors and version < RUNS_VERSION:
            raise self.fail(
                "small_tensors", f"small tensors need format version {RUNS_VERSION}, the file says {version}"
            )
        if version == RUNS_VERSION and not small_tensors:
            raise self.fail("small_tensors", f"missing: a version {version} file holds small tensors")
        split = [i for i, e in enumerate(experts) if e.planes is not None]
        planes_apart = [
            (i, j) for i, t in enumerate(tensors) for j, p in enumerate(t.parts) if p.plane is not None
        ]  # fmt: skip
        if (split or planes_apart) and version < SPLIT_VERSION:
            at = f"experts[{split[0]}].planes" if split else "tensors[{}].parts[{}].plane".format(*planes_apart[0])
            raise self.fail(
                at, f"sign-mantissa planes stored apart need format version {SPLIT_VERSION}, the file says {version}"
            )
        if version == SPLIT_VERSION and not split:
            raise self.fail("experts", f"missing: a version {version} file holds split expert records")
        self.unique_names([f.name for f in files] + [s.name for s in safetensors])
        return Manifest(
            created_by=self.get(doc, "created_by", str, where),
            source=self.source(self.get(doc, "source", dict, where)),
            model=self.model(self.get(doc, "model", dict, where)),
            config=config,
            encodings=encodings,
            files=files,
            safetensors=safetensors,
            tensors=tensors,
            experts=experts,
            stats=self.stats(self.get(doc, "stats", dict, where)),
            slices=slices,
            slice_records=slice_records,
            small_tensors=small_tensors,
            routing=self.routing(doc["routing"]) if "routing" in doc else None,
        )

    def routing(self, doc: Any) -> RoutingStats:
        """Activation counts: every count an integer from 0 to the token count, one row of E per sparse layer."""
        where = "routing"
        experts = self.get(doc, "num_experts", int, where)
        top_k = self.get(doc, "top_k", int, where)
        layers = self.get(doc, "num_layers", int, where)
        tokens = self.get(doc, "tokens", int, where)
        counts = self.get(doc, "counts", list, where)
        if not (1 <= top_k <= experts <= MAX_ROUTING_EXPERTS and 1 <= layers <= MAX_ROUTING_LAYERS and tokens >= 1):
            raise self.fail(where, f"{layers} layers of {experts} experts, top-{top_k}, {tokens} tokens: out of range")
        if len(counts) != layers or any(
            not isinstance(row, list) or len(row) != experts
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= tokens for c in row)
            for row in counts
        ):  # fmt: skip
            raise self.fail(f"{where}.counts", f"expected {layers} rows of {experts} counts from 0 to {tokens}")
        return RoutingStats(experts, top_k, layers, tokens, tuple(tuple(row) for row in counts))

    def unique_names(self, names: list[str]) -> None:
        """No two output files may share a name (after normalisation), nor may a file be another's directory."""
        seen: dict[str, str] = {}
        for name in names:
            key = normalized(name)
            if key in seen:
                raise self.fail("files", f"file names {seen[key]!r} and {name!r} name the same file")
            seen[key] = name
        for name in names:
            parts = normalized(name).split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent in seen:
                    raise self.fail("files", f"{seen[parent]!r} is a file, but {name!r} uses it as a directory")

    def source(self, source: dict[str, Any]) -> dict[str, Any]:
        kind = self.get(source, "kind", str, "source")
        if kind not in ("local", "hub"):
            raise self.fail("source.kind", f"expected 'local' or 'hub', got {kind!r}")
        self.get(source, "name", str, "source")
        for key in ("revision", "commit"):
            if source.get(key) is not None:
                self.get(source, key, str, "source")
        return source

    def model(self, model: dict[str, Any]) -> dict[str, Any]:
        for key, kind in (("model_type", str), ("family", str), ("n_layers", int), ("n_experts", int)):
            if model.get(key) is not None:
                self.get(model, key, kind, "model")
        return model

    def stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        classes = self.get(stats, "classes", dict, "stats", optional=True) or {}
        for name, cls in classes.items():
            where = f"stats.classes.{name}"
            histogram = self.get(cls, "exponent_histogram", list, where, optional=True)
            if histogram is not None and (
                len(histogram) != 256
                or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63 for v in histogram)
            ):
                raise self.fail(f"{where}.exponent_histogram", "expected 256 integers from 0 to 2**63-1")
        return stats

    def tensor(self, t: Any, where: str, n_encodings: int) -> TensorEntry:
        shape = self.get(t, "shape", list, where)
        if len(shape) > MAX_NDIM or any(
            isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIMENSION for d in shape
        ):
            raise self.fail(
                f"{where}.shape", f"expected at most {MAX_NDIM} integers from 0 to {MAX_DIMENSION}, got {shape}"
            )
        tensor_class = self.get(t, "class", str, where)
        if tensor_class not in (CLASS_EXPERT, CLASS_DENSE):
            raise self.fail(f"{where}.class", f"expected 'expert' or 'dense', got {tensor_class!r}")
        encoding = self.get(t, "encoding", int, where)
        if encoding >= n_encodings:
            raise self.fail(f"{where}.encoding", f"index {encoding} out of range ({n_encodings} encodings)")
        parts = tuple(
            self.blob(p, f"{where}.parts[{j}]", plane_allowed=True)
            for j, p in enumerate(self.get(t, "parts", list, where))
        )
        fused = self.get(t, "fused", bool, where, optional=True) or False
        layer = self.index(t, "layer", where, optional=True)
        expert = self.index(t, "expert", where, optional=True)
        if tensor_class == CLASS_EXPERT and (layer is None or (expert is None) == (not fused)):
            raise self.fail(where, "an expert tensor needs 'layer' and either 'expert' or 'fused'")
        if (fused and (not shape or len(parts) != shape[0])) or (not fused and len(parts) != 1):
            raise self.fail(f"{where}.parts", f"{len(parts)} parts do not fit shape {shape} (fused={fused})")
        entropy = t.get("exponent_entropy")
        if entropy is not None and not isinstance(entropy, (int, float)):
            raise self.fail(f"{where}.exponent_entropy", "expected a number")
        return TensorEntry(
            name=self.get(t, "name", str, where),
            dtype=self.get(t, "dtype", str, where),
            shape=tuple(shape),
            tensor_class=tensor_class,
            file=self.get(t, "file", int, where),
            sha256=self.sha256(t, "sha256", where),
            encoding=encoding,
            parts=parts,
            layer=layer,
            expert=expert,
            fused=fused,
            exponent_entropy=None if entropy is None else float(entropy),
        )

    def safetensors(self, s: Any, where: str, n_tensors: int) -> SafetensorsEntry:
        segments: list[tuple[str, Any]] = []
        for j, seg in enumerate(self.get(s, "segments", list, where)):
            at = f"{where}.segments[{j}]"
            if not isinstance(seg, list) or len(seg) != 2 or seg[0] not in ("tensor", "gap"):
                raise self.fail(at, f"expected ['tensor', index] or ['gap', blob], got {seg!r}")
            if seg[0] == "tensor":
                if isinstance(seg[1], bool) or not isinstance(seg[1], int) or not 0 <= seg[1] < n_tensors:
                    raise self.fail(at, f"tensor index {seg[1]!r} out of range ({n_tensors} tensors)")
                segments.append(("tensor", seg[1]))
            else:
                segments.append(("gap", self.blob(seg[1], at)))
        return SafetensorsEntry(
            self.path_name(s, where),
            self.get(s, "nbytes", int, where),
            self.sha256(s, "sha256", where),
            self.blob(self.get(s, "header", dict, where), f"{where}.header"),
            tuple(segments),
        )

    def member(self, m: Any, where: str, tensors: tuple[TensorEntry, ...], length: int) -> tuple[int, int]:
        if (
            not isinstance(m, list)
            or len(m) != length
            or any(isinstance(v, bool) or not isinstance(v, int) for v in m[:2])
            or not 0 <= m[0] < len(tensors)
            or not 0 <= m[1] < len(tensors[m[0]].parts)
        ):
            shape = "[tensor index, part index]" if length == 2 else "[tensor index, part index, blob]"
            raise self.fail(where, f"expected {shape}, got {m!r}")
        return m[0], m[1]

    def expert(self, e: Any, where: str, tensors: tuple[TensorEntry, ...]) -> ExpertRecord:
        members = [
            self.member(m, f"{where}.members[{j}]", tensors, 2)
            for j, m in enumerate(self.get(e, "members", list, where))
        ]
        planes = self.get(e, "planes", int, where, optional=True)
        for j, (t, p) in enumerate(members):  # a split record: every member's plane apart, and only then
            if (planes is None) != (tensors[t].parts[p].plane is None):
                problem = "has no sign-mantissa plane apart, in a split record" if planes is not None else (
                    "has a sign-mantissa plane apart, in a record that is not split (no 'planes')"
                )  # fmt: skip
                raise self.fail(f"{where}.members[{j}]", f"tensor {tensors[t].name!r} {problem}")
        return ExpertRecord(
            self.index(e, "layer", where),
            self.index(e, "expert", where),
            self.get(e, "offset", int, where),
            self.get(e, "nbytes", int, where),
            tuple(members),
            planes,
        )

    def slice_record(self, r: Any, where: str, tensors: tuple[TensorEntry, ...]) -> SliceRecord:
        kind = self.get(r, "kind", str, where)
        if kind not in SLICE_KINDS:
            raise self.fail(f"{where}.kind", f"expected one of {list(SLICE_KINDS)}, got {kind!r}")
        members = []
        for j, m in enumerate(self.get(r, "members", list, where)):
            at = f"{where}.members[{j}]"
            t, p = self.member(m, at, tensors, 3)
            members.append((t, p, self.blob(m[2], f"{at}[2]")))
        return SliceRecord(
            self.index(r, "layer", where),
            self.index(r, "expert", where),
            kind,
            self.get(r, "offset", int, where),
            self.get(r, "nbytes", int, where),
            tuple(members),
        )
