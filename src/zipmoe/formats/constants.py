"""Every magic number of the container format, in one place (docs/FORMAT.md is the normative spec)."""

from __future__ import annotations

MAGIC = b"\x89ZIPMOE\n"  # 8 bytes; the high first byte and the newline catch 7-bit and text-mode transfers
FORMAT_VERSION = 1  # written for containers without slices
SLICES_VERSION = 2  # written for containers with AMAT slices
RUNS_VERSION = 3  # written for containers holding small tensors in raw runs (with or without slices)
SPLIT_VERSION = 4  # written for containers with split expert records (sign-mantissa planes apart)
READABLE_VERSIONS = (1, 2, 3, 4)
HEADER_NBYTES = 64
DEFAULT_ALIGNMENT = 4096  # records (dense tensors, expert records, files) start on this boundary
PART_ALIGNMENT = 64  # parts inside an expert record start on this boundary
MAX_MANIFEST_NBYTES = 256 << 20  # a reader refuses larger manifests before reading them (DeepSeek-V3: ~40 MB)
MAX_NDIM = 32  # dimensions of a tensor shape
MAX_DIMENSION = 1 << 48  # one dimension of a tensor shape (torch and numpy index with int64)
MAX_INDEX = 1 << 20  # a layer or expert number
SMALL_TENSOR_NBYTES = 64 << 10  # dense tensors below this are stored in raw runs, not as records of their own
SUFFIX = ".zmoe"  # conventional file name suffix
PARTIAL_SUFFIX = ".partial"  # a container being written; never a valid container

# Tensor classes in the manifest.
CLASS_EXPERT = "expert"
CLASS_DENSE = "dense"

# Roles of embedded files.
ROLE_CONFIG = "config"
ROLE_GENERATION_CONFIG = "generation_config"
ROLE_INDEX = "safetensors_index"
ROLE_TOKENIZER = "tokenizer"
