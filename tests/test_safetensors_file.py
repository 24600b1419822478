"""Reading safetensors headers ourselves: valid files, holes, and every way a header can be bad."""

import struct

import pytest

from conftest import bf16_bytes, write_safetensors
from zipmoe.errors import CheckpointError
from zipmoe.formats.safetensors_file import read_safetensors_header, tensor_nbytes


def test_reads_a_file_written_by_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file(
        {"b": torch.zeros(3, 4, dtype=torch.bfloat16), "a": torch.ones(5, dtype=torch.float32)},
        tmp_path / "m.safetensors",
        metadata={"format": "pt"},
    )
    f = read_safetensors_header(tmp_path / "m.safetensors")
    assert f.metadata == {"format": "pt"}
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in f.tensors] == [
        ("a", "F32", (5,), 20),
        ("b", "BF16", (3, 4), 24),
    ]
    assert f.gaps == []
    assert f.tensors[0].start == f.header_nbytes


def test_holes_and_trailing_bytes_are_gaps(tmp_path):
    path = write_safetensors(
        tmp_path / "g.safetensors", {"x": ("BF16", [4], bf16_bytes((4,)))}, data_prefix=b"\x01\x02", data_suffix=b"zz"
    )
    f = read_safetensors_header(path)
    assert f.gaps == [(f.header_nbytes, f.header_nbytes + 2), (f.header_nbytes + 10, f.nbytes)]


def test_sub_byte_and_unknown_dtypes():
    assert tensor_nbytes("F4", (3, 2)) == 3
    assert tensor_nbytes("F8_E4M3", (7,)) == 7
    assert tensor_nbytes("BRAND_NEW", (3,)) is None


def header_file(tmp_path, header: bytes, data: bytes = b"", length: int | None = None):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        (b"", b"", None, "not UTF-8 JSON"),
        (b"{", b"", None, "not UTF-8 JSON"),
        (b"[1]", b"", None, "not a JSON object"),
        (b'{"x": 1}', b"", None, "entry 'x' is not an object"),
        (b'{"x": {"shape": [1], "data_offsets": [0, 2]}}', b"ab", None, "has no dtype"),
        (b'{"x": {"dtype": "BF16", "shape": [-1], "data_offsets": [0, 2]}}', b"ab", None, "invalid shape"),
        (
            b'{"x": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 4]}}',
            b"ab",
            None,
            "outside the 2-byte data region",
        ),
        (b'{"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 2]}}', b"ab", None, "needs 4 bytes"),
        (
            b'{"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, '
            b'"y": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
            b"ab",
            None,
            "overlaps",
        ),
        (b'{"__metadata__": 3}', b"", None, "__metadata__ is not an object"),
        (b"{}", b"", 1 << 40, "exceeds the 100000000-byte limit"),
        (b"{}", b"", 1000, "exceeds the file size"),
    ],
)
def test_bad_headers(tmp_path, header, data, length, message):
    with pytest.raises(CheckpointError, match="corrupt safetensors header: .*" + message):
        read_safetensors_header(header_file(tmp_path, header, data, length))


def test_too_short(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short for the 8-byte header length"):
        read_safetensors_header(path)
