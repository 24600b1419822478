"""Split expert records (format version 4) and the record-access layer (`zipmoe.formats.records`)."""

import numpy as np
import pytest

from conftest import copy_of, rewrite_manifest
from zipmoe._threads import Workers
from zipmoe.codecs.bf16 import widen_bf16
from zipmoe.codecs.coders import parse_coder
from zipmoe.codecs.parts import Bf16Split, PartView, decode_part, encode_part, pad8, split_part
from zipmoe.errors import ChecksumError, FormatError
from zipmoe.formats.constants import DEFAULT_ALIGNMENT, PART_ALIGNMENT, SPLIT_VERSION
from zipmoe.formats.reader import Container
from zipmoe.formats.records import decode_expert
from zipmoe.formats.writer import ContainerWriter
from zipmoe.pack import PackOptions, pack
from zipmoe.verify import verify


@pytest.fixture(scope="module")
def packed(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture(scope="module")
def packed_raw(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "raw.zmoe"
    pack(str(checkpoints.demo("tiny")), out, PackOptions(coder=parse_coder("none")))
    return out


def test_split_record_layout(packed):
    with Container(packed) as c:
        assert c.header.format_version == c.manifest.format_version == SPLIT_VERSION
        assert set(c.expert_layouts) == set(c.experts)
        for (layer, expert), layout in c.expert_layouts.items():
            record = c.experts[(layer, expert)]
            assert layout.split and layout.planes == record.planes and (layout.layer, layout.expert) == (layer, expert)
            last = layout.members[-1]
            exponents_end = layout.offset + last.view.offset + last.view.nbytes
            # what a sign-mantissa hit reads: the exponent pieces, up to the aligned start of the planes
            assert layout.exponent_nbytes == layout.planes - layout.offset
            assert (
                layout.exponent_nbytes == -(-(exponents_end - layout.offset) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
            )
            assert layout.planes_nbytes == layout.nbytes - layout.exponent_nbytes
            assert layout.planes_nbytes == sum(
                -(-pad8(m.view.size // 2) // PART_ALIGNMENT) * PART_ALIGNMENT for m in layout.members[:-1]
            ) + pad8(last.view.size // 2)
            assert layout.source_nbytes == sum(c.manifest.tensors[t].parts[p].size for t, p in record.members)
            assert not c.data[exponents_end : layout.planes].any()
            for m in layout.members:
                blob = c.manifest.tensors[m.tensor_index].parts[m.part]
                assert m.view.plane == blob.plane - layout.offset and m.view.plane_file_offset == blob.plane
                assert m.split_view.plane == blob.plane - layout.planes and m.split_view.offset == m.view.offset
                assert m.label == f"tensor {m.name!r}" and m.dtype == "BF16"


@pytest.mark.parametrize("writable", [True, False])
def test_decoding_with_planes_apart_gives_the_bytes_of_read_expert(packed, writable):
    with Container(packed) as c:
        for key, layout in c.expert_layouts.items():
            expected = [m.data for m in c.read_expert(*key)]
            exponents = c.data[layout.offset : layout.planes]  # the one read of a sign-mantissa hit
            planes = c.data[layout.planes : layout.offset + layout.nbytes]
            if writable:
                exponents, planes = np.array(exponents), np.array(planes)
            outs = [np.empty(m.view.size, np.uint8) for m in layout.members]
            decode_expert(layout, exponents, outs, Workers(2), planes=planes)
            assert all(np.array_equal(a, b) for a, b in zip(outs, expected))
            wide = [np.empty(2 * m.view.size, np.uint8) for m in layout.members]
            decode_expert(layout, exponents, wide, Workers(1), planes=planes, widen=True)
            for out, data in zip(wide, expected):
                reference = np.empty(data.size // 2, np.uint32)
                widen_bf16(data.view(np.uint16), reference)
                assert np.array_equal(out.view(np.uint32), reference)
            whole = np.array(c.data[layout.offset : layout.offset + layout.nbytes])
            outs = [np.empty(m.view.size, np.uint8) for m in layout.members]
            decode_expert(layout, whole, outs, Workers(1))
            assert all(np.array_equal(a, b) for a, b in zip(outs, expected))


def test_decode_expert_names_the_member_and_the_file_offset(packed):
    with Container(packed) as c:
        layout = c.expert_layouts[(1, 3)]
        exponents = np.array(c.data[layout.offset : layout.planes])
        planes = np.array(c.data[layout.planes : layout.offset + layout.nbytes])
        member = layout.members[2]
        planes[member.split_view.plane + 10] ^= 0x01
        outs = [np.empty(m.view.size, np.uint8) for m in layout.members]
        offset = member.view.plane_file_offset
        message = (
            f"expert 1/3 tensor {member.name!r}: chunk 0 sign-mantissa bytes: checksum mismatch .file offset {offset}"
        )
        with pytest.raises(ChecksumError, match=message):
            decode_expert(layout, exponents, outs, Workers(1), planes=planes, label_prefix="expert 1/3 ")
        with pytest.raises(FormatError, match="cannot hold"):
            decode_expert(layout, exponents[:-1], outs, Workers(1), planes=planes)
        with pytest.raises(FormatError, match="cannot hold"):
            decode_expert(layout, exponents, outs, Workers(1), planes=planes[:-1])


def test_raw_experts_keep_unsplit_records(packed_raw):
    with Container(packed_raw) as c:
        assert c.manifest.format_version < SPLIT_VERSION and verify(packed_raw).ok
        for layout in c.expert_layouts.values():
            assert not layout.split and layout.planes is None and layout.planes_nbytes == 0
            assert layout.exponent_nbytes == layout.nbytes
            assert all(m.split_view is None and m.view.plane is None for m in layout.members)
            buf = np.array(c.data[layout.offset : layout.offset + layout.nbytes])
            with pytest.raises(FormatError, match="not a split record"):
                decode_expert(layout, buf, [np.empty(m.view.size, np.uint8) for m in layout.members], Workers(1),
                              planes=buf)  # fmt: skip


def test_a_version_4_file_needs_a_split_record(packed_raw, tmp_path):
    container = copy_of(packed_raw, tmp_path)
    rewrite_manifest(container, lambda d: d.update(format_version=4))
    with pytest.raises(FormatError, match="missing: a version 4 file holds split expert records"):
        Container(container)


def test_pack_is_reproducible(checkpoints, packed, tmp_path):
    again = tmp_path / "again.zmoe"
    pack(str(checkpoints.demo("tiny")), again)
    assert again.read_bytes() == packed.read_bytes()


def test_split_part_cuts_an_encoded_part_in_two():
    values = (np.arange(3001, dtype=np.uint16) * 40503) & 0x3FFF | 0x3C00
    encoding = Bf16Split(chunk_values=1024)
    encoded = encode_part(encoding, values.view(np.uint8), Workers(1))
    pieces, plane = split_part(encoded, values.size)
    assert plane.size == pad8(values.size) and not plane[values.size :].any()
    exponents = np.concatenate(pieces)
    assert exponents.size + plane.size == encoded.data.size
    view = PartView(encoding, 0, exponents.size, values.nbytes, encoded.n_chunks, encoded.directory_xxh64, 0, 0, 0)
    out = np.empty(values.nbytes, np.uint8)
    decode_part(exponents, view, out, Workers(1), planes=plane)
    assert np.array_equal(out.view(np.uint16), values)
    with pytest.raises(FormatError, match="lies outside its buffer"):
        decode_part(exponents, view, out, Workers(1), planes=plane[:-8])


def test_writer_state_machine_for_planes(tmp_path):
    with ContainerWriter(tmp_path / "w.zmoe") as writer:
        with pytest.raises(RuntimeError, match="expected state record"):
            writer.begin_planes()
        writer.begin_record()
        first = writer.write_part(np.ones(10, np.uint8), np.ones(3, np.uint8))
        planes = writer.begin_planes()
        second = writer.write_part(np.ones(5, np.uint8))
        with pytest.raises(RuntimeError, match="expected state record"):
            writer.begin_planes()
        offset, nbytes = writer.end_record()
        assert first == offset and planes == second == offset + DEFAULT_ALIGNMENT and nbytes == DEFAULT_ALIGNMENT + 5
