"""`zipmoe bench serve`: the load generator's arithmetic, and one small run against a live server."""

import json

import pytest

from conftest import run_cli
from zipmoe.bench.serve_load import LevelResult, parse_metrics, percentile, prompt_text


def test_percentile_interpolates_like_numpy():
    import numpy as np

    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.5]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) == 0.0


def test_parse_metrics_reads_labelled_and_plain_samples():
    text = """# HELP zipmoe_requests_total HTTP requests.
# TYPE zipmoe_requests_total counter
zipmoe_requests_total{endpoint="/v1/completions",status="200"} 12
zipmoe_storage_read_bytes_total 1.5e+09
zipmoe_expert_uses_total{source="decoded"} 40
"""
    metrics = parse_metrics(text)
    assert metrics['zipmoe_requests_total{endpoint="/v1/completions",status="200"}'] == 12
    assert metrics["zipmoe_storage_read_bytes_total"] == 1.5e9
    assert len(metrics) == 3


def test_level_result_ratios():
    r = LevelResult(streams=2, requests=4, completion_tokens=64, wall_seconds=2.0, ttft=[0.1, 0.3], tpot=[0.02],
                    bytes_read=6400.0)  # fmt: skip
    doc = r.to_json()
    assert doc["tokens_per_second"] == 32 and doc["bytes_read_per_token"] == 100
    assert doc["ttft_p50"] == pytest.approx(0.2)


def test_prompts_are_distinct_and_sized():
    assert len(prompt_text(3, 1, 32)) == 32
    assert prompt_text(0, 0, 40) != prompt_text(1, 0, 40)


def test_bad_streams_is_one_line_error(capsys):
    code, _, err = run_cli(capsys, "bench", "serve", "--streams", "1,x")
    assert code == 1 and "--streams" in err and "Traceback" not in err


def test_bench_serve_runs_against_a_live_server(checkpoints, capsys):
    """Two levels on the tiny demo checkpoint: every request generates exactly max_tokens (ignore_eos), and the
    batch at 2 streams holds more than one sequence on average."""
    source = checkpoints.demo("tiny")
    code, out, err = run_cli(capsys, "bench", "serve", str(source), "--streams", "1,2", "--requests", "1", "-n", "6",
                             "--prompt-tokens", "8", "--storage", "0", "--device", "cpu", "--json", "-q")  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["page cache"]
    assert [r["streams"] for r in rows] == [1, 2]
    assert [r["completion_tokens"] for r in rows] == [6, 12]
    assert rows[1]["mean_batch"] > 1
    assert all(r["tokens_per_second"] > 0 and r["ttft_p50"] > 0 for r in rows)
