"""Decoded tensor bytes as the arrays API callers get: torch tensors when torch is installed, numpy arrays otherwise.

Both are views over the decoded little-endian bytes (no copy). torch gets the dtype safetensors gives each
safetensors dtype, so a tensor is bit-identical to what ``safetensors.torch.load_file`` returns. numpy has no
bfloat16 or float8 types: those come back as their bit patterns (BF16 as ``uint16``, F8_* as ``uint8``) of the
tensor's shape, and sub-byte dtypes (F4, F6_*) as their packed bytes (flat ``uint8``), exactly as stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zipmoe.errors import ZipmoeError
from zipmoe.extras import installed
from zipmoe.formats.reader import NUMPY_DTYPES, as_array
from zipmoe.formats.safetensors_file import DTYPE_BITS

FRAMEWORKS = ("auto", "pt", "np")

# safetensors dtype -> name of the torch dtype that safetensors loads it as (torch has no F4/F6 tensors it can load).
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip


class FrameworkError(ZipmoeError, ValueError):
    """An array framework that is unknown, not installed, or cannot hold a tensor's dtype."""


def resolve_framework(framework: str) -> str:
    """``pt`` or ``np`` for ``framework`` (``auto``: ``pt`` when torch is installed, else ``np``).

    Raises:
        FrameworkError: an unknown framework, or ``pt`` without torch.
    """
    if framework not in FRAMEWORKS:
        raise FrameworkError(f"unknown framework {framework!r} (choose {', '.join(FRAMEWORKS)})")
    if framework == "np":
        return "np"
    if not installed("torch"):
        if framework == "pt":
            raise FrameworkError("framework='pt' needs PyTorch: pip install 'zipmoe[run]' (or use framework='np')")
        return "np"
    return "pt"


def to_array(data: np.ndarray, dtype: str, shape: tuple[int, ...], framework: str, name: str) -> Any:
    """A tensor of ``framework`` (``pt`` or ``np``) over ``data``, the decoded bytes (uint8) of tensor ``name``.

    Raises:
        FrameworkError: torch has no dtype for ``dtype`` (F4, F6_*: use ``np`` for their packed bytes).
    """
    if framework == "np":
        return to_numpy(data, dtype, shape)
    return to_torch(data, dtype, shape, name)


def to_numpy(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of decoded bytes: typed where numpy has the dtype, else bit patterns or packed bytes."""
    if dtype in NUMPY_DTYPES:
        return as_array(data, dtype, shape)
    if DTYPE_BITS.get(dtype) == 8:  # float8 formats: one byte per value
        return data.reshape(shape)
    return data


def to_torch(data: np.ndarray, dtype: str, shape: tuple[int, ...], name: str):
    """A torch view of decoded bytes, with the dtype safetensors loads ``dtype`` as."""
    import torch

    torch_dtype = getattr(torch, TORCH_DTYPES.get(dtype, ""), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise FrameworkError(
            f"tensor {name!r} is {dtype}, which torch {torch.__version__} cannot hold; open the container with "
            "framework='np' for its bytes"
        )
    if data.size == 0:  # numpy gives an empty array stride 0, which torch cannot view as another dtype
        return torch.empty(shape, dtype=torch_dtype)
    return torch.from_numpy(data).view(torch_dtype).reshape(shape)
