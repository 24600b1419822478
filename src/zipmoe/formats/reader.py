"""Reading a container: validate before trusting, then decode one tensor or one expert on request.

Opening reads only the header and the manifest and checks that every record lies inside the data region, is
aligned, and overlaps no other record. The file is memory-mapped; nothing else is read until a tensor or an expert
is asked for. Every decode checks the chunk checksums unless told not to.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from zipmoe._threads import Workers
from zipmoe.codecs.checksum import checksum
from zipmoe.codecs.parts import (
    Bf16Split,
    Encoding,
    Fp8Split,
    PartView,
    decode_part,
    decode_parts,
    pad8,
    size_problem,
)
from zipmoe.errors import CheckpointError, ChecksumError, FormatError
from zipmoe.formats.constants import (
    CLASS_DENSE,
    CLASS_EXPERT,
    HEADER_NBYTES,
    MAX_MANIFEST_NBYTES,
    PART_ALIGNMENT,
    PARTIAL_SUFFIX,
    SMALL_TENSOR_NBYTES,
)
from zipmoe.formats.header import FileHeader
from zipmoe.formats.manifest import Blob, ExpertRecord, Manifest, SliceRecord, TensorEntry
from zipmoe.formats.records import ExpertLayout, SliceLayout, decode_expert, expert_layouts, slice_layouts
from zipmoe.formats.safetensors_file import parse_safetensors_header, tensor_nbytes
from zipmoe.quant.spec import SliceError

# numpy dtypes for viewing decoded bytes; BF16 has none in numpy, so its bit patterns come back as uint16.
NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
    "BF16": np.uint16, "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64,
    "F64": np.float64, "C64": np.complex64,
}  # fmt: skip


def as_array(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """View decoded bytes as an array of the tensor's shape (uint16 for BF16; flat uint8 for dtypes numpy lacks)."""
    np_dtype = NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        return data
    return data.view(np.dtype(np_dtype).newbyteorder("<")).reshape(shape)


@dataclass(frozen=True)
class SmallTensor:
    """A dense tensor smaller than `SMALL_TENSOR_NBYTES`, stored inside a raw run (a ``gap`` segment) and described
    only by its file's stored safetensors header (docs/FORMAT.md §4)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    blob: Blob | None  # the run holding its bytes (None: a tensor of zero bytes)
    start: int  # of its bytes in the decoded run
    size: int
    tensor_class: str = CLASS_DENSE


@dataclass(frozen=True)
class DecodedMember:
    """One tensor part of a decoded expert record."""

    tensor: TensorEntry
    part: int
    data: np.ndarray  # uint8 bytes; see `as_array`

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape[1:] if self.tensor.fused else self.tensor.shape


class Container:
    """A zipmoe container opened for reading.

    Args:
        path: the ``.zmoe`` file.
        unpublished: read a file whose writer has not yet published it (magic still zero; see `FileHeader`).

    Raises:
        FormatError: the file is missing, not a container, of an unsupported version, truncated, or inconsistent.
        ChecksumError: the header or the manifest is corrupt.
    """

    def __init__(self, path: str | os.PathLike[str], *, unpublished: bool = False) -> None:
        self.path = Path(path)
        name = str(path)
        if self.path.name.endswith(PARTIAL_SUFFIX) and not unpublished:
            raise FormatError(f"{name}: an unfinished output (a *{PARTIAL_SUFFIX} file is never a container)")
        try:
            if self.path.exists() and not self.path.is_dir() and not self.path.is_file():
                raise FormatError(f"{name}: not a regular file")  # a FIFO or a device would block or never end
            with open(self.path, "rb") as f:
                file_nbytes = os.fstat(f.fileno()).st_size
                self.header = FileHeader.unpack(f.read(HEADER_NBYTES), file_nbytes, name, unpublished=unpublished)
                if self.header.manifest_nbytes > MAX_MANIFEST_NBYTES:
                    raise FormatError(f"{name}: manifest of {self.header.manifest_nbytes} bytes exceeds the limit")
                f.seek(self.header.manifest_offset)
                manifest_bytes = f.read(self.header.manifest_nbytes)
        except FileNotFoundError:
            raise FormatError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{name}: is a directory, not a container file") from None
        except OSError as exc:
            raise FormatError(f"{name}: cannot read ({exc.strerror or exc})") from None
        if checksum(manifest_bytes) != self.header.manifest_xxh64:
            start = self.header.manifest_offset
            raise ChecksumError(
                f"{name}: manifest checksum mismatch (file offset {start}..{start + len(manifest_bytes) - 1})"
            )
        self.manifest = Manifest.from_json_bytes(manifest_bytes, name)
        if self.manifest.format_version != self.header.format_version:
            raise FormatError(
                f"{name}: the header says format version {self.header.format_version}, "
                f"the manifest {self.manifest.format_version}"
            )
        self.encodings: list[Encoding] = [self.manifest.encoding(i) for i in range(len(self.manifest.encodings))]
        self.tensors = {t.name: t for t in self.manifest.tensors}
        self.experts = {(e.layer, e.expert): e for e in self.manifest.experts}
        self.slice_spec = self.manifest.slices
        self.slice_records = {(r.layer, r.expert, r.kind): r for r in self.manifest.slice_records}
        self._validate(name)

    # -- validation -------------------------------------------------------------------------------------------------

    def _validate(self, name: str) -> None:
        m, h = self.manifest, self.header
        if len(self.tensors) != len(m.tensors) or len(self.experts) != len(m.experts):
            raise FormatError(f"{name}: manifest has duplicate tensor names or expert records")
        raw = self.encodings[self.raw_encoding_index]
        for label, blob, encoding in m.blobs():
            self._check_sizes(name, label, blob, raw if encoding is None else self.encodings[encoding])
        for label, blob in m.slice_blobs():
            self._check_sizes(name, label, blob, raw)
        data_end = h.manifest_offset

        def check_range(label: str, offset: int, nbytes: int, alignment: int) -> None:
            if offset % alignment or offset < HEADER_NBYTES or offset + nbytes > data_end:
                raise FormatError(
                    f"{name}: {label}: range {offset}..{offset + nbytes} is misaligned or outside the data region "
                    f"{HEADER_NBYTES}..{data_end}"
                )

        in_record: dict[tuple[int, int], ExpertRecord] = {}
        regions: list[tuple[int, int, str]] = []
        for rec in m.experts:
            label = f"expert record (layer {rec.layer}, expert {rec.expert})"
            check_range(label, rec.offset, rec.nbytes, h.alignment)
            regions.append((rec.offset, rec.offset + rec.nbytes, label))
            end = rec.offset + rec.nbytes
            if rec.planes is not None and (rec.planes % h.alignment or not rec.offset < rec.planes <= end):
                raise FormatError(
                    f"{name}: {label}: sign-mantissa section at {rec.planes} is misaligned or outside the record "
                    f"{rec.offset}..{end}"
                )
            position = rec.offset
            plane_position = rec.planes
            for t_index, p_index in rec.members:
                tensor = m.tensors[t_index]
                part = tensor.parts[p_index]
                if tensor.tensor_class != CLASS_EXPERT or (t_index, p_index) in in_record:
                    raise FormatError(
                        f"{name}: {label}: member {tensor.name!r} is not an expert part or is listed twice"
                    )
                exponent_end = end if rec.planes is None else rec.planes
                if part.offset < position or part.offset % PART_ALIGNMENT or part.offset + part.nbytes > exponent_end:
                    raise FormatError(
                        f"{name}: {label}: member {tensor.name!r} lies outside the record or out of order"
                    )
                if part.plane is not None:
                    plane_end = part.plane + pad8(part.size // 2)
                    if part.plane < plane_position or part.plane % PART_ALIGNMENT or plane_end > end:
                        raise FormatError(
                            f"{name}: {label}: the sign-mantissa plane of {tensor.name!r} (file offset {part.plane}) "
                            f"lies outside the record's sign-mantissa section {rec.planes}..{end} or out of order"
                        )
                    plane_position = plane_end
                expected_expert = p_index if tensor.fused else tensor.expert
                if tensor.layer != rec.layer or expected_expert != rec.expert:
                    raise FormatError(f"{name}: {label}: member {tensor.name!r} belongs to another expert")
                position = part.offset + part.nbytes
                in_record[(t_index, p_index)] = rec
        for rec in m.slice_records:
            self._validate_slice_record(name, rec, check_range, regions)
        if len(self.slice_records) != len(m.slice_records) or (
            m.slices is not None and len(self.slice_records) != 2 * len(self.experts)
        ):
            raise FormatError(f"{name}: every expert record needs exactly one MSB and one LSB slice record")
        for t_index, t in enumerate(m.tensors):
            encoding = self.encodings[t.encoding]
            expected = tensor_nbytes(t.dtype, t.shape)
            if expected is not None and expected != t.size:
                raise FormatError(
                    f"{name}: tensor {t.name!r}: {t.dtype} {list(t.shape)} is {expected} bytes, parts hold {t.size}"
                )
            if isinstance(encoding, Bf16Split | Fp8Split) and t.dtype != encoding.dtype:
                raise FormatError(f"{name}: tensor {t.name!r}: {encoding.encoding_id} encoding on a {t.dtype} tensor")
            if any(p.plane is not None for p in t.parts) and (
                t.tensor_class != CLASS_EXPERT or not isinstance(encoding, Bf16Split)
            ):
                raise FormatError(
                    f"{name}: tensor {t.name!r}: only a bf16-split expert part may have a sign-mantissa plane apart"
                )
            if t.fused and len({p.size for p in t.parts}) > 1:
                raise FormatError(f"{name}: tensor {t.name!r}: fused parts differ in size")
            for p_index, part in enumerate(t.parts):
                label = f"tensor {t.name!r}" + (f" part {p_index}" if t.fused else "")
                if t.tensor_class == CLASS_EXPERT:
                    if (t_index, p_index) not in in_record:
                        raise FormatError(f"{name}: {label}: expert part is in no expert record")
                else:
                    check_range(label, part.offset, part.nbytes, h.alignment)
                    regions.append((part.offset, part.offset + part.nbytes, label))
        for f in m.files:
            check_range(f"file {f.name!r}", f.blob.offset, f.blob.nbytes, h.alignment)
            regions.append((f.blob.offset, f.blob.offset + f.blob.nbytes, f"file {f.name!r}"))
        seen_tensors: set[int] = set()
        for f_index, s in enumerate(m.safetensors):
            check_range(f"header of {s.name!r}", s.header.offset, s.header.nbytes, h.alignment)
            regions.append((s.header.offset, s.header.offset + s.header.nbytes, f"header of {s.name!r}"))
            total = s.header.size
            for kind, value in s.segments:
                if kind == "gap":
                    check_range(f"gap in {s.name!r}", value.offset, value.nbytes, h.alignment)
                    regions.append((value.offset, value.offset + value.nbytes, f"gap in {s.name!r}"))
                    total += value.size
                else:
                    if value in seen_tensors or m.tensors[value].file != f_index:
                        raise FormatError(
                            f"{name}: {s.name!r}: segment tensor {value} is listed twice or in another file"
                        )
                    seen_tensors.add(value)
                    total += m.tensors[value].size
            if total != s.nbytes:
                raise FormatError(f"{name}: {s.name!r}: header and segments add up to {total} bytes, not {s.nbytes}")
        if len(seen_tensors) != len(m.tensors):
            raise FormatError(f"{name}: {len(m.tensors) - len(seen_tensors)} tensors are in no safetensors file")
        regions.sort()
        for (_, a_end, a_label), (b_start, _, b_label) in zip(regions, regions[1:]):
            if b_start < a_end:
                raise FormatError(f"{name}: {b_label} overlaps {a_label}")
        self.regions = regions

    @staticmethod
    def _check_sizes(name: str, label: str, blob: Blob, encoding: Encoding) -> None:
        """A blob's decoded size follows from its stored bytes, so nothing larger than the file is ever allocated."""
        if blob.plane is not None and not isinstance(encoding, Bf16Split):
            raise FormatError(f"{name}: {label}: only a bf16-split expert part may have a sign-mantissa plane apart")
        problem = size_problem(encoding, blob.nbytes, blob.size, blob.n_chunks, blob.plane is not None)
        if problem:
            raise FormatError(f"{name}: {label}: {problem}")

    def _validate_slice_record(self, name: str, rec: SliceRecord, check_range, regions: list) -> None:
        label = f"{rec.kind.upper()} slice record (layer {rec.layer}, expert {rec.expert})"
        check_range(label, rec.offset, rec.nbytes, self.header.alignment)
        regions.append((rec.offset, rec.offset + rec.nbytes, label))
        expert = self.experts.get((rec.layer, rec.expert))
        members = [(t, p) for t, p, _ in rec.members]
        if expert is None or sorted(members) != sorted(expert.members) or len(set(members)) != len(members):
            raise FormatError(f"{name}: {label}: its members are not those of an expert record")
        position = rec.offset
        for t_index, _, blob in rec.members:
            tensor = self.manifest.tensors[t_index]
            try:
                rows, cols = self.slice_spec.check_shape(
                    tensor.name, tensor.shape[1:] if tensor.fused else tensor.shape
                )
            except SliceError as exc:
                raise FormatError(f"{name}: {label}: {exc}") from None
            expected = self.slice_spec.slice_nbytes(rec.kind, rows, cols)
            if blob.size != expected:
                raise FormatError(f"{name}: {label}: {tensor.name!r} holds {blob.size} bytes, expected {expected}")
            if (
                blob.offset < position
                or blob.offset % PART_ALIGNMENT
                or blob.offset + blob.nbytes > rec.offset + rec.nbytes
            ):
                raise FormatError(f"{name}: {label}: member {tensor.name!r} lies outside the record or out of order")
            position = blob.offset + blob.nbytes

    # -- access -----------------------------------------------------------------------------------------------------

    @cached_property
    def data(self) -> np.ndarray:
        """The whole file, memory-mapped read-only (uint8); slices are zero-copy views."""
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mmap, dtype=np.uint8)

    def release(self, offset: int, nbytes: int) -> None:
        """Drop the mapped pages of a byte range from this process's resident memory.

        The bytes stay in the page cache and stay readable; a scan over the whole file that releases what it has
        read keeps its memory bounded by what it holds at once, not by the size of the file.
        """
        if "data" not in self.__dict__ or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(offset + nbytes, self.header.file_nbytes)
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def part_view(self, tensor: TensorEntry, part: int, base: int = 0) -> PartView:
        """Where part ``part`` of ``tensor`` lies in a buffer that starts at file offset ``base``."""
        blob = tensor.parts[part]
        return self.blob_view(blob, self.encodings[tensor.encoding], base)

    def blob_view(self, blob: Blob, encoding: Encoding, base: int = 0) -> PartView:
        """Where ``blob`` lies in a buffer that starts at file offset ``base`` (its plane too, when stored apart)."""
        plane = None if blob.plane is None else blob.plane - base
        return PartView(
            encoding, blob.offset - base, blob.nbytes, blob.size, blob.n_chunks, blob.directory_xxh64, blob.offset,
            plane, blob.plane,
        )  # fmt: skip

    def stored_blobs(self) -> Iterator[tuple[str, PartView]]:
        """Every stored blob of the file (tensor parts, embedded files, headers, gaps) with a label, as part views."""
        for label, blob, encoding in self.manifest.blobs():
            index = self.raw_encoding_index if encoding is None else encoding
            yield label, self.blob_view(blob, self.encodings[index])
        for label, blob in self.manifest.slice_blobs():
            yield label, self.blob_view(blob, self.encodings[self.raw_encoding_index])

    def tensor(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None

    @cached_property
    def small_tensors(self) -> dict[str, SmallTensor]:
        """The tensors stored in raw runs, by name, found through the stored safetensors headers.

        Raises:
            FormatError: a stored header is malformed, or names a tensor that is neither in the manifest nor inside
                a run.
        """
        out: dict[str, SmallTensor] = {}
        for s in self.manifest.safetensors:
            raw = self.read_blob(s.header, f"header of {s.name!r}").tobytes()
            if len(raw) < 8 or int.from_bytes(raw[:8], "little") != len(raw) - 8:
                raise FormatError(f"{self.path}: header of {s.name!r}: its length prefix does not match its size")
            try:
                parsed = parse_safetensors_header(Path(s.name), raw[8:], s.nbytes)
            except CheckpointError as exc:
                raise FormatError(f"{self.path}: {exc}") from None
            runs: list[tuple[int, int, Blob]] = []  # [start, end) in the source file, and the run
            position = s.header.size
            for kind, value in s.segments:
                size = value.size if kind == "gap" else self.manifest.tensors[value].size
                if kind == "gap":
                    runs.append((position, position + size, value))
                position += size
            starts = [start for start, _, _ in runs]
            for t in parsed.tensors:
                if t.name in self.tensors:
                    continue
                i = bisect.bisect_right(starts, t.start) - 1
                inside = t.nbytes == 0 or (i >= 0 and t.start + t.nbytes <= runs[i][1])
                if t.name in out or t.nbytes >= SMALL_TENSOR_NBYTES or not inside:
                    raise FormatError(
                        f"{self.path}: header of {s.name!r}: tensor {t.name!r} is not in the manifest, "
                        "nor a small tensor inside a stored run (or is named twice)"
                    )
                blob = runs[i][2] if t.nbytes else None
                out[t.name] = SmallTensor(t.name, t.dtype, t.shape, blob, t.start - runs[i][0] if blob else 0, t.nbytes)
        if len(out) != self.manifest.small_tensors:
            raise FormatError(
                f"{self.path}: the manifest counts {self.manifest.small_tensors} small tensors, "
                f"the stored safetensors headers name {len(out)} tensors it does not list"
            )
        return out

    def dense_tensors(self) -> list[TensorEntry | SmallTensor]:
        """Every dense tensor: those the manifest lists and those stored in raw runs."""
        listed = [t for t in self.manifest.tensors if t.tensor_class == CLASS_DENSE]
        return listed + list(self.small_tensors.values())

    def read_tensor(self, name: str, *, workers: Workers | None = None, check: bool = True) -> np.ndarray:
        """Decode a whole tensor; returns its source bytes (uint8). See `as_array` for a typed view."""
        if name not in self.tensors and name in self.small_tensors:
            return self._read_small(self.small_tensors[name], check)
        tensor = self.tensor(name)
        out = np.empty(tensor.size, np.uint8)
        self.decode_tensor_into(tensor, out, workers=workers, check=check)
        return out

    def decode_tensor_into(
        self, tensor: TensorEntry, out: np.ndarray, *, workers: Workers | None = None, check: bool = True
    ) -> None:
        """Decode ``tensor`` into ``out`` (uint8, ``tensor.size`` bytes), all its parts at once."""
        items = []
        position = 0
        for index, blob in enumerate(tensor.parts):
            items.append(self._item(tensor, index, self.data, 0, out[position : position + blob.size]))
            position += blob.size
        self._decode(items, workers, check)

    @cached_property
    def expert_layouts(self) -> dict[tuple[int, int], ExpertLayout]:
        """Where the members of every expert record lie, by (layer, expert) (`zipmoe.formats.records`)."""
        return expert_layouts(self.manifest, self.encodings)

    @cached_property
    def slice_layouts(self) -> dict[tuple[int, int, str], SliceLayout]:
        """Where the members of every slice record lie, by (layer, expert, kind)."""
        return slice_layouts(self.manifest, self.encodings[self.raw_encoding_index]) if self.slice_records else {}

    def read_expert(
        self, layer: int, expert: int, *, workers: Workers | None = None, check: bool = True
    ) -> list[DecodedMember]:
        """Read one expert record with a single read and decode every tensor part in it."""
        layout = self.expert_layouts.get((layer, expert))
        if layout is None:
            raise FormatError(f"{self.path}: no expert record for layer {layer}, expert {expert}")
        buf = np.array(self.data[layout.offset : layout.offset + layout.nbytes])  # the one read
        members = [
            DecodedMember(self.manifest.tensors[m.tensor_index], m.part, np.empty(m.view.size, np.uint8))
            for m in layout.members
        ]
        try:
            decode_expert(layout, buf, [m.data for m in members], workers or Workers(1), check=check)
        except FormatError as exc:
            raise type(exc)(f"{self.path}: {exc}") from None
        return members

    def _read_small(self, tensor: SmallTensor, check: bool) -> np.ndarray:
        if tensor.blob is None:
            return np.empty(0, np.uint8)
        cached = self.__dict__.get("_last_run")
        if cached is None or cached[0] != tensor.blob.offset:  # tensors are mostly read in file order: one decode
            cached = (tensor.blob.offset, self.read_blob(tensor.blob, f"run holding {tensor.name!r}", check=check))
            self._last_run = cached
        return cached[1][tensor.start : tensor.start + tensor.size].copy()

    def _item(self, tensor: TensorEntry, part: int, buf: np.ndarray, base: int, out: np.ndarray) -> tuple:
        label = f"tensor {tensor.name!r}" + (f" part {part}" if tensor.fused else "")
        return buf, self.part_view(tensor, part, base), out, label

    def _decode(self, items: list[tuple], workers: Workers | None, check: bool) -> None:
        try:
            decode_parts(items, workers or Workers(1), check=check)
        except FormatError as exc:
            raise type(exc)(f"{self.path}: {exc}") from None

    def read_blob(self, blob: Blob, label: str, *, check: bool = True) -> np.ndarray:
        """Decode a raw blob (embedded file, safetensors header, gap)."""
        out = np.empty(blob.size, np.uint8)
        encoding = self.encodings[self.raw_encoding_index]
        try:
            decode_part(self.data, self.blob_view(blob, encoding), out, Workers(1), check=check)
        except FormatError as exc:
            raise type(exc)(f"{self.path}: {label}: {exc}") from None
        return out

    def read_slices(
        self, layer: int, expert: int, kind: str, *, check: bool = True
    ) -> list[tuple[TensorEntry, int, np.ndarray]]:
        """The slice payloads of one expert, ``(tensor, part, payload bytes)`` per member, read with one read."""
        layout = self.slice_layouts.get((layer, expert, kind))
        if layout is None:
            raise FormatError(f"{self.path}: no {kind.upper()} slice record for layer {layer}, expert {expert}")
        buf = np.array(self.data[layout.offset : layout.offset + layout.nbytes])
        out = []
        for m in layout.members:
            payload = np.empty(m.view.size, np.uint8)
            try:
                decode_part(buf, m.view, payload, Workers(1), check=check)
            except FormatError as exc:
                raise type(exc)(f"{self.path}: {m.label}: {exc}") from None
            out.append((self.manifest.tensors[m.tensor_index], m.part, payload))
        return out

    @cached_property
    def raw_encoding_index(self) -> int:
        for i, config in enumerate(self.manifest.encodings):
            if config.get("id") == "raw":
                return i
        raise FormatError(f"{self.path}: manifest has no raw encoding for its files")

    def read_file(self, name: str) -> bytes:
        """The bytes of an embedded file (config.json, tokenizer.json, ...)."""
        for f in self.manifest.files:
            if f.name == name:
                return self.read_blob(f.blob, f"file {name!r}").tobytes()
        raise FormatError(f"{self.path}: no embedded file named {name!r}")

    def padding_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges that no stored blob covers (alignment padding); in a valid file they are all zero."""
        ranges = []
        position = HEADER_NBYTES
        blobs = [b for _, b, _ in self.manifest.blobs()] + [b for _, b in self.manifest.slice_blobs()]
        covered = [(b.offset, b.offset + b.nbytes) for b in blobs]
        covered += [(b.plane, b.plane + pad8(b.size // 2)) for b in blobs if b.plane is not None]
        for start, end in sorted(covered):
            if start > position:
                ranges.append((position, start))
            position = max(position, end)
        if position < self.header.manifest_offset:
            ranges.append((position, self.header.manifest_offset))
        return ranges

    def close(self) -> None:
        """Unmap the file (views handed out earlier keep the mapping alive until they are gone)."""
        if self.__dict__.pop("data", None) is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
