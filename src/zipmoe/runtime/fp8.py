"""FP8 E4M3 weights with per-block scales (DeepSeek-V3's ``weight_scale_inv``) into the compute dtype.

A checkpoint quantized as DeepSeek-V3 is stores each linear weight ``W [R, C]`` as FP8 E4M3 ``q`` and one float32
scale per ``block x block`` tile (``block`` = 128, config ``quantization_config.weight_block_size``), of shape
``[ceil(R / block), ceil(C / block)]``; ``W = q * scale_inv`` tile by tile. The product is taken in float32 (exact
for FP8 values; one rounding per weight) and then cast to the compute dtype, as transformers' ``Fp8Dequantize``
does when it loads such a checkpoint with ``dequantize=True``, so both give the same weights bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from zipmoe.errors import FormatError

DEFAULT_BLOCK = 128


def dequantize_fp8_blocks(
    fp8: np.ndarray | torch.Tensor,
    scale_inv: np.ndarray | torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Dequantize one FP8 E4M3 weight with its block scales.

    Args:
        fp8: the weight's bytes (uint8, as a container decodes them) or a ``float8_e4m3fn``/uint8 tensor, ``R * C``
            values in row-major order.
        scale_inv: float32 scales ``[ceil(R / block), ceil(C / block)]`` (bytes or values, as numpy or torch).
        shape: ``(R, C)``.
        dtype: the compute dtype of the result.
        block: the tile edge.

    Returns:
        The ``[R, C]`` weight in ``dtype``, on the device of ``fp8`` (CPU for numpy input).

    Raises:
        FormatError: the sizes of ``fp8`` or ``scale_inv`` do not fit ``shape`` and ``block``.
    """
    if len(shape) != 2 or block < 1:
        raise FormatError(
            f"FP8 block dequantization needs a 2-D shape and a positive block, got {list(shape)}, {block}"
        )
    rows, cols = shape
    q = _as_tensor(fp8)
    if q.dtype not in (torch.uint8, torch.float8_e4m3fn) or q.numel() != rows * cols:
        raise FormatError(
            f"FP8 weight: expected {rows * cols} float8_e4m3fn values for {list(shape)}, got {q.numel()} {q.dtype}"
        )
    scales = _as_tensor(scale_inv)
    if scales.dtype == torch.uint8:  # raw little-endian float32 bytes
        scales = scales.contiguous().view(torch.float32)
    grid = (-(-rows // block), -(-cols // block))
    if scales.dtype != torch.float32 or scales.numel() != grid[0] * grid[1]:
        raise FormatError(
            f"FP8 weight {list(shape)}: expected float32 weight_scale_inv {list(grid)} for {block}x{block} blocks, "
            f"got {list(scales.shape)} {scales.dtype}"
        )
    values = q.contiguous().view(torch.float8_e4m3fn).reshape(rows, cols).to(torch.float32)
    scales = scales.reshape(grid).to(values.device)
    full = scales.repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :cols]
    return (values * full).to(dtype)


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, np.ndarray):  # decoded bytes may be read-only views; torch wants writable memory
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    return array


def fp8_block_size(config: dict[str, Any] | None) -> int | None:
    """The scale tile edge of a checkpoint quantized as DeepSeek-V3 is (``quantization_config`` with
    ``quant_method: fp8``), or None for a checkpoint that is not.

    Raises:
        FormatError: an FP8 quantization this runtime cannot dequantize (not E4M3, or tiles that are not square).
    """
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    fmt = quant.get("fmt", "e4m3")
    sizes = quant.get("weight_block_size", [DEFAULT_BLOCK, DEFAULT_BLOCK])
    square = isinstance(sizes, list) and len(sizes) == 2 and sizes[0] == sizes[1]
    if fmt != "e4m3" or not square or not isinstance(sizes[0], int) or isinstance(sizes[0], bool) or sizes[0] < 1:
        raise FormatError(
            f"config.json: quantization_config: only FP8 e4m3 with square weight blocks can be dequantized, "
            f"got fmt {fmt!r}, weight_block_size {sizes!r}"
        )
    return sizes[0]


SCALE_SUFFIX = "_scale_inv"  # ``X.weight`` is scaled by ``X.weight_scale_inv``


def fold_fp8_scales(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, block: int = DEFAULT_BLOCK
) -> list[tuple[str, torch.Tensor]]:
    """Replace each FP8 weight and its ``weight_scale_inv`` by the dequantized weight in ``dtype``.

    The hook for loading: the members of an expert (or a layer's dense tensors) go through this before they are
    assembled, so the rest of the runtime only sees weights in the compute dtype. Tensors that are not FP8 and have
    no scale pass through unchanged, in order; a dequantized weight takes its FP8 tensor's place.

    Args:
        tensors: ``(checkpoint name, tensor)``; FP8 weights as ``float8_e4m3fn`` tensors of shape ``[R, C]``.
        dtype: the compute dtype.
        block: the scale tile edge (``quantization_config.weight_block_size``).

    Raises:
        FormatError: an FP8 weight without its scale, a scale without its FP8 weight, or sizes that do not fit.
    """
    items = list(tensors)
    position = {name: i for i, (name, _) in enumerate(items)}
    return sorted(fold_fp8_stream(items, dtype, block), key=lambda item: position[item[0]])


def fold_fp8_stream(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, block: int = DEFAULT_BLOCK
) -> Iterator[tuple[str, torch.Tensor]]:
    """`fold_fp8_scales` for tensors read one at a time (a checkpoint's dense weights): each is yielded as soon as
    it can be, an FP8 weight once it and its scale have both arrived, so only those waiting for their pair are held.

    Raises:
        FormatError: as `fold_fp8_scales`, once ``tensors`` is exhausted (the unpaired tensors are known then).
    """
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            scales[name.removesuffix(SCALE_SUFFIX)] = tensor
        elif tensor.dtype == torch.float8_e4m3fn:
            weights[name] = tensor
        else:
            yield name, tensor
            continue
        weight = name.removesuffix(SCALE_SUFFIX)
        if weight in weights and weight in scales:
            fp8 = weights.pop(weight)
            yield weight, dequantize_fp8_blocks(fp8, scales.pop(weight), tuple(fp8.shape), dtype, block)
    for name in weights:
        raise FormatError(f"{name}: an FP8 weight without its {name + SCALE_SUFFIX!r}")
    for weight in scales:
        raise FormatError(f"{weight + SCALE_SUFFIX}: a block scale without an FP8 weight {weight!r}")


def scale_block(config: dict[str, Any] | None) -> int:
    """The scale tile edge to dequantize FP8 weights with: the config's (`fp8_block_size`), else 128."""
    return fp8_block_size(config) or DEFAULT_BLOCK
