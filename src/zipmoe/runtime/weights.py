"""Turning stored bytes into torch tensors: dense weights, and routed experts from their member tensors; and checking,
before anything is loaded, that a container's tensors are the ones its config.json implies (`check_tensors`).

An expert's members are named as in the checkpoint: ``w1``/``w3``/``w2`` (Mixtral) or ``gate_proj``/``up_proj``/
``down_proj`` per expert, or one expert's slice of the fused ``gate_up_proj`` ([2I, H]: gate rows, then up rows)
and ``down_proj`` tensors that newer transformers save.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from zipmoe._threads import Workers
from zipmoe.errors import FormatError
from zipmoe.formats.constants import CLASS_DENSE
from zipmoe.formats.experts import expert_role
from zipmoe.formats.manifest import Manifest
from zipmoe.formats.reader import SmallTensor
from zipmoe.quant.amat import base_quantized
from zipmoe.quant.spec import SliceSpec
from zipmoe.runtime.config import ModelArgs, UnsupportedModelError
from zipmoe.runtime.fp8 import DEFAULT_BLOCK, SCALE_SUFFIX, fold_fp8_scales, fold_fp8_stream, scale_block
from zipmoe.runtime.model import ExpertWeights
from zipmoe.runtime.shapes import dense_shapes

_TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
}  # fmt: skip
# Bit-compatible storage for each dtype: torch.from_numpy cannot take BF16 or FP8, so their bits travel as integers.
_CARRIER = {torch.bfloat16: np.int16, torch.float16: np.float16, torch.float8_e4m3fn: np.uint8}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
FP8 = "F8_E4M3"  # block-quantized weights, each with a float32 ``weight_scale_inv`` (`zipmoe.runtime.fp8`)


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
    role = expert_role(name)
    if role is None:
        raise UnsupportedModelError(f"expert tensor {name!r}: the runtime only knows gate/up/down projections")
    return role


def assemble_expert(
    members: Iterable[tuple[str, torch.Tensor]],
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    fp8_block: int = DEFAULT_BLOCK,
) -> ExpertWeights:
    """Build one expert from its member tensors ``(checkpoint name, tensor)``, converted to ``dtype`` on ``device``.

    FP8 members are dequantized with their ``weight_scale_inv`` members (``fp8_block``-square tiles) on ``device``.
    """
    parts: dict[str, torch.Tensor] = {}
    members = [(name, t.to(device, non_blocking=True) if _is_fp8(name, t) else t) for name, t in members]
    for name, tensor in fold_fp8_scales(members, dtype, fp8_block):
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


def _is_fp8(name: str, tensor: torch.Tensor) -> bool:
    """An FP8 weight or its scale: what `fold_fp8_scales` dequantizes."""
    return tensor.dtype == torch.float8_e4m3fn or name.endswith(SCALE_SUFFIX)


def load_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype):
    """Every weight of a safetensors checkpoint directory, in memory: (args, dense weights, experts).

    This is the runtime on the original files, the reference that serving from a container must match bit for bit.
    """
    from zipmoe.formats.checkpoint import open_checkpoint
    from zipmoe.formats.experts import classify

    ckpt = open_checkpoint(str(path))
    args = ModelArgs.from_hf_config(ckpt.config)
    block = scale_block(ckpt.config)
    layout = classify(ckpt.config, [t for _, t in ckpt.tensors.values()])
    members: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}

    def dense_tensors():
        for name, (file_index, t) in ckpt.tensors.items():
            if not runs_tensor(args, name):
                continue
            data = np.empty(t.nbytes, np.uint8)
            ckpt.files[file_index].read_into(t.start, data)
            tensor = to_tensor(data, t.dtype, t.shape)
            placement = layout.experts.get(name)
            if placement is None:
                yield name, tensor
            elif placement.expert is not None:
                members.setdefault((placement.layer, placement.expert), []).append((name, tensor))
            else:
                for e in range(t.shape[0]):
                    members.setdefault((placement.layer, e), []).append((name, tensor[e]))

    dense = resident_weights(args, dense_tensors(), device, dtype, block)
    experts = {key: assemble_expert(m, args, device, dtype, block) for key, m in members.items()}
    return args, dense, experts


def runs_tensor(args: ModelArgs, name: str) -> bool:
    """Whether the model reads tensor ``name``: False for the multi-token-prediction layers DeepSeek-V3 stores
    after its last layer (packed and unpacked like every tensor, never loaded)."""
    m = _LAYER.match(name)
    return m is None or int(m[1]) < args.n_layers


def resident_weights(
    args: ModelArgs,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    fp8_block: int = DEFAULT_BLOCK,
) -> dict[str, torch.Tensor]:
    """The dense tensors ``(name, tensor)`` as the model holds them (`resident`), FP8 weights dequantized with their
    block scales as they arrive (`fold_fp8_stream`)."""
    return {name: resident(args, name, t, device, dtype) for name, t in fold_fp8_stream(tensors, dtype, fp8_block)}


def resident(
    args: ModelArgs, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Dense tensor ``name`` as the model holds it on ``device``: floats in the compute ``dtype``, except the
    routers of DeepSeek, which compute in float32 and keep their stored float32 weights (as transformers does)."""
    if not tensor.is_floating_point():
        return tensor.to(device=device)
    keep = args.router.float32_logits and tensor.dtype == torch.float32 and ".mlp.gate." in name
    return tensor.to(device=device, dtype=torch.float32 if keep else dtype)


def check_tensors(args: ModelArgs, manifest: Manifest, small: Mapping[str, SmallTensor] | None = None) -> None:
    """Check that a container holds the tensors ``args`` implies, before anything is allocated from ``args``.

    Every dense tensor the model reads must exist with the shape the config implies and a float dtype; the routed
    experts must be exactly the MoE layers x experts, each with gate/up/down members of the implied shapes. An FP8
    weight (dense or member) needs its float32 ``weight_scale_inv``, one value per tile of the config's
    ``weight_block_size``. Only the manifest is read (nothing is decoded), and ``small``: the tensors stored in raw
    runs (`Container.small_tensors`).

    Raises:
        UnsupportedModelError: the first mismatch, naming the tensor, the shape the config implies and the stored one.
    """
    tensors = {t.name: t for t in manifest.tensors} | dict(small or {})
    block = scale_block(manifest.config)
    held = 1 + max((int(m[1]) for m in map(_LAYER.match, tensors) if m), default=-1)
    if not args.n_layers <= held <= args.n_layers + args.mtp_layers:
        layers = f"{args.n_layers} layer" + ("s" if args.n_layers != 1 else "")
        if args.mtp_layers:
            layers += f" and up to {args.mtp_layers} multi-token-prediction layer(s)"
        raise UnsupportedModelError(f"config.json says {layers}, the container holds tensors for {held}")
    for name, shape in dense_shapes(args, tensors).items():
        tensor = tensors.get(name)
        if tensor is None or tensor.tensor_class != CLASS_DENSE:
            raise UnsupportedModelError(f"config.json implies a tensor {name} {list(shape)}; the container has none")
        if tensor.shape != shape or tensor.dtype not in _FLOAT_DTYPES + (FP8,):
            raise UnsupportedModelError(
                f"tensor {name}: config.json implies a float tensor of shape {list(shape)}, "
                f"the container holds {tensor.dtype} {list(tensor.shape)}"
            )
        if tensor.dtype == FP8:
            _check_scale(tensors.get(name + SCALE_SUFFIX), name, shape, block, f"tensor {name}")
    _check_experts(args, manifest, block)


def _check_scale(scale, weight: str, shape: tuple[int, ...], block: int, label: str) -> None:
    """``scale`` is the float32 ``weight_scale_inv`` of the FP8 weight ``weight`` of ``shape``: one per tile."""
    grid = tuple(-(-n // block) for n in shape)
    if scale is not None:  # a fused scale ([E, ...]) is checked per expert
        held = f"{scale.dtype} {list(scale.shape[1:] if getattr(scale, 'fused', False) else scale.shape)}"
    else:
        held = "none"
    if scale is None or held != f"F32 {list(grid)}":
        raise UnsupportedModelError(
            f"{label} is FP8: config.json implies a F32 {weight + SCALE_SUFFIX} {list(grid)} "
            f"({block}x{block} blocks), the container holds {held}"
        )


def _check_experts(args: ModelArgs, manifest: Manifest, block: int) -> None:
    """The expert records are exactly (MoE layer, expert) for every MoE layer and expert, with members that fit."""
    moe_layers = sum(args.sparse_layers)
    implied = f"config.json implies {args.n_experts} experts in each of {moe_layers} MoE layers"
    held = set()
    for record in manifest.experts:
        layer, expert = record.layer, record.expert
        if args.n_layers <= layer < args.n_layers + args.mtp_layers:
            continue  # a multi-token-prediction layer's experts: kept in the container, not run
        if not (layer < args.n_layers and args.sparse_layers[layer] and expert < args.n_experts):
            raise UnsupportedModelError(f"{implied}; the container holds (layer {layer}, expert {expert})")
        _check_members(args, manifest, record.members, block, f"expert (layer {layer}, expert {expert})")
        held.add((layer, expert))
    if len(held) != moe_layers * args.n_experts:
        layer, expert = next(
            (layer, e) for layer in range(args.n_layers) if args.sparse_layers[layer] for e in range(args.n_experts)
            if (layer, e) not in held
        )  # fmt: skip
        raise UnsupportedModelError(f"{implied}; the container has no (layer {layer}, expert {expert})")


def _check_members(
    args: ModelArgs, manifest: Manifest, members: tuple[tuple[int, int], ...], block: int, label: str
) -> None:
    h, i = args.hidden_size, args.moe_intermediate
    implied = {"gate": (i, h), "up": (i, h), "down": (h, i), "gate_up": (2 * i, h)}
    tensors = {t.name: t for t in (manifest.tensors[t_index] for t_index, _ in members)}
    roles = []
    for tensor in tensors.values():
        if tensor.name.endswith(SCALE_SUFFIX):
            weight = tensors.get(tensor.name.removesuffix(SCALE_SUFFIX))
            if weight is None or weight.dtype != FP8:
                raise UnsupportedModelError(f"{label} {tensor.name}: a block scale without an FP8 weight")
            continue  # checked with its weight
        role = member_role(tensor.name)
        shape = tensor.shape[1:] if tensor.fused else tensor.shape
        if shape != implied[role] or tensor.dtype not in _FLOAT_DTYPES + (FP8,):
            raise UnsupportedModelError(
                f"{label} {tensor.name}: config.json implies a float tensor of shape {list(implied[role])}, "
                f"the container holds {tensor.dtype} {list(shape)}"
            )
        if tensor.dtype == FP8:
            _check_scale(tensors.get(tensor.name + SCALE_SUFFIX), tensor.name, shape, block, f"{label} {tensor.name}")
        roles.append(role)
    if sorted(roles) not in (["down", "gate", "up"], ["down", "gate_up"]):
        raise UnsupportedModelError(f"{label}: expected gate, up and down projections, the container holds {roles}")


def base_transform(args: ModelArgs, bits: int, group: int, workers: Workers):
    """A weight transform that quantizes each expert tensor on its own at ``bits`` (SliceMoE's "Base" baseline).

    Raises:
        SliceError: the expert dimensions are not multiples of ``group``.
    """
    spec = SliceSpec(8, 4, group)
    spec.check_shape("expert gate/up projection", (args.moe_intermediate, args.hidden_size))
    spec.check_shape("expert down projection", (args.hidden_size, args.moe_intermediate))

    def quantize(t: torch.Tensor) -> torch.Tensor:
        rows, cols = t.shape
        values = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        out = base_quantized(values, rows, cols, bits, group, workers)
        return torch.from_numpy(out).view(rows, cols).to(device=t.device, dtype=t.dtype)

    def apply(weights: ExpertWeights) -> ExpertWeights:
        return ExpertWeights(quantize(weights.gate), quantize(weights.up), quantize(weights.down))

    return apply
