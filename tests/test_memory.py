"""pack's memory grows with the largest tensor, not with the model (so a checkpoint larger than RAM packs)."""

import json
import subprocess
import sys

import pytest

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


MEMORY_PROBE = """
import os, sys
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import SamplingOptions

def rss():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

with Engine(sys.argv[1], EngineOptions(device="cpu", dtype="bfloat16")) as engine:
    scheduler = engine.scheduler()
    scheduler.submit([256, 72, 105], SamplingOptions(max_new_tokens=700, stop_at_eos=False))
    marks, step = [], 0
    while scheduler.step():
        step += 1
        if step in (200, 650):
            marks.append(rss())
print(marks[1] - marks[0])
"""


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek"])
def test_memory_does_not_grow_with_the_tokens_generated(checkpoints, preset):
    """Generating in BF16 on a CPU keeps its memory flat as the sequence grows. oneDNN compiles and caches a BF16
    kernel per new matmul shape, and attention (and MLA's key/value expansion) meet a new shape every token: before
    they ran in float32 there, 500 tokens of the tiny model added ~300 MB."""
    container = checkpoints.packed(checkpoints.demo(preset))
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(container)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 40 << 20
