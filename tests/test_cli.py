"""The command line: results on stdout, one-line errors on stderr with exit status 1, never a traceback."""

import hashlib
import json

import pytest

from conftest import assert_one_line_error, copy_of, run_cli
from zipmoe.formats.reader import Container


def test_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("zipmoe ")


def test_pack_verify_inspect_unpack(capsys, checkpoints, tmp_path):
    source = checkpoints.demo("tiny")
    out = tmp_path / "m.zmoe"
    code, stdout, _ = run_cli(capsys, "pack", str(source), "-o", str(out), "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert (
        doc["expert_records"] == 8
        and doc["verified"]
        and 0.6 < doc["classes"]["expert"]["stored_bytes"] / doc["classes"]["expert"]["source_bytes"] < 0.7
    )

    code, stdout, _ = run_cli(capsys, "verify", str(out), "--source", str(source))
    assert code == 0 and stdout.startswith("OK ")

    code, stdout, _ = run_cli(capsys, "inspect", str(out), "--json", "--tensors")
    doc = json.loads(stdout)
    assert code == 0 and doc["n_expert_records"] == 8 and len(doc["tensors"]) == doc["n_tensors"]
    expert = next(s for s in doc["sections"] if s["name"] == "expert tensors (BF16)")
    assert expert["entropy_bound"] < expert["ratio"] < expert["entropy_bound"] + 0.01
    with Container(out) as c:
        manifest = out.read_bytes()[c.header.manifest_offset :]
    assert doc["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()

    code, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert code == 0 and "expert tensors (BF16)" in stdout and "bound (8+H)/16" in stdout
    assert f"manifest  sha256 {doc['manifest_sha256']}" in stdout

    code, stdout, _ = run_cli(capsys, "unpack", str(out), "-o", str(tmp_path / "back"))
    assert code == 0 and "SHA-256 equal" in stdout
    code, _, err = run_cli(capsys, "unpack", str(out), "-o", str(tmp_path / "back"))
    assert_one_line_error(code, err, "exists (use --force to overwrite)")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["pack", "/no/such/dir"], ["no such directory"]),
        (["pack", "{tmp}"], ["no *.safetensors files"]),
        (["pack", "{tiny}", "-o", "{tmp}/missing/x.zmoe"], ["does not exist"]),
        (["pack", "{tiny}", "--coder", "brotli", "-o", "{tmp}/x.zmoe"], ["unknown exponent coder 'brotli'"]),
        (
            ["pack", "{tiny}", "--chunk-values", "100", "-o", "{tmp}/x.zmoe"],
            ["--chunk-values must be a multiple of 64"],
        ),
        (["verify", "{tmp}/absent.zmoe"], ["no such file"]),
        (["inspect", "{tiny}/config.json"], ["not a zipmoe container"]),
        (["demo-checkpoint", "{tiny}"], ["is not empty"]),
    ],
)
def test_bad_input(capsys, checkpoints, tmp_path, args, fragments):
    tiny = checkpoints.demo("tiny")
    args = [a.format(tmp=tmp_path, tiny=tiny) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *fragments)


def test_verify_reports_corruption_and_exits_1(capsys, checkpoints, tmp_path):
    packed = copy_of(checkpoints.packed(checkpoints.demo("tiny")), tmp_path)
    with Container(packed) as c:
        tensor = next(t for t in c.manifest.tensors if t.tensor_class == "expert")
        offset = tensor.parts[0].offset + tensor.parts[0].nbytes - 20
    data = bytearray(packed.read_bytes())
    data[offset] ^= 0x20
    packed.write_bytes(bytes(data))
    code, stdout, err = run_cli(capsys, "verify", str(packed))
    assert code == 1
    assert f"FAIL tensor {tensor.name!r}: chunk 0 exponent payload: checksum mismatch" in stdout
    assert "1 problem(s) found" in err and "Traceback" not in err

    code, _, err = run_cli(capsys, "unpack", str(packed), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, tensor.name, "checksum mismatch", "file offset")


def test_truncated_and_wrong_magic(capsys, checkpoints, tmp_path):
    packed = copy_of(checkpoints.packed(checkpoints.demo("tiny")), tmp_path)
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "verify", str(packed))
    assert_one_line_error(code, err, "truncated", f"the file is {len(data) // 2} bytes, its header says {len(data)}")
    packed.write_bytes(b"GGUF" + data[4:])
    code, _, err = run_cli(capsys, "inspect", str(packed))
    assert_one_line_error(code, err, "not a zipmoe container (bad magic")


def test_bench_codecs_json(capsys, checkpoints):
    code, stdout, _ = run_cli(
        capsys, "bench", "codecs", str(checkpoints.demo("tiny")), "--coders", "rans,zstd:1",
        "--chunk-values", "4096,16384", "--repeat", "1", "--threads", "2", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    doc = json.loads(stdout)
    methods = [(r["method"], r["chunk_values"]) for r in doc["rows"]]
    assert ("rans", 4096) in methods and ("zstd-1", 65536) in methods and ("zipnn", None) in methods
    assert doc["threads"] == [1, 2]
    rans = next(r for r in doc["rows"] if r["method"] == "rans" and r["chunk_values"] == 16384)
    assert doc["entropy_bound"] < rans["ratio"] < doc["entropy_bound"] + 0.02
    assert set(rans["decode_gbps"]) == {"1", "2"}


def test_bench_pack_json(capsys, checkpoints):
    code, stdout, _ = run_cli(capsys, "bench", "pack", str(checkpoints.demo("tiny")), "--repeat", "1", "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["pack_mbps"] > 0 and doc["peak_rss_bytes"] > doc["baseline_rss_bytes"] > 0


def test_bench_run_json(capsys, checkpoints, tmp_path):
    """Every configuration in a fresh process, on a copy of the tiny checkpoint (the bench packs beside it)."""
    import shutil

    source = tmp_path / "tiny"
    shutil.copytree(checkpoints.demo("tiny"), source)
    code, stdout, err = run_cli(
        capsys, "bench", "run", str(source), "--budgets", "90", "--storage", "2", "--prompt-tokens", "6",
        "--new-tokens", "3", "--threads", "1", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(stdout)}
    assert {"full", "full, router", "uncompressed", "zipmoe", "zipmoe, router", "zipmoe, all hits"} <= set(rows)
    for method in ("uncompressed", "zipmoe", "zipmoe, router", "zipmoe, all hits"):  # the tokens of the full model
        assert rows[method]["tokens_match_full"], method
    zipmoe, uncompressed = rows["zipmoe"], rows["uncompressed"]
    assert zipmoe["storage_gbps"] == 2 and zipmoe["budget_percent"] == 90 and uncompressed["config"]
    assert 0 < zipmoe["bytes_read"] < uncompressed["bytes_read"]  # same misses or fewer, smaller records
    assert zipmoe["tpot_seconds"] > 0 and zipmoe["ttft_seconds"] > 0


def test_bench_cache_json(capsys, checkpoints, tmp_path):
    import shutil

    source = tmp_path / "tiny"
    shutil.copytree(checkpoints.demo("tiny"), source)
    code, stdout, err = run_cli(
        capsys, "bench", "cache", str(source), "--budgets", "90", "--new-tokens", "2", "--threads", "1", "--json",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(stdout)
    assert [r["method"] for r in rows] == ["fifo", "lru", "lfu", "planned", "planned+affinity"]
    assert len({tuple(r["tokens"]) for r in rows}) == 1  # every policy computes the same tokens
    assert all(sum(r["served_rate"].values()) == pytest.approx(1.0) for r in rows)
    assert rows[3]["predicted_tpot_seconds"] > 0 and rows[0]["predicted_tpot_seconds"] is None


@pytest.mark.parametrize("args", [[], ["pack"], ["pack", "--bogus", "x"], ["verify"]])
def test_usage_errors_are_usage_lines_not_tracebacks(capsys, args):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert "Traceback" not in err and "Usage: zipmoe" in out + err
