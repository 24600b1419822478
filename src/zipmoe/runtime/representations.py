"""The forms in which the runtime holds an expert, and how each is read and becomes compute.

Lossless (a container's expert records, `zipmoe.formats.records`):

| representation | bytes held (one expert) | a hit costs |
|---|---|---|
| ``decoded`` | its weights in the compute dtype on the compute device | nothing |
| ``compressed`` | its whole record as stored (about 2/3 of BF16; all of it for ``--coder none``) | a decode |
| ``sm`` | its sign+mantissa planes (1 byte per parameter; split records, format v4) | one read of its coded exponents (about a sixth of BF16) and a decode |
| (storage) | nothing | one read of the record and a decode |

Slices (AMAT, format v2+): ``msb`` (the low-bit weights with scales and zero-points) and ``lsb`` (the remaining bits).
Weights are made from cached slices at each use.

A *source* (`LosslessExperts`, `SliceExperts`) knows its representations' sizes and turns what is held into compute:
`fetch` runs on the pipeline's storage thread, reads what is missing (one request per contiguous range, so the
device sees few large reads) and hands decoding to the decode thread as soon as each piece has arrived; `finish`,
on the compute thread, waits for the decodes and returns the new representations to admit.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zipmoe._threads import Workers
from zipmoe.codecs.parts import DIRECTORY_ENTRY, check_part, decode_parts
from zipmoe.errors import ChecksumError, FormatError
from zipmoe.formats.reader import Container
from zipmoe.formats.records import ExpertLayout, SliceLayout
from zipmoe.quant import torch_ops
from zipmoe.quant.amat import dequantize_tensor
from zipmoe.quant.matvec import matmul_slices
from zipmoe.quant.spec import Precision
from zipmoe.runtime.buffers import BufferPool
from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.fp8 import scale_block
from zipmoe.runtime.model import ExpertWeights, expert_output
from zipmoe.runtime.storage import Storage
from zipmoe.runtime.weights import FP8, assemble_expert, member_role, to_tensor

DECODED, SM, COMPRESSED, MSB, LSB = "decoded", "sm", "compressed", "msb", "lsb"
STORAGE = "storage"
FUSED_MAX_TOKENS = 16  # CPU slices: an expert with at most this many tokens multiplies straight from its slices

Key = tuple[int, int]
Submit = Callable[..., Future]


@dataclass
class Fetch:
    """One expert being fetched: where it was served from, what was read, and the decodes still running."""

    key: Key
    served_from: str  # the representation that served it, or STORAGE
    bytes_read: int = 0
    reads: int = 0  # records read from storage (an expert's, or each of its slices)
    bytes_decoded: int = 0
    pending: list[Future] = field(default_factory=list)
    finish: Callable[[], dict[str, tuple[Any, int]]] | None = None  # -> new representations: kind -> (value, nbytes)
    buffers: dict[str, list[np.ndarray]] = field(default_factory=dict)  # pooled, by the representation they hold


class _Source:
    """What both sources hold: the container, the model, where weights go, how bytes are read and decoded."""

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        storage: Storage,
        workers: Workers,
    ) -> None:
        self.container = container
        self.args = args
        self.device = device
        self.dtype = dtype
        self.storage = storage
        self.workers = workers
        self.decoded_nbytes = args.expert_params * torch.empty((), dtype=dtype).element_size()
        self.fp8_block = scale_block(container.manifest.config)  # FP8 experts are dequantized in `assemble_expert`

    def _check_complete(self, held) -> None:
        """Every (MoE layer, expert) of the model is in ``held``."""
        args = self.args
        for layer in range(args.n_layers):
            for e in range(args.n_experts if args.sparse_layers[layer] else 0):
                if (layer, e) not in held:
                    raise FormatError(f"{self.container.path}: no expert record for layer {layer}, expert {e}")


class LosslessExperts(_Source):
    """Experts decoded bit-exactly from their records (representations ``decoded``, ``compressed``, ``sm``).

    Args:
        container: an open container.
        args: the model's hyper-parameters.
        device, dtype: where and in which dtype decoded experts are placed.
        storage: reads the container's bytes.
        workers: decode threads (each part's chunks spread over all of them).
        transform: applied to every expert's weights once decoded (the eval's Base quantization baseline).
    """

    kinds = (DECODED, COMPRESSED, SM)
    mode = None  # every expert bit-exact

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        storage: Storage,
        workers: Workers,
        transform: Callable[[ExpertWeights], ExpertWeights] | None = None,
    ) -> None:
        super().__init__(container, args, device, dtype, storage, workers)
        self.transform = transform
        self.layouts: dict[Key, ExpertLayout] = container.expert_layouts
        self._check_complete(self.layouts)
        layouts = list(self.layouts.values())
        self.split = all(layout.split for layout in layouts)
        self.record_nbytes = max(layout.nbytes for layout in layouts)
        self.sm_nbytes = max(layout.planes_nbytes for layout in layouts) if self.split else 0
        self.sm_read_nbytes = max(layout.exponent_nbytes for layout in layouts)
        # FP8 experts are dequantized into new tensors: their decoded bytes are not viewed by the weights kept
        self.copied = any(m.dtype == FP8 for layout in layouts for m in layout.members)
        # BF16 bytes of one expert (what budgets in percent are of; FP8 experts counted as BF16, as they are run)
        self.source_nbytes = 2 * args.expert_params if self.copied else layouts[0].source_nbytes
        self.widen = dtype == torch.float32 and device.type == "cpu"
        self.pool = BufferPool(storage.buffer, 0)  # the engine sets its limit (the reservation)
        self._sizes = {  # buffer sizes: every expert's record sections and weights fit the largest
            "exponents": storage.buffer(max(layout.exponent_nbytes for layout in layouts)).size,
            "planes": storage.buffer(self.sm_nbytes).size,
        }

    def nbytes(self, kind: str) -> int:
        """The most bytes one expert takes as ``kind``."""
        return {DECODED: self.decoded_nbytes, COMPRESSED: self.record_nbytes, SM: self.sm_nbytes}[kind]

    def reservation(self, inflight: int) -> int:
        """Memory for ``inflight`` experts being fetched at once: each one's record as read, and its weights."""
        return inflight * (self.record_nbytes + self.decoded_nbytes)

    def fetch_nbytes(self, held: dict[str, Any], needed: tuple[str, ...]) -> int:
        """Memory a fetch of an expert holding ``held`` takes until admitted: what it reads and the weights."""
        read = 0 if COMPRESSED in held else self.sm_read_nbytes if SM in held else self.record_nbytes
        return read + self.decoded_nbytes

    def needs(self, high: Any) -> tuple[str, ...]:
        return (DECODED,)

    def fetch(self, key: Key, held: dict[str, Any], needed: tuple[str, ...], submit: Submit) -> Fetch:
        """Read what ``key`` lacks (on the storage thread) and start decoding it (on the decode thread)."""
        layout = self.layouts[key]
        check = True  # bytes from storage are checked as they are decoded; held records were, when they were read
        record = None  # a record read now, to offer to the tiers
        if COMPRESSED in held:
            fetch = Fetch(key, COMPRESSED)
            exponents, planes = held[COMPRESSED]
            check = False
        elif SM in held:
            fetch = Fetch(key, SM, bytes_read=layout.exponent_nbytes)
            planes = held[SM]
            exponents = self._read(fetch, "exponents", layout.offset, layout.exponent_nbytes)
        else:
            fetch = Fetch(key, STORAGE, bytes_read=layout.nbytes, reads=1)
            if not layout.split:
                exponents, planes = self._read(fetch, "exponents", layout.offset, layout.nbytes), None
                record = (exponents, None)
        outs = self._outputs(fetch, layout)
        fetch.bytes_decoded = layout.source_nbytes
        if fetch.served_from == STORAGE and layout.split:  # the exponents, then each plane, decoded as it arrives
            exponents = self._read(fetch, "exponents", layout.offset, layout.exponent_nbytes)
            buf = self.pool.take(self._sizes["planes"])
            fetch.buffers.setdefault(SM, []).append(buf)
            planes = self.storage.span(buf, layout.planes, layout.planes_nbytes)
            for i, _ in enumerate(self.storage.read_pieces(layout.planes, _plane_sizes(layout), out=buf)):
                fetch.pending.append(submit(self._decode, layout, [i], exponents, planes, outs))
            record = (exponents, planes)
        else:
            members = range(len(layout.members))
            fetch.pending.append(submit(self._decode, layout, members, exponents, planes, outs, check))
        fetch.finish = partial(self._finish, fetch.pending, layout, outs, record)  # not a closure over fetch: no cycle
        return fetch

    def _read(self, fetch: Fetch, role: str, offset: int, nbytes: int) -> np.ndarray:
        """Read into a pooled buffer, noted in ``fetch`` as part of the compressed record."""
        buf = self.pool.take(self._sizes[role] if nbytes <= self._sizes[role] else self.storage.buffer(nbytes).size)
        fetch.buffers.setdefault(COMPRESSED, []).append(buf)
        return self.storage.read(offset, nbytes, out=buf)

    def _outputs(self, fetch: Fetch, layout: ExpertLayout) -> list[np.ndarray]:
        """One buffer per member for the decoded weights (pooled on the CPU, where the weights are views of it)."""
        widen = self.widen and all(m.dtype == "BF16" for m in layout.members)
        sizes = [m.view.size * (2 if widen else 1) for m in layout.members]
        if self.device.type == "cuda":  # pinned, copied to the GPU asynchronously: never reused
            return [self.storage.buffer(n)[:n] for n in sizes]
        buf = self.pool.take(sum(sizes))
        fetch.buffers[DECODED] = [buf]
        bounds = np.cumsum([0, *sizes])
        return [buf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def recycle(self, fetch: Fetch, kept: set[str]) -> None:
        """Hand back the buffers of representations the tiers did not keep (once they have been computed with).

        A record's buffers are kept with it; its planes buffer also when only the sign-mantissa planes were kept.
        """
        for kind, buffers in fetch.buffers.items():
            if (kind in kept and not (kind == DECODED and self.copied)) or (kind == SM and COMPRESSED in kept):
                continue
            for buf in buffers:
                self.pool.give(buf)

    def _decode(self, layout: ExpertLayout, which, exponents: np.ndarray, planes, outs: list[np.ndarray], check=True):
        widen = outs[0].size == 2 * layout.members[0].view.size
        label = f"expert (layer {layout.layer}, expert {layout.expert})"
        items = []
        for i in which:
            m = layout.members[i]
            view = m.split_view if planes is not None and m.split_view is not None else m.view
            item = (exponents, view, outs[i], f"{label} {m.name!r}")
            items.append((*item, planes) if view is m.split_view else item)
        try:
            decode_parts(items, self.workers, widen=widen, check=check)
        except FormatError as exc:
            raise type(exc)(f"{self.container.path}: {exc}") from None

    def _finish(self, pending: list[Future], layout: ExpertLayout, outs: list[np.ndarray], record) -> dict[str, tuple]:
        for future in pending:
            future.result()
        widen = outs[0].size == 2 * layout.members[0].view.size
        tensors = [
            (m.name, to_tensor(out, "F32" if widen else m.dtype, m.shape)) for m, out in zip(layout.members, outs)
        ]
        weights = assemble_expert(tensors, self.args, self.device, self.dtype, self.fp8_block)
        if self.transform is not None:
            weights = self.transform(weights)
        new: dict[str, tuple[Any, int]] = {DECODED: (weights, weights.nbytes)}
        if record is not None:
            exponents, planes = record
            new[COMPRESSED] = (record, layout.nbytes)
            if planes is not None:
                new[SM] = (planes, layout.planes_nbytes)
        return new

    def compute(self, key: Key, held: dict[str, Any], x, tokens, slots, top_weight, high) -> torch.Tensor:
        return expert_output(x, held[DECODED], tokens, slots, top_weight)


def _plane_sizes(layout: ExpertLayout) -> list[int]:
    """Consecutive byte ranges of the sign-mantissa section, one ending at the end of each member's plane."""
    ends = [m.split_view.plane + (m.view.size // 2 + 7) // 8 * 8 for m in layout.members]
    ends[-1] = layout.planes_nbytes
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]


@dataclass(frozen=True)
class Slice:
    """One slice record of one expert, read and checked: a payload per member (numpy, or a tensor on a GPU)."""

    kind: str
    payloads: tuple
    nbytes: int


class SliceExperts(_Source):
    """Experts made from AMAT slices: ``msb`` alone (low bits) or with ``lsb`` (high bits).

    Args:
        container: an open container with slices.
        args, device, dtype, storage, workers: as `LosslessExperts`.
        mode: ``high`` (every expert at the high bit width), ``low``/``trunc`` (MSB alone; ``trunc``: naive
            truncation, a quality baseline) or ``dbsc`` (critical experts high, the rest low).

    Raises:
        FormatError: the container holds no slices, or lacks some expert's.
    """

    kinds = (MSB, LSB)

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        storage: Storage,
        workers: Workers,
        mode: str,
    ) -> None:
        if container.slice_spec is None:
            raise FormatError(f"{container.path}: holds no AMAT slices (pack it with --slices 8:4)")
        super().__init__(container, args, device, dtype, storage, workers)
        self.spec = container.slice_spec
        self.mode = mode
        self.layouts: dict[tuple[int, int, str], SliceLayout] = container.slice_layouts
        self._check_complete({(layer, e) for layer, e, _ in self.layouts})
        self.roles = {}
        for layout in self.layouts.values():
            for m in layout.members:
                self.spec.check_shape(m.name, m.shape)
                self.roles.setdefault(m.name, member_role(m.name))
        self.record_nbytes = {
            kind: max(layout.nbytes for (_, _, k), layout in self.layouts.items() if k == kind) for kind in self.kinds
        }
        self.source_nbytes = 2 * args.expert_params  # BF16

    def nbytes(self, kind: str) -> int:
        return self.record_nbytes[kind]

    def reservation(self, inflight: int) -> int:
        """Memory for the slices of ``inflight`` experts being read at once, and one expert's weights being made
        from slices (on the compute thread, one at a time)."""
        return inflight * (self.record_nbytes[MSB] + self.record_nbytes[LSB]) + self.decoded_nbytes

    def fetch_nbytes(self, held: dict[str, Any], needed: tuple[str, ...]) -> int:
        """The slices a fetch reads (weights are made from them at compute time: see `reservation`)."""
        return sum(self.record_nbytes[kind] for kind in needed if kind not in held)

    def needs(self, high: torch.Tensor) -> tuple[str, ...]:
        return (MSB, LSB) if bool(high.any()) else (MSB,)

    def read(self, key: Key, kind: str) -> Slice:
        """One slice record with a single read, every checksum checked."""
        layout = self.layouts[(*key, kind)]
        buf = self.storage.read(layout.offset, layout.nbytes)
        payloads = []
        for m in layout.members:
            failures = check_part(buf, m.view, self.workers)
            if failures:
                raise ChecksumError(
                    f"{self.container.path}: {kind.upper()} slice of {m.name!r}: {failures[0].describe()}"
                )
            start = m.view.offset + m.view.n_chunks * DIRECTORY_ENTRY.itemsize
            payloads.append(buf[start : start + m.view.size])
        if self.device.type == "cuda":
            payloads = [torch.from_numpy(p).to(self.device, non_blocking=True) for p in payloads]
        return Slice(kind, tuple(payloads), layout.nbytes)

    def fetch(self, key: Key, held: dict[str, Any], needed: tuple[str, ...], submit: Submit) -> Fetch:
        missing = [kind for kind in needed if kind not in held]
        slices = {kind: self.read(key, kind) for kind in missing}
        nbytes = sum(s.nbytes for s in slices.values())
        fetch = Fetch(key, STORAGE if missing else MSB, bytes_read=nbytes, reads=len(slices))
        fetch.finish = lambda: {kind: (s, s.nbytes) for kind, s in slices.items()}
        return fetch

    def recycle(self, fetch: Fetch, kept: set[str]) -> None:
        """Slices are small and kept as read: nothing to hand back."""

    def weights(self, key: Key, msb: Slice, lsb: Slice | None, precision: Precision) -> ExpertWeights:
        """Compute-ready weights of one expert at ``precision`` (`Precision.HIGH` needs the LSB slice)."""
        members = self.layouts[(*key, MSB)].members
        tensors = []
        for i, m in enumerate(members):
            rows, cols = m.shape
            low = lsb.payloads[i] if lsb is not None else None
            if self.device.type == "cuda":
                w = torch_ops.dequantize(msb.payloads[i], low, rows, cols, self.spec, precision, self.dtype)
            else:
                out = np.empty(rows * cols, np.float32)
                dequantize_tensor(msb.payloads[i], low, rows, cols, self.spec, precision, out, self.workers)
                w = torch.from_numpy(out).view(rows, cols)
            tensors.append((m.name, w))
        return assemble_expert(tensors, self.args, self.device, self.dtype, self.fp8_block)

    def output(self, key: Key, msb: Slice, lsb: Slice | None, precision: Precision, x, tokens, slots, top_weight):
        """One expert's contribution for its ``tokens`` at ``precision``, as `expert_output` computes it.

        On the CPU, up to `FUSED_MAX_TOKENS` tokens multiply straight from the slices (equal to the dequantized
        weights' products up to float32 rounding); more tokens, or a GPU, make the weights first.
        """
        if self.device.type != "cpu" or len(tokens) > FUSED_MAX_TOKENS:
            return expert_output(x, self.weights(key, msb, lsb, precision), tokens, slots, top_weight)
        members = self.layouts[(*key, MSB)].members

        def product(role: str, inputs: np.ndarray) -> np.ndarray:
            i = next(i for i, m in enumerate(members) if self.roles[m.name] == role)
            rows, cols = members[i].shape
            low = lsb.payloads[i] if lsb is not None else None
            return matmul_slices(inputs, msb.payloads[i], low, rows, cols, self.spec, precision, self.workers)

        h = x[tokens].float().numpy()
        if any(self.roles[m.name] == "gate_up" for m in members):
            gate, up = np.split(product("gate_up", h), [self.args.moe_intermediate], axis=1)
        else:
            gate, up = product("gate", h), product("up", h)
        act = F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)
        y = torch.from_numpy(product("down", act.numpy())).to(x.dtype)
        return y * top_weight[tokens, slots, None]

    def compute(self, key: Key, held: dict[str, Any], x, tokens, slots, top_weight, high) -> torch.Tensor:
        """High precision for the ``high`` tokens, the low path (MSB alone) for the rest."""
        low = Precision.TRUNC if self.mode == "trunc" else Precision.LOW
        msb, lsb = held[MSB], held.get(LSB)
        if bool(high.all()):
            return self.output(key, msb, lsb, Precision.HIGH, x, tokens, slots, top_weight)
        if not bool(high.any()):
            return self.output(key, msb, None, low, x, tokens, slots, top_weight)
        y = torch.empty(len(tokens), x.shape[1], dtype=x.dtype, device=x.device)
        y[high] = self.output(key, msb, lsb, Precision.HIGH, x, tokens[high], slots[high], top_weight).to(x.dtype)
        y[~high] = self.output(key, msb, None, low, x, tokens[~high], slots[~high], top_weight).to(x.dtype)
        return y
