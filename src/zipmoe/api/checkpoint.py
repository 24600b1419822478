"""`zipmoe.open`: the tensors of a container, decoded on request, as torch tensors or numpy arrays.

A `PackedCheckpoint` reads nothing but the header and the manifest when it opens; each tensor is decoded when it is
asked for, with every chunk checksum checked, into memory of its own (the arrays stay valid after `close`). Tensors
come back with the dtype and shape safetensors gives them (`zipmoe.api.arrays`).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from zipmoe._threads import Workers
from zipmoe.api.arrays import resolve_framework, to_array
from zipmoe.errors import CheckpointError, FormatError, ZipmoeError
from zipmoe.formats.experts import expert_role
from zipmoe.formats.reader import Container
from zipmoe.formats.safetensors_file import parse_safetensors_header


class NotInContainerError(ZipmoeError, KeyError):
    """A tensor name or expert that the container does not hold (a `KeyError` too, as for a mapping)."""

    __str__ = Exception.__str__  # KeyError's would quote the whole message


@dataclass(frozen=True)
class TensorInfo:
    """What the manifest says about a tensor, without decoding it.

    ``layer`` and ``expert`` are set for routed-expert tensors (``expert`` None: a fused ``[n_experts, ...]`` tensor).
    """

    name: str
    dtype: str  # safetensors' spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int  # decoded bytes
    file: str  # the safetensors file it came from
    layer: int | None = None
    expert: int | None = None


def open(path: str | os.PathLike[str], *, framework: str = "auto", threads: int | None = None) -> PackedCheckpoint:
    """Open a container to read its tensors.

    Args:
        path: the ``.zmoe`` file.
        framework: ``pt`` (torch tensors), ``np`` (numpy arrays), or ``auto``: torch when it is installed.
        threads: decode threads for large tensors (default: every available CPU).

    Returns:
        A `PackedCheckpoint`; close it, or use it as a context manager.

    Raises:
        FormatError: the file is missing, not a container, truncated, or its manifest is corrupt.
        FrameworkError: an unknown ``framework``, or ``pt`` without torch.
    """
    return PackedCheckpoint(path, framework=framework, threads=threads)


class PackedCheckpoint:
    """The checkpoint a container holds, tensor by tensor. See `open`."""

    def __init__(self, path: str | os.PathLike[str], *, framework: str = "auto", threads: int | None = None) -> None:
        self.framework = resolve_framework(framework)
        self._container = Container(path)
        self._workers = Workers(threads)
        self.closed = False

    @property
    def path(self) -> Path:
        return self._container.path

    # -- what it holds ----------------------------------------------------------------------------------------------

    @cached_property
    def _files(self) -> dict[str, str]:
        """The safetensors file of every tensor, by name: file by file in packed order, each by data offset.

        Raises:
            FormatError: a stored safetensors header is malformed.
        """
        c = self._container
        listed = c.small_tensors.keys() | c.tensors.keys()  # reading `small_tensors` validates the stored headers
        files: dict[str, str] = {}
        for s in c.manifest.safetensors:
            raw = c.read_blob(s.header, f"header of {s.name!r}").tobytes()
            try:
                parsed = parse_safetensors_header(Path(s.name), raw[8:], s.nbytes)
            except CheckpointError as exc:
                raise FormatError(f"{c.path}: {exc}") from None
            files.update((t.name, s.name) for t in parsed.tensors if t.name in listed)
        return files

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name, file by file in the order of the packed safetensors files, each by data offset."""
        return tuple(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._container.tensors or name in self._container.small_tensors

    def __len__(self) -> int:
        return len(self._container.tensors) + len(self._container.small_tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape, size and placement of tensor ``name``, from the manifest alone.

        Raises:
            NotInContainerError: no tensor of that name.
        """
        c = self._container
        entry = c.tensors.get(name)
        if entry is not None:
            file = c.manifest.safetensors[entry.file].name
            return TensorInfo(name, entry.dtype, entry.shape, entry.size, file, entry.layer, entry.expert)
        small = c.small_tensors.get(name)
        if small is None:
            raise self._unknown(name)
        return TensorInfo(name, small.dtype, small.shape, small.size, self._files[name])

    @property
    def config(self) -> dict[str, Any] | None:
        """The checkpoint's ``config.json`` (a copy), or None when it had none."""
        return copy.deepcopy(self._container.manifest.config)

    @cached_property
    def manifest_sha256(self) -> str:
        """SHA-256 of the manifest, as ``zipmoe inspect`` shows it (`zipmoe.summary.manifest_sha256`)."""
        from zipmoe.summary import manifest_sha256

        return manifest_sha256(self._container)

    @property
    def metadata(self) -> dict[str, Any]:
        """What the container says about itself: format version, writer, source and model (family, experts)."""
        m = self._container.manifest
        return {"format_version": m.format_version, "created_by": m.created_by, "source": copy.deepcopy(m.source),
                "model": copy.deepcopy(m.model)}  # fmt: skip

    @property
    def files(self) -> tuple[str, ...]:
        """The files kept verbatim next to the weights (config, tokenizer, index)."""
        return tuple(f.name for f in self._container.manifest.files)

    def read_file(self, name: str) -> bytes:
        """The bytes of an embedded file, checksum checked.

        Raises:
            FormatError: no such file embedded, or its bytes are corrupt.
        """
        self._check_open()
        return self._container.read_file(name)

    # -- tensors ----------------------------------------------------------------------------------------------------

    def tensor(self, name: str) -> Any:
        """Decode tensor ``name``: a torch tensor bit-identical to the source's (numpy array with ``np``).

        Raises:
            NotInContainerError: no tensor of that name.
            ChecksumError: its stored bytes are corrupt (the message names the tensor and the file offset).
        """
        info = self.info(name)
        self._check_open()
        data = self._container.read_tensor(name, workers=self._workers)
        return to_array(data, info.dtype, info.shape, self.framework, name)

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` for every tensor in `names` order, each decoded only when the iteration reaches it."""
        for name in self.names:
            yield name, self.tensor(name)

    @property
    def experts(self) -> tuple[tuple[int, int], ...]:
        """Every routed expert, as ``(layer, index)``, in file order."""
        return tuple((e.layer, e.expert) for e in self._container.manifest.experts)

    def expert(self, layer: int, index: int) -> dict[str, Any]:
        """The weights of one routed expert, read with one read, by role: ``gate``, ``up`` and ``down``.

        Mixtral's ``w1``/``w3``/``w2``, the ``gate_proj``/``up_proj``/``down_proj`` of the other families, and this
        expert's slice of fused ``[n_experts, ...]`` tensors all come back under the same keys; a fused
        ``gate_up_proj`` slice is split into its gate rows and its up rows (views). A member of no known role keeps
        its checkpoint name after ``experts.``.

        Raises:
            NotInContainerError: no such expert.
            ChecksumError: its stored bytes are corrupt.
        """
        if (layer, index) not in self._container.experts:
            raise NotInContainerError(
                f"{self.path}: no routed expert (layer {layer}, expert {index}); "
                f"it holds {len(self._container.experts)} experts" + _expert_ranges(self.experts)
            )
        self._check_open()
        out: dict[str, Any] = {}
        for member in self._container.read_expert(layer, index, workers=self._workers):
            name = member.tensor.name
            array = to_array(member.data, member.tensor.dtype, member.shape, self.framework, name)
            role = expert_role(name)
            if role == "gate_up":
                half = array.shape[0] // 2
                out["gate"], out["up"] = array[:half], array[half:]
            else:
                out[role or _member_name(name)] = array
        return out

    def _check_open(self) -> None:
        if self.closed:
            raise ZipmoeError(f"{self.path}: the container is closed (read tensors inside its `with` block)")

    def _unknown(self, name: str) -> NotInContainerError:
        close = difflib.get_close_matches(str(name), self.names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return NotInContainerError(f"{self.path}: no tensor named {name!r}{hint}")

    # -- lifetime ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the file and stop the decode threads; tensors handed out stay valid (they own their memory)."""
        self._workers.close()
        self._container.close()
        self.closed = True

    def __enter__(self) -> PackedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<zipmoe.PackedCheckpoint {str(self.path)!r}: {len(self)} tensors, {len(self.experts)} experts>"


def _member_name(name: str) -> str:
    """What follows ``experts.`` (and the expert's index) in an expert tensor's name."""
    tail = name.rpartition("experts.")[2]
    head, _, rest = tail.partition(".")
    return rest if head.isdigit() and rest else tail


def _expert_ranges(experts: tuple[tuple[int, int], ...]) -> str:
    if not experts:
        return ""
    layers = sorted({layer for layer, _ in experts})
    return f" in layers {layers[0]}..{layers[-1]}, indices 0..{max(e for _, e in experts)}"
