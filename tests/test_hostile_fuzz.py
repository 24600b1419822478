"""Fuzzing twin of the hostile-container tests: hypothesis mutates a packed container's manifest.

Each example takes the manifest of a small clean container and changes it the way an attacker (or a broken writer)
would: keys deleted, values replaced by other JSON types, integers made huge, negative or slightly off, strings
turned into paths with ``..``, list elements swapped, duplicated or cut off. Every checksum is recomputed
(`conftest.rewrite_manifest`), so only the manifest's content can stop the reader. Then the reader opens it, the
summary behind ``zipmoe inspect`` is built, every embedded file and tensor is read, `zipmoe.verify.verify` runs, the
``inspect`` command runs in-process, and ``unpack`` writes into a directory four levels deep: each may succeed or
raise a `ZipmoeError`, and nothing may be written outside the output directory. Any other exception (a KeyError, a
MemoryError from an allocation made before its size was proven, a RecursionError) is a bug.

Each example runs under a 30-second alarm and an address-space cap, so a hang or a runaway allocation fails the
example instead of the machine. `scripts/attack.py` runs the same kinds of input through the real command line.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conftest import rewrite_manifest, run_cli
from zipmoe.errors import ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.quant.spec import SliceSpec
from zipmoe.summary import summarize
from zipmoe.unpack import unpack
from zipmoe.verify import verify

EXAMPLE_SECONDS = 30
EXTRA_ADDRESS_SPACE = 4 << 30  # an example may map this much more than the process already has
OUT_DEPTH = 4  # unpack writes to WORK/d1/d2/d3/OUT: a name needs 4 ".." to reach WORK
ABSOLUTE = "\x00ABSOLUTE\x00"  # stands for the example's own directory in absolute names (never a real "/path")

# the profile's examples (40 by default, 200 in the ci profile); the main test runs three times as many
FUZZ_EXAMPLES = max(10, settings.default.max_examples)
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# -- strategies ------------------------------------------------------------------------------------------------------

# Text without path separators: any separator comes from `PATHS`, whose paths stay inside the example's directory.
TEXT = st.text(st.characters(blacklist_characters="/\\"), max_size=12)
PATH_PARTS = st.sampled_from(
    ["..", ".", "", "a", "b.json", "config.json", "model.safetensors", "x.sh", "a\\..\\b", "nul\x00", "new\nline"]
)
PATHS = st.one_of(
    st.lists(PATH_PARTS, min_size=1, max_size=OUT_DEPTH).map("/".join),  # at most 4 "..": never above WORK
    st.sampled_from(["victim/abs.sh", "", "d1/x"]).map(lambda p: ABSOLUTE + "/" + p),
)
EDGE_INTS = st.sampled_from(
    [-1, 0, 1, 7, 63, 64, 65, 4095, 4096, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1,
     10**15, 10**30, -(2**63)]
)  # fmt: skip
INTS = st.one_of(EDGE_INTS, st.integers(-(10**6), 10**6))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(), TEXT, PATHS)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6
)


def perturbed_int(value: int) -> st.SearchStrategy[Any]:
    """An integer near ``value``, scaled, negated, overflowing 64 bits, or of another type."""
    return st.one_of(
        st.integers(-4, 4).map(lambda d: value + d),
        st.integers(1, 64).map(lambda k: value * 2**k),
        st.just(-value - 1),
        st.just(2**64 - value),
        st.just(float(value)),
        st.just(str(value)),
        EDGE_INTS,
    )


# -- mutating a manifest ----------------------------------------------------------------------------------------------


def manifest_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """The key paths a mutation may hit: every field, but of a long list (41 tensors, 8 expert records, 256
    histogram counts) only the first two elements, the middle one and the last, so that the other sections get
    their share."""
    paths = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            paths += manifest_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        indices = range(len(doc)) if len(doc) <= 4 else (0, 1, len(doc) // 2, len(doc) - 1)
        for i in indices:
            paths += manifest_paths(doc[i], (*prefix, i))
    return paths


def lookup(doc: Any, path: tuple) -> tuple[Any, Any]:
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    return parent, path[-1]


def mutate_once(doc: dict, data: st.DataObject) -> str:
    """Apply one drawn mutation to ``doc`` in place; return what it did (for the failure report)."""
    # a section first (source, model and stats are as likely as tensors), then a field of it
    section = data.draw(st.sampled_from(sorted(doc)), label="section")
    path = data.draw(st.sampled_from(manifest_paths(doc[section], (section,)) or [(section,)]), label="path")
    parent, key = lookup(doc, path)
    value = parent[key]
    ops = ["delete", "replace"]
    if isinstance(value, int) and not isinstance(value, bool):
        ops += ["perturb"] * 3
    if isinstance(value, str):
        ops += ["path"] * 2
    if isinstance(value, list) and value:
        ops += ["swap", "duplicate", "truncate"]
    op = data.draw(st.sampled_from(ops), label="operation")
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(JSON, label="new value")
    elif op == "perturb":
        parent[key] = data.draw(perturbed_int(value), label="new value")
    elif op == "path":
        # never more ".." than PATHS has: the names must not reach above the example's directory
        grown = st.just(value + "/x/..") if ".." not in value.split("/") else PATHS
        parent[key] = data.draw(st.one_of(PATHS, grown), label="new value")
    elif op == "swap":
        i, j = data.draw(st.integers(0, len(value) - 1)), data.draw(st.integers(0, len(value) - 1))
        value[i], value[j] = value[j], value[i]
    elif op == "duplicate":
        i, j = data.draw(st.integers(0, len(value) - 1)), data.draw(st.integers(0, len(value)))
        value.insert(j, value[i])
    else:
        value[:] = value[: data.draw(st.integers(0, len(value) - 1))]
    return f"{op} at {'.'.join(map(str, path))}"


def resolve_absolute(doc: Any, work: Path) -> Any:
    """Put the example's directory where a drawn absolute path says `ABSOLUTE`."""
    if isinstance(doc, dict):
        return {k: resolve_absolute(v, work) for k, v in doc.items()}
    if isinstance(doc, list):
        return [resolve_absolute(v, work) for v in doc]
    if isinstance(doc, str) and ABSOLUTE in doc:
        return doc.replace(ABSOLUTE, str(work))
    return doc


def hostile_copy(clean: Path, work: Path, data: st.DataObject, n_mutations: st.SearchStrategy[int]) -> Path:
    """A copy of ``clean`` in ``work`` with drawn mutations of its manifest and recomputed checksums."""
    path = work / "in.zmoe"
    shutil.copyfile(clean, path)
    done: list[str] = []

    def mutate(doc: dict) -> None:
        for _ in range(data.draw(n_mutations, label="mutations")):
            done.append(mutate_once(doc, data))
        fixed = resolve_absolute(doc, work)
        doc.clear()
        doc.update(fixed)

    rewrite_manifest(path, mutate)
    note("; ".join(done))
    return path


# -- guards -----------------------------------------------------------------------------------------------------------


class ExampleTimeout(Exception):
    """An example ran longer than `EXAMPLE_SECONDS` (not a ZipmoeError: a hang is a bug)."""


@contextmanager
def guarded(seconds: float = EXAMPLE_SECONDS):
    """Interrupt the example after ``seconds`` and cap its address space, then restore both."""

    def expire(signum: int, frame: Any) -> None:
        raise ExampleTimeout(f"example still running after {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + EXTRA_ADDRESS_SPACE
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, size and modification time (symlinks not followed)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            info = os.lstat(p)
            is_dir = stat.S_ISDIR(info.st_mode)  # a directory changes when entries come and go: only its existence
            entries[p] = (info.st_mode,) if is_dir else (info.st_mode, info.st_size, info.st_mtime_ns, info.st_ino)
    return entries


def written_outside(before: dict, after: dict, out: Path) -> list[str]:
    allowed = (str(out), str(out) + ".partial")
    return [
        p
        for p in sorted(set(before) | set(after))
        if before.get(p) != after.get(p) and not any(p == a or p.startswith(a + os.sep) for a in allowed)
    ]


def workspace(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh directory per example (hypothesis reuses ``tmp_path``), with a victim file and unpack's target."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "victim").mkdir()
    (work / "victim" / "x.sh").write_text("original\n")
    out = work.joinpath(*(f"d{i}" for i in range(1, OUT_DEPTH)), "OUT")
    out.parent.mkdir(parents=True)
    return work, out


def allowed(step: str, call) -> None:
    """Run ``call``; a ZipmoeError is an answer, any other exception fails the example (naming the step)."""
    try:
        call()
        event(f"{step}: done")
    except ZipmoeError:
        event(f"{step}: refused")
    except ExampleTimeout:
        raise
    except Exception as exc:
        raise AssertionError(f"{step}: {type(exc).__name__}: {exc}"[:2000]) from exc


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(checkpoints) -> Path:
    """The tiny demo checkpoint (tokenizer, chat template, generation config) packed with default options."""
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture(scope="module")
def sliced(checkpoints) -> Path:
    return checkpoints.packed(checkpoints.demo("tiny"), SliceSpec(8, 4))


# -- tests ------------------------------------------------------------------------------------------------------------


def read_everything(path: Path) -> None:
    with Container(path) as c:
        summarize(c, tensors=True)
        for f in c.manifest.files:
            c.read_file(f.name)
        for t in c.manifest.tensors:
            c.read_tensor(t.name)
        for layer, expert in list(c.experts)[:2]:
            c.read_expert(layer, expert)
        for layer, expert, kind in list(c.slice_records)[:2]:
            c.read_slices(layer, expert, kind)


def check_everything(path: Path, out: Path, work: Path, capsys) -> None:
    allowed("open, inspect and read", lambda: read_everything(path))
    allowed("verify", lambda: verify(path, threads=1))
    code, _, err = run_cli(capsys, "inspect", str(path), "--tensors")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 1), (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), err
    before = tree(work)
    allowed("unpack", lambda: unpack(path, out, threads=1))
    outside = written_outside(before, tree(work), out)
    assert not outside, f"unpack wrote outside {out}: {outside}"


@settings(FUZZ, max_examples=3 * FUZZ_EXAMPLES)
@given(data=st.data())
def test_mutated_manifest_is_read_or_refused(plain, tmp_path, capsys, data):
    work, out = workspace(tmp_path)
    with guarded():
        path = hostile_copy(plain, work, data, st.integers(1, 3))
        check_everything(path, out, work, capsys)


@FUZZ
@given(data=st.data())
def test_mutated_sliced_manifest_is_read_or_refused(sliced, tmp_path, capsys, data):
    work, out = workspace(tmp_path)
    with guarded():
        path = hostile_copy(sliced, work, data, st.integers(1, 2))
        check_everything(path, out, work, capsys)


NAME_TARGETS = st.sampled_from(["files", "safetensors"])


@FUZZ
@given(data=st.data())
def test_unpack_never_writes_outside_its_output(plain, tmp_path, data):
    """Names (and duplicates of entries) aimed at the file system: unpack refuses them or writes inside OUT only."""
    work, out = workspace(tmp_path)
    victim = (work / "victim" / "x.sh").read_bytes()
    path = work / "in.zmoe"
    shutil.copyfile(plain, path)

    def mutate(doc: dict) -> None:
        for _ in range(data.draw(st.integers(1, 3), label="renames")):
            section = data.draw(NAME_TARGETS, label="section")
            i = data.draw(st.integers(0, len(doc[section]) - 1), label="index")
            kind = data.draw(st.sampled_from(["path", "copy of another name", "duplicate entry"]), label="kind")
            if kind == "path":
                doc[section][i]["name"] = data.draw(st.one_of(PATHS, TEXT), label="name")
            elif kind == "copy of another name":
                j = data.draw(st.integers(0, len(doc["files"]) - 1), label="from")
                doc[section][i]["name"] = doc["files"][j]["name"] + data.draw(st.sampled_from(["", "/", "/.", "//"]))
            else:
                doc[section].insert(i, dict(doc[section][i]))
        fixed = resolve_absolute(doc, work)
        doc.clear()
        doc.update(fixed)

    if data.draw(st.booleans(), label="OUT holds a symlink to the victim"):
        out.mkdir()
        (out / "generation_config.json").symlink_to(work / "victim" / "x.sh")
    with guarded():
        rewrite_manifest(path, mutate)
        before = tree(work)
        allowed("unpack", lambda: unpack(path, out, force=True, threads=1))
        outside = written_outside(before, tree(work), out)
    assert not outside, f"unpack wrote outside {out}: {outside}"
    assert (work / "victim" / "x.sh").read_bytes() == victim


def test_guard_interrupts_a_hang():
    """The time guard itself: an example that never ends fails with ExampleTimeout, not a stuck test run."""
    with pytest.raises(ExampleTimeout), guarded(0.2):
        while True:
            math.sqrt(2.0)
