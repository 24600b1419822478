"""pack's memory grows with the largest tensor, not with the model (so a checkpoint larger than RAM packs)."""

import json
import subprocess
import sys

from conftest import bf16_bytes, write_safetensors

TENSOR = bf16_bytes((1024, 1024))  # 2 MB


def checkpoint(tmp_path, name, n_tensors):
    root = tmp_path / name
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 4}')
    tensors = {
        f"model.layers.{i // 12}.block_sparse_moe.experts.{(i // 3) % 4}.w{i % 3 + 1}.weight": (
            "BF16",
            [1024, 1024],
            TENSOR,
        )
        for i in range(n_tensors)
    }
    write_safetensors(root / "model.safetensors", tensors)
    return root


def peak_rss(source, out):
    result = subprocess.run(
        [sys.executable, "-m", "zipmoe", "pack", str(source), "-o", str(out), "--json", "--quiet", "--threads", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["peak_rss_bytes"]


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    small = peak_rss(checkpoint(tmp_path, "small", 12), tmp_path / "small.zmoe")  # 24 MB of weights
    large = peak_rss(checkpoint(tmp_path, "large", 96), tmp_path / "large.zmoe")  # 192 MB of weights
    assert large - small < 24 << 20, (small, large)
