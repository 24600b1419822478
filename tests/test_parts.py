"""Encoded parts: layout, round trips with every coder, and checksums that name the bad chunk."""

import numpy as np
import pytest

from conftest import bf16_bytes
from zipmoe._threads import Workers
from zipmoe.codecs.coders import parse_coder
from zipmoe.codecs.parts import (
    DIRECTORY_ENTRY,
    Bf16Split,
    PartView,
    Raw,
    check_part,
    decode_part,
    decode_parts,
    encode_part,
    encoding_from_config,
)
from zipmoe.errors import ChecksumError, FormatError, UnknownCodecError

WORKERS = Workers(2)


def roundtrip(encoding, data: np.ndarray, file_offset: int = 4096):
    part = encode_part(encoding, data, WORKERS)
    view = PartView(encoding, 0, part.data.size, data.size, part.n_chunks, part.directory_xxh64, file_offset)
    out = np.empty(data.size, np.uint8)
    decode_part(part.data, view, out, WORKERS)
    assert np.array_equal(out, data)
    assert check_part(part.data, view, WORKERS) == []
    return part, view


@pytest.mark.parametrize("coder", ["rans", "zstd:3", "lz4", "lz4hc:9"])
@pytest.mark.parametrize("n_values", [0, 1, 63, 1024, 1025, 5000])
def test_bf16_roundtrip(coder, n_values):
    data = np.frombuffer(bf16_bytes((n_values,), seed=n_values), np.uint8)
    part, _ = roundtrip(Bf16Split(parse_coder(coder), 1024), data)
    assert part.n_chunks == -(-n_values // 1024)
    assert part.exponent_histogram.sum() == n_values


def test_bf16_layout_is_as_documented():
    data = np.frombuffer(bf16_bytes((3000,)), np.uint8)
    part, _ = roundtrip(Bf16Split(parse_coder("rans"), 1024), data)
    directory = part.data[: 3 * DIRECTORY_ENTRY.itemsize].view(DIRECTORY_ENTRY)
    sm_start = 3 * DIRECTORY_ENTRY.itemsize
    values = data.view(np.uint16)
    sign_mantissa = (((values >> 8) & 0x80) | (values & 0x7F)).astype(np.uint8)
    assert np.array_equal(part.data[sm_start : sm_start + 3000], sign_mantissa)
    padded = [(int(n) + 7) & ~7 for n in directory["payload_nbytes"]]
    assert part.data.size == sm_start + 3000 + sum(padded)  # 3000 is a multiple of 8: no padding after the plane
    assert set(directory["reserved"].tolist()) == {0}


def test_raw_roundtrip():
    data = np.frombuffer(np.random.default_rng(0).bytes(3 * 1024 + 5), np.uint8)
    part, _ = roundtrip(Raw(1024), data)
    assert part.n_chunks == 4
    assert part.data.size == 4 * DIRECTORY_ENTRY.itemsize + data.size


def test_checksums_name_the_chunk_and_stream():
    data = np.frombuffer(bf16_bytes((4096,)), np.uint8)
    encoding = Bf16Split(parse_coder("rans"), 1024)
    part, view = roundtrip(encoding, data, file_offset=10_000)
    sm_start = 4 * DIRECTORY_ENTRY.itemsize

    bad = part.data.copy()
    bad[sm_start + 2 * 1024 + 5] ^= 0x10  # chunk 2's sign-mantissa bytes
    failures = check_part(bad, view, WORKERS)
    assert [(f.chunk, f.stream) for f in failures] == [(2, "sign-mantissa bytes")]
    assert failures[0].file_offset == 10_000 + sm_start + 2 * 1024
    with pytest.raises(ChecksumError, match=r"chunk 2 sign-mantissa bytes: checksum mismatch \(file offset 12144\)"):
        decode_part(bad, view, np.empty(data.size, np.uint8), WORKERS)

    bad = part.data.copy()
    bad[-1] ^= 0x01  # the last payload (or its padding)
    bad[sm_start + 4096 + 3] ^= 0x01  # chunk 0's payload
    streams = {(f.chunk, f.stream) for f in check_part(bad, view, WORKERS)}
    assert (0, "exponent payload") in streams

    bad = part.data.copy()
    bad[5] ^= 0x80  # the directory
    assert check_part(bad, view, WORKERS)[0].stream == "directory"
    with pytest.raises(ChecksumError, match="chunk directory: checksum mismatch"):
        decode_part(bad, view, np.empty(data.size, np.uint8), WORKERS)


def test_decode_without_checks_still_rejects_a_corrupt_rans_stream():
    data = np.frombuffer(bf16_bytes((4096,)), np.uint8)
    encoding = Bf16Split(parse_coder("rans"), 4096)
    part, view = roundtrip(encoding, data)
    bad = part.data.copy()
    bad[-9] ^= 0xFF  # inside the word stream of the only chunk
    with pytest.raises(ChecksumError, match="chunk 0 exponent payload: rANS"):
        decode_part(bad, view, np.empty(data.size, np.uint8), WORKERS, check=False)


def test_manifest_sizes_must_match_the_directory():
    data = np.frombuffer(bf16_bytes((2048,)), np.uint8)
    encoding = Bf16Split(parse_coder("rans"), 1024)
    part, view = roundtrip(encoding, data)
    wrong = PartView(encoding, 0, view.nbytes + 8, view.size, view.n_chunks, view.directory_xxh64, 0)
    with pytest.raises(FormatError, match="directory describes"):
        decode_part(np.concatenate([part.data, np.zeros(8, np.uint8)]), wrong, np.empty(data.size, np.uint8), WORKERS)
    wrong = PartView(encoding, 0, view.nbytes, view.size, 3, view.directory_xxh64, 0)
    with pytest.raises(FormatError, match="3 chunks recorded, 2 expected"):
        decode_part(part.data, wrong, np.empty(data.size, np.uint8), WORKERS)


def test_encoding_configs():
    bf16 = Bf16Split(parse_coder("zstd:5"), 4096)
    assert encoding_from_config(bf16.get_config()) == bf16
    assert encoding_from_config({"id": "raw", "chunk_bytes": 1 << 20}) == Raw()
    with pytest.raises(UnknownCodecError, match="unknown tensor encoding 'fp4-split'"):
        encoding_from_config({"id": "fp4-split"})
    with pytest.raises(FormatError, match="chunk_values must be a multiple of 64"):
        Bf16Split(parse_coder("rans"), 1000)
    with pytest.raises(FormatError, match="expected keys"):
        encoding_from_config({"id": "raw"})


@pytest.mark.parametrize(
    "encoding", [Bf16Split(parse_coder("rans"), 1024), Bf16Split(parse_coder("lz4"), 1024), Raw(1024)]
)
def test_widened_decode_gives_float32_bits(encoding):
    data = np.frombuffer(bf16_bytes((5000,), seed=5), np.uint8)
    part = encode_part(encoding, data, WORKERS)
    view = PartView(encoding, 0, part.data.size, data.size, part.n_chunks, part.directory_xxh64, 0)
    out = np.empty(2 * data.size, np.uint8)
    decode_parts([(part.data, view, out, "")], WORKERS, widen=True)
    assert np.array_equal(out.view(np.uint32), data.view(np.uint16).astype(np.uint32) << 16)
