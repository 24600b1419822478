"""LLVM-level helpers for the kernels that numba does not offer as Python operators."""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def mulhi64(typingctx, a, b):  # pragma: no cover - compiled
    """The high 64 bits of the 128-bit product of two uint64 (one MUL instruction on x86-64 and AArch64)."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    signature = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        wide = ir.IntType(128)
        x = builder.zext(context.cast(builder, args[0], sig.args[0], types.uint64), wide)
        y = builder.zext(context.cast(builder, args[1], sig.args[1], types.uint64), wide)
        return builder.trunc(builder.lshr(builder.mul(x, y), ir.Constant(wide, 64)), ir.IntType(64))

    return signature, codegen
