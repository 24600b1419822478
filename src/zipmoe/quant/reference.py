"""Plain numpy twins of the AMAT kernels: the rule of `docs/FORMAT.md` restated as array code, the test oracle.

Nothing in the product calls these, except `quantize` (Base low-bit weights for `zipmoe eval`, where speed does not
matter).
"""

from __future__ import annotations

import numpy as np

from zipmoe.quant.spec import Precision, SliceSpec


def bf16_to_float32(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.uint32) << 16).view(np.float32)


def round_up_bf16(x: np.ndarray) -> np.ndarray:
    """Positive float32 values rounded up to the next BF16 value (kept as float32)."""
    bits = x.astype(np.float32).view(np.uint32)
    up = np.where(bits & 0xFFFF, (bits + 0x10000) & 0xFFFF0000, bits).astype(np.uint32)
    return up.view(np.float32)


def quantize(values: np.ndarray, cols: int, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min/max quantization in groups along the last axis.

    Returns ``q`` (int32, ``[rows, cols]``), scales (float32, BF16-exact, ``[rows, groups]``) and zero-points
    (int32, ``[rows, groups]``).
    """
    w = bf16_to_float32(values).reshape(-1, cols // group, group)
    lo = np.minimum(w.min(axis=-1), np.float32(0))
    hi = np.maximum(w.max(axis=-1), np.float32(0))
    qmax = np.float32((1 << bits) - 1)
    scale = round_up_bf16((hi - lo) / qmax)
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]) + zp[..., None], 0, qmax)
    return q.astype(np.int32).reshape(-1, cols), scale, zp.astype(np.int32)


def pack(values: np.ndarray, width: int) -> np.ndarray:
    """Pack values (each < 2**width) eight at a time into ``width`` bytes, value i at bits ``width*i``."""
    blocks = values.reshape(-1, 8).astype(np.uint64)
    acc = np.zeros(blocks.shape[0], np.uint64)
    for i in range(8):
        acc |= blocks[:, i] << np.uint64(width * i)
    out = np.stack([(acc >> np.uint64(8 * k)) & np.uint64(0xFF) for k in range(width)], axis=1)
    return out.astype(np.uint8).reshape(-1)


def unpack(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack` (int32 values)."""
    blocks = packed.reshape(-1, width).astype(np.uint64)
    acc = np.zeros(blocks.shape[0], np.uint64)
    for k in range(width):
        acc |= blocks[:, k] << np.uint64(8 * k)
    mask = np.uint64((1 << width) - 1)
    return np.stack([(acc >> np.uint64(width * i)) & mask for i in range(8)], axis=1).astype(np.int32).reshape(-1)


def slices(values: np.ndarray, rows: int, cols: int, spec: SliceSpec) -> tuple[np.ndarray, np.ndarray]:
    """The MSB and LSB slice payloads of a BF16 ``[rows, cols]`` tensor (uint16 patterns)."""
    q, scale, zp = quantize(values, cols, spec.group_size, spec.high_bits)
    msb = pack(q >> spec.shift, spec.low_bits)
    lsb = pack(q & ((1 << spec.shift) - 1), spec.shift)
    scale_bits = (scale.view(np.uint32) >> 16).astype("<u2")
    msb_payload = np.concatenate([msb, scale_bits.reshape(-1).view(np.uint8), zp.astype(np.uint8).reshape(-1)])
    return msb_payload, lsb


def dequantize(
    msb_payload: np.ndarray, lsb_payload: np.ndarray | None, rows: int, cols: int, spec: SliceSpec, mode: Precision
) -> np.ndarray:
    """Float32 ``[rows, cols]`` weights from slice payloads (``lsb_payload`` only for `Precision.HIGH`)."""
    n = rows * cols
    groups = n // spec.group_size
    packed_nbytes = n * spec.low_bits // 8
    msb = unpack(msb_payload[:packed_nbytes], spec.low_bits).reshape(-1, spec.group_size)
    scale = bf16_to_float32(msb_payload[packed_nbytes : packed_nbytes + 2 * groups].view("<u2"))
    zp = msb_payload[packed_nbytes + 2 * groups :].astype(np.int32)
    if mode == Precision.HIGH:
        q = (msb << spec.shift) | unpack(lsb_payload, spec.shift).reshape(msb.shape) if spec.shift else msb
    else:
        q = msb
        scale = scale * np.float32(1 << spec.shift)
        zp = zp >> spec.shift if mode == Precision.LOW else zp
    return ((q - zp[:, None]).astype(np.float32) * scale[:, None]).reshape(rows, cols)
