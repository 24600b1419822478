"""Lossless FP8 E4M3: the fp8-split planes and encoding, pack/verify/unpack of FP8 checkpoints, DeepSeek-style block
quantization, the runtime's dequantization, and the FP8 codec benchmark."""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import assert_one_line_error, bf16_bytes, copy_of, rewrite_manifest, run_cli, write_safetensors
from zipmoe._threads import Workers
from zipmoe.codecs import fp8, fp8_reference
from zipmoe.codecs.checksum import xxh64
from zipmoe.codecs.coders import RansCoder, parse_coder
from zipmoe.codecs.fp8_blocks import dequantize_blocks, e4m3_to_float32, float32_to_e4m3, quantize_blocks
from zipmoe.codecs.parts import (
    DIRECTORY_ENTRY,
    Bf16Split,
    Fp8Split,
    PartView,
    check_part,
    decode_part,
    decode_parts,
    encode_part,
    encoding_from_config,
    pad8,
    size_problem,
)
from zipmoe.errors import ChecksumError, FormatError, ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.pack import PackOptions, pack
from zipmoe.runtime.fp8 import dequantize_fp8_blocks, fold_fp8_scales, fp8_block_size
from zipmoe.unpack import unpack
from zipmoe.verify import verify

WORKERS = Workers(2)
ALL_PATTERNS = np.arange(256, dtype=np.uint8)  # +-0, subnormals, 448, both NaNs


def fp8_weights(shape, seed=0, std=0.02) -> np.ndarray:
    """FP8 bytes of random weights block-quantized as DeepSeek-V3's (flat uint8)."""
    rng = np.random.default_rng(seed)
    q, _ = quantize_blocks(rng.standard_normal(shape) * std)
    return q.reshape(-1)


def roundtrip(encoding, data, file_offset=4096):
    part = encode_part(encoding, data, WORKERS)
    view = PartView(encoding, 0, part.data.size, data.size, part.n_chunks, part.directory_xxh64, file_offset)
    out = np.empty(data.size, np.uint8)
    decode_part(part.data, view, out, WORKERS)
    assert np.array_equal(out, data)
    assert check_part(part.data, view, WORKERS) == []
    return part, view


# -- planes -----------------------------------------------------------------------------------------------------


def kernel_planes(values):
    words = np.empty(values.size, np.uint16)
    plane = np.empty((values.size + 1) // 2, np.uint8)
    fp8.exponent_words(values, words)
    fp8.pack_sign_mantissa(values, plane)
    return words, plane


@pytest.mark.parametrize("values", [ALL_PATTERNS, ALL_PATTERNS[:255], ALL_PATTERNS[::-1], ALL_PATTERNS[:1]])
def test_kernels_match_the_numpy_reference_and_invert_exactly(values):
    values = np.ascontiguousarray(values)
    words, plane = kernel_planes(values)
    ref_plane, ref_exponents = fp8_reference.split_fp8(values)
    assert np.array_equal(plane, ref_plane)
    assert np.array_equal(words, ref_exponents.astype(np.uint16) << 7)
    out = np.empty_like(values)
    assert not fp8.merge_fp8(words, plane, out)
    assert np.array_equal(out, values)
    assert np.array_equal(fp8_reference.merge_fp8(ref_exponents, ref_plane, values.size), values)


def test_planes_hold_the_documented_bits():
    # 0x38 is 1.0 (exponent 7), 0xC4 is -3.0 (sign, exponent 8, mantissa 4), 0x7F is NaN, 0x01 the least subnormal.
    words, plane = kernel_planes(np.array([0x38, 0xC4, 0x7F, 0x01, 0xFE], np.uint8))
    assert (words >> 7).tolist() == [7, 8, 15, 0, 15]
    assert plane.tolist() == [0x0 | 0xC << 4, 0x7 | 0x1 << 4, 0xE]  # low nibble first; last high nibble zero


def test_merge_rejects_words_outside_the_exponent_field():
    out = np.empty(2, np.uint8)
    assert fp8.merge_fp8(np.array([16 << 7, 0], np.uint16), np.zeros(1, np.uint8), out)
    assert fp8.merge_fp8(np.array([0, 1], np.uint16), np.zeros(1, np.uint8), out)


@given(arrays(np.uint8, st.integers(0, 3000)))
def test_planes_roundtrip_property(values):
    words, plane = kernel_planes(values)
    out = np.empty_like(values)
    assert not fp8.merge_fp8(words, plane, out)
    assert np.array_equal(out, values)
    assert np.array_equal(plane, fp8_reference.split_fp8(values)[0])


# -- the encoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coder", ["rans", "zstd:3", "lz4", "lz4hc:9"])
@pytest.mark.parametrize("n_values", [0, 1, 63, 64, 1024, 1025, 5001])
def test_fp8_roundtrip(coder, n_values):
    data = fp8_weights((1, n_values), seed=n_values)
    part, _ = roundtrip(Fp8Split(parse_coder(coder), 1024), data)
    assert part.n_chunks == -(-n_values // 1024)


@pytest.mark.parametrize("coder", ["rans", "zstd:3"])
def test_every_pattern_roundtrips_in_every_position(coder):
    data = np.tile(ALL_PATTERNS, 40)[:10_001]  # near-uniform: rans stores these chunks verbatim
    roundtrip(Fp8Split(parse_coder(coder), 1024), data)
    np.random.default_rng(0).shuffle(data)
    roundtrip(Fp8Split(parse_coder(coder), 1024), data)


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.integers(0, 3000)), st.sampled_from([64, 128, 1024]))
def test_fp8_part_roundtrip_property(values, chunk_values):
    roundtrip(Fp8Split(RansCoder(), chunk_values), values)


def test_fp8_layout_is_as_documented():
    data = fp8_weights((1, 2500))
    part = encode_part(Fp8Split(RansCoder(), 1024), data, WORKERS)
    directory = part.data[: 3 * DIRECTORY_ENTRY.itemsize].view(DIRECTORY_ENTRY)
    plane_start = directory.nbytes
    plane, exponents = fp8_reference.split_fp8(data)
    assert bytes(part.data[plane_start : plane_start + plane.size]) == plane.tobytes()
    assert not part.data[plane_start + plane.size : plane_start + pad8(plane.size)].any()
    position = plane_start + pad8(plane.size)
    for c, entry in enumerate(directory):
        chunk_plane = plane[c * 512 : c * 512 + (min(2500 - c * 1024, 1024) + 1) // 2]
        assert int(entry["plain_xxh64"]) == xxh64(chunk_plane, 0, chunk_plane.size)
        size = int(entry["payload_nbytes"])
        assert int(entry["payload_xxh64"]) == xxh64(part.data, position, position + size)
        position += pad8(size)
    assert position == part.data.size
    # The payloads are those a BF16 chunk with the same exponent bytes gets: the same coder, unchanged.
    bf16 = encode_part(Bf16Split(RansCoder(), 1024), (exponents.astype(np.uint16) << 7).view(np.uint8), WORKERS)
    bf16_payloads = bf16.data[3 * DIRECTORY_ENTRY.itemsize + pad8(2500) :]
    assert bytes(bf16_payloads) == bytes(part.data[plane_start + pad8(plane.size) :])


def test_block_quantized_weights_shrink_to_near_the_entropy_bound():
    data = fp8_weights((256, 512))
    part = encode_part(Fp8Split(), data, WORKERS)
    counts = np.zeros(16, np.int64)
    fp8.exponent_histogram(data, counts)
    p = counts[counts > 0] / counts.sum()
    bound = (4 - (p * np.log2(p)).sum()) / 8  # two nibbles per byte; a byte per value would exceed the FP8 bytes
    assert bound < part.data.size / data.size < bound + 0.01 < 0.85


def test_encoding_configs():
    encoding = Fp8Split(parse_coder("zstd:5"), 2048)
    assert encoding.get_config() == {
        "id": "fp8-split",
        "exponent_coder": {"id": "zstd", "level": 5},
        "chunk_values": 2048,
    }
    assert encoding_from_config(encoding.get_config()) == encoding
    assert encoding != Bf16Split(parse_coder("zstd:5"), 2048)
    with pytest.raises(FormatError, match="fp8-split encoding: expected keys"):
        encoding_from_config({**encoding.get_config(), "extra": 1})


def test_sizes_must_match():
    assert size_problem(Fp8Split(), 24 + 8, 9, 1) is None
    assert "cannot hold 17 bytes of FP8" in size_problem(Fp8Split(), 24 + 8, 17, 1)
    assert "2 chunks recorded, 1 expected" in size_problem(Fp8Split(RansCoder(), 64), 100, 64, 2)
    assert "cannot hold" in size_problem(Fp8Split(), 1000, 9, 1, plane_apart=True)
    part = encode_part(Fp8Split(RansCoder(), 64), fp8_weights((1, 300)), WORKERS)
    for n_chunks, nbytes, message in ((4, part.data.size, "chunks recorded"), (5, part.data.size + 8, "describes")):
        view = PartView(Fp8Split(RansCoder(), 64), 0, nbytes, 300, n_chunks, part.directory_xxh64, 0)
        with pytest.raises(FormatError, match=message):
            decode_part(np.concatenate([part.data, np.zeros(8, np.uint8)]), view, np.empty(300, np.uint8), WORKERS)


def test_checksums_name_the_chunk_and_the_stream():
    data = fp8_weights((1, 3000))
    part, view = roundtrip(Fp8Split(RansCoder(), 1024), data)
    plane_start = part.n_chunks * DIRECTORY_ENTRY.itemsize
    payloads = plane_start + pad8((data.size + 1) // 2)
    for offset, stream, chunk in (
        (plane_start + 600, "sign-mantissa bytes", 1),
        (payloads + 10, "exponent payload", 0),
    ):
        bad = part.data.copy()
        bad[offset] ^= 0x10
        failures = check_part(bad, view, WORKERS)
        assert [(f.chunk, f.stream) for f in failures] == [(chunk, stream)]
        with pytest.raises(ChecksumError, match=f"w: chunk {chunk} {stream}: checksum mismatch"):
            decode_parts([(bad, view, np.empty(data.size, np.uint8), "w")], WORKERS)


def test_a_symbol_above_15_is_refused_even_with_valid_checksums():
    # A chunk of BF16 exponents 0..31 coded by rans, passed off as an fp8-split part with correct checksums.
    n = 1024
    exponents = np.arange(n) % 32
    part = encode_part(Bf16Split(RansCoder(), n), (exponents.astype(np.uint16) << 7).view(np.uint8), WORKERS)
    payload = part.data[DIRECTORY_ENTRY.itemsize + n :]
    plane = np.zeros(n // 2, np.uint8)
    directory = np.zeros(1, DIRECTORY_ENTRY)
    size = int(part.data[: DIRECTORY_ENTRY.itemsize].view(DIRECTORY_ENTRY)["payload_nbytes"][0])
    directory["payload_nbytes"] = size
    directory["payload_xxh64"] = xxh64(payload, 0, size)
    directory["plain_xxh64"] = xxh64(plane, 0, plane.size)
    blob = np.concatenate([directory.view(np.uint8), plane, payload])
    for coder in (RansCoder(),):
        encoding = Fp8Split(coder, n)
        view = PartView(encoding, 0, blob.size, n, 1, xxh64(blob, 0, DIRECTORY_ENTRY.itemsize), 0)
        with pytest.raises(ChecksumError, match="chunk 0 exponent payload: an exponent symbol above 15"):
            decode_part(blob, view, np.empty(n, np.uint8), WORKERS)


def test_the_unused_nibble_of_an_odd_count_must_be_zero():
    data = fp8_weights((1, 101))
    part, view = roundtrip(Fp8Split(RansCoder(), 64), data)
    bad = part.data.copy()
    last = part.n_chunks * DIRECTORY_ENTRY.itemsize + 50
    bad[last] |= 0x30
    stream = {f.stream for f in check_part(bad, view, WORKERS)}
    assert "padding" in stream


def test_fp8_parts_are_never_widened():
    data = fp8_weights((1, 100))
    part, view = roundtrip(Fp8Split(RansCoder(), 64), data)
    with pytest.raises(FormatError, match="cannot be widened"):
        decode_parts([(part.data, view, np.empty(200, np.uint8), "w")], WORKERS, widen=True)


# -- block quantization -----------------------------------------------------------------------------------------


def test_float32_to_e4m3_matches_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    finite = e4m3_to_float32(ALL_PATTERNS)
    finite = finite[np.isfinite(finite)]
    midpoints = (np.sort(finite)[1:] + np.sort(finite)[:-1]) / 2  # every tie
    x = np.concatenate([rng.standard_normal(50_000) * 50, finite, midpoints, [0.0, -0.0, 2.0**-10, -(2.0**-10)]])
    x = np.clip(x, -448, 448).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(float32_to_e4m3(x), expected)
    as_torch = torch.from_numpy(ALL_PATTERNS.copy()).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(e4m3_to_float32(ALL_PATTERNS), as_torch, equal_nan=True)


def test_block_quantization_is_deepseeks():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((300, 200)) * 0.02).astype(np.float32)
    w[:128, :128] *= 10  # blocks of different ranges
    q, scale_inv = quantize_blocks(w)
    assert q.shape == (300, 200) and scale_inv.shape == (3, 2) and scale_inv.dtype == np.float32
    assert scale_inv[0, 0] == np.float32(np.abs(w[:128, :128]).max() / np.float32(448))
    assert e4m3_to_float32(q).max() <= 448 and np.abs(e4m3_to_float32(q[:128, :128])).max() == 448
    # Within half a unit in the last place: 1/16 relative for normal values, 2^-10 of the block scale for subnormals.
    scales = np.repeat(np.repeat(scale_inv, 128, axis=0), 128, axis=1)[:300, :200]
    error = np.abs(dequantize_blocks(q, scale_inv) - w)
    assert (error <= (np.abs(w) / 16 + scales * 2.0**-10) * 1.001).all()
    with pytest.raises(ZipmoeError, match="finite 2-D"):
        quantize_blocks(np.array([[np.inf]]))


def test_runtime_dequantization_equals_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q, scale_inv = quantize_blocks(np.random.default_rng(2).standard_normal((256, 384)) * 0.02)
    for dtype in (torch.float32, torch.bfloat16):
        expected = Fp8Dequantize(None)._dequantize_one(
            torch.from_numpy(q).view(torch.float8_e4m3fn), torch.from_numpy(scale_inv), dtype
        )
        got = dequantize_fp8_blocks(q.reshape(-1), scale_inv.view(np.uint8).reshape(-1), (256, 384), dtype)
        assert got.dtype == dtype and torch.equal(got, expected)
    ragged_q, ragged_scales = quantize_blocks(np.random.default_rng(3).standard_normal((130, 70)))
    got = dequantize_fp8_blocks(torch.from_numpy(ragged_q), ragged_scales, (130, 70), torch.float32)
    assert torch.equal(got, torch.from_numpy(dequantize_blocks(ragged_q, ragged_scales)))


@pytest.mark.parametrize(
    "fp8_values, scales, shape, message",
    [
        (np.zeros(10, np.uint8), np.ones((1, 1), np.float32), (3, 3), "expected 9 float8_e4m3fn values"),
        (np.zeros(9, np.uint8), np.ones((2, 1), np.float32), (3, 3), "expected float32 weight_scale_inv"),
        (np.zeros(9, np.uint8), np.ones((1, 1), np.float64), (3, 3), "expected float32 weight_scale_inv"),
        (np.zeros(9, np.uint8), np.ones((1, 1), np.float32), (9,), "2-D shape"),
    ],
)
def test_runtime_dequantization_refuses_bad_sizes(fp8_values, scales, shape, message):
    with pytest.raises(FormatError, match=message):
        dequantize_fp8_blocks(fp8_values, scales, shape, torch.float32)


def test_fold_fp8_scales_dequantizes_each_weight_in_place():
    q, scale_inv = quantize_blocks(np.random.default_rng(4).standard_normal((130, 64)))
    fp8_weight = torch.from_numpy(q).view(torch.float8_e4m3fn)
    bias = torch.ones(3)
    members = [
        ("mlp.experts.0.gate_proj.weight", fp8_weight),
        ("mlp.experts.0.gate_proj.weight_scale_inv", torch.from_numpy(scale_inv)),
        ("mlp.experts.0.bias", bias),
    ]
    folded = fold_fp8_scales(members, torch.bfloat16)
    assert [name for name, _ in folded] == ["mlp.experts.0.gate_proj.weight", "mlp.experts.0.bias"]
    expected = torch.from_numpy(dequantize_blocks(q, scale_inv)).to(torch.bfloat16)
    assert torch.equal(folded[0][1], expected) and folded[1][1] is bias
    with pytest.raises(FormatError, match="an FP8 weight without its"):
        fold_fp8_scales(members[:1], torch.float32)
    with pytest.raises(FormatError, match="a block scale without an FP8 weight"):
        fold_fp8_scales(members[1:], torch.float32)


@pytest.mark.parametrize(
    "quant, expected",
    [
        (None, None),
        ({"quant_method": "bitsandbytes"}, None),
        ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, 128),
        ({"quant_method": "fp8"}, 128),
        ({"quant_method": "fp8", "weight_block_size": [128, 64]}, "square weight blocks"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "square weight blocks"),
        ({"quant_method": "fp8", "weight_block_size": "128"}, "square weight blocks"),
    ],
)
def test_fp8_block_size_from_the_config(quant, expected):
    config = {"model_type": "deepseek_v3"} | ({"quantization_config": quant} if quant else {})
    if isinstance(expected, str):
        with pytest.raises(FormatError, match=expected):
            fp8_block_size(config)
    else:
        assert fp8_block_size(config) == expected


# -- pack, verify, unpack ---------------------------------------------------------------------------------------


def write_fp8_checkpoint(root, n_layers=2, n_experts=2, hidden=64, inter=96):
    """A DeepSeek-V3-style checkpoint: FP8 routed experts with block scales, BF16 dense tensors, one large FP8 dense
    tensor (its own record) and one small one (a raw run)."""
    root.mkdir()
    config = {"model_type": "deepseek_v3", "n_routed_experts": n_experts, "num_hidden_layers": n_layers}
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (root / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(7)
    tensors = {"model.embed_tokens.weight": ("BF16", [260, 128], bf16_bytes((260, 128)))}  # not a small tensor
    big, big_scales = quantize_blocks(rng.standard_normal((300, 301)))  # 90,300 bytes: not a small tensor
    tensors["model.layers.0.self_attn.o_proj.weight"] = ("F8_E4M3", [300, 301], big.tobytes())
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = ("F32", list(big_scales.shape), big_scales.tobytes())
    tensors["model.layers.0.self_attn.kv_a_proj.weight"] = ("F8_E4M3", [5, 7], fp8_weights((5, 7)).tobytes())
    for layer in range(n_layers):
        for expert in range(n_experts):
            for proj, shape in (
                ("gate_proj", [inter, hidden]),
                ("up_proj", [inter, hidden]),
                ("down_proj", [hidden, inter]),
            ):
                q, scale_inv = quantize_blocks(rng.standard_normal(shape) * 0.02)
                name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                tensors[f"{name}.weight"] = ("F8_E4M3", shape, q.tobytes())
                tensors[f"{name}.weight_scale_inv"] = ("F32", list(scale_inv.shape), scale_inv.tobytes())
    write_safetensors(root / "model.safetensors", tensors, metadata={"format": "pt"})
    return root


@pytest.fixture
def fp8_packed(tmp_path):
    source = write_fp8_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "fp8.zmoe"
    result = pack(str(source), out, PackOptions(chunk_values=1024, threads=2))
    return source, out, result


def test_pack_codes_fp8_tensors_and_verify_and_unpack_are_exact(fp8_packed, tmp_path):
    source, out, result = fp8_packed
    with Container(out) as c:
        encodings = [c.encodings[t.encoding].encoding_id for t in c.manifest.tensors]
        by_name = dict(zip((t.name for t in c.manifest.tensors), encodings))
        assert by_name["model.layers.0.self_attn.o_proj.weight"] == "fp8-split"
        assert by_name["model.layers.1.mlp.experts.1.down_proj.weight"] == "fp8-split"
        assert by_name["model.layers.1.mlp.experts.1.down_proj.weight_scale_inv"] == "raw"
        assert c.manifest.encodings[-1]["id"] == "fp8-split"
        assert "model.layers.0.self_attn.kv_a_proj.weight" in c.small_tensors  # small FP8: in a raw run
        assert all(rec.planes is None for rec in c.manifest.experts)  # FP8 records are not split
        fp8_tensor = c.tensors["model.layers.0.mlp.experts.0.gate_proj.weight"]
        assert 0 < fp8_tensor.exponent_entropy < 4
        stored = sum(p.nbytes for p in fp8_tensor.parts)
        assert stored < 0.95 * fp8_tensor.size  # small chunks (1024 values); the bound test measures the ratio
    report = verify(out, str(source))
    assert report.ok, report.failures
    unpack(out, tmp_path / "back")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (source / name).read_bytes()


def test_an_fp8_expert_read_from_the_container_dequantizes_as_transformers_does(fp8_packed):
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    source, out, _ = fp8_packed
    original = load_file(str(source / "model.safetensors"))
    with Container(out) as c:
        members = c.read_expert(1, 0)
    tensors = [
        (
            m.tensor.name,
            torch.from_numpy(m.data).view(torch.float8_e4m3fn if m.tensor.dtype == "F8_E4M3" else torch.float32),
        )
        for m in members
    ]
    tensors = [(name, t.reshape(original[name].shape)) for name, t in tensors]
    folded = dict(fold_fp8_scales(tensors, torch.bfloat16))
    assert sorted(folded) == [f"model.layers.1.mlp.experts.0.{p}_proj.weight" for p in ("down", "gate", "up")]
    for name, weight in folded.items():
        expected = Fp8Dequantize(None)._dequantize_one(original[name], original[name + "_scale_inv"], torch.bfloat16)
        assert torch.equal(weight, expected)


def test_fused_fp8_experts_are_one_part_per_expert(tmp_path):
    root = tmp_path / "fused"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "n_routed_experts": 3}))
    weights = np.stack([fp8_weights((96, 64), seed=e).reshape(96, 64) for e in range(3)])
    scales = np.ones((3, 1, 1), "<f4")
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj": ("F8_E4M3", [3, 96, 64], weights.tobytes()),
        "model.layers.0.mlp.experts.gate_up_proj_scale_inv": ("F32", [3, 1, 1], scales.tobytes()),
    }
    write_safetensors(root / "model.safetensors", tensors)
    out = tmp_path / "fused.zmoe"
    pack(str(root), out, PackOptions(chunk_values=1024, threads=1))
    with Container(out) as c:
        fused = c.tensors["model.layers.0.mlp.experts.gate_up_proj"]
        assert fused.fused and len(fused.parts) == 3 and c.encodings[fused.encoding].encoding_id == "fp8-split"
        for e in range(3):
            member = next(m for m in c.read_expert(0, e) if m.tensor.name == fused.name)
            assert np.array_equal(member.data, weights[e].reshape(-1))
    assert verify(out, str(root)).ok


def test_without_a_coder_fp8_is_stored_raw(tmp_path):
    source = write_fp8_checkpoint(tmp_path / "ckpt", n_layers=1)
    out = tmp_path / "none.zmoe"
    pack(str(source), out, PackOptions(coder=None, threads=1))
    with Container(out) as c:
        assert [e["id"] for e in c.manifest.encodings] == ["raw"]
    assert verify(out, str(source)).ok


def test_a_checkpoint_without_fp8_lists_no_fp8_encoding(checkpoints):
    with Container(checkpoints.packed(checkpoints.demo())) as c:
        assert [e["id"] for e in c.manifest.encodings] == ["bf16-split", "raw"]


def test_corrupt_fp8_bytes_are_found(fp8_packed, tmp_path):
    _, out, _ = fp8_packed
    (tmp_path / "copy").mkdir()
    bad = copy_of(out, tmp_path / "copy")
    with Container(bad) as c:
        part = c.tensors["model.layers.1.mlp.experts.0.up_proj.weight"].parts[0]
    data = bytearray(bad.read_bytes())
    data[part.offset + part.n_chunks * DIRECTORY_ENTRY.itemsize + 10] ^= 0x01
    bad.write_bytes(bytes(data))
    report = verify(bad)
    assert not report.ok
    assert any("up_proj.weight" in f and "sign-mantissa bytes" in f for f in report.failures), report.failures


def _fp8_on_bf16(t, enc):
    if t["dtype"] == "BF16":
        t.update(encoding=enc["fp8"], parts=[{**p, "n_chunks": -(-p["size"] // 1024)} for p in t["parts"]])


def _bf16_on_fp8(t, enc):
    if t["dtype"] == "F8_E4M3":
        t.update(encoding=enc["bf16"], parts=[{**p, "n_chunks": -(-p["size"] // 2048)} for p in t["parts"]])


def _fp8_parts(**changes):
    def mutate(t, enc):
        if t["dtype"] == "F8_E4M3":
            t["parts"] = [{**p, **{k: f(p) for k, f in changes.items()}} for p in t["parts"]]

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_fp8_on_bf16, "fp8-split encoding on a BF16 tensor"),
        (_bf16_on_fp8, "bf16-split encoding on a F8_E4M3 tensor"),
        (_fp8_parts(n_chunks=lambda p: p["n_chunks"] + 1), "chunks recorded"),
        (_fp8_parts(size=lambda p: p["size"] * 4), "chunks recorded"),
        (_fp8_parts(size=lambda p: p["size"] + 1), "chunks recorded"),
        (_fp8_parts(nbytes=lambda p: 24 * p["n_chunks"]), "bytes of FP8 values"),
        (_fp8_parts(plane=lambda p: p["offset"]), "plane apart"),
    ],
    ids=["fp8-on-bf16", "bf16-on-fp8", "chunk-count", "size", "size-by-one", "nbytes", "plane"],
)
def test_hostile_fp8_manifests_are_refused_in_one_line(fp8_packed, tmp_path, capsys, mutate, message):
    _, out, _ = fp8_packed
    bad = tmp_path / "hostile.zmoe"
    bad.write_bytes(out.read_bytes())

    def edit(doc):
        ids = [e["id"] for e in doc["encodings"]]
        enc = {"fp8": ids.index("fp8-split"), "bf16": ids.index("bf16-split")}
        for t in doc["tensors"]:
            mutate(t, enc)

    rewrite_manifest(bad, edit)
    with pytest.raises(FormatError, match=message):
        Container(bad)
    code, _, err = run_cli(capsys, "verify", str(bad))
    assert_one_line_error(code, err, message)


def test_an_unknown_encoding_is_named(fp8_packed, tmp_path):
    _, out, _ = fp8_packed
    bad = tmp_path / "future.zmoe"
    bad.write_bytes(out.read_bytes())
    rewrite_manifest(bad, lambda d: d["encodings"][-1].update(id="fp8-split-v9"))
    with pytest.raises(ZipmoeError, match="unknown tensor encoding 'fp8-split-v9'"):
        Container(bad)


# -- the benchmark ----------------------------------------------------------------------------------------------


def test_fp8_bench_measures_every_row(tmp_path):
    from zipmoe.bench.fp8 import render, run_fp8_bench
    from zipmoe.formats.checkpoint import open_checkpoint

    root = tmp_path / "f32"
    root.mkdir()
    rng = np.random.default_rng(0)
    weights = {
        f"layer{i}.weight": ("F32", [256, 192], (rng.standard_normal((256, 192)) * 0.05).astype("<f4").tobytes())
        for i in range(3)
    }
    weights["bias"] = ("F32", [4], np.ones(4, "<f4").tobytes())
    write_safetensors(root / "model.safetensors", weights)
    report = run_fp8_bench(open_checkpoint(str(root)), repeat=1, threads=1)
    assert report.n_tensors == 3 and report.source_bytes == 3 * 256 * 192 and report.scale_bytes == 3 * 2 * 2 * 4
    rows = {r.method: r for r in report.rows}
    rans = rows["fp8-split/rans"]
    assert report.entropy_bound - 0.01 < rans.ratio < 0.9
    assert rows["raw (zipmoe raw encoding: checksummed copy)"].ratio > 1.0
    assert rows["fp8-split/rans layout with one sign-mantissa byte per value (rejected)"].ratio > 1.0
    assert rans.decode_gbps[1] > 0 and "zstd-3 on raw FP8 bytes" in rows
    assert "order-0 entropy bound" in render(report)
    assert json.loads(json.dumps(report.to_json()))["entropy_bound"] == report.entropy_bound


# -- fuzzing ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_corrupt_payloads_with_valid_checksums_decode_or_are_refused(data):
    """The decoder itself, not the checksums, must stand: payload bytes changed and every checksum recomputed."""
    values = fp8_weights((1, 3000), seed=data.draw(st.integers(0, 3)))
    encoding = Fp8Split(data.draw(st.sampled_from([RansCoder(), parse_coder("zstd:1"), parse_coder("lz4")])), 1024)
    part = encode_part(encoding, values, WORKERS)
    blob = part.data.copy()
    directory = blob[: part.n_chunks * DIRECTORY_ENTRY.itemsize].view(DIRECTORY_ENTRY)
    payloads = part.n_chunks * DIRECTORY_ENTRY.itemsize + pad8(1500)
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(payloads, blob.size - 1))] = data.draw(st.integers(0, 255))
    position = payloads
    for entry in directory:
        size = int(entry["payload_nbytes"])
        entry["payload_xxh64"] = xxh64(blob, position, position + size)
        position += pad8(size)
    view = PartView(encoding, 0, blob.size, values.size, part.n_chunks, xxh64(blob, 0, directory.nbytes), 0)
    out = np.empty(values.size, np.uint8)
    try:
        decode_part(blob, view, out, WORKERS)
    except ChecksumError as exc:
        assert "exponent payload" in str(exc)


@pytest.fixture(scope="module")
def golden_fp8():
    from pathlib import Path

    return Path(__file__).parent / "golden" / "fp8" / "micro.zmoe"


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_fp8_manifest_is_read_or_refused(golden_fp8, tmp_path_factory, capsys, data):
    from test_hostile_fuzz import check_everything, guarded, hostile_copy, workspace

    work, out = workspace(tmp_path_factory.mktemp("fuzz"))
    with guarded():
        path = hostile_copy(golden_fp8, work, data, st.integers(1, 3))
        check_everything(path, out, work, capsys)


def test_fp8_bench_command_line(tmp_path, capsys):
    """`zipmoe bench codecs --fp8`: the report as JSON; missing or unusable checkpoints are one-line errors."""
    code, _, err = run_cli(capsys, "bench", "codecs", str(tmp_path / "missing"), "--fp8")
    assert_one_line_error(code, err, "missing")
    root = tmp_path / "ints"
    root.mkdir()
    write_safetensors(root / "model.safetensors", {"ids": ("I64", [2, 2], bytes(32))})
    code, _, err = run_cli(capsys, "bench", "codecs", str(root), "--fp8", "-q")
    assert_one_line_error(code, err, "no finite BF16, F32 or F16 weight matrices")
    rng = np.random.default_rng(1)
    root = tmp_path / "f32"
    root.mkdir()
    weight = (rng.standard_normal((128, 256)) * 0.05).astype("<f4").tobytes()
    write_safetensors(root / "model.safetensors", {"w.weight": ("F32", [128, 256], weight)})
    code, out, err = run_cli(capsys, "bench", "codecs", str(root), "--fp8", "--coders", "rans,none", "--repeat", "1",
                             "-t", "1", "--json", "-q")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["n_tensors"] == 1 and report["source_bytes"] == 128 * 256
    assert any(row["method"] == "fp8-split/rans" for row in report["rows"])


# -- serving FP8 checkpoints ----------------------------------------------------------------------------------------

SERVE_BLOCK = 16  # the tiny model's projections span several tiles, some partial (24 rows), at this edge
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]


def quantize_checkpoint(source, out, block=SERVE_BLOCK):
    """``source`` (a BF16 checkpoint) as DeepSeek-V3 stores its weights: every projection (``*_proj.weight``,
    ``kv_a_proj_with_mqa.weight``, and fused ``experts.*_proj`` expert by expert) block-quantized to FP8 with a
    float32 ``*_scale_inv``; norms, embeddings, routers and the head stay BF16. The config gains the matching
    ``quantization_config``."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if not re.search(r"_proj(_with_mqa)?\.weight$|\.experts\.\w+_proj$", name):
            tensors[name] = t
            continue
        pairs = [quantize_blocks(m.float().numpy(), block) for m in (t if t.dim() == 3 else [t])]
        q, scales = (np.stack(x) if t.dim() == 3 else x[0] for x in zip(*pairs))
        tensors[name] = torch.from_numpy(q).view(torch.float8_e4m3fn)
        tensors[name + "_scale_inv"] = torch.from_numpy(scales)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def fp8_deepseek(checkpoints, tmp_path_factory):
    """DeepSeek-V3 quantized to FP8 (experts and dense projections), per-expert and fused, with their containers."""
    root = tmp_path_factory.mktemp("fp8-deepseek")
    made = {"bf16": checkpoints.deepseek("deepseek_v3")}
    for fused in (False, True):
        source = quantize_checkpoint(checkpoints.deepseek("deepseek_v3", fused=fused), root / f"v3-fused-{fused}")
        made[fused] = (source, checkpoints.packed(source))
    return made


def fp8_engine(path, **options):
    from zipmoe.runtime.engine import Engine, EngineOptions

    return Engine(path, EngineOptions(device="cpu", dtype="float32", threads=1, **options))


def reference_logits(source):
    from zipmoe.runtime.model import InMemoryExperts, Transformer
    from zipmoe.runtime.weights import load_checkpoint

    torch.set_num_threads(1)  # as `fp8_engine` computes
    args, dense, experts = load_checkpoint(source, torch.device("cpu"), torch.float32)
    model = Transformer(args, dense, InMemoryExperts(experts))
    assert not any(t.dtype == torch.float8_e4m3fn for t in dense.values()) and not any("scale_inv" in n for n in dense)
    return model, model.forward(torch.tensor(PROMPT), 0, model.new_cache(32), all_logits=True)


def greedy_tokens(model, n=16):
    from zipmoe.runtime.generate import SamplingOptions, generate

    return generate(model, PROMPT, SamplingOptions(max_new_tokens=n, stop_at_eos=False)).tokens


def test_fp8_experts_serve_the_same_bits_as_the_fp8_safetensors(fp8_deepseek):
    source, _ = fp8_deepseek[False]
    with Container(fp8_deepseek[False][1]) as c:
        expert = c.tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
        assert expert.dtype == "F8_E4M3" and c.encodings[expert.encoding].encoding_id == "fp8-split"
    ref, expected = reference_logits(source)
    expected_tokens = greedy_tokens(ref)
    for fused in (False, True):
        packed = fp8_deepseek[fused][1]
        with fp8_engine(packed) as e:
            minimum = e.cache_minimum()
        for options in ({}, {"memory_budget": minimum}):
            with fp8_engine(packed, **options) as e:
                assert all(t.dtype == torch.float32 for t in e.dense.values()), "FP8 dense weights are dequantized"
                logits = e.model.forward(torch.tensor(PROMPT), 0, e.model.new_cache(32), all_logits=True)
                assert torch.equal(logits, expected), (fused, options)
                assert greedy_tokens(e.model) == expected_tokens, (fused, options)
                if options:
                    assert e.pipeline.stats.served_from["storage"] > 0 and e.pipeline.stats.peak_bytes <= e.budget
    with fp8_engine(fp8_deepseek[False][1]) as e:
        assert e.source.source_nbytes == 2 * e.args.expert_params  # budgets in percent: of the experts as BF16
    from zipmoe.runtime.engine import Engine, EngineOptions

    with Engine(fp8_deepseek[True][1], EngineOptions(device="cpu", dtype="bfloat16")) as e:
        assert e.dense["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
        assert len(greedy_tokens(e.model, 4)) == 4


def test_fp8_checkpoint_runs_as_transformers_dequantizes_it(fp8_deepseek, tmp_path):
    """Transformers' own FP8 dequantization (``Fp8Dequantize``) of every weight, loaded with ``from_pretrained``
    (float32; the FP8 integration itself wants a GPU), computes the logits the runtime computes from the FP8 file."""
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    # transformers infers the tile edge from the scale grid, so it needs tiles that divide every shape: 8 here
    source = quantize_checkpoint(fp8_deepseek["bf16"], tmp_path / "fp8-8", block=8)
    ours, logits = reference_logits(source)
    stored = load_file(source / "model.safetensors")
    state = {}
    for name, t in stored.items():
        scale = stored.get(name + "_scale_inv")
        if not name.endswith("_scale_inv"):
            state[name] = t if scale is None else Fp8Dequantize(None)._dequantize_one(t, scale, torch.float32)
    (tmp_path / "dequantized").mkdir()
    save_file(state, tmp_path / "dequantized" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "dequantized" / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(PROMPT)[None]).logits[0]
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5), (logits - expected).abs().max()
    reference_tokens = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT) :]
    assert greedy_tokens(ours) == reference_tokens.tolist()


def _block_size(size):
    return lambda doc: doc["config"]["quantization_config"].update(weight_block_size=[size, size])


def _tensor(tensor, **changes):
    def mutate(doc):
        next(t for t in doc["tensors"] if t["name"] == tensor).update(changes)

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_block_size(32), "kv_a_proj_with_mqa.weight is FP8: config.json implies a F32 model.layers.0.self_attn."
                          "kv_a_proj_with_mqa.weight_scale_inv [1, 2] (32x32 blocks), the container holds F32 [2, 4]"),
        (_tensor("model.layers.1.mlp.experts.2.down_proj.weight_scale_inv", shape=[2, 4]),
         "expert (layer 1, expert 2) model.layers.1.mlp.experts.2.down_proj.weight is FP8: config.json implies a F32 "
         "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv [4, 2] (16x16 blocks), the container holds F32 [2, 4]"),
    ],
    ids=["block-size", "expert-scale-shape"],
)  # fmt: skip
def test_fp8_scales_that_do_not_fit_are_refused_in_one_line(fp8_deepseek, tmp_path, capsys, mutate, message):
    out = copy_of(fp8_deepseek[False][1], tmp_path)
    rewrite_manifest(out, mutate)
    code, _, err = run_cli(capsys, "run", str(out), "hello", "-n", "1", "--device", "cpu")
    assert_one_line_error(code, err, message)
