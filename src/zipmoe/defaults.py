"""Default values that both the library and the command line's ``--help`` show, in a module that imports nothing.

The CLI declares its options at import time, defaults included; taking them from the modules that use them would load
numba or torch just to print ``--help``. Those modules import them from here instead, so each value is written once.
"""

from __future__ import annotations

DEFAULT_CHUNK_VALUES = 1 << 16  # BF16 values per independently decodable chunk; chosen with `zipmoe bench codecs`
BENCH_CODERS = ("rans", "zstd:3", "lz4", "lz4hc:9")  # the exponent coders `zipmoe bench codecs` compares
BENCH_CHUNK_VALUES = (1 << 14, 1 << 16, 1 << 18, 1 << 20)  # the chunk sizes it sweeps with rans
