"""Expert records on storage: one positioned read per expert, an optional bandwidth simulation, decoding to tensors.

``--simulate-storage GBPS`` models a storage device of that bandwidth on a machine whose page cache holds the
container: every read still happens, and then waits until a device serving reads one after another at GBPS would
have delivered it. It is a simulation of transfer time only (no seek latency, no queue depth).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


class RecordReader:
    """Positioned reads of whole records from a container, into pinned memory when the compute device is a GPU.

    Args:
        container: an open container.
        device: where the data goes in the end (pinned host buffers for a GPU).
        throttle: simulated storage bandwidth, if any.
    """

    def __init__(self, container: Container, device: torch.device, throttle: StorageThrottle | None) -> None:
        self.container = container
        self.device = device
        self.throttle = throttle
        self._fd = os.open(container.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # reads are random: no readahead into the neighbouring records
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    def _buffer(self, nbytes: int) -> np.ndarray:
        """Host memory for ``nbytes``: pinned when experts go to a GPU, so copies to it run asynchronously."""
        if self.device.type == "cuda":
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty(nbytes, np.uint8)

    def _read_into(self, buf: np.ndarray, start: int, stop: int, offset: int) -> None:
        """Read bytes ``start..stop`` of the record at file ``offset`` into the same bytes of ``buf``."""
        view = memoryview(buf)[start:stop]
        done = 0
        while done < view.nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + start + done)
            if n == 0:
                raise FormatError(f"{self.container.path}: record at {offset} ends early")
            done += n
        if self.throttle is not None:
            self.throttle.transfer(view.nbytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class _Member:
    name: str
    dtype: str
    shape: tuple[int, ...]
    view: PartView  # relative to the start of the record


class ExpertStore(RecordReader):
    """Reads and decodes the expert records of a container.

    Args:
        container: an open container.
        args: the model's hyper-parameters.
        device, dtype: where and in which dtype decoded experts are placed.
        throttle: simulated storage bandwidth, if any.
        threads: decoder threads.
        transform: applied to every expert's weights once decoded (the eval's Base quantization baseline).
    """

    def __init__(
        self,
        container: Container,
        args: ModelArgs,
        device: torch.device,
        dtype: torch.dtype,
        throttle: StorageThrottle | None = None,
        threads: int = 1,
        transform: Callable[[ExpertWeights], ExpertWeights] | None = None,
    ) -> None:
        super().__init__(container, device, throttle)
        self.args = args
        self.dtype = dtype
        self.transform = transform
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
        self.widen = dtype == torch.float32 and device.type == "cpu"
        self._decoder = ThreadPoolExecutor(max(1, threads), thread_name_prefix="zipmoe-decode")
        self._part_workers = Workers(threads)  # and each part's chunks on every thread

    def fetch(self, key: tuple[int, int], record: np.ndarray | None = None) -> tuple[ExpertWeights, np.ndarray]:
        """The compute-ready weights of one expert, and its record bytes (checksums verified).

        A record already in memory is decoded at once, its parts side by side. Otherwise the record is read from
        storage front to back, one part at a time, and each part is decoded while the next one is being read, so
        that reading and decoding overlap. For float32 compute on a CPU, BF16 members decode straight to float32;
        for a GPU they decode into pinned memory and are copied asynchronously.
        """
        offset, nbytes, members = self._records[key]
        widen = self.widen and all(m.dtype == "BF16" for m in members)
        outs = [self._buffer(m.view.size * (2 if widen else 1)) for m in members]
        label = f"expert (layer {key[0]}, expert {key[1]})"

        def decode(i: int, buf: np.ndarray) -> None:
            item = (buf, members[i].view, outs[i], f"{label} {members[i].name!r}")
            decode_parts([item], self._part_workers, widen=widen)

        if record is not None:
            futures = [self._decoder.submit(decode, i, record) for i in range(len(members))]
        else:
            record = self._buffer(nbytes)
            futures = []
            position = 0
            for i, m in enumerate(members):  # parts are in offset order; the gaps between them are padding
                end = m.view.offset + m.view.nbytes
                self._read_into(record, position, end, offset)
                futures.append(self._decoder.submit(decode, i, record))
                position = end
            self._read_into(record, position, nbytes, offset)
        try:
            for future in futures:
                future.result()
        except FormatError as exc:
            raise type(exc)(f"{self.container.path}: {exc}") from None
        tensors = [(m.name, to_tensor(out, "F32" if widen else m.dtype, m.shape)) for m, out in zip(members, outs)]
        weights = assemble_expert(tensors, self.args, self.device, self.dtype)
        return (self.transform(weights) if self.transform else weights), record

    def close(self) -> None:
        self._decoder.shutdown(wait=True)
        super().close()
