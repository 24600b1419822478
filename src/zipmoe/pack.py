"""`pack`: a Hugging Face checkpoint in, one verified container out.

Order of the file: embedded files (config, tokenizer, index), each safetensors header (and any bytes no tensor
covers), dense tensors in checkpoint order, then one record per routed expert sorted by (layer, expert). An expert
whose parts are all bf16-split gets a split record (format version 4): the exponent pieces of its parts, then, from
the next aligned offset, their sign-mantissa planes; only the planes of the current expert are held meanwhile. Tensors
are read one part at a time into reused buffers, so memory grows with the largest tensor, never with the model.
Every part is decoded again right after it is encoded and compared with its source bit for bit; when the file is
complete every checksum is read back from disk before the file is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe import __version__
from zipmoe._threads import Workers
from zipmoe.codecs.bf16 import entropy_bits
from zipmoe.codecs.coders import ExponentCoder, RansCoder
from zipmoe.codecs.parts import (
    DEFAULT_CHUNK_VALUES,
    MAX_CHUNK,
    MIN_CHUNK,
    Bf16Split,
    EncodedPart,
    Fp8Split,
    PartView,
    Raw,
    check_part,
    decode_part,
    encode_part,
    split_part,
)
from zipmoe.errors import OutputError, VerificationError, ZipmoeError
from zipmoe.formats.checkpoint import Checkpoint, open_checkpoint
from zipmoe.formats.constants import CLASS_DENSE, CLASS_EXPERT, SMALL_TENSOR_NBYTES, SUFFIX
from zipmoe.formats.experts import ModelLayout, classify
from zipmoe.formats.manifest import (
    Blob,
    EmbeddedFile,
    ExpertRecord,
    Manifest,
    RoutingStats,
    SafetensorsEntry,
    SliceRecord,
    TensorEntry,
)
from zipmoe.formats.reader import Container
from zipmoe.formats.safetensors_file import SourceTensor
from zipmoe.formats.writer import ContainerWriter
from zipmoe.quant.amat import quantize_tensor
from zipmoe.quant.spec import LSB, MSB, SliceError, SliceSpec
from zipmoe.runtime.config import SUPPORTED, config_problems

ProgressFn = Callable[[int], None]  # called with the number of source bytes just processed
_HASH_BLOCK = 8 << 20
_MAX_RUN_NBYTES = 64 << 20  # small tensors joined into one raw run: memory stays bounded like a tensor's


@dataclass(frozen=True)
class PackOptions:
    """How to pack.

    Args:
        coder: exponent coder for BF16 and FP8 (E4M3) tensors.
        chunk_values: BF16 (or FP8) values per independently decodable chunk.
        threads: worker threads (None: every available CPU).
        verify: read every checksum back from the finished file before publishing it.
        force: overwrite an existing output file.
        slices: also store AMAT MSB/LSB slices of every expert (SliceMoE), in this configuration.
        routing: activation counts of a routing trace to store for cache planning (`zipmoe run --plan auto`).
    """

    coder: ExponentCoder | None = field(default_factory=RansCoder)  # None: BF16 stored uncompressed
    chunk_values: int = DEFAULT_CHUNK_VALUES
    threads: int | None = None
    verify: bool = True
    force: bool = False
    slices: SliceSpec | None = None
    routing: RoutingStats | None = None

    def __post_init__(self) -> None:
        if self.coder is not None:
            check_chunk_values(self.chunk_values)  # before any work
            Bf16Split(self.coder, self.chunk_values)


class PackOptionError(ZipmoeError, ValueError):
    """A pack option out of its range; the message names it by its command-line flag."""


def check_chunk_values(chunk_values: Any) -> int:
    """``chunk_values`` if it is a valid number of BF16 values per chunk, else `PackOptionError`."""
    ok = isinstance(chunk_values, int) and not isinstance(chunk_values, bool)
    if not (ok and MIN_CHUNK <= chunk_values <= MAX_CHUNK and chunk_values % 64 == 0):
        raise PackOptionError(
            f"--chunk-values must be a multiple of 64 between {MIN_CHUNK} and {MAX_CHUNK}, got {chunk_values!r}"
        )
    return chunk_values


@dataclass
class ClassStats:
    """Sizes of one class of stored bytes (expert tensors, dense tensors, embedded files)."""

    n_tensors: int = 0
    source_bytes: int = 0
    stored_bytes: int = 0
    bf16_source_bytes: int = 0
    bf16_stored_bytes: int = 0
    exponent_histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))

    def add(self, source: int, stored: int, histogram: np.ndarray | None) -> None:
        self.source_bytes += source
        self.stored_bytes += stored
        if histogram is not None:
            self.bf16_source_bytes += source
            self.bf16_stored_bytes += stored
            self.exponent_histogram += histogram

    def to_json(self) -> dict[str, Any]:
        return {
            "n_tensors": self.n_tensors,
            "source_bytes": self.source_bytes,
            "stored_bytes": self.stored_bytes,
            "bf16_source_bytes": self.bf16_source_bytes,
            "bf16_stored_bytes": self.bf16_stored_bytes,
            "exponent_histogram": self.exponent_histogram.tolist(),
        }


@dataclass(frozen=True)
class PackResult:
    """What `pack` did."""

    path: Path
    source: str
    family: str | None
    n_tensors: int
    n_expert_records: int
    source_bytes: int
    container_bytes: int
    stats: dict[str, dict[str, Any]]
    seconds: float
    warnings: tuple[str, ...]
    verified: bool

    @property
    def ratio(self) -> float:
        return self.container_bytes / self.source_bytes if self.source_bytes else 1.0


def default_output(source: str) -> Path:
    """``SOURCE.zmoe`` in the current directory, named after the checkpoint directory or repo."""
    name = source.rstrip("/").split("@")[0].rsplit("/", 1)[-1] or "model"
    return Path(name + SUFFIX)


def check_output(path: Path, force: bool) -> None:
    """Fail early, with one clear line, if ``path`` cannot be created."""
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if path.exists() and not force:
        raise OutputError(f"{path} exists (use --force to overwrite it)")
    if not parent.exists():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")


def pack(
    source: str,
    output: Path | None = None,
    options: PackOptions | None = None,
    *,
    progress_start: Callable[[int], None] | None = None,
    progress: ProgressFn | None = None,
    warn: Callable[[str], None] | None = None,
) -> PackResult:
    """Pack a checkpoint (local directory or ``org/name[@revision]``) into a container.

    Args:
        source: checkpoint directory or Hub repo id.
        output: container path (default: `default_output`).
        options: `PackOptions`.
        progress_start: called once with the total number of source bytes (every byte of the safetensors and
            embedded files).
        progress: called with the number of source bytes just packed; the calls add up to that total exactly.
        warn: called with each warning (unknown architecture, odd tensors).

    Returns:
        A `PackResult` with sizes, ratios and timing.

    Raises:
        CheckpointError: the source cannot be read.
        OutputError: the output cannot be written.
        VerificationError: a part did not decode to its source (a bug; nothing is published).
    """
    options = options or PackOptions()
    output = Path(output) if output is not None else default_output(source)
    check_output(output, options.force)
    started = time.perf_counter()
    checkpoint = open_checkpoint(source)
    layout = classify(checkpoint.config, [t for _, t in checkpoint.tensors.values()])
    if options.slices is not None:
        _check_sliceable(checkpoint, layout, options.slices)
    warnings = layout.warnings + _config_warnings(checkpoint.config)
    for message in warnings:
        if warn:
            warn(message)
    if progress_start:
        progress_start(_source_nbytes(checkpoint))
    with Workers(options.threads) as workers, ContainerWriter(output) as writer:
        packer = _Packer(checkpoint, layout, writer, options, workers, progress or (lambda n: None))
        manifest = packer.run()
        verify = (lambda tmp: _check_written(tmp, workers)) if options.verify else None
        writer.finish(manifest, check=verify)
    container_bytes = output.stat().st_size
    return PackResult(
        path=output,
        source=checkpoint.source.describe(),
        family=layout.family,
        n_tensors=len(checkpoint.tensors),
        n_expert_records=len(manifest.experts),
        source_bytes=sum(f.nbytes for f in checkpoint.files) + sum(f.blob.size for f in manifest.files),
        container_bytes=container_bytes,
        stats=manifest.stats["classes"],
        seconds=time.perf_counter() - started,
        warnings=warnings,
        verified=options.verify,
    )


def _source_nbytes(checkpoint: Checkpoint) -> int:
    """Every byte that pack reads and reports progress for: the safetensors files (headers, tensors and any bytes
    between them) and the embedded files."""
    files = sum(f.nbytes for f in checkpoint.files)
    return files + sum((checkpoint.root / name).stat().st_size for name, _ in checkpoint.aux_files)


def _config_warnings(config: dict[str, Any] | None) -> tuple[str, ...]:
    """What `zipmoe run` will refuse in the ``config.json`` of a family it serves (pack stores the file anyway)."""
    if not config or config.get("model_type") not in SUPPORTED:
        return ()
    return tuple(f"config.json: {p}; zipmoe run will refuse this container" for p in config_problems(config))


def _check_sliceable(checkpoint: Checkpoint, layout: ModelLayout, spec: SliceSpec) -> None:
    """Fail before writing anything if some expert tensor cannot be sliced."""
    if not layout.experts:
        raise SliceError(
            f"{checkpoint.source.describe()}: no routed experts were recognised, so there is nothing to slice"
        )
    for name in layout.experts:
        _, tensor = checkpoint.tensors[name]
        if tensor.dtype != "BF16":
            raise SliceError(f"cannot slice {name!r}: slices are made from BF16 weights, this tensor is {tensor.dtype}")
        spec.check_shape(name, tensor.shape if layout.experts[name].expert is not None else tensor.shape[1:])


def _check_written(path: Path, workers: Workers) -> None:
    """Re-open the finished (unpublished) file and check its structure and every checksum from disk."""
    with Container(path, unpublished=True) as container:
        for label, view in container.stored_blobs():
            failures = check_part(container.data, view, workers)
            container.release(view.offset, view.nbytes)
            if view.plane is not None:
                container.release(view.plane, view.size // 2)
            if failures:
                raise VerificationError(f"{path}: {label}: {failures[0].describe()}")


class _Packer:
    """The state of one pack run."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        layout: ModelLayout,
        writer: ContainerWriter,
        options: PackOptions,
        workers: Workers,
        progress: ProgressFn,
    ) -> None:
        self.checkpoint = checkpoint
        self.layout = layout
        self.writer = writer
        self.workers = workers
        self.progress = progress
        self.raw = Raw()
        self.bf16 = Bf16Split(options.coder, options.chunk_values) if options.coder else self.raw
        self.encodings = [self.bf16.get_config()] + ([self.raw.get_config()] if options.coder else [])
        self.raw_index = len(self.encodings) - 1
        # FP8 E4M3 tensors get fp8-split, listed last and only when there are some: other files keep their bytes.
        self.fp8: Fp8Split | None = None
        has_fp8 = any(
            t.dtype == Fp8Split.dtype and t.nbytes and (name in layout.experts or t.nbytes >= SMALL_TENSOR_NBYTES)
            for name, (_, t) in checkpoint.tensors.items()
        )  # small dense tensors go into raw runs
        if options.coder and has_fp8:
            self.fp8 = Fp8Split(options.coder, options.chunk_values)
            self.encodings.append(self.fp8.get_config())
        self.stats = {CLASS_EXPERT: ClassStats(), CLASS_DENSE: ClassStats(), "files": ClassStats()}
        self.spec = options.slices
        self.routing = options.routing
        if self.spec is not None:
            self.stats[MSB], self.stats[LSB] = ClassStats(), ClassStats()
        self.slice_records: list[SliceRecord] = []
        self._slices: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []  # the expert being written
        self._planes: list[np.ndarray] = []  # sign-mantissa planes of the split record being written
        # Small dense tensors go into raw runs with the bytes around them, listed only by their safetensors header;
        # the others in checkpoint order: (file index, offset).
        self.small = {
            name for name, (_, t) in checkpoint.tensors.items()
            if name not in layout.experts and t.nbytes < SMALL_TENSOR_NBYTES
        }  # fmt: skip
        self.order = sorted(
            (ft for name, ft in checkpoint.tensors.items() if name not in self.small),
            key=lambda ft: (ft[0], ft[1].start),
        )
        self.index = {t.name: i for i, (_, t) in enumerate(self.order)}
        self.parts: dict[str, list[Blob | None]] = {}
        self.entropy: dict[str, np.ndarray] = {}
        self.hashes: dict[str, Any] = {}
        self._buffer = np.empty(0, np.uint8)
        self._check_buffer = np.empty(0, np.uint8)
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-hash")  # tensor hashes, in order
        self._file_hasher = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-file-hash")

    # -- buffers ----------------------------------------------------------------------------------------------------

    def _scratch(self, name: str, nbytes: int) -> np.ndarray:
        buf = getattr(self, name)
        if buf.size < nbytes:
            buf = np.empty(max(nbytes, buf.size * 5 // 4), np.uint8)
            setattr(self, name, buf)
        return buf[:nbytes]

    # -- one part ---------------------------------------------------------------------------------------------------

    def _encoding_of(self, tensor: SourceTensor) -> tuple[int, Bf16Split | Fp8Split | Raw]:
        if tensor.dtype == "BF16":
            return 0, self.bf16
        if self.fp8 is not None and tensor.dtype == self.fp8.dtype:
            return len(self.encodings) - 1, self.fp8
        return self.raw_index, self.raw

    def _encode_checked(self, data: np.ndarray, encoding: Bf16Split | Fp8Split | Raw, label: str) -> EncodedPart:
        encoded = encode_part(encoding, data, self.workers)
        view = PartView(encoding, 0, encoded.data.size, data.size, encoded.n_chunks, encoded.directory_xxh64, 0)
        decoded = self._scratch("_check_buffer", data.size)
        decode_part(encoded.data, view, decoded, self.workers)
        if not np.array_equal(decoded, data):
            first = int(np.flatnonzero(decoded != data)[0])
            raise VerificationError(f"{label}: byte {first} does not decode to its source (please report this bug)")
        return encoded

    def _read(self, file_index: int, start: int, nbytes: int) -> np.ndarray:
        data = self._scratch("_buffer", nbytes)
        self.checkpoint.files[file_index].read_into(start, data)
        return data

    def _pack_part(
        self, file_index: int, tensor: SourceTensor, part: int, n_parts: int, in_record: bool, split: bool = False
    ) -> Blob:
        """Encode and write one part; with ``split`` write only its exponent piece and keep its plane in
        ``_planes`` (the blob's ``plane`` is set once the planes are written)."""
        size = tensor.nbytes // n_parts
        data = self._read(file_index, tensor.start + part * size, size)
        hashing: Future[Any] = self._hasher.submit(self._hash_update, tensor.name, data)
        enc_index, encoding = self._encoding_of(tensor)
        label = f"{tensor.name}" + (f" part {part}" if n_parts > 1 else "")
        encoded = self._encode_checked(data, encoding, label)
        nbytes = encoded.data.size
        if split:
            pieces, plane = split_part(encoded, size // 2)
            self._planes.append(plane.copy())  # not a view: the rest of the encoded part is freed once written
            offset = self.writer.write_part(*pieces)
            nbytes -= plane.size
        elif in_record:
            offset = self.writer.write_part(encoded.data)
        else:
            offset = self.writer.write_record(encoded.data)
        if in_record and self.spec is not None:
            rows, cols = self.spec.check_shape(tensor.name, tensor.shape[1:] if n_parts > 1 else tensor.shape)
            msb, lsb = quantize_tensor(data.view(np.uint16), rows, cols, self.spec, self.workers, name=label)
            self._slices.append((self.index[tensor.name], part, size, msb, lsb))
        hashing.result()  # the buffer is reused by the next part
        if encoded.exponent_histogram is not None:
            self.entropy.setdefault(tensor.name, np.zeros(256, np.int64))
            self.entropy[tensor.name] += encoded.exponent_histogram
        cls = CLASS_EXPERT if tensor.name in self.layout.experts else CLASS_DENSE
        bf16_histogram = encoded.exponent_histogram if isinstance(encoding, Bf16Split) else None  # FP8: 4-bit fields
        self.stats[cls].add(size, encoded.data.size, bf16_histogram)
        self.progress(size)
        return Blob(offset, nbytes, size, encoded.n_chunks, encoded.directory_xxh64)

    def _hash_update(self, name: str, data: np.ndarray) -> None:
        self.hashes.setdefault(name, hashlib.sha256()).update(data)

    def _pack_raw_bytes(self, data: np.ndarray, label: str, *, digest: bool = False) -> Blob:
        """A raw blob; with ``digest`` it records the SHA-256 of ``data`` (headers and runs: no tensor hash covers
        them)."""
        encoded = self._encode_checked(data, self.raw, label)
        offset = self.writer.write_record(encoded.data)
        self.stats["files"].add(data.size, encoded.data.size, None)
        sha256 = hashlib.sha256(data).hexdigest() if digest else None
        return Blob(offset, encoded.data.size, data.size, encoded.n_chunks, encoded.directory_xxh64, sha256)

    # -- the whole file ---------------------------------------------------------------------------------------------

    def run(self) -> Manifest:
        ckpt = self.checkpoint
        file_hashes = [self._file_hasher.submit(_sha256_file, f.path) for f in ckpt.files]
        try:
            files = self._pack_files()
            headers = [self._pack_header(i) for i in range(len(ckpt.files))]
            for file_index, tensor in self.order:
                if tensor.name not in self.layout.experts:
                    self.parts[tensor.name] = [self._pack_part(file_index, tensor, 0, 1, in_record=False)]
                    self.stats[CLASS_DENSE].n_tensors += 1
            records = self._pack_experts()
            file_sha = [f.result() for f in file_hashes]
        finally:
            self._hasher.shutdown(wait=True)
            self._file_hasher.shutdown(wait=True, cancel_futures=True)
        tensors = tuple(self._tensor_entry(file_index, t) for file_index, t in self.order)
        safetensors = tuple(
            SafetensorsEntry(f.name, f.nbytes, file_sha[i], header, tuple(segments))
            for i, (f, (header, segments)) in enumerate(zip(ckpt.files, headers))
        )
        classes = {name: s.to_json() for name, s in self.stats.items()}
        return Manifest(
            created_by=f"zipmoe {__version__}",
            source=ckpt.source.to_json(),
            model=self.layout.to_json(),
            config=ckpt.config,
            encodings=tuple(self.encodings),
            files=files,
            safetensors=safetensors,
            tensors=tensors,
            experts=records,
            stats={"classes": classes},
            slices=self.spec,
            slice_records=tuple(self.slice_records),
            small_tensors=len(self.small),
            routing=self.routing,
        )

    def _pack_files(self) -> tuple[EmbeddedFile, ...]:
        out = []
        for name, role in self.checkpoint.aux_files:
            data = np.fromfile(self.checkpoint.root / name, dtype=np.uint8)
            blob = self._pack_raw_bytes(data, name)
            out.append(EmbeddedFile(name, role, hashlib.sha256(data).hexdigest(), blob))
            self.progress(data.size)
        return tuple(out)

    def _pack_header(self, file_index: int) -> tuple[Blob, list[tuple[str, Any]]]:
        f = self.checkpoint.files[file_index]
        header = self._pack_raw_bytes(self._read(file_index, 0, f.header_nbytes), f"header of {f.name}", digest=True)
        self.progress(f.header_nbytes)
        small = [t for t in f.tensors if t.name in self.small]
        runs = _merge_ranges(f.gaps + [(t.start, t.start + t.nbytes) for t in small], _MAX_RUN_NBYTES)
        gaps = {
            start: self._pack_raw_bytes(self._read(file_index, start, end - start), f"gap in {f.name}", digest=True)
            for start, end in runs
        }
        self.progress(sum(end - start for start, end in runs))  # the small tensors and the bytes between tensors
        segments: list[tuple[str, Any]] = []
        listed = [(t.start, "tensor", self.index[t.name]) for t in f.tensors if t.name not in self.small]
        positions = sorted(listed + [(s, "gap", s) for s in gaps])
        for _, kind, key in positions:
            segments.append((kind, key if kind == "tensor" else gaps[key]))
        return header, segments

    def _pack_experts(self) -> tuple[ExpertRecord, ...]:
        groups: dict[tuple[int, int], list[tuple[int, int, SourceTensor, int, int]]] = {}
        for file_index, tensor in self.order:
            placement = self.layout.experts.get(tensor.name)
            if placement is None:
                continue
            self.stats[CLASS_EXPERT].n_tensors += 1
            if placement.expert is not None:
                groups.setdefault((placement.layer, placement.expert), []).append(
                    (file_index, tensor.start, tensor, 0, 1)
                )
                self.parts[tensor.name] = [None]
            else:
                n = tensor.shape[0]
                self.parts[tensor.name] = [None] * n
                for e in range(n):
                    key = (placement.layer, e)
                    groups.setdefault(key, []).append(
                        (file_index, tensor.start + e * (tensor.nbytes // n), tensor, e, n)
                    )
        records = []
        for (layer, expert), members in sorted(groups.items()):
            members.sort(key=lambda m: (m[0], m[1]))  # checkpoint order: (file, offset)
            split = (
                isinstance(self.bf16, Bf16Split)
                and all(t.dtype == "BF16" for _, _, t, _, _ in members)
                and any(t.nbytes for _, _, t, _, _ in members)
            )
            self.writer.begin_record()
            blobs = [
                self._pack_part(file_index, tensor, part, n_parts, in_record=True, split=split)
                for file_index, _, tensor, part, n_parts in members
            ]
            planes = None
            if split:
                planes = self.writer.begin_planes()
                blobs = [replace(blob, plane=self.writer.write_part(plane)) for blob, plane in zip(blobs, self._planes)]
                self._planes = []
            for (_, _, tensor, part, _), blob in zip(members, blobs):
                self.parts[tensor.name][part] = blob
            offset, nbytes = self.writer.end_record()
            member_ids = tuple((self.index[t.name], part) for _, _, t, part, _ in members)
            records.append(ExpertRecord(layer, expert, offset, nbytes, member_ids, planes))
            if self.spec is not None:
                self._write_slices(layer, expert)
        return tuple(records)

    def _write_slices(self, layer: int, expert: int) -> None:
        """The MSB record, then the LSB record, of the expert just written (each contiguous, apart from the other)."""
        for kind in (MSB, LSB):
            self.writer.begin_record()
            members = []
            for t_index, part, source_nbytes, msb, lsb in self._slices:
                payload = msb if kind == MSB else lsb
                encoded = self._encode_checked(payload, self.raw, f"{kind} slice of {self.order[t_index][1].name}")
                offset = self.writer.write_part(encoded.data)
                blob = Blob(offset, encoded.data.size, payload.size, encoded.n_chunks, encoded.directory_xxh64)
                members.append((t_index, part, blob))
                self.stats[kind].add(source_nbytes, encoded.data.size, None)
            offset, nbytes = self.writer.end_record()
            self.slice_records.append(SliceRecord(layer, expert, kind, offset, nbytes, tuple(members)))
            self.stats[kind].n_tensors += len(members)
        self._slices = []

    def _tensor_entry(self, file_index: int, tensor: SourceTensor) -> TensorEntry:
        placement = self.layout.experts.get(tensor.name)
        parts = self.parts[tensor.name]
        assert all(p is not None for p in parts), tensor.name
        histogram = self.entropy.get(tensor.name)
        return TensorEntry(
            name=tensor.name,
            dtype=tensor.dtype,
            shape=tensor.shape,
            tensor_class=CLASS_EXPERT if placement else CLASS_DENSE,
            file=file_index,
            sha256=self.hashes.get(tensor.name, hashlib.sha256()).hexdigest(),
            encoding=self._encoding_of(tensor)[0],
            parts=tuple(p for p in parts if p is not None),
            layer=placement.layer if placement else None,
            expert=placement.expert if placement else None,
            fused=bool(placement and placement.expert is None),
            exponent_entropy=entropy_bits(histogram) if histogram is not None else None,
        )


def _merge_ranges(ranges: list[tuple[int, int]], max_nbytes: int) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` byte ranges with touching ones joined (up to ``max_nbytes`` each); empty ones dropped."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and merged[-1][1] == start and end - merged[-1][0] <= max_nbytes:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(memoryview(buf)[:n])
    return digest.hexdigest()
