"""`scripts/attack_server.py --quick`, the hostile-input campaign against `zipmoe serve`, in a subprocess: every one of
its ~30 cases (bad JSON and parameters, the context limit, unknown paths, malformed HTTP, a slowloris client,
clients that vanish, wrong keys, a burst past the queue) ends as a clean refusal or an accepted answer, with the
server alive, answering /health, and no traceback in its log (exit status 0). About 15 s on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attack_server.py"

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("httpx")


def test_quick_campaign_against_the_server_is_clean(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ZIPMOE_DEBUG", "ZIPMOE_API_KEY")}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", "--golden", str(tmp_path / "golden")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(result.stdout)
    total = summary["total"]
    assert total["tried"] >= 25
    assert total["tried"] == total["clean"] + total["accepted"], summary["failures"]
    assert set(summary["families"]) == {"json", "params", "context", "http", "auth", "load"}
    assert all(family["tried"] for family in summary["families"].values())
    assert summary["server"]["key"]["starts"] == 1  # never restarted: no crash, hang or memory kill
