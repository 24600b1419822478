"""Expert records on storage: one positioned read per expert, an optional bandwidth simulation, decoding to tensors.

``--simulate-storage GBPS`` models a storage device of that bandwidth on a machine whose page cache holds the
container: every read still happens, and then waits until a device serving reads one after another at GBPS would
have delivered it. It is a simulation of transfer time only (no seek latency, no queue depth).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from zipmoe._threads import Workers
from zipmoe.codecs.parts import PartView, decode_parts
from zipmoe.errors import FormatError
from zipmoe.formats.reader import Container
from zipmoe.runtime.config import ModelArgs
from zipmoe.runtime.model import ExpertWeights
from zipmoe.runtime.weights import assemble_expert, to_tensor


class StorageThrottle:
    """A storage device of ``bytes_per_second`` that serves reads one after another."""

    def __init__(self, bytes_per_second: float) -> None:
        if bytes_per_second <= 0:
            raise ValueError("storage bandwidth must be positive")
        self.rate = bytes_per_second
        self._lock = threading.Lock()
        self._free_at = 0.0

    def transfer(self, nbytes: int) -> None:
        """Block until a read of ``nbytes`` issued now would have completed."""
        with self._lock:
            now = time.perf_counter()
            self._free_at = max(now, self._free_at) + nbytes / self.rate
            done = self._free_at
        delay = done - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


@dataclass(frozen=True)
class _Member:
    name: str
    dtype: str
    shape: tuple[int, ...]
    view: PartView  # relative to the start of the record


class ExpertStore:
    """Reads and decodes the expert records of a container.

    Args:
        container: an open container.
        args: the model's hyper-parameters.
        device, dtype: where and in which dtype decoded experts are placed.
        throttle: simulated storage bandwidth, if any.
    """

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        throttle: StorageThrottle | None = None,
    ) -> None:
        self.container = container
        self.args = args
        self.device = device
        self.dtype = dtype
        self.throttle = throttle
        self._fd = os.open(container.path, os.O_RDONLY)
        self._records = {}
        for (layer, expert), record in container.experts.items():
            members = []
            for t_index, p_index in record.members:
                tensor = container.manifest.tensors[t_index]
                shape = tensor.shape[1:] if tensor.fused else tensor.shape
                view = container.part_view(tensor, p_index, base=record.offset)
                members.append(_Member(tensor.name, tensor.dtype, shape, view))
            self._records[(layer, expert)] = (record.offset, record.nbytes, tuple(members))
        missing = [
            (layer, e) for layer in range(args.n_layers) if args.sparse_layers[layer] for e in range(args.n_experts)
            if (layer, e) not in self._records
        ]  # fmt: skip
        if missing:
            raise FormatError(f"{container.path}: no expert record for layer {missing[0][0]}, expert {missing[0][1]}")
        any_key = next(iter(self._records))
        self.record_nbytes = max(nbytes for _, nbytes, _ in self._records.values())
        self.source_nbytes = sum(m.view.size for m in self._records[any_key][2])  # BF16 bytes of one expert
        self.decoded_nbytes = args.expert_params * torch.empty((), dtype=dtype).element_size()

    def read(self, key: tuple[int, int]) -> np.ndarray:
        """The bytes of one expert record: one read (then the simulated transfer time, if any)."""
        offset, nbytes, _ = self._records[key]
        buf = np.empty(nbytes, np.uint8)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise FormatError(f"{self.container.path}: expert record {key} ends early")
            done += n
        if self.throttle is not None:
            self.throttle.transfer(nbytes)
        return buf

    def decode(self, key: tuple[int, int], record: np.ndarray, workers: Workers) -> ExpertWeights:
        """Decode a record (checksums verified) into compute-ready tensors."""
        _, _, members = self._records[key]
        pinned = self.device.type == "cuda"
        outs = [
            torch.empty(m.view.size, dtype=torch.uint8, pin_memory=pinned).numpy()
            if pinned
            else np.empty(m.view.size, np.uint8)
            for m in members
        ]
        label = f"expert (layer {key[0]}, expert {key[1]})"
        try:
            decode_parts([(record, m.view, out, f"{label} {m.name!r}") for m, out in zip(members, outs)], workers)
        except FormatError as exc:
            raise type(exc)(f"{self.container.path}: {exc}") from None
        tensors = [(m.name, to_tensor(out, m.dtype, m.shape)) for m, out in zip(members, outs)]
        return assemble_expert(tensors, self.args, self.device, self.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
