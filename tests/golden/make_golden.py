"""Write the golden fixtures of the current format version, only if they are missing.

    python tests/golden/make_golden.py

Fixtures are never regenerated in place: a change of format adds a new version folder (v2/ ...), and the tests keep
reading every older one. The source checkpoint is built with numpy from fixed seeds, so it does not depend on torch.
v1 is a container without slices; v2 the same kind of checkpoint, with expert dimensions a multiple of the slice
group size, packed with ``--slices 8:4``; v3 the v2 checkpoint packed the same way, its dense tensors (all small)
stored in raw runs; v4 (the latest) the same again, its expert records split (sign-mantissa planes apart).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

from zipmoe.codecs.coders import RansCoder
from zipmoe.formats.constants import READABLE_VERSIONS
from zipmoe.formats.reader import Container
from zipmoe.pack import PackOptions, pack
from zipmoe.quant.spec import parse_slices

HERE = Path(__file__).parent / f"v{max(READABLE_VERSIONS)}"
CHUNK_VALUES = 1024  # several chunks per tensor, with tails
SLICES = "8:4"
INTERMEDIATE = 64  # v1 used 48, which cannot be sliced in groups of 32


def bf16(values: np.ndarray) -> bytes:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def source_tensors() -> dict[str, tuple[str, list[int], bytes]]:
    rng = np.random.default_rng(1234)
    tensors: dict[str, tuple[str, list[int], bytes]] = {
        "model.embed_tokens.weight": ("BF16", [40, 32], bf16(rng.standard_normal((40, 32)) * 0.02)),
        "model.norm.weight": ("BF16", [32], bf16(np.ones(32))),  # a constant chunk
        "model.layers.0.block_sparse_moe.gate.weight": (
            "F32",
            [2, 32],
            rng.standard_normal((2, 32)).astype("<f4").tobytes(),
        ),
        "model.noise": (
            "BF16",
            [700],
            rng.integers(0, 1 << 16, 700, dtype=np.uint16).astype("<u2").tobytes(),
        ),  # stored mode
        "model.steps": ("I64", [3], np.array([1, -2, 3], "<i8").tobytes()),
    }
    for layer in range(2):
        for expert in range(2):
            for w, shape in (("w1", [INTERMEDIATE, 32]), ("w2", [32, INTERMEDIATE]), ("w3", [INTERMEDIATE, 32])):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
                tensors[name] = ("BF16", shape, bf16(rng.standard_normal(shape) * 0.02))
    return tensors


def write_source(root: Path) -> None:
    root.mkdir(parents=True)
    config = {"model_type": "mixtral", "num_local_experts": 2, "num_hidden_layers": 2, "hidden_size": 32}
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "tokenizer_config.json").write_text('{"bos_token": "<s>"}\n')
    write_safetensors(root / "model.safetensors", source_tensors())


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file of ``{name: (dtype, shape, raw bytes)}`` in that order, header padded to 8 bytes."""
    header, data = {}, bytearray()
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data))


def main() -> int:
    container = HERE / "micro.zmoe"
    if container.exists():
        print(f"{container} exists; golden fixtures are never regenerated in place")
        return 0
    write_source(HERE / "source")
    options = PackOptions(coder=RansCoder(), chunk_values=CHUNK_VALUES, threads=1, slices=parse_slices(SLICES))
    pack(str(HERE / "source"), container, options)
    with Container(container) as c:
        assert c.manifest.format_version == max(READABLE_VERSIONS), c.manifest.format_version
        slices = {
            f"{t.name}:{kind}": hashlib.sha256(payload).hexdigest()
            for layer, expert in c.experts
            for kind in ("msb", "lsb")
            for t, _, payload in c.read_slices(layer, expert, kind)
        }
    expected = {
        "pack_options": {"coder": "rans", "chunk_values": CHUNK_VALUES, "slices": SLICES},
        "tensor_sha256": {n: hashlib.sha256(raw).hexdigest() for n, (_, _, raw) in source_tensors().items()},
        "slice_sha256": slices,
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"wrote {container}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
