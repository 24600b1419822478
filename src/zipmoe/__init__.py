"""zipmoe: pack Mixture-of-Experts checkpoints into one verifiable, memory-mappable container.

The container keeps BF16 weights bit-exact: each value's sign and mantissa stay as a raw byte, its exponent is
entropy-coded in independently decodable chunks. Experts are stored one record each, so a runtime loads one expert
with one read.

The Python API (docs/API.md)::

    with zipmoe.open("model.zmoe") as checkpoint:     # tensors, bit-identical to the packed safetensors
        w = checkpoint.tensor("model.norm.weight")
    with zipmoe.load("model.zmoe", memory_budget="2GiB") as model:   # generation (needs torch)
        print(model.generate("The capital of France is").text)
    hf_model = zipmoe.to_transformers("model.zmoe")  # a transformers model, no file written

Importing zipmoe imports none of numpy, numba, torch or the CLI: each name below loads its module when first used.
"""

from __future__ import annotations

import importlib

from zipmoe.errors import ZipmoeError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (a fifth of this module's import time)

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY = {
    "open": "zipmoe.api.checkpoint",
    "PackedCheckpoint": "zipmoe.api.checkpoint",
    "TensorInfo": "zipmoe.api.checkpoint",
    "NotInContainerError": "zipmoe.api.checkpoint",
    "load": "zipmoe.api.model",
    "Model": "zipmoe.api.model",
    "Generation": "zipmoe.api.model",
    "to_transformers": "zipmoe.api.huggingface",
}

__all__ = [
    "__version__", "ZipmoeError", "open", "PackedCheckpoint", "TensorInfo", "NotInContainerError", "load", "Model",
    "Generation", "to_transformers",
]  # fmt: skip

if TYPE_CHECKING:
    from zipmoe.api.checkpoint import NotInContainerError, PackedCheckpoint, TensorInfo, open
    from zipmoe.api.huggingface import to_transformers
    from zipmoe.api.model import Generation, Model, load


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zipmoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
