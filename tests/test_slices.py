"""AMAT slices in the container: layout, verification, damage, and what pack refuses."""

import numpy as np
import pytest

import zipmoe.pack as pack_module
from conftest import bf16_bytes, copy_of, rewrite_manifest, run_cli, write_safetensors
from zipmoe.errors import FormatError
from zipmoe.formats.constants import DEFAULT_ALIGNMENT, PART_ALIGNMENT
from zipmoe.formats.reader import Container
from zipmoe.pack import PackOptions, pack
from zipmoe.quant import reference as ref
from zipmoe.quant.spec import Precision, SliceError, SliceSpec
from zipmoe.unpack import unpack
from zipmoe.verify import verify


@pytest.fixture(scope="module")
def sliced(checkpoints):
    source = checkpoints.family("qwen2_moe")
    return source, checkpoints.packed(source, slices=SliceSpec(8, 4))


def test_layout_msb_and_lsb_records_apart(sliced):
    _, path = sliced
    with Container(path) as c:
        m = c.manifest
        assert c.header.format_version == m.format_version == 4  # split expert records
        assert m.slices == SliceSpec(8, 4)
        assert len(m.slice_records) == 2 * len(m.experts)
        spans = {}
        for r in m.slice_records:
            assert r.offset % DEFAULT_ALIGNMENT == 0
            expert = c.experts[(r.layer, r.expert)]
            assert sorted((t, p) for t, p, _ in r.members) == sorted(expert.members)
            for _, _, blob in r.members:
                assert blob.offset % PART_ALIGNMENT == 0 and r.offset <= blob.offset
                assert blob.offset + blob.nbytes <= r.offset + r.nbytes
            spans[(r.layer, r.expert, r.kind)] = (r.offset, r.offset + r.nbytes)
        for (layer, expert, kind), (start, end) in spans.items():
            if kind == "msb":  # an MSB-only read touches no LSB byte (and no lossless byte)
                lsb_start, lsb_end = spans[(layer, expert, "lsb")]
                assert end <= lsb_start or lsb_end <= start
                record = c.experts[(layer, expert)]
                assert end <= record.offset or record.offset + record.nbytes <= start


def test_slices_are_the_quantized_source(sliced):
    source, path = sliced
    spec = SliceSpec(8, 4)
    with Container(path) as c:
        for (layer, expert), record in list(c.experts.items())[:3]:
            msb = {(t.name, p): payload for t, p, payload in c.read_slices(layer, expert, "msb")}
            lsb = {(t.name, p): payload for t, p, payload in c.read_slices(layer, expert, "lsb")}
            for t_index, p in record.members:
                tensor = c.manifest.tensors[t_index]
                values = c.read_tensor(tensor.name).view(np.uint16)
                rows, cols = tensor.shape
                expected_msb, expected_lsb = ref.slices(values, rows, cols, spec)
                assert np.array_equal(msb[(tensor.name, p)], expected_msb)
                assert np.array_equal(lsb[(tensor.name, p)], expected_lsb)


def test_verify_checks_every_slice(sliced):
    source, path = sliced
    report = verify(path, str(source))
    assert report.ok, report.failures
    with Container(path) as c:
        assert report.n_slices == 2 * sum(len(r.members) for r in c.manifest.experts)


def test_unpack_ignores_the_slices(sliced, tmp_path):
    source, path = sliced
    unpack(path, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_fused_and_per_expert_layouts_give_the_same_weights(checkpoints, tmp_path):
    spec = SliceSpec(6, 3)
    paths = {}
    for fused in (False, True):
        paths[fused] = tmp_path / f"{fused}.zmoe"
        pack(str(checkpoints.family("mixtral", fused=fused)), paths[fused], PackOptions(slices=spec))
    with Container(paths[False]) as per_expert, Container(paths[True]) as fused:
        for layer, expert in [(0, 0), (1, 3)]:

            def high(c):
                """{projection: high-bit weights} of one expert, from its slices."""
                lsb = {(t.name, p): x for t, p, x in c.read_slices(layer, expert, "lsb")}
                out = {}
                for t, p, payload in c.read_slices(layer, expert, "msb"):
                    rows, cols = t.shape[1:] if t.fused else t.shape
                    short = [n for n in t.name.split(".") if n != "weight"][-1]
                    out[short] = ref.dequantize(payload, lsb[(t.name, p)], rows, cols, spec, Precision.HIGH)
                return out

            a, b = high(per_expert), high(fused)
            assert np.array_equal(np.vstack([a["w1"], a["w3"]]), b["gate_up_proj"])
            assert np.array_equal(a["w2"], b["down_proj"])


@pytest.mark.parametrize("kind", ["msb", "lsb"])
@pytest.mark.parametrize("where", ["payload", "directory"])
def test_damaged_slice_bytes_are_caught_with_their_location(sliced, tmp_path, kind, where):
    _, path = sliced
    damaged = copy_of(path, tmp_path)
    with Container(damaged) as c:
        record = c.slice_records[(1, 2, kind)]
        _, _, blob = record.members[1]
        offset = blob.offset + (blob.nbytes - blob.size // 2 if where == "payload" else 3)
    with open(damaged, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    report = verify(damaged)
    assert not report.ok
    assert any(f.startswith(f"{kind.upper()} slice of ") and "file offset" in f for f in report.failures), (
        report.failures
    )


def test_slices_that_do_not_match_the_weights_fail_verify(checkpoints, tmp_path, monkeypatch):
    real = pack_module.quantize_tensor

    def off_by_one(values, rows, cols, spec, workers, *, name):
        msb, lsb = real(values, rows, cols, spec, workers, name=name)
        lsb[7] ^= 1
        return msb, lsb

    monkeypatch.setattr(pack_module, "quantize_tensor", off_by_one)
    out = tmp_path / "bad.zmoe"
    pack(str(checkpoints.family("olmoe")), out, PackOptions(slices=SliceSpec()))
    report = verify(out)  # every checksum holds: only quantizing again finds it
    assert not report.ok
    assert (
        "LSB slice of " in report.failures[0]
        and "byte 7 differs from quantizing the weights again" in report.failures[0]
    )
    assert any("MSB+LSB dequantize to" in f for f in report.failures)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["slices"]["records"].pop(), "exactly one MSB and one LSB slice record"),
        (lambda d: d["slices"]["records"][0]["members"].pop(), "not those of an expert record"),
        (lambda d: d["slices"]["records"][1].update(kind="mid"), r"kind: expected one of \['msb', 'lsb'\]"),
        (lambda d: d["slices"]["records"][0]["members"][0][2].update(size=4, nbytes=28), "holds 4 bytes, expected"),
        (lambda d: d["slices"]["records"][0]["members"][0][2].update(size=4), "a raw part of 4 bytes is 28 bytes"),
        (lambda d: d["slices"].update(high_bits=12), "slices need 1 <= low bits < high bits <= 8"),
        (lambda d: (d.pop("slices"), d.pop("small_tensors"), d.update(format_version=2)), "missing: a version 2 file"),
        (lambda d: d.update(format_version=1), "slices need format version 2, the file says 1"),
        (lambda d: d.update(format_version=2), "small tensors need format version 3, the file says 2"),
        (
            lambda d: (d.pop("slices"), d.pop("small_tensors"), d.update(format_version=1)),
            "sign-mantissa planes stored apart need format version 4, the file says 1",
        ),  # fmt: skip
    ],
)
def test_inconsistent_slice_manifests(sliced, tmp_path, mutate, message):
    damaged = copy_of(sliced[1], tmp_path)
    rewrite_manifest(damaged, mutate)
    with pytest.raises(FormatError, match=message):
        Container(damaged)


def test_pack_refuses_what_it_cannot_slice(tmp_path, capsys):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 2, "num_hidden_layers": 1}')
    tensors = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight": ("BF16", [16, 48], bf16_bytes((16, 48), e))
               for e in range(2) for w in ("w1", "w2", "w3")}  # fmt: skip
    write_safetensors(src / "model.safetensors", tensors)
    with pytest.raises(SliceError, match="input dimension 48 is not a multiple of the group size 32"):
        pack(str(src), tmp_path / "x.zmoe", PackOptions(slices=SliceSpec()))
    assert not list(tmp_path.glob("x.zmoe*"))
    tensors = {name: ("F32", [16, 64], bytes(16 * 64 * 4)) for name in tensors}
    write_safetensors(src / "model.safetensors", tensors)
    code, _, err = run_cli(capsys, "pack", str(src), "-o", str(tmp_path / "x.zmoe"), "--slices", "8:4")
    assert code == 1 and "slices are made from BF16 weights, this tensor is F32" in err
    code, _, err = run_cli(capsys, "pack", str(src), "-o", str(tmp_path / "x.zmoe"), "--slices", "4:8")
    assert code == 1 and "Error: slices need 1 <= low bits < high bits <= 8, got 4:8" in err
