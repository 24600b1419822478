"""Record access: where each member of an expert or slice record lies, computed once from the manifest.

An expert record is one read (docs/FORMAT.md §1). A split record (format version 4, §3.7) is two sections: the
exponent section ``[offset, planes)`` (each member's directory and coded exponents) and the sign-mantissa section
``[planes, offset + nbytes)`` (each member's raw sign+mantissa plane). A runtime that keeps the planes of an expert
in memory reads only ``[offset, planes)`` and decodes with `decode_expert(..., planes=...)`.

Views are relative to the record start (``view``), or, for split parts, directory and payloads relative to the
record start and the plane relative to the sign-mantissa section (``split_view``). `Container.expert_layouts` and
`Container.slice_layouts` build these once per container; `Container.read_expert` and `read_slices` use them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from zipmoe._threads import Workers
from zipmoe.codecs.parts import Encoding, PartView, decode_parts
from zipmoe.errors import FormatError
from zipmoe.formats.manifest import Blob, Manifest


@dataclass(frozen=True)
class RecordMember:
    """One tensor part of an expert record."""

    tensor_index: int
    part: int
    name: str  # the tensor's name
    dtype: str  # "BF16", ...
    shape: tuple[int, ...]  # this expert's shape (a fused tensor's shape[1:])
    label: str  # for messages: "tensor 'x'" or "tensor 'x' part 3"
    view: PartView  # relative to the record start (a split part's `plane` too)
    split_view: PartView | None  # split parts: payloads relative to the record start, `plane` to the planes offset


@dataclass(frozen=True)
class ExpertLayout:
    """Where the members of one expert record lie."""

    layer: int
    expert: int
    offset: int  # file offset of the record
    nbytes: int  # the whole record
    planes: int | None  # file offset of the sign-mantissa section (split records), else None
    members: tuple[RecordMember, ...]

    @property
    def split(self) -> bool:
        """The record keeps its members' sign-mantissa planes in a section of their own."""
        return self.planes is not None

    @property
    def exponent_nbytes(self) -> int:
        """Bytes a reader that holds the planes reads: ``[offset, planes)`` (the whole record when not split)."""
        return self.nbytes if self.planes is None else self.planes - self.offset

    @property
    def planes_nbytes(self) -> int:
        """Bytes of the sign-mantissa section ``[planes, offset + nbytes)``; 0 when not split."""
        return 0 if self.planes is None else self.offset + self.nbytes - self.planes

    @property
    def source_nbytes(self) -> int:
        """Decoded bytes of the whole expert."""
        return sum(m.view.size for m in self.members)


@dataclass(frozen=True)
class SliceMember:
    """One tensor part's slice in an MSB or LSB slice record."""

    tensor_index: int
    part: int
    name: str
    shape: tuple[int, ...]
    label: str
    view: PartView  # the raw blob, relative to the slice record start


@dataclass(frozen=True)
class SliceLayout:
    """Where the members of one slice record lie."""

    layer: int
    expert: int
    kind: str  # "msb" or "lsb"
    offset: int
    nbytes: int
    members: tuple[SliceMember, ...]


def _view(blob: Blob, encoding: Encoding, base: int, plane_base: int) -> PartView:
    plane = None if blob.plane is None else blob.plane - plane_base
    return PartView(
        encoding, blob.offset - base, blob.nbytes, blob.size, blob.n_chunks, blob.directory_xxh64, blob.offset,
        plane, blob.plane,
    )  # fmt: skip


def _part_label(name: str, part: int, fused: bool) -> str:
    return f"tensor {name!r}" + (f" part {part}" if fused else "")


def expert_layouts(manifest: Manifest, encodings: list[Encoding]) -> dict[tuple[int, int], ExpertLayout]:
    """The layout of every expert record of a validated manifest, by (layer, expert)."""
    out = {}
    for rec in manifest.experts:
        members = []
        for t_index, p_index in rec.members:
            tensor = manifest.tensors[t_index]
            blob = tensor.parts[p_index]
            encoding = encodings[tensor.encoding]
            view = _view(blob, encoding, rec.offset, rec.offset)
            split_view = None if rec.planes is None else replace(view, plane=blob.plane - rec.planes)
            members.append(
                RecordMember(
                    t_index, p_index, tensor.name, tensor.dtype, tensor.shape[1:] if tensor.fused else tensor.shape,
                    _part_label(tensor.name, p_index, tensor.fused), view, split_view,
                )
            )  # fmt: skip
        out[(rec.layer, rec.expert)] = ExpertLayout(
            rec.layer, rec.expert, rec.offset, rec.nbytes, rec.planes, tuple(members)
        )
    return out


def slice_layouts(manifest: Manifest, raw: Encoding) -> dict[tuple[int, int, str], SliceLayout]:
    """The layout of every slice record of a validated manifest, by (layer, expert, kind)."""
    out = {}
    for rec in manifest.slice_records:
        members = []
        for t_index, p_index, blob in rec.members:
            tensor = manifest.tensors[t_index]
            label = f"{rec.kind.upper()} slice of {tensor.name!r}" + (f" part {p_index}" if tensor.fused else "")
            shape = tensor.shape[1:] if tensor.fused else tensor.shape
            view = _view(blob, raw, rec.offset, rec.offset)
            members.append(SliceMember(t_index, p_index, tensor.name, shape, label, view))
        out[(rec.layer, rec.expert, rec.kind)] = SliceLayout(
            rec.layer, rec.expert, rec.kind, rec.offset, rec.nbytes, tuple(members)
        )
    return out


def decode_expert(
    layout: ExpertLayout,
    buf: np.ndarray,
    outs: list[np.ndarray],
    workers: Workers,
    *,
    planes: np.ndarray | None = None,
    check: bool = True,
    widen: bool = False,
    label_prefix: str = "",
) -> None:
    """Decode every member of an expert record, their chunks spread over the worker threads.

    Args:
        layout: the record.
        buf: the whole record (``planes`` None), or at least its exponent section ``[0, exponent_nbytes)``.
        outs: one uint8 array per member, ``view.size`` bytes (twice that with ``widen``).
        workers: the threads.
        planes: a split record's sign-mantissa section (``planes_nbytes`` bytes), held apart from ``buf``.
        check: verify every checksum before decoding.
        widen: the members are BF16; write float32 bit patterns.
        label_prefix: put before each member's label in messages (say, ``"expert (layer 3, expert 5) "``).

    Raises:
        ChecksumError: a checksum does not match; the message names the member, the chunk and a file offset.
        FormatError: the buffers are too small, the record is not split but ``planes`` is given, or a directory is
            inconsistent.
    """
    if len(outs) != len(layout.members):
        raise FormatError(f"{label_prefix}{len(outs)} outputs for {len(layout.members)} members")
    where = f"expert record (layer {layout.layer}, expert {layout.expert})"
    if planes is None:
        if buf.size < layout.nbytes:
            raise FormatError(f"{label_prefix}{where}: a buffer of {buf.size} bytes cannot hold its {layout.nbytes}")
        items = [(buf, m.view, out, label_prefix + m.label) for m, out in zip(layout.members, outs)]
    else:
        if not layout.split:
            raise FormatError(f"{label_prefix}{where}: not a split record, its planes are not apart")
        if buf.size < layout.exponent_nbytes or planes.size < layout.planes_nbytes:
            raise FormatError(
                f"{label_prefix}{where}: buffers of {buf.size} and {planes.size} bytes cannot hold its "
                f"{layout.exponent_nbytes} exponent and {layout.planes_nbytes} sign-mantissa bytes"
            )
        items = [(buf, m.split_view, out, label_prefix + m.label, planes) for m, out in zip(layout.members, outs)]
    decode_parts(items, workers, check=check, widen=widen)
