"""The container: layout rules, determinism, readers, and every way a file can be damaged."""

import json
import struct

import pytest

from conftest import copy_of, rewrite_manifest
from zipmoe.errors import ChecksumError, FormatError, UnknownCodecError
from zipmoe.formats.constants import DEFAULT_ALIGNMENT, MAGIC, PART_ALIGNMENT
from zipmoe.formats.reader import Container, as_array
from zipmoe.formats.safetensors_file import read_safetensors_header
from zipmoe.pack import PackOptions, pack
from zipmoe.verify import verify


@pytest.fixture(scope="module")
def packed(checkpoints):
    """The tiny demo checkpoint packed with small chunks (several per tensor)."""
    source = checkpoints.demo("tiny")
    out = checkpoints.root / "tiny-small-chunks.zmoe"
    if not out.exists():
        pack(str(source), out, PackOptions(chunk_values=4096))
    return source, out


def test_layout(packed):
    source, path = packed
    with Container(path) as c:
        h, m = c.header, c.manifest
        assert path.read_bytes()[:8] == MAGIC
        assert h.alignment == DEFAULT_ALIGNMENT and h.manifest_offset % h.alignment == 0
        assert h.file_nbytes == path.stat().st_size
        assert m.model["family"] == "mixtral" and m.model["n_experts"] == 4
        assert len(m.experts) == 2 * 4
        for record in m.experts:
            assert record.offset % DEFAULT_ALIGNMENT == 0
            parts = [m.tensors[t].parts[p] for t, p in record.members]
            assert [m.tensors[t].name.rsplit(".", 2)[-2] for t, _ in record.members] == ["w1", "w2", "w3"]
            assert all(p.offset % PART_ALIGNMENT == 0 for p in parts)
            # a split record (format version 4): exponent pieces, then from an aligned offset the planes
            assert m.format_version == 4 and record.planes is not None and record.planes % DEFAULT_ALIGNMENT == 0
            assert record.offset == parts[0].offset and parts[-1].offset + parts[-1].nbytes <= record.planes
            assert parts[0].plane == record.planes and all(p.plane % PART_ALIGNMENT == 0 for p in parts)
            assert parts[-1].plane + parts[-1].size // 2 == record.offset + record.nbytes
        for t in m.tensors:
            if t.tensor_class == "dense":
                assert t.parts[0].offset % DEFAULT_ALIGNMENT == 0
        assert [f.name for f in m.files] == [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        assert json.loads(c.read_file("config.json")) == json.loads((source / "config.json").read_text())
        assert all(not c.data[a:b].any() for a, b in c.padding_ranges())


def test_read_tensor_and_expert_equal_the_source(packed):
    source, path = packed
    st = read_safetensors_header(source / "model.safetensors")
    raw = (source / "model.safetensors").read_bytes()
    by_name = {t.name: raw[t.start : t.start + t.nbytes] for t in st.tensors}
    with Container(path) as c:
        for name, expected in by_name.items():
            assert c.read_tensor(name).tobytes() == expected
        members = c.read_expert(1, 2)
        assert [m.tensor.name for m in members] == [
            f"model.layers.1.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3")
        ]
        for m in members:
            assert m.data.tobytes() == by_name[m.tensor.name]
            assert (
                as_array(m.data, "BF16", m.shape).shape == (256, 128) if m.tensor.name.endswith("w1.weight") else True
            )
        with pytest.raises(FormatError, match="no expert record for layer 5"):
            c.read_expert(5, 0)
        with pytest.raises(FormatError, match="no tensor named 'nope'"):
            c.read_tensor("nope")


def test_output_is_deterministic(packed, tmp_path):
    source, path = packed
    again = tmp_path / "again.zmoe"
    pack(str(source), again, PackOptions(chunk_values=4096, threads=1))
    assert again.read_bytes() == path.read_bytes()


# -- damaged files ---------------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(packed, tmp_path):
    return copy_of(packed[1], tmp_path)


def test_not_a_container(tmp_path):
    path = tmp_path / "x.zmoe"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(FormatError, match=r"not a zipmoe container \(bad magic"):
        Container(path)
    with pytest.raises(FormatError, match="no such file"):
        Container(tmp_path / "missing.zmoe")
    with pytest.raises(FormatError, match="is a directory"):
        Container(tmp_path)


def test_unknown_version(damaged):
    data = bytearray(damaged.read_bytes())
    data[8:12] = struct.pack("<I", 5)
    damaged.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"unsupported format version 5 \(this zipmoe reads versions 1, 2, 3 and 4\)"):
        Container(damaged)


@pytest.mark.parametrize("keep", [0, 10, 63, 64, 5000, -1])
def test_truncated(damaged, keep):
    data = damaged.read_bytes()
    damaged.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(FormatError, match="truncated"):
        Container(damaged)


def test_trailing_bytes(damaged):
    with open(damaged, "ab") as f:
        f.write(b"\0")
    with pytest.raises(FormatError, match="has trailing bytes"):
        Container(damaged)


def test_header_and_manifest_checksums(damaged):
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="header checksum mismatch"):
        Container(damaged)
    data[20] ^= 0x01
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"manifest checksum mismatch \(file offset \d+\.\.\d+\)"):
        Container(damaged)


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda d: d["tensors"][0].update(shape=[1]), FormatError, "is 2 bytes, parts hold"),
        (lambda d: d["tensors"][0]["parts"][0].update(offset=7), FormatError, "misaligned or outside the data region"),
        (
            lambda d: d["tensors"][1]["parts"][0].update(offset=d["tensors"][0]["parts"][0]["offset"]),
            FormatError,
            "overlaps",
        ),
        (lambda d: d["experts"][0]["members"].reverse(), FormatError, "outside the record or out of order"),
        (
            lambda d: d["experts"][1].update(expert=d["experts"][0]["expert"], layer=d["experts"][0]["layer"]),
            FormatError,
            "duplicate",
        ),
        (
            lambda d: d["encodings"][0]["exponent_coder"].update(id="brotli"),
            UnknownCodecError,
            "unknown exponent coder 'brotli'",
        ),
        (lambda d: d["tensors"][0].update(sha256="xyz"), FormatError, r"tensors\[0\]\.sha256: expected a SHA-256"),
        (lambda d: d.pop("experts"), FormatError, "missing field 'experts'"),
        (lambda d: d["safetensors"][0]["segments"].pop(), FormatError, "add up to"),
    ],
)
def test_inconsistent_manifests(damaged, mutate, error, message):
    rewrite_manifest(damaged, mutate)
    with pytest.raises(error, match=message):
        Container(damaged)


def test_a_flipped_bit_anywhere_is_caught_with_its_location(damaged):
    """Flip one bit at offsets spread over every region of the file; verify must fail every time."""
    size = damaged.stat().st_size
    with Container(damaged) as c:
        blobs = [b for _, b, _ in c.manifest.blobs()]
        interesting = {0, 8, 12, 55, 63, 64, 4095, c.header.manifest_offset, size - 1}
        for b in blobs[:: max(1, len(blobs) // 12)]:
            interesting |= {b.offset, b.offset + 24 * b.n_chunks - 1, b.offset + b.nbytes // 2, b.offset + b.nbytes - 1}
        interesting |= {a for a, _ in c.padding_ranges()[:5]}
    offsets = sorted(interesting | set(range(0, size, size // 120)))
    with open(damaged, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x04]))
            f.flush()
            try:
                report = verify(damaged)
            except FormatError as exc:  # header or manifest: the file cannot be opened at all
                assert "checksum mismatch" in str(exc) or "version" in str(exc) or "magic" in str(exc), str(exc)
            else:
                assert not report.ok, f"flip at {offset} went unnoticed"
                assert "file offset" in report.failures[0], report.failures[0]
            f.seek(offset)
            f.write(bytes([byte]))
            f.flush()
    assert verify(damaged).ok
