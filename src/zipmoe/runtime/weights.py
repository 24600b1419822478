"""Turning stored bytes into torch tensors: dense weights, and routed experts from their member tensors.

An expert's members are named as in the checkpoint: ``w1``/``w3``/``w2`` (Mixtral) or ``gate_proj``/``up_proj``/
``down_proj`` per expert, or one expert's slice of the fused ``gate_up_proj`` ([2I, H]: gate rows, then up rows)
and ``down_proj`` tensors that newer transformers save.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from zipmoe.errors import FormatError
from zipmoe.runtime.config import ModelArgs, UnsupportedModelError
from zipmoe.runtime.model import ExpertWeights

_TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
# Bit-compatible storage for each dtype: torch.from_numpy cannot take BF16, so its bits travel as int16.
_CARRIER = {torch.bfloat16: np.int16, torch.float16: np.float16}

_ROLES = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_MEMBER = re.compile(r"experts\.(?:\d+\.)?(?P<proj>[A-Za-z0-9_]+?)(?:\.weight)?$")


def to_tensor(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A torch tensor over decoded little-endian bytes (no copy)."""
    torch_dtype = _TORCH_DTYPES.get(dtype)
    if torch_dtype is None:
        raise UnsupportedModelError(f"the runtime cannot compute with {dtype} tensors")
    carrier = _CARRIER.get(torch_dtype)
    if carrier is not None:
        return torch.from_numpy(data.view(carrier)).view(torch_dtype).reshape(shape)
    return torch.from_numpy(data.view(np.dtype(str(torch_dtype).removeprefix("torch.")))).reshape(shape)


def member_role(name: str) -> str:
    """The role of an expert member tensor: ``gate``, ``up``, ``down`` or ``gate_up`` (fused)."""
    m = _MEMBER.search(name)
    proj = m["proj"] if m else ""
    if proj == "gate_up_proj":
        return "gate_up"
    role = _ROLES.get(proj)
    if role is None:
        raise UnsupportedModelError(f"expert tensor {name!r}: the runtime only knows gate/up/down projections")
    return role


def assemble_expert(
    members: Iterable[tuple[str, torch.Tensor]], args: ModelArgs, device: torch.device, dtype: torch.dtype
) -> ExpertWeights:
    """Build one expert from its member tensors ``(checkpoint name, tensor)``, converted to ``dtype`` on ``device``."""
    parts: dict[str, torch.Tensor] = {}
    for name, tensor in members:
        role = member_role(name)
        if role == "gate_up":
            parts["gate"], parts["up"] = tensor.split(args.moe_intermediate, dim=0)
        else:
            parts[role] = tensor
    missing = {"gate", "up", "down"} - set(parts)
    if missing:
        raise FormatError(f"expert is missing its {', '.join(sorted(missing))} projection(s)")
    return ExpertWeights(
        *(parts[r].to(device=device, dtype=dtype, non_blocking=True).contiguous() for r in ("gate", "up", "down"))
    )


def load_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype):
    """Every weight of a safetensors checkpoint directory, in memory: (args, dense weights, experts).

    This is the runtime on the original files, the reference that serving from a container must match bit for bit.
    """
    from zipmoe.formats.checkpoint import open_checkpoint
    from zipmoe.formats.experts import classify

    ckpt = open_checkpoint(str(path))
    args = ModelArgs.from_hf_config(ckpt.config)
    layout = classify(ckpt.config, [t for _, t in ckpt.tensors.values()])
    dense: dict[str, torch.Tensor] = {}
    members: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
    for name, (file_index, t) in ckpt.tensors.items():
        data = np.empty(t.nbytes, np.uint8)
        ckpt.files[file_index].read_into(t.start, data)
        tensor = to_tensor(data, t.dtype, t.shape)
        placement = layout.experts.get(name)
        if placement is None:
            dense[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        elif placement.expert is not None:
            members.setdefault((placement.layer, placement.expert), []).append((name, tensor))
        else:
            for e in range(t.shape[0]):
                members.setdefault((placement.layer, e), []).append((name, tensor[e]))
    experts = {key: assemble_expert(m, args, device, dtype) for key, m in members.items()}
    return args, dense, experts
