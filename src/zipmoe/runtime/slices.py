"""AMAT slices on storage: one read per MSB or LSB slice record, checksums checked, and weights at a precision.

An MSB record holds an expert's values at the low bit width plus its scales and zero-points; the LSB record the
remaining bits. A slice read from storage stays packed (that is what makes it small in the cache); compute-ready
weights are made from the cached slices each time the expert runs: with the Numba kernel on the CPU, with torch
operations on a GPU (where the slices are kept). On the CPU an expert with few tokens (decoding) multiplies straight
from its slices instead (`zipmoe.quant.matvec`), which reads each weight once, packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zipmoe._threads import Workers
from zipmoe.codecs.parts import DIRECTORY_ENTRY, PartView, check_part
from zipmoe.errors import ChecksumError, FormatError
from zipmoe.formats.reader import Container
from zipmoe.quant import torch_ops
from zipmoe.quant.amat import base_quantized, dequantize_tensor
from zipmoe.quant.matvec import matmul_slices
from zipmoe.quant.spec import MSB, SLICE_KINDS, Precision, SliceSpec
from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.model import ExpertWeights, expert_output
from zipmoe.runtime.store import RecordReader, StorageThrottle
from zipmoe.runtime.weights import assemble_expert, member_role

FUSED_MAX_TOKENS = 16  # CPU: an expert with at most this many tokens multiplies straight from its slices


@dataclass(frozen=True)
class _Member:
    name: str
    role: str  # gate, up, down or gate_up
    rows: int
    cols: int
    view: PartView  # of the raw blob, relative to the start of its record


@dataclass(frozen=True)
class Slice:
    """One slice record of one expert, read and checked: a payload per member (numpy, or a tensor on a GPU)."""

    kind: str
    payloads: tuple  # np.ndarray (uint8) on the CPU, torch.Tensor (uint8) on a GPU
    nbytes: int  # the memory it holds


class SliceStore(RecordReader):
    """Reads an expert's MSB and LSB slice records and makes weights from them.

    Args:
        container: an open container with slices.
        args: the model's hyper-parameters.
        device, dtype: where and in which dtype weights are made.
        throttle: simulated storage bandwidth, if any.
        threads: threads that check checksums and dequantize.

    Raises:
        FormatError: the container holds no slices, or lacks some expert's.
    """

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        throttle: StorageThrottle | None = None,
        threads: int = 1,
    ) -> None:
        if container.slice_spec is None:
            raise FormatError(f"{container.path}: holds no AMAT slices (pack it with --slices 8:4)")
        super().__init__(container, device, throttle)
        self.spec = container.slice_spec
        self.args = args
        self.dtype = dtype
        self._workers = Workers(threads)
        raw = container.encodings[container.raw_encoding_index]
        self._records: dict[tuple[int, int, str], tuple[int, int, tuple[_Member, ...]]] = {}
        for (layer, expert, kind), record in container.slice_records.items():
            members = []
            for t_index, _, blob in record.members:
                tensor = container.manifest.tensors[t_index]
                rows, cols = self.spec.check_shape(tensor.name, tensor.shape[1:] if tensor.fused else tensor.shape)
                view = container.blob_view(blob, raw, base=record.offset)
                members.append(_Member(tensor.name, member_role(tensor.name), rows, cols, view))
            self._records[(layer, expert, kind)] = (record.offset, record.nbytes, tuple(members))
        for layer in range(args.n_layers):
            for e in range(args.n_experts if args.sparse_layers[layer] else 0):
                if (layer, e, MSB) not in self._records:
                    raise FormatError(f"{container.path}: no slices for layer {layer}, expert {e}")
        self.record_nbytes = {k: max(n for (_, _, kind), (_, n, _) in self._records.items() if kind == k)
                              for k in SLICE_KINDS}  # fmt: skip
        self.decoded_nbytes = args.expert_params * torch.empty((), dtype=dtype).element_size()
        self.source_nbytes = 2 * args.expert_params  # BF16

    def read(self, key: tuple[int, int], kind: str) -> Slice:
        """Read one slice record with a single read and check every checksum in it."""
        offset, nbytes, members = self._records[(*key, kind)]
        buf = self._buffer(nbytes)
        self._read_into(buf, 0, nbytes, offset)
        payloads = []
        for m in members:
            failures = check_part(buf, m.view, self._workers)
            if failures:
                raise ChecksumError(
                    f"{self.container.path}: {kind.upper()} slice of {m.name!r}: {failures[0].describe()}"
                )
            start = m.view.offset + m.view.n_chunks * DIRECTORY_ENTRY.itemsize
            payloads.append(buf[start : start + m.view.size])
        if self.device.type == "cuda":
            payloads = [torch.from_numpy(p).to(self.device, non_blocking=True) for p in payloads]
        return Slice(kind, tuple(payloads), nbytes)

    def weights(self, key: tuple[int, int], msb: Slice, lsb: Slice | None, precision: Precision) -> ExpertWeights:
        """Compute-ready weights of one expert at ``precision`` (`Precision.HIGH` needs the LSB slice)."""
        _, _, members = self._records[(*key, MSB)]
        tensors = []
        for i, m in enumerate(members):
            low = lsb.payloads[i] if lsb is not None else None
            if self.device.type == "cuda":
                w = torch_ops.dequantize(msb.payloads[i], low, m.rows, m.cols, self.spec, precision, self.dtype)
            else:
                out = np.empty(m.rows * m.cols, np.float32)
                dequantize_tensor(msb.payloads[i], low, m.rows, m.cols, self.spec, precision, out, self._workers)
                w = torch.from_numpy(out).view(m.rows, m.cols)
            tensors.append((m.name, w))
        return assemble_expert(tensors, self.args, self.device, self.dtype)

    def output(
        self,
        key: tuple[int, int],
        msb: Slice,
        lsb: Slice | None,
        precision: Precision,
        x: torch.Tensor,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        top_weight: torch.Tensor,
    ) -> torch.Tensor:
        """One expert's contribution for its ``tokens`` at ``precision``, as `expert_output` computes it.

        On the CPU, up to `FUSED_MAX_TOKENS` tokens multiply straight from the slices (equal to the dequantized
        weights' products up to float32 rounding); more tokens, or a GPU, make the weights first.
        """
        if self.device.type != "cpu" or len(tokens) > FUSED_MAX_TOKENS:
            return expert_output(x, self.weights(key, msb, lsb, precision), tokens, slots, top_weight)
        _, _, members = self._records[(*key, MSB)]

        def product(role: str, inputs: np.ndarray) -> np.ndarray:
            i = next(i for i, m in enumerate(members) if m.role == role)
            low = lsb.payloads[i] if lsb is not None else None
            m = members[i]
            return matmul_slices(inputs, msb.payloads[i], low, m.rows, m.cols, self.spec, precision, self._workers)

        h = x[tokens].float().numpy()
        if any(m.role == "gate_up" for m in members):
            gate, up = np.split(product("gate_up", h), [self.args.moe_intermediate], axis=1)
        else:
            gate, up = product("gate", h), product("up", h)
        act = F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)
        y = torch.from_numpy(product("down", act.numpy())).to(x.dtype)
        return y * top_weight[tokens, slots, None]

    def close(self) -> None:
        self._workers.close()
        super().close()


def base_transform(args: ModelArgs, bits: int, group: int, threads: int):
    """A weight transform that quantizes each expert tensor on its own at ``bits`` (SliceMoE's "Base" baseline).

    Raises:
        SliceError: the expert dimensions are not multiples of ``group``.
    """
    spec = SliceSpec(8, 4, group)
    spec.check_shape("expert gate/up projection", (args.moe_intermediate, args.hidden_size))
    spec.check_shape("expert down projection", (args.hidden_size, args.moe_intermediate))
    workers = Workers(threads)

    def quantize(t: torch.Tensor) -> torch.Tensor:
        rows, cols = t.shape
        values = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        out = base_quantized(values, rows, cols, bits, group, workers)
        return torch.from_numpy(out).view(rows, cols).to(device=t.device, dtype=t.dtype)

    def apply(weights: ExpertWeights) -> ExpertWeights:
        return ExpertWeights(quantize(weights.gate), quantize(weights.up), quantize(weights.down))

    return apply
