"""zipmoe: pack Mixture-of-Experts checkpoints into one verifiable, memory-mappable container.

The container keeps BF16 weights bit-exact: each value's sign and mantissa stay as a raw byte, its exponent is
entropy-coded in independently decodable chunks. Experts are stored one record each, so a runtime loads one expert
with one read.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
