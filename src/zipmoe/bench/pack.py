"""`zipmoe bench pack`: pack throughput and peak memory, in child processes, against reading the same files.

The baseline is a plain sequential read of the checkpoint's safetensors files (page cache), measured in the same
run. Throughput is measured twice: warm (the child first loads zipmoe's compiled kernels, then packs: what a large
checkpoint sees) and cold (``zipmoe pack`` end to end, interpreter start and kernel loading included). Peak memory
is the warm child's high-water mark minus that of a child that only imports zipmoe and runs its kernels once, and
is compared with the largest tensor of the checkpoint: pack's memory grows with the largest tensor, not the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zipmoe.errors import ZipmoeError
from zipmoe.formats.checkpoint import Checkpoint

# Imports what pack imports and runs its kernels once on a small buffer (loading the compiled code).
_WARM_UP = (
    "import json, sys; import zipmoe.cli.app; from zipmoe.codecs.parts import warm_up;"
    "from zipmoe._memory import peak_rss_bytes; warm_up();"
)
_BASELINE_RSS = _WARM_UP + "print(peak_rss_bytes())"
# Warm up, then pack sys.argv[1] into sys.argv[2] with sys.argv[3] threads (0: all) and report.
_WARM_PACK = _WARM_UP + (
    "from pathlib import Path; from zipmoe.pack import PackOptions, pack;"
    "r = pack(sys.argv[1], Path(sys.argv[2]), PackOptions(threads=int(sys.argv[3]) or None, force=True));"
    "print(json.dumps({'seconds': r.seconds, 'source_bytes': r.source_bytes, 'container_bytes': r.container_bytes,"
    " 'peak_rss_bytes': peak_rss_bytes()}))"
)


@dataclass(frozen=True)
class PackBenchReport:
    checkpoint: str
    source_bytes: int
    largest_tensor_bytes: int
    read_seconds: float
    pack_seconds: float
    cold_seconds: float
    container_bytes: int
    peak_rss_bytes: int
    baseline_rss_bytes: int
    threads: int | None

    @property
    def pack_mbps(self) -> float:
        return self.source_bytes / self.pack_seconds / 1e6

    @property
    def cold_mbps(self) -> float:
        return self.source_bytes / self.cold_seconds / 1e6

    @property
    def read_mbps(self) -> float:
        return self.source_bytes / self.read_seconds / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "source_bytes": self.source_bytes,
            "largest_tensor_bytes": self.largest_tensor_bytes,
            "read_seconds": self.read_seconds,
            "read_mbps": self.read_mbps,
            "pack_seconds": self.pack_seconds,
            "pack_mbps": self.pack_mbps,
            "cold_seconds": self.cold_seconds,
            "cold_mbps": self.cold_mbps,
            "container_bytes": self.container_bytes,
            "ratio": self.container_bytes / self.source_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "pack_memory_bytes": self.peak_rss_bytes - self.baseline_rss_bytes,
            "threads": self.threads,
        }


def _read_all(checkpoint: Checkpoint) -> float:
    buf = bytearray(8 << 20)
    start = time.perf_counter()
    for f in checkpoint.files:
        with open(f.path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def _child(args: list[str]) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ZipmoeError(
            f"benchmark child failed: {result.stderr.strip().splitlines()[-1] if result.stderr else result.returncode}"
        )
    return result.stdout


def run_pack_bench(
    checkpoint: Checkpoint,
    source: str,
    *,
    threads: int | None = None,
    repeat: int = 2,
    on_step: Callable[[str], None] | None = None,
) -> PackBenchReport:
    """Pack ``source`` ``repeat`` times warm and cold in child processes (best kept), and read it as the baseline.

    ``on_step`` is called with a short description before each step (for progress display).
    """
    note = on_step or (lambda s: None)
    note("reading the safetensors files (baseline)")
    _read_all(checkpoint)  # warm the page cache, as pack's first read would
    read_seconds = min(_read_all(checkpoint) for _ in range(repeat))
    note("measuring the memory of a child that only loads zipmoe")
    baseline_rss = int(_child(["-c", _BASELINE_RSS]).strip())
    best: dict[str, Any] | None = None
    cold = float("inf")
    with tempfile.TemporaryDirectory(prefix="zipmoe-bench-") as tmp:
        out = Path(tmp) / "bench.zmoe"
        cli = ["-m", "zipmoe", "pack", source, "-o", str(out), "--force", "--quiet"] + (
            ["--threads", str(threads)] if threads else []
        )
        for i in range(repeat):
            note(f"packing, round {i + 1}/{repeat}: kernels loaded, then zipmoe pack end to end")
            result = json.loads(_child(["-c", _WARM_PACK, source, str(out), str(threads or 0)]))
            if best is None or result["seconds"] < best["seconds"]:
                best = result
            start = time.perf_counter()
            _child(cli)
            cold = min(cold, time.perf_counter() - start)
    assert best is not None
    return PackBenchReport(
        checkpoint=checkpoint.source.describe(),
        source_bytes=best["source_bytes"],
        largest_tensor_bytes=max(t.nbytes for _, t in checkpoint.tensors.values()),
        read_seconds=read_seconds,
        pack_seconds=best["seconds"],
        cold_seconds=cold,
        container_bytes=best["container_bytes"],
        peak_rss_bytes=best["peak_rss_bytes"],
        baseline_rss_bytes=baseline_rss,
        threads=threads,
    )
