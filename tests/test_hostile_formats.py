"""Hostile containers and checkpoints: each attack is built first (checksums recomputed), then refused cleanly.

Covers names that would write outside `unpack`'s output, sizes and shapes that would allocate before the bytes exist,
JSON nested or numbered to crash a parser, informational fields of the wrong type, symbolic links out of a
checkpoint, concurrent and interrupted writers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, copy_of, rewrite_manifest, run_cli, write_safetensors
from zipmoe._partial import open_locked, partial_path
from zipmoe.errors import CheckpointError, ChecksumError, FormatError, OutputError
from zipmoe.formats.reader import Container
from zipmoe.pack import pack
from zipmoe.unpack import _target, unpack
from zipmoe.verify import verify


@pytest.fixture(scope="module")
def packed(checkpoints) -> Path:
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory beside the output that no command may write into."""
    path = tmp_path / "victim"
    path.mkdir()
    return path


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# -- names -------------------------------------------------------------------------------------------------------

BAD_NAMES = [
    "../escaped.sh", "../../../escaped.sh", "a/../../escaped.sh", "/tmp/zipmoe-absolute.sh", "", ".", "..", "a//b",
    "./config.json", "a/./b", "dir/", "a\\..\\b", "nul\x00byte", "new\nline", "esc\x1b[31m", "x" * 300,
]  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("section", ["files", "safetensors"])
def test_unsafe_names_are_refused_by_every_command(capsys, packed, tmp_path, victim, section, name):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, lambda d: d[section][0].update(name=name))
    with pytest.raises(FormatError, match=f"manifest {section}\\[0\\].name: unsafe file name"):
        Container(container)
    before = files_under(tmp_path)
    for command in (["verify"], ["inspect"], ["unpack", "-o", str(tmp_path / "out"), "--force"], ["run", "--help"]):
        if command[0] == "run":
            code, _, err = run_cli(capsys, "run", str(container), "Hello", "-n", "1", "--device", "cpu")
        else:
            code, _, err = run_cli(capsys, command[0], str(container), *command[1:])
        assert_one_line_error(code, err, "unsafe file name")
    assert files_under(tmp_path) == before and not Path("/tmp/zipmoe-absolute.sh").exists()


@pytest.mark.parametrize("names", [["config.json", "CONFIG.json"], ["config.json", "config.json/x"]])
def test_names_that_collide_are_refused(packed, tmp_path, names):
    container = copy_of(packed, tmp_path)

    def collide(doc):
        doc["files"][0]["name"], doc["files"][1]["name"] = names

    rewrite_manifest(container, collide)
    with pytest.raises(FormatError, match="name the same file|uses it as a directory"):
        Container(container)


def test_unpack_checks_every_target_itself(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("../victim/x", "/abs/x", "a/../../x"):
        with pytest.raises(OutputError, match="refusing to write"):
            _target(out, name)
    (out / "sub").symlink_to(victim, target_is_directory=True)
    with pytest.raises(OutputError, match="resolves outside"):
        _target(out, "sub/x.json")
    (out / "real").mkdir()
    (out / "inner").symlink_to(out / "real", target_is_directory=True)
    with pytest.raises(OutputError, match="inner is a symbolic link"):
        _target(out, "inner/x.json")


def test_unpack_never_writes_through_a_symlink_in_the_output(packed, tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    precious = victim / "precious"
    precious.write_text("keep me")
    (out / "config.json").symlink_to(precious)
    with pytest.raises(OutputError, match="exists"):
        unpack(packed, out)
    unpack(packed, out, force=True)
    assert precious.read_text() == "keep me"
    assert not (out / "config.json").is_symlink() and json.loads((out / "config.json").read_text())


def test_a_failed_unpack_leaves_nothing_and_the_rerun_needs_no_force(packed, tmp_path):
    container = copy_of(packed, tmp_path)
    with Container(container) as c:
        last = max((t.parts[0] for t in c.manifest.tensors), key=lambda b: b.offset)
    data = bytearray(container.read_bytes())
    data[last.offset + last.nbytes // 2] ^= 1  # the last tensor written: config and tokenizer come first
    container.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(FormatError, match="checksum mismatch"):
        unpack(container, out)
    assert not out.exists() and not partial_path(out).exists()
    partial_path(out).mkdir()
    (partial_path(out) / "config.json").write_text("left by a killed run")
    unpack(packed, out)
    assert not partial_path(out).exists() and (out / "model.safetensors").is_file()


def test_a_locked_output_is_refused(packed, tmp_path):
    out = tmp_path / "out"
    fd = open_locked(partial_path(out), directory=True)
    try:
        with pytest.raises(OutputError, match="locked: another zipmoe process is writing"):
            unpack(packed, out)
    finally:
        os.close(fd)
    unpack(packed, out)


# -- sizes, shapes, counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10**15, 2**60, 2**64 + 5])
@pytest.mark.parametrize("where", ["file", "tensor"])
def test_sizes_are_proven_before_anything_is_allocated(capsys, packed, tmp_path, size, where):
    container = copy_of(packed, tmp_path)

    def grow(doc):
        blob = doc["files"][0]["blob"] if where == "file" else doc["tensors"][0]["parts"][0]
        blob["size"] = size

    rewrite_manifest(container, grow)
    for command in (["verify"], ["inspect"], ["unpack", "-o", str(tmp_path / "out")]):
        code, _, err = run_cli(capsys, command[0], str(container), *command[1:])
        assert_one_line_error(code, err, "chunks recorded")


@pytest.mark.parametrize(
    "shape, message",
    [([0, 2**63], "expected at most 32 integers from 0 to"), ([1] * 40, "expected at most 32"), ([-1], "from 0")],
)
def test_absurd_shapes_are_refused(packed, tmp_path, shape, message):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, lambda d: d["tensors"][0].update(shape=shape))
    with pytest.raises(FormatError, match=message):
        Container(container)


def test_layer_numbers_are_bounded(packed, tmp_path):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, lambda d: d["experts"][0].update(layer=10**12))
    with pytest.raises(FormatError, match="out of range"):
        Container(container)


# -- JSON that crashes parsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
        (lambda t: t.replace('"stats":{', '"stats":{"big":' + "9" * 5000 + ",", 1), "a number of 5000 characters"),
        (lambda t: t.replace('"stats":{', '"stats":{"nan":NaN,', 1), "NaN is not JSON"),
        (lambda t: t[:10] + "\udcff" + t[10:], "not UTF-8 JSON"),
    ],
)
def test_manifest_json_bombs(capsys, packed, tmp_path, edit, message):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, edit_text=edit)
    code, _, err = run_cli(capsys, "inspect", str(container))
    assert_one_line_error(code, err, "manifest: ", message)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
        (lambda t: t[:-1] + ',"big":' + "1" * 5000 + "}", "a number of 5000 characters"),
    ],
)
@pytest.mark.parametrize("target", ["config.json", "model.safetensors"])
def test_checkpoint_json_bombs(checkpoints, tmp_path, edit, message, target):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    if target == "config.json":
        path = source / "config.json"
        path.write_text(edit(path.read_text()))
    else:
        path = source / "model.safetensors"
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = edit(data[8 : 8 + n].decode().rstrip()).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n :])
    with pytest.raises(CheckpointError, match=message):
        pack(str(source), tmp_path / "m.zmoe")


# -- informational fields ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["source"].update(kind=5), "source.kind"),
        (lambda d: d["source"].pop("name"), "missing field 'name'"),
        (lambda d: d["model"].update(n_layers="two"), "model.n_layers"),
        (lambda d: d["model"].update(model_type=["x"]), "model.model_type"),
        (lambda d: [d["model"].pop(k) for k in ("model_type", "n_layers", "n_experts")], None),
        (lambda d: d["stats"].update(classes=[]), "stats.classes"),
        (lambda d: d["stats"]["classes"]["expert"].update(exponent_histogram=[1, 2]), "256 integers"),
        (lambda d: d["stats"]["classes"]["expert"].update(exponent_histogram=[10**30] * 256), "256 integers"),
    ],
)
def test_inspect_reads_only_validated_fields(capsys, packed, tmp_path, mutate, message):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, mutate)
    code, _, err = run_cli(capsys, "inspect", str(container))
    if message is None:  # informational fields may be missing
        assert code == 0, err
    else:
        assert_one_line_error(code, err, message)


def test_markup_in_names_is_printed_as_text(capsys, packed, tmp_path):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, lambda d: d["files"][0].update(name="[/red]x\x07"))
    code, _, err = run_cli(capsys, "inspect", str(container))
    assert_one_line_error(code, err, "[/red]x")


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_symlinks_out_of_a_checkpoint_are_refused(checkpoints, tmp_path, victim):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    secret = victim / "secret.txt"
    secret.write_text("not for publishing")
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="tokenizer.json: a symbolic link to .*secret.txt, outside"):
        pack(str(source), tmp_path / "m.zmoe")
    (source / "tokenizer.json").unlink()
    shutil.copy(checkpoints.demo("tiny") / "tokenizer.json", source / "real-tokenizer.json")
    (source / "tokenizer.json").symlink_to("real-tokenizer.json")  # inside the directory: followed
    pack(str(source), tmp_path / "m.zmoe")


def test_index_naming_a_file_outside_is_refused(checkpoints, tmp_path):
    source = tmp_path / "ckpt"
    source.mkdir()
    write_safetensors(source / "a.safetensors", {"w": ("F32", [1], b"\0" * 4)})
    index = {"metadata": {}, "weight_map": {"w": "../a.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="must name files in the same directory"):
        pack(str(source), tmp_path / "m.zmoe")


# -- writers -----------------------------------------------------------------------------------------------------


def test_a_partial_file_never_opens_even_when_complete(checkpoints, tmp_path, monkeypatch):
    """A pack killed while it reads its finished file back leaves a complete file: its magic is still zero."""
    import zipmoe.pack as pack_module

    snapshot = tmp_path / "snapshot.zmoe"
    real = pack_module._check_written

    def check_and_snapshot(path, workers):
        shutil.copy(path, snapshot)  # the file as a SIGKILL at this moment would leave it
        real(path, workers)

    monkeypatch.setattr(pack_module, "_check_written", check_and_snapshot)
    pack(str(checkpoints.demo("tiny")), tmp_path / "m.zmoe")
    with pytest.raises(FormatError, match="unfinished file: its magic is written last"):
        verify(snapshot)
    assert verify(tmp_path / "m.zmoe").ok


def test_a_second_writer_of_the_same_output_is_refused(checkpoints, tmp_path):
    out = tmp_path / "m.zmoe"
    fd = open_locked(partial_path(out), directory=False)
    try:
        with pytest.raises(OutputError, match="locked: another zipmoe process is writing m.zmoe"):
            pack(str(checkpoints.demo("tiny")), out)
    finally:
        os.close(fd)
    assert not out.exists()


def _zipmoe(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zipmoe", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)


def test_concurrent_packs_one_wins_cleanly(checkpoints, tmp_path):
    source = str(checkpoints.demo("small"))
    out = tmp_path / "m.zmoe"
    for _ in range(2):
        runs = [_zipmoe("pack", source, "-o", str(out), "--force", "--quiet") for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in runs]
        for code, err in results:
            assert code in (0, 1) and "Traceback" not in err, err  # never a signal (SIGBUS) or a crash
            assert code == 0 or "locked: another zipmoe process is writing" in err, err
        assert any(code == 0 for code, _ in results)
        assert verify(out).ok


@pytest.mark.parametrize("command", ["pack", "unpack"])
def test_sigkill_leaves_nothing_that_looks_valid(checkpoints, tmp_path, command):
    source = checkpoints.demo("small")
    container = checkpoints.packed(source)
    out = tmp_path / ("m.zmoe" if command == "pack" else "out")
    args = [str(source), "-o", str(out)] if command == "pack" else [str(container), "-o", str(out)]
    for delay in (0.3, 1.0, 2.0, 3.0):
        run = _zipmoe(command, *args, "--quiet", "--force")
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        if command == "pack":
            assert not out.exists() or verify(out).ok  # published only when complete
            if partial_path(out).exists():
                with pytest.raises(FormatError):
                    verify(partial_path(out))
        elif out.exists():  # published whole, or not at all
            assert_same_files(out, source)
    rerun = _zipmoe(command, *args, "--quiet", "--force")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    if command == "pack":
        assert verify(out).ok
    else:
        assert_same_files(out, source)


def assert_same_files(out: Path, source: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in source.iterdir())
    assert all((out / n).read_bytes() == (source / n).read_bytes() for n in names)


def test_pack_warns_about_a_config_run_would_refuse(checkpoints, tmp_path):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["num_experts_per_tok"] = 0
    (source / "config.json").write_text(json.dumps(config))
    warnings = []
    result = pack(str(source), tmp_path / "m.zmoe", warn=warnings.append)
    assert warnings == list(result.warnings)
    assert any("num_experts_per_tok" in w and "zipmoe run will refuse this container" in w for w in warnings)


# -- many small tensors --------------------------------------------------------------------------------------------


def test_many_tiny_tensors_share_runs(tmp_path):
    """20,000 one-byte tensors: no record (and no manifest entry) each, so the overhead stays bounded."""
    source = tmp_path / "ckpt"
    source.mkdir()
    tensors = {f"t.{i}": ("U8", [1], bytes([i % 251])) for i in range(20_000)}
    tensors["big"] = ("BF16", [128, 256], bytes(range(256)) * 256)  # listed: 64 KiB
    write_safetensors(source / "model.safetensors", tensors)
    out = tmp_path / "m.zmoe"
    result = pack(str(source), out)
    source_bytes = (source / "model.safetensors").stat().st_size
    assert out.stat().st_size <= source_bytes * 1.01 + (1 << 20), (out.stat().st_size, source_bytes)
    assert result.n_tensors == 20_001 and verify(out, str(source)).ok
    with Container(out) as c:
        assert c.manifest.format_version == 3 and c.manifest.small_tensors == 20_000 and list(c.tensors) == ["big"]
        assert c.read_tensor("t.300").tobytes() == bytes([300 % 251]) and len(c.dense_tensors()) == 20_001
    unpack(out, tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(small_tensors=d["small_tensors"] + 1), "the manifest counts"),
        (lambda d: d["tensors"][0].update(name="renamed"), "is not in the manifest, nor a small tensor inside a"),
    ],
)
def test_small_tensors_must_be_accounted_for(checkpoints, packed, tmp_path, mutate, message):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, mutate)
    with pytest.raises(FormatError, match=message):
        assert Container(container).small_tensors
    report = verify(container, str(checkpoints.demo("tiny")))
    assert sum(message in f for f in report.failures) == 1, report.failures  # reported once


def test_names_that_look_like_markup_are_written_and_printed_as_they_are(capsys, packed, tmp_path):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, lambda d: d["files"][0].update(name="[/]x.json"))
    code, out, err = run_cli(capsys, "unpack", str(container), "-o", str(tmp_path / "out"))
    assert code == 0 and "[/]x.json" in out, err
    assert (tmp_path / "out" / "[/]x.json").is_file()


def test_special_files_and_partial_names_are_not_containers(capsys, packed, tmp_path):
    fifo = tmp_path / "pipe.zmoe"
    os.mkfifo(fifo)
    for command in ("inspect", "verify"):
        code, _, err = run_cli(capsys, command, str(fifo))
        assert_one_line_error(code, err, "not a regular file")
    named = copy_of(packed, tmp_path).rename(tmp_path / "m.zmoe.partial")
    code, _, err = run_cli(capsys, "verify", str(named))
    assert_one_line_error(code, err, "an unfinished output")


def test_absurd_thread_counts_are_usage_errors(capsys, packed):
    code, out, err = run_cli(capsys, "verify", str(packed), "--threads", "100000")
    assert code == 2 and "Traceback" not in err


def test_json_bounds_scan_long_strings_in_constant_memory():
    import resource

    from zipmoe._json import load_json

    text = '{"a":"' + "x" * 20_000_000 + '\\"' + '","n":[1]}'
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert load_json(text, ValueError)["n"] == [1]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: the text and its parse only


# -- split expert records (format version 4) -----------------------------------------------------------------------


def _member_part(doc, record: int = 0, member: int = 0) -> dict:
    t, p = doc["experts"][record]["members"][member]
    return doc["tensors"][t]["parts"][p]


def _dense_part(doc) -> dict:
    return next(t for t in doc["tensors"] if t["class"] == "dense" and t["dtype"] == "BF16")["parts"][0]


def _plane_outside(doc):
    record = doc["experts"][0]
    _member_part(doc, 0, 2)["plane"] = record["offset"] + record["nbytes"]


def _planes_overlap(doc):
    _member_part(doc, 0, 1)["plane"] = _member_part(doc, 0, 0)["plane"]


def _plane_on_another_blob(doc):
    _member_part(doc)["plane"] = _dense_part(doc)["offset"]


def _plane_in_exponents(doc):
    _member_part(doc, 0, 1)["plane"] = _member_part(doc, 0, 1)["offset"]


def _plane_on_dense(doc):
    part = _dense_part(doc)
    part["plane"] = part["offset"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_plane_outside, r"expert record \(layer 0, expert 0\): the sign-mantissa plane of .* lies outside"),
        (lambda d: d["experts"][0].update(planes=d["experts"][0]["planes"] + 64), "section at .* is misaligned"),
        (lambda d: d["experts"][0].update(planes=d["experts"][0]["offset"]), "section at .* is misaligned or outside"),
        (_planes_overlap, "lies outside the record's sign-mantissa section .* or out of order"),
        (_plane_in_exponents, "lies outside the record's sign-mantissa section .* or out of order"),
        (_plane_on_another_blob, "lies outside the record's sign-mantissa section"),
        (_plane_on_dense, "only a bf16-split expert part may have a sign-mantissa plane apart"),
        (lambda d: d["files"][0]["blob"].update(plane=64), r"files\[0\].blob.plane: only a bf16-split expert part"),
        (lambda d: d.update(format_version=3), "planes stored apart need format version 4, the file says 3"),
        (lambda d: _member_part(d).pop("plane"), "has no sign-mantissa plane apart, in a split record"),
        (lambda d: d["experts"][0].pop("planes"), "has a sign-mantissa plane apart, in a record that is not split"),
        (lambda d: d["experts"][0].update(planes="4096"), r"experts\[0\].planes: expected an integer"),
    ],
)
def test_hostile_split_records_are_refused(capsys, packed, tmp_path, mutate, message):
    container = copy_of(packed, tmp_path)
    rewrite_manifest(container, mutate)
    with pytest.raises(FormatError, match=message):
        Container(container)
    code, _, err = run_cli(capsys, "verify", str(container))
    assert_one_line_error(code, err)


def test_a_corrupted_plane_is_found_at_its_offset(packed, tmp_path):
    container = copy_of(packed, tmp_path)
    with Container(container) as c:
        layout = c.expert_layouts[(1, 2)]
        member = layout.members[1]
        plane = member.view.plane_file_offset
        n_values = member.view.size // 2
    data = bytearray(container.read_bytes())
    data[plane + n_values // 2] ^= 0x04  # a sign-mantissa byte, far from the exponent section
    container.write_bytes(bytes(data))
    report = verify(container)
    failures = [f for f in report.failures if "sign-mantissa bytes: checksum mismatch" in f]
    assert len(failures) == 1 and member.name in failures[0], report.failures
    offset = int(failures[0].rsplit("file offset ", 1)[1].rstrip(")"))
    assert plane <= offset <= plane + n_values // 2 < plane + n_values
    with Container(container) as c, pytest.raises(ChecksumError, match=f"{member.name}.*sign-mantissa bytes"):
        c.read_expert(1, 2)


def test_nonzero_bytes_between_the_sections_are_found(packed, tmp_path):
    container = copy_of(packed, tmp_path)
    with Container(container) as c:
        layout = c.expert_layouts[(0, 1)]
    data = bytearray(container.read_bytes())
    data[layout.planes - 1] = 1  # the last byte of the padding after the exponent section
    container.write_bytes(bytes(data))
    report = verify(container)
    assert len(report.failures) == 1, report.failures
    assert report.failures[0].startswith(f"padding: nonzero byte at file offset {layout.planes - 1} (in padding ")
