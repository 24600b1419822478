"""pack: atomic output, re-runs after interruption, every dtype, odd safetensors files, output errors."""

import hashlib
import os

import numpy as np
import pytest

import zipmoe.pack as pack_module
from conftest import bf16_bytes, copy_of, write_safetensors
from zipmoe.errors import CheckpointError, OutputError
from zipmoe.formats.reader import Container
from zipmoe.formats.writer import partial_path
from zipmoe.pack import PackOptions, default_output, pack
from zipmoe.unpack import unpack
from zipmoe.verify import verify


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_pack_leaves_nothing_and_a_rerun_works(checkpoints, tmp_path, monkeypatch):
    source = checkpoints.demo("tiny")
    out = tmp_path / "m.zmoe"
    calls = 0
    real = pack_module.encode_part

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pack_module, "encode_part", failing)
    with pytest.raises(KeyboardInterrupt):
        pack(str(source), out)
    assert not out.exists() and not partial_path(out).exists()
    monkeypatch.setattr(pack_module, "encode_part", real)

    partial_path(out).write_bytes(b"left over by a killed run")  # what SIGKILL would leave
    pack(str(source), out)
    assert verify(out).ok and not partial_path(out).exists()


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "m.zmoe"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists \\(use --force to overwrite it\\)"):
        pack(str(checkpoints.demo("tiny")), out)
    assert out.read_bytes() == b"precious"
    pack(str(checkpoints.demo("tiny")), out, PackOptions(force=True))
    assert verify(out).ok


@pytest.mark.parametrize(
    "make_output, message",
    [
        (lambda tmp: tmp / "missing-dir" / "m.zmoe", "directory .* does not exist"),
        (lambda tmp: (tmp / "file").write_bytes(b"") or tmp / "file" / "m.zmoe", "is not a directory"),
        (lambda tmp: tmp, "it is a directory"),
    ],
)
def test_unwritable_output(checkpoints, tmp_path, make_output, message):
    with pytest.raises(OutputError, match=message):
        pack(str(checkpoints.demo("tiny")), make_output(tmp_path))


def test_default_output_name():
    assert default_output("/data/Mixtral-8x7B/").name == "Mixtral-8x7B.zmoe"
    assert default_output("Qwen/Qwen1.5-MoE-A2.7B@main").name == "Qwen1.5-MoE-A2.7B.zmoe"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda tmp: tmp / "nope", "no such directory, and not a Hub repo id"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no \\*.safetensors files"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "not a directory"),
    ],
)
def test_bad_sources(tmp_path, setup, message):
    with pytest.raises(CheckpointError, match=message):
        pack(str(setup(tmp_path)), tmp_path / "out.zmoe")
    assert not (tmp_path / "out.zmoe").exists()


def test_corrupt_safetensors_header(checkpoints, tmp_path):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    data = bytearray((source / "model.safetensors").read_bytes())
    data[8:10] = b"[["
    (source / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match="model.safetensors: corrupt safetensors header: header is not UTF-8 JSON"
    ):
        pack(str(source), tmp_path / "out.zmoe")


def test_every_dtype_and_holes_roundtrip_byte_identical(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "odd"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "olmoe", "num_experts": 2, "num_hidden_layers": 1}')
    tensors = {
        "model.layers.0.mlp.experts.0.up_proj.weight": ("BF16", [8, 16], bf16_bytes((8, 16), 1)),
        "model.layers.0.mlp.experts.1.up_proj.weight": ("F8_E4M3", [8, 16], rng.bytes(128)),
        "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv": ("F32", [1], rng.bytes(4)),
        "model.norm.weight": ("F32", [16], rng.bytes(64)),
        "model.position_ids": ("I64", [5], rng.bytes(40)),
        "model.half": ("F16", [3, 3], rng.bytes(18)),
        "model.flags": ("BOOL", [7], bytes([0, 1, 1, 0, 1, 0, 0])),
        "model.empty": ("BF16", [0, 4], b""),
        "model.nan_inf": ("BF16", [6], np.array([0x7FC1, 0xFF80, 0x7F80, 0x8000, 0x0001, 0x8001], "<u2").tobytes()),
    }
    write_safetensors(
        source / "model.safetensors",
        tensors,
        metadata={"format": "pt", "note": "holes"},
        data_prefix=b"\x07" * 3,
        data_suffix=b"tail",
    )
    out = tmp_path / "odd.zmoe"
    pack(str(source), out)
    with Container(out) as c:
        assert {t.name: t.tensor_class for t in c.manifest.tensors if t.tensor_class == "expert"} == {
            "model.layers.0.mlp.experts.0.up_proj.weight": "expert",
            "model.layers.0.mlp.experts.1.up_proj.weight": "expert",
            "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv": "expert",
        }
        assert len(c.manifest.experts) == 2
        for name, (_, _, raw) in tensors.items():
            assert c.read_tensor(name).tobytes() == raw
    report = verify(out, str(source))
    assert report.ok, report.failures
    unpack(out, tmp_path / "back")
    assert sha(tmp_path / "back" / "model.safetensors") == sha(source / "model.safetensors")
    assert sha(tmp_path / "back" / "config.json") == sha(source / "config.json")


def test_unknown_architecture_packs_dense_with_a_warning(tmp_path):
    source = tmp_path / "llama"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "llama"}')
    write_safetensors(
        source / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": ("BF16", [4, 4], bf16_bytes((4, 4)))}
    )
    warnings = []
    result = pack(str(source), tmp_path / "l.zmoe", warn=warnings.append)
    assert result.family is None and result.n_expert_records == 0
    assert "unknown architecture 'llama'" in warnings[0]


@pytest.mark.parametrize("coder", ["zstd:3", "lz4", "lz4hc:9"])
def test_other_coders(checkpoints, tmp_path, coder):
    from zipmoe.codecs.coders import parse_coder

    out = tmp_path / "c.zmoe"
    pack(str(checkpoints.demo("tiny")), out, PackOptions(coder=parse_coder(coder), chunk_values=8192))
    assert verify(out, str(checkpoints.demo("tiny"))).ok


def test_duplicate_tensor_across_files(tmp_path):
    source = tmp_path / "dup"
    source.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        write_safetensors(source / name, {"w": ("BF16", [2], bf16_bytes((2,)))})
    with pytest.raises(CheckpointError, match="tensor 'w' is in both a.safetensors and b.safetensors"):
        pack(str(source), tmp_path / "d.zmoe")


def test_index_listing_a_missing_shard(checkpoints, tmp_path):
    source = copy_of(checkpoints.family("mixtral", max_shard_size="100KB"), tmp_path)
    shard = sorted(source.glob("model-*.safetensors"))[-1]
    os.remove(shard)
    with pytest.raises(CheckpointError, match="lists 1 missing file"):
        pack(str(source), tmp_path / "s.zmoe")
