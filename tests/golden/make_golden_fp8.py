"""Write the FP8 golden fixture (fp8/), only if it is missing.

    python tests/golden/make_golden_fp8.py

A tiny DeepSeek-V3-style checkpoint whose routed experts are FP8 E4M3 weights with a float32 ``weight_scale_inv``
per 128x128 block, made as DeepSeek makes them (`zipmoe.codecs.fp8_blocks.quantize_blocks`), plus BF16 dense
tensors. One expert member holds every one of the 256 FP8 patterns (NaNs included, a chunk rANS stores verbatim)
and one an odd number of values (the half-filled last byte of a nibble plane). The fixture pins the ``fp8-split``
encoding: it must keep reading, and the current writer must keep producing its bytes. Built with numpy from fixed
seeds, so it does not depend on torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from zipmoe.codecs.coders import RansCoder
from zipmoe.codecs.fp8_blocks import quantize_blocks
from zipmoe.formats.reader import Container
from zipmoe.pack import PackOptions, pack

sys.path.insert(0, str(Path(__file__).parent))
from make_golden import write_safetensors  # noqa: E402  (the writer of the versioned fixtures)

HERE = Path(__file__).parent / "fp8"
CHUNK_VALUES = 1024  # several chunks per tensor, with tails
HIDDEN, INTERMEDIATE = 32, 48


def bf16(values: np.ndarray) -> bytes:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()


def source_tensors() -> dict[str, tuple[str, list[int], bytes]]:
    rng = np.random.default_rng(2026)
    tensors: dict[str, tuple[str, list[int], bytes]] = {
        "model.embed_tokens.weight": ("BF16", [40, HIDDEN], bf16(rng.standard_normal((40, HIDDEN)) * 0.02)),
        "model.norm.weight": ("BF16", [HIDDEN], bf16(np.ones(HIDDEN))),
    }
    for layer in range(2):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = (
            "BF16",
            [2, HIDDEN],
            bf16(rng.standard_normal((2, HIDDEN)) * 0.1),
        )
        for expert in range(2):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}"
            for proj, shape in (
                ("gate_proj", [INTERMEDIATE, HIDDEN]),
                ("up_proj", [INTERMEDIATE, HIDDEN]),
                ("down_proj", [HIDDEN, INTERMEDIATE]),
            ):
                q, scale_inv = quantize_blocks(rng.standard_normal(shape) * 0.02)
                if (layer, expert, proj) == (1, 1, "down_proj"):  # every FP8 pattern, NaNs included: stored mode
                    q = rng.integers(0, 256, shape, dtype=np.uint8)
                tensors[f"{prefix}.{proj}.weight"] = ("F8_E4M3", shape, q.tobytes())
                tensors[f"{prefix}.{proj}.weight_scale_inv"] = ("F32", list(scale_inv.shape), scale_inv.tobytes())
        odd, _ = quantize_blocks(rng.standard_normal((7, 9)))  # 63 values: an odd count
        tensors[f"model.layers.{layer}.mlp.experts.0.odd_proj.weight"] = ("F8_E4M3", [7, 9], odd.tobytes())
    return tensors


def write_source(root: Path) -> None:
    root.mkdir(parents=True)
    config = {
        "model_type": "deepseek_v3",
        "n_routed_experts": 2,
        "num_hidden_layers": 2,
        "hidden_size": HIDDEN,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(root / "model.safetensors", source_tensors())


def main() -> int:
    container = HERE / "micro.zmoe"
    if container.exists():
        print(f"{container} exists; golden fixtures are never regenerated in place")
        return 0
    write_source(HERE / "source")
    pack(str(HERE / "source"), container, PackOptions(coder=RansCoder(), chunk_values=CHUNK_VALUES, threads=1))
    with Container(container) as c:
        encodings = [config["id"] for config in c.manifest.encodings]
        assert "fp8-split" in encodings, encodings
    expected = {
        "pack_options": {"coder": "rans", "chunk_values": CHUNK_VALUES},
        "tensor_sha256": {n: hashlib.sha256(raw).hexdigest() for n, (_, _, raw) in source_tensors().items()},
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    print(f"wrote {container}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
