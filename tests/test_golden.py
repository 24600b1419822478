"""Golden fixtures: files written by earlier versions of the format must still read, verify and decode exactly."""

import hashlib
import json
from pathlib import Path

import pytest

from zipmoe.codecs.coders import parse_coder
from zipmoe.formats.constants import HEADER_NBYTES
from zipmoe.formats.reader import Container
from zipmoe.pack import PackOptions, pack
from zipmoe.quant.spec import parse_slices
from zipmoe.verify import verify

GOLDEN = Path(__file__).parent / "golden"
VERSIONS = sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name.startswith("v"))
ENCODINGS = [GOLDEN / "fp8"]  # encodings added without a version change (make_golden_fp8.py)
# The files the current writer must reproduce byte for byte: the latest version's, and those of later encodings.
CURRENT = VERSIONS[-1:] + ENCODINGS


@pytest.mark.parametrize("folder", VERSIONS + ENCODINGS, ids=[p.name for p in VERSIONS + ENCODINGS])
def test_golden_container_reads_and_verifies(folder):
    expected = json.loads((folder / "expected.json").read_text())
    report = verify(folder / "micro.zmoe", str(folder / "source"))
    assert report.ok, report.failures
    with Container(folder / "micro.zmoe") as c:
        names = list(c.tensors) + list(c.small_tensors)
        assert {name: hashlib.sha256(c.read_tensor(name)).hexdigest() for name in names} == expected["tensor_sha256"]
        slices = {
            f"{t.name}:{kind}": hashlib.sha256(payload).hexdigest()
            for layer, expert in c.experts
            for kind in ("msb", "lsb")
            for t, _, payload in (c.read_slices(layer, expert, kind) if c.slice_spec else [])
        }
        assert slices == expected.get("slice_sha256", {})


@pytest.mark.parametrize("folder", CURRENT, ids=[p.name for p in CURRENT])
def test_current_writer_reproduces_the_golden_files(tmp_path, folder):
    """Catches unintended format changes: the same input must still give the same bytes as the latest golden files
    (bar the version string); older versions are only read."""
    options = json.loads((folder / "expected.json").read_text())["pack_options"]
    out = tmp_path / "again.zmoe"
    pack(
        str(folder / "source"),
        out,
        PackOptions(
            coder=parse_coder(options["coder"]),
            chunk_values=options["chunk_values"],
            threads=1,
            slices=parse_slices(options["slices"]) if "slices" in options else None,
        ),
    )
    with Container(folder / "micro.zmoe") as golden, Container(out) as again:
        assert golden.header.manifest_offset == again.header.manifest_offset
        end = golden.header.manifest_offset
        assert bytes(golden.data[HEADER_NBYTES:end]) == bytes(again.data[HEADER_NBYTES:end])
        old, new = (json.loads(bytes(c.data[end:])) for c in (golden, again))
        old.pop("created_by"), new.pop("created_by")
        assert old == new
