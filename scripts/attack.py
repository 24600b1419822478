#!/usr/bin/env python
"""A rerunnable hostile-input campaign against the zipmoe command line.

    .venv/bin/python scripts/attack.py                  # every family, ~730 cases, 2 at a time (4-11 min)
    .venv/bin/python scripts/attack.py --quick          # ~65 cases, for CI-like use (~2 min)
    .venv/bin/python scripts/attack.py --family names --family sizes --jobs 2 --json
    .venv/bin/python scripts/attack.py --markdown       # the table for docs/SECURITY.md

The campaign builds a tiny clean checkpoint offline (the ``tiny`` demo preset: Mixtral layout, tokenizer and chat
template), packs it (also with ``--slices 8:4``), checks that ``zipmoe run`` serves it, and then crafts hostile
inputs in families. Every case is a crafted input plus the zipmoe commands to run on it, each in its own process
(``python -m zipmoe ...``) in a private temporary directory that holds the declared output path, a ``victim/`` tree
that path-traversal names point at, and sentinel files. Container manifests are rewritten with every checksum
recomputed, so that checksums alone cannot save the reader.

Each command runs with a wall-clock timeout (``--timeout``, 30 s), an address-space cap (``--max-vm``, RLIMIT_AS)
and a resident-memory bound (``--max-rss``, polled from /proc), and its outcome is one of:

    clean          refused: exit 1 or 2, no traceback, an ``Error:`` line (or a usage error)
    accepted       exit 0 where the case allows it (a harmless oddity, a valid input)
    wrong          exit 0 where a refusal was required (or a refusal where success was), or a check after the
                   commands failed: a corruption verify missed, a partial output that verifies, a secret embedded
    traceback      a Python traceback on stderr, or the CLI's one-line ``Error: internal error (...)`` that stands
                   for one
    hang           still running at the timeout (killed)
    memory         killed above --max-rss, or a MemoryError / bad_alloc
    crash          ended by a signal
    unclean        any other exit: a status other than 0, 1 and 2, or no one-line error
    outside-write  a file created, changed or removed anywhere in the case directory outside the declared output

Everything but ``clean`` and ``accepted`` is a failure; the exit status is 1 if there is any. Nothing is written
outside the campaign's temporary directory: traversal names resolve into the case directory by construction.

Commands run in children forked from one process that has already imported the CLI (see `ZYGOTE`): the same
``zipmoe.cli.app.main(argv)`` that ``python -m zipmoe`` runs, without paying torch's start-up for every one of
~900 commands; ``--exec`` starts a fresh interpreter per command instead. Families are in ``FAMILIES``; docs/SECURITY.md
describes them and keeps the results.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ZIPMOE = [sys.executable, "-m", "zipmoe"]
OUT_PARTS = ("d1", "d2", "d3", "d4", "OUT")  # unpack's output directory, five levels below the case root
UP = "../" * len(OUT_PARTS)  # from inside OUT back to the case root
SECRET = "ZIPMOE-ATTACK-SECRET-7f3a9c"  # in secret/passwd; must never end up inside a container
GIB = 1 << 30

OUTCOMES = ("clean", "accepted", "wrong", "traceback", "hang", "memory", "crash", "unclean", "outside-write")
FAILURES = OUTCOMES[2:]
COLUMNS = {
    "clean": "clean errors",
    "accepted": "accepted (expected)",
    "wrong": "wrong outcome",
    "traceback": "tracebacks",
    "hang": "hangs",
    "memory": "memory",
    "crash": "crashes",
    "unclean": "unclean exit",
    "outside-write": "outside writes",
}

REFUSE, ANY, ACCEPT = "refuse", "any", "accept"  # what a command's exit may be

# -- running one command ---------------------------------------------------------------------------------------------


@dataclass
class Limits:
    timeout: float  # seconds
    rss_bytes: int  # resident memory bound, polled
    vm_bytes: int  # RLIMIT_AS


@dataclass
class Result:
    """What one command did."""

    argv: list
    rc: int
    stdout: str
    stderr: str
    seconds: float
    maxrss_bytes: int  # ru_maxrss of this child, from wait4
    killed: str | None = None  # "hang", "memory", or "ours" (a deliberate SIGKILL)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ZIPMOE_DEBUG", None)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="400",  # rich wraps at the terminal width; one error line should stay one line
        NO_COLOR="1",
        PYTHONFAULTHANDLER="1",  # a segfault prints where it happened
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
    )
    return env


CHILD_ENV = _child_env()


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _read_capped(path: Path, cap: int = 64 << 10) -> str:
    """The text of a log file, its head and tail when it is large (a hostile input may print megabytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size <= 2 * cap:
                data = f.read()
            else:
                head = f.read(cap)
                f.seek(size - cap)
                data = head + f"\n[... {size - 2 * cap} bytes left out ...]\n".encode() + f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


# One process that has imported the CLI (torch, numba, the compiled codecs) and forks a fresh child for every
# command: the child runs `zipmoe.cli.app.main(argv)`, exactly what `python -m zipmoe ARGV` runs, ends the way the
# interpreter would (SystemExit codes, an uncaught exception printed as a traceback, exit handlers, non-daemon
# threads joined), and is reaped here with wait4 for its own rusage. It saves the ~2.5 s of start-up per command that
# would otherwise be most of the campaign's time; `--exec` starts a fresh interpreter per command instead.
ZYGOTE = r"""
import json, os, resource, select, signal, sys, traceback
REQ, REP = os.dup(0), os.dup(1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(2, 1)
from zipmoe.cli.app import main
from zipmoe.cli._output import prepare_codecs
prepare_codecs(True)
import gc
gc.collect()

def reply(doc):
    os.write(REP, (json.dumps(doc) + "\n").encode())

def child(req):
    code = 1
    try:
        os.setsid()
        os.close(REQ)
        os.close(REP)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.chdir(req["cwd"])
        resource.setrlimit(resource.RLIMIT_AS, (req["vm"], req["vm"]))
        sys.argv = ["zipmoe"] + req["argv"]
        try:
            main(req["argv"])
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            import atexit, threading
            threading._shutdown()
            atexit._run_exitfuncs()
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)

reply({"ready": os.getpid()})
buf = b""
while True:
    ready, _, _ = select.select([REQ], [], [], 0.02)
    if ready:
        data = os.read(REQ, 1 << 20)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(req)
            reply({"id": req["id"], "pid": pid})
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            break
        reply({"pid": pid, "status": status, "maxrss": usage.ru_maxrss})
"""


class Zygote:
    """The driver's side of `ZYGOTE`: send a command, get a pid; a reader thread collects exit statuses."""

    def __init__(self, cwd: Path, log: Path) -> None:
        self.lock = threading.Lock()
        self.pids: dict[int, int] = {}  # request id -> pid
        self.exits: dict[int, tuple[int, int]] = {}  # pid -> (wait status, ru_maxrss in KiB)
        self.changed = threading.Condition(self.lock)
        self.next_id = 0
        with open(log, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE],
                cwd=cwd,
                env=CHILD_ENV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        line = self.popen.stdout.readline()
        if not line or "ready" not in json.loads(line):
            raise SystemExit(f"the zygote did not start; see {log}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            doc = json.loads(line)
            with self.changed:
                if "id" in doc:
                    self.pids[doc["id"]] = doc["pid"]
                else:
                    self.exits[doc["pid"]] = (doc["status"], doc["maxrss"])
                self.changed.notify_all()
        with self.changed:  # the zygote is gone
            self.changed.notify_all()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def spawn(self, argv: list[str], cwd: Path, stdout: Path, stderr: Path, vm_bytes: int) -> int:
        with self.changed:
            self.next_id += 1
            request = self.next_id
            doc = {"id": request, "argv": argv, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr),
                   "vm": vm_bytes}  # fmt: skip
            self.popen.stdin.write((json.dumps(doc) + "\n").encode())
            self.popen.stdin.flush()
            while request not in self.pids:
                if not self.alive():
                    raise OSError("the zygote exited")
                self.changed.wait(1.0)
            return self.pids.pop(request)

    def poll(self, pid: int) -> tuple[int, int] | None:
        with self.lock:
            return self.exits.pop(pid, None)

    def close(self) -> None:
        try:
            self.popen.stdin.close()
            self.popen.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.popen.kill()


ZYGOTES: list[Zygote] = []  # the one in use, when not --exec


class Proc:
    """A child in its own session, watched for time and resident memory, reaped with wait4 for its own rusage."""

    def __init__(self, argv: list, cwd: Path, log: Path, limits: Limits, *, fresh: bool = False) -> None:
        self.argv, self.limits, self.killed, self.rc = argv, limits, None, None
        self.out_path, self.err_path = log.with_suffix(".out"), log.with_suffix(".err")
        self.zygote = None if fresh or not ZYGOTES or not ZYGOTES[0].alive() else ZYGOTES[0]
        if self.zygote is not None and argv[:3] == ZIPMOE:
            args = [os.fsdecode(a) if isinstance(a, bytes) else a for a in argv[3:]]
            self.pid = self.zygote.spawn(args, cwd, self.out_path, self.err_path, limits.vm_bytes)
        else:
            self.zygote = None
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                popen = subprocess.Popen(
                    argv, cwd=cwd, env=CHILD_ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True,
                )  # fmt: skip
            self.pid = popen.pid
            popen.returncode = 0  # reaped below with wait4, not by Popen
            try:  # set from outside (preexec_fn is unsafe with threads); the child is still starting
                import resource

                resource.prlimit(self.pid, resource.RLIMIT_AS, (limits.vm_bytes, limits.vm_bytes))
            except (ImportError, AttributeError, OSError, ValueError):
                pass
        self.started = time.monotonic()

    def kill(self, reason: str) -> None:
        if self.killed is None:
            self.killed = reason
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def running(self) -> bool:
        return self.rc is None and os.path.exists(f"/proc/{self.pid}") and not _zombie(self.pid)

    def _reaped(self) -> tuple[int, int] | None:
        if self.zygote is not None:
            done = self.zygote.poll(self.pid)
            if done is None and not self.zygote.alive():
                return (signal.SIGKILL, 0)
            return done
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        return (status, usage.ru_maxrss) if pid else None

    def wait(self, timeout: float | None = None) -> Result:
        deadline = self.started + (self.limits.timeout if timeout is None else timeout)
        while True:
            done = self._reaped()
            if done is not None:
                break
            if self.killed is None:
                if time.monotonic() > deadline:
                    self.kill("hang")
                elif _rss_bytes(self.pid) > self.limits.rss_bytes:
                    self.kill("memory")
            time.sleep(0.02)
        status, maxrss_kib = done
        self.rc = os.waitstatus_to_exitcode(status)
        try:  # anything the child left behind in its session
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return Result(
            self.argv,
            self.rc,
            _read_capped(self.out_path),
            _read_capped(self.err_path),
            time.monotonic() - self.started,
            maxrss_kib * 1024,
            self.killed,
        )


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


# -- what changed on disk ---------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (symlinks not followed) with what identifies its content."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                entries[path] = ("dir",)
            elif stat.S_ISLNK(st.st_mode):
                entries[path] = ("link", os.readlink(path))
            else:
                entries[path] = ("file", st.st_size, st.st_mtime_ns, st.st_ino, stat.S_IFMT(st.st_mode))
    return entries


def outside_writes(before: dict, after: dict, outputs: list[Path], root: Path) -> list[str]:
    """Paths created, changed or removed that are not an output (or ``OUTPUT.something`` beside it)."""
    allowed = [str(o) for o in outputs]
    changed = []
    for path in sorted(set(before) | set(after)):
        if before.get(path) == after.get(path):
            continue
        if any(path == o or path.startswith(o + os.sep) or path.startswith(o + ".") for o in allowed):
            continue
        what = "created" if path not in before else "removed" if path not in after else "changed"
        changed.append(f"{what} {os.path.relpath(path, root)}")
    return changed


# -- outcomes ---------------------------------------------------------------------------------------------------------


def exception_line(stderr: str) -> str:
    """The ``Type: message`` line that ends the last traceback, with the frame that raised it."""
    lines = stderr[stderr.rfind("Traceback (most recent call last)") :].splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    last = ""
    if frames:  # the exception starts at the first unindented line after the last frame (it may span lines)
        last = next((ln.strip() for ln in lines[frames[-1] + 1 :] if ln and not ln[0].isspace()), "")
    where = ""
    if frames:
        parts = lines[frames[-1]].strip().split('"')
        if len(parts) >= 3:
            line_no = parts[2].split(",")[1].strip() if "," in parts[2] else ""
            where = f" [{'/'.join(Path(parts[1]).parts[-2:])} {line_no}]"
    return (last or "Traceback")[:200] + where


def error_line(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.strip().startswith("Error:"):
            return line.strip()[:300]
    if "Usage:" in stderr:
        body = [ln.strip(" │╭╮╰╯─") for ln in stderr.splitlines() if ln.strip().startswith("│")]
        return "usage: " + " ".join(b for b in body if b)[:280]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else ""


def classify(r: Result, expect: str, rss_limit: int) -> tuple[str, str]:
    """The outcome of one command and a one-line detail."""
    err = r.stderr
    if r.killed == "hang":
        return "hang", f"still running after {r.seconds:.0f} s; killed"
    if r.killed == "memory":
        return "memory", f"resident memory above {rss_limit / GIB:.1f} GiB; killed"
    if "MemoryError" in err:
        return "memory", exception_line(err) if "Traceback" in err else error_line(err)
    if "std::bad_alloc" in err:
        return "memory", f"std::bad_alloc (exit {r.rc})"
    if r.rc < 0:
        try:
            name = signal.Signals(-r.rc).name
        except ValueError:
            name = f"signal {-r.rc}"
        fatal = next((ln for ln in err.splitlines() if "Fatal Python error" in ln), "")
        return "crash", f"{name} {fatal}".strip()
    if "Traceback (most recent call last)" in err:
        return "traceback", exception_line(err)
    internal = next((ln.strip() for ln in err.splitlines() if ln.strip().startswith("Error: internal error")), None)
    if internal:  # an uncaught exception that the CLI turned into one line: still a bug
        return "traceback", internal[:300]
    if any(ln.strip() == "Error: out of memory" for ln in err.splitlines()):
        return "memory", "Error: out of memory"
    if r.rc == 0:
        if expect == REFUSE:
            return "wrong", "exit 0: accepted an input that must be refused"
        return "accepted", ""
    clean = r.rc in (1, 2) and (
        any(ln.strip().startswith("Error:") for ln in err.splitlines()) or (r.rc == 2 and "Usage:" in err)
    )
    if expect == ACCEPT:
        return "wrong", f"exit {r.rc} where success was required: {error_line(err)}"
    if clean:
        return "clean", error_line(err)
    return "unclean", f"exit {r.rc}: {error_line(err) or '(nothing on stderr)'}"


# -- cases ------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    argv: list
    expect: str = REFUSE
    outputs: list[Path] = field(default_factory=list)
    timeout: float | None = None


@dataclass
class Plan:
    """What a case runs: steps in order (the first refusal or failure ends the case), then an optional check.

    ``custom`` replaces the steps for cases that need concurrency or kills: it returns the results with what each
    was expected to do, and a message when its own check failed.
    """

    steps: list[Step] = field(default_factory=list)
    check: Callable[[Ctx, list[Result]], str | None] | None = None
    outputs: list[Path] = field(default_factory=list)  # extra declared outputs (custom cases)
    custom: Callable[[Ctx], tuple[list[tuple[Result, str]], str | None]] | None = None


@dataclass
class Case:
    family: str
    name: str
    prepare: Callable[[Ctx], Plan]
    quick: bool = False  # always in --quick
    timeout: float | None = None  # overrides --timeout for every step
    slow: bool = False  # never in --quick


@dataclass
class Verdict:
    case: Case
    outcome: str
    detail: str
    results: list[Result]
    seconds: float
    deciding: Result | None = None


@dataclass
class Golden:
    """The clean inputs every case starts from (read-only: cases copy what they change)."""

    base: Path
    ckpt: Path
    containers: dict[str, Path]
    docs: dict[str, dict]
    clean_run: Result | None = None
    small_ckpt: Path | None = None
    small: Path | None = None
    small_pack_seconds: float = 0.0
    small_unpack_seconds: float = 0.0


class Ctx:
    """A case's private directory and helpers to craft inputs in it and run commands."""

    def __init__(self, root: Path, golden: Golden, limits: Limits, case: Case, logs: Path, seed: int) -> None:
        self.root, self.golden, self.limits, self.case, self.logs = root, golden, limits, case, logs
        self.rng = random.Random(seed)
        self.n_logs = 0
        self.out = root.joinpath(*OUT_PARTS)
        self.victim = root / "victim"
        self.cwd = root / "cwd"
        self.out.parent.mkdir(parents=True)
        self.cwd.mkdir()
        self.victim.mkdir()
        (self.victim / "x.sh").write_text("#!/bin/sh\necho original\n")
        (self.victim / "linked.txt").write_text("original\n")
        (self.victim / "target.bin").write_bytes(b"original\n")
        (root / "outside").mkdir()
        (root / "outside" / "keep.txt").write_text("sentinel\n")
        (root / "secret").mkdir()
        (root / "secret" / "passwd").write_text(f"root:x:0:0:{SECRET}:/root:/bin/sh\n")

    # crafting

    def container(self, key: str = "tiny", name: str = "in.zmoe") -> Path:
        path = self.root / name
        shutil.copyfile(self.golden.containers[key], path)
        return path

    def mutated(self, key: str, mutate: Callable[[dict, Ctx, Splicer], Any], name: str = "in.zmoe") -> Path:
        """The golden container ``key`` with its manifest changed by ``mutate`` and every checksum recomputed.

        ``mutate(doc, ctx, splice)`` edits the parsed manifest in place; ``splice(text)`` returns a placeholder
        value that is replaced by raw JSON text (deep nesting, 5,000-digit numbers, NaN); it may also return
        bytes, which become the whole manifest.
        """
        doc = copy.deepcopy(self.golden.docs[key])
        splice = Splicer()
        raw = mutate(doc, self, splice)
        manifest = raw if isinstance(raw, (bytes, bytearray)) else splice.dumps(doc).encode()
        path = self.root / name
        write_container(self.golden.containers[key], path, bytes(manifest))
        return path

    def ckpt(self, key: str = "ckpt") -> Path:
        target = self.root / "ckpt"
        shutil.copytree(self.golden.ckpt if key == "ckpt" else self.golden.small_ckpt, target)
        return target

    def fifo(self, name: str = "fifo") -> Path:
        path = self.root / name
        os.mkfifo(path)
        return path

    # running

    def spawn(self, argv: list, timeout: float | None = None) -> Proc:
        self.n_logs += 1
        limits = self.limits if timeout is None else Limits(timeout, self.limits.rss_bytes, self.limits.vm_bytes)
        return Proc(argv, self.cwd, self.logs / f"{self.n_logs:02d}", limits)

    def execute(self, argv: list, timeout: float | None = None) -> Result:
        timeout = timeout or self.case.timeout
        return self.spawn(argv, timeout).wait()


class Splicer:
    """Placeholders for raw JSON text that json.dumps cannot (or should not) produce."""

    def __init__(self) -> None:
        self.raw: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        key = f"@@SPLICE-{len(self.raw)}@@"
        self.raw[key] = text
        return key

    def dumps(self, doc: Any) -> str:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
        for key, raw in self.raw.items():
            text = text.replace(json.dumps(key), raw)
        return text


def write_container(src: Path, dst: Path, manifest: bytes) -> None:
    """``src`` with its manifest replaced by ``manifest``, the header's sizes and checksums recomputed."""
    from zipmoe.codecs.checksum import checksum
    from zipmoe.formats.constants import HEADER_NBYTES
    from zipmoe.formats.header import FileHeader

    data = src.read_bytes()
    h = FileHeader.unpack(data[:HEADER_NBYTES], len(data), str(src))
    header = FileHeader(
        h.alignment,
        h.manifest_offset + len(manifest),
        h.manifest_offset,
        len(manifest),
        checksum(manifest),
        h.format_version,
    )
    dst.write_bytes(header.pack() + data[HEADER_NBYTES : h.manifest_offset] + manifest)


def read_manifest(path: Path) -> dict:
    from zipmoe.formats.constants import HEADER_NBYTES
    from zipmoe.formats.header import FileHeader

    data = path.read_bytes()
    h = FileHeader.unpack(data[:HEADER_NBYTES], len(data), str(path))
    return json.loads(data[h.manifest_offset :])


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_safetensors(path: Path, header: str | bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file from raw header text; ``length`` overrides the 8-byte header length (to lie)."""
    blob = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def set_path(doc: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def zm(*args: Any) -> list:
    return [*ZIPMOE, *(a if isinstance(a, bytes) else str(a) for a in args)]


def command_step(command: str, path: Path, ctx: Ctx, expect: str) -> Step:
    """One of the commands every container attack goes through."""
    if command == "verify":
        return Step(zm("verify", path, "-q"), expect)
    if command == "inspect":
        return Step(zm("inspect", path, "--tensors"), expect)
    if command == "inspect-json":
        return Step(zm("inspect", path, "--json"), expect)
    if command == "unpack":
        return Step(zm("unpack", path, "-o", ctx.out, "-q"), expect, [ctx.out])
    if command == "run":
        return Step(zm("run", path, "Hello", "-n", "2"), expect)
    if command == "run-chat":
        return Step(zm("run", path, "Hello", "-n", "2", "--chat"), expect)
    if command == "run-q4":
        return Step(zm("run", path, "Hello", "-n", "2", "--mode", "q4"), expect)
    if command == "run-dbsc":
        return Step(zm("run", path, "Hello", "-n", "2", "--mode", "dbsc"), expect)
    raise ValueError(command)


def manifest_case(
    family: str,
    name: str,
    mutate: Callable[[dict, Ctx, Splicer], Any],
    command: str,
    *,
    source: str = "tiny",
    expect: str = REFUSE,
    quick: bool = False,
    timeout: float | None = None,
) -> Case:
    def prepare(ctx: Ctx) -> Plan:
        return Plan([command_step(command, ctx.mutated(source, mutate), ctx, expect)])

    return Case(family, f"{name} :{command}", prepare, quick, timeout)


def index_of(doc: dict, predicate: Callable[[dict], bool], default: int | None = None) -> int:
    found = next((i for i, t in enumerate(doc["tensors"]) if predicate(t)), default)
    if found is None:
        raise LookupError("the clean container has no tensor the case needs")
    return found


# -- family: names -----------------------------------------------------------------------------------------------------


def _abs(path: str) -> Callable[[Ctx], str]:
    return lambda ctx: f"{ctx.root}/{path}"


# (label, name or name(ctx), expect). Path names that escape OUT resolve inside the case root by construction.
BAD_NAMES: list[tuple[str, Any, str]] = [
    ("dotdot", "..", REFUSE),
    ("dot", ".", REFUSE),
    ("empty", "", REFUSE),
    ("slash", "/", REFUSE),
    ("parent", "../x.sh", REFUSE),
    ("escape-existing", UP + "victim/x.sh", REFUSE),
    ("escape-new", UP + "victim/new.sh", REFUSE),
    ("middle-dotdot", "a/../../b.sh", REFUSE),
    ("middle-dotdot-deep", "a/" + "../" * (len(OUT_PARTS) + 1) + "victim/deep.sh", REFUSE),
    ("absolute", _abs("victim/abs.sh"), REFUSE),
    ("absolute-dir", _abs("victim/"), REFUSE),
    ("double-slash", "a//b.json", REFUSE),
    ("dot-slash", "./a.json", REFUSE),
    ("inner-dot", "a/./b.json", REFUSE),
    ("trailing-slash", "a.json/", REFUSE),
    ("backslash", "a\\b.json", REFUSE),
    ("backslash-dotdot", "..\\..\\x.sh", REFUSE),
    ("nul", "a\x00b.json", REFUSE),
    ("newline", "a\nb.json", REFUSE),
    ("ansi-escape", "\x1b[31mred\x1b[0m.json", REFUSE),
    ("del-char", "a\x7f.json", REFUSE),
    ("lone-surrogate", "\ud800.json", REFUSE),
    ("rich-markup-close", "[/]x.json", ANY),
    ("long-component", "a" * 300 + ".json", ANY),
    ("long-path", "a/" * 3000 + "x.json", ANY),
    ("million-chars", "b" * 1_000_000, ANY),
    ("int", 5, REFUSE),
    ("null", None, REFUSE),
    ("list", ["config.json"], REFUSE),
    ("object", {"name": "x"}, REFUSE),
]
BENIGN_NAMES = [("subdir", "sub/dir.json"), ("unicode", "конфиг.json"), ("space", "a b.json"), ("dash", "-rf.json")]
PATH_LABELS = {
    "dotdot", "dot", "empty", "slash", "parent", "escape-existing", "escape-new", "middle-dotdot",
    "middle-dotdot-deep", "absolute", "absolute-dir", "double-slash", "dot-slash", "backslash-dotdot", "nul",
    "lone-surrogate",
}  # fmt: skip
INSPECT_LABELS = {"ansi-escape", "newline", "lone-surrogate", "rich-markup-close", "million-chars", "nul", "int"}
RUN_LABELS = {"dotdot", "escape-existing", "absolute", "nul", "lone-surrogate", "int"}


def _rename(target: str, name: Any) -> Callable[[dict, Ctx, Splicer], None]:
    def mutate(doc: dict, ctx: Ctx, splice: Splicer) -> None:
        value = name(ctx) if callable(name) else name
        if target == "file":
            doc["files"][1]["name"] = value  # generation_config.json: run and unpack both read it
        elif target == "safetensors":
            doc["safetensors"][0]["name"] = value
        else:
            doc["tensors"][0]["name"] = value

    return mutate


def _duplicate(first: str, second: str) -> Callable[[dict, Ctx, Splicer], None]:
    def mutate(doc: dict, ctx: Ctx, splice: Splicer) -> None:
        doc["files"][1]["name"] = first
        doc["files"][3]["name"] = second

    return mutate


def _planted(link_name: str, target: str, force: bool) -> Callable[[Ctx], Plan]:
    """unpack into an OUT that already holds a symlink (to a victim file) under a name unpack writes."""

    def prepare(ctx: Ctx) -> Plan:
        path = ctx.container()
        ctx.out.mkdir()
        link = ctx.out / link_name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ctx.root / target)
        argv = zm("unpack", path, "-o", ctx.out, "-q", *(["--force"] if force else []))
        return Plan([Step(argv, ANY, [ctx.out])])

    return prepare


def _planted_subdir(ctx: Ctx) -> Plan:
    """A name with a plain subdirectory component, where OUT already has that subdirectory as a symlink."""
    path = ctx.mutated("tiny", _rename("file", "sub/gen.json"))
    ctx.out.mkdir()
    (ctx.out / "sub").symlink_to(ctx.victim, target_is_directory=True)
    return Plan([Step(zm("unpack", path, "-o", ctx.out, "-q"), ANY, [ctx.out])])


def family_names(g: Golden) -> list[Case]:
    cases = []
    for label, name, expect in BAD_NAMES:
        quick = label in ("escape-existing", "absolute", "nul")
        cases.append(
            manifest_case("names", f"file={label}", _rename("file", name), "unpack", expect=expect, quick=quick)
        )
        if label in PATH_LABELS:
            cases.append(manifest_case("names", f"safetensors={label}", _rename("safetensors", name), "unpack",
                                       expect=expect, quick=label == "escape-new"))  # fmt: skip
        if isinstance(name, str) or callable(name):
            cases.append(manifest_case("names", f"file={label}", _rename("file", name), "verify", expect=expect))
        if label in INSPECT_LABELS:
            cases.append(manifest_case("names", f"file={label}", _rename("file", name), "inspect-json", expect=expect))
            cases.append(manifest_case("names", f"tensor={label}", _rename("tensor", name), "inspect", expect=ANY))
        if label in RUN_LABELS:
            cases.append(manifest_case("names", f"file={label}", _rename("file", name), "run", expect=expect))
    for label, name in BENIGN_NAMES:
        cases.append(manifest_case("names", f"file={label}", _rename("file", name), "unpack", expect=ANY))
    for label, first, second in [
        ("exact", "config.json", "config.json"),
        ("dot-slash", "config.json", "./config.json"),
        ("double-slash", "x/y.json", "x//y.json"),
        ("trailing-slash", "config.json", "config.json/"),
        ("dotdot-inside", "a/b.json", "a/c/../b.json"),
    ]:
        cases.append(manifest_case("names", f"duplicate-{label}", _duplicate(first, second), "unpack"))
        cases.append(manifest_case("names", f"duplicate-{label}", _duplicate(first, second), "verify"))
    cases.append(manifest_case("names", "file-equals-safetensors", _rename("file", "model.safetensors"), "unpack"))
    cases.append(manifest_case("names", "file-equals-safetensors", _rename("file", "model.safetensors"), "verify"))
    cases.append(manifest_case("names", "duplicate-tensor-name", _dup_tensor_name, "verify"))
    cases += [
        Case("names", "symlink-in-OUT :unpack --force", _planted("generation_config.json", "victim/linked.txt", True),
             quick=True),
        Case("names", "symlink-in-OUT safetensors :unpack --force", _planted("model.safetensors", "victim/target.bin",
                                                                             True)),
        Case("names", "symlink-as-partial-in-OUT :unpack", _planted("generation_config.json.partial",
                                                                    "victim/linked.txt", False)),
        Case("names", "symlinked-subdir-in-OUT :unpack", _planted_subdir),
    ]  # fmt: skip
    return cases


def _dup_tensor_name(doc: dict, ctx: Ctx, splice: Splicer) -> None:
    doc["tensors"][1]["name"] = doc["tensors"][0]["name"]


# -- family: sizes -----------------------------------------------------------------------------------------------------

SIZE_VALUES: list[tuple[str, Any]] = [
    ("-1", -1),
    ("0", 0),
    ("2^32+7", 2**32 + 7),
    ("1e15", 10**15),
    ("1e15-float", 1e15),
    ("2^60", 2**60),
    ("2^63", 2**63),
    ("2^64+1", 2**64 + 1),
    ("string", "64"),
]


def family_sizes(g: Golden) -> list[Case]:
    doc = g.docs["tiny"]
    embed = index_of(doc, lambda t: t["name"] == "model.embed_tokens.weight")
    expert = index_of(doc, lambda t: t["class"] == "expert")
    # format v3 leaves small tensors (the norms) out of `tensors`: then the zero-size attacks take lm_head
    norm = index_of(doc, lambda t: t["name"] == "model.norm.weight", index_of(doc, lambda t: t["class"] == "dense"))
    blob_fields = ("offset", "nbytes", "size", "n_chunks")
    fields: list[tuple[str, tuple]] = []
    fields += [(f"files[1].blob.{f}", ("files", 1, "blob", f)) for f in blob_fields]
    fields += [(f"dense.parts[0].{f}", ("tensors", embed, "parts", 0, f)) for f in blob_fields]
    fields += [(f"expert.parts[0].{f}", ("tensors", expert, "parts", 0, f)) for f in ("size", "nbytes", "n_chunks")]
    fields += [(f"experts[0].{f}", ("experts", 0, f)) for f in ("offset", "nbytes")]
    fields += [("safetensors[0].nbytes", ("safetensors", 0, "nbytes"))]
    fields += [(f"safetensors[0].header.{f}", ("safetensors", 0, "header", f)) for f in ("size", "n_chunks")]

    def setter(path: tuple, value: Any) -> Callable[[dict, Ctx, Splicer], None]:
        return lambda d, ctx, splice: set_path(d, path, value)

    cases = []
    # the type checks are one function for every field: wrong types on a few fields; big values on all of them
    typed = ("files[1].blob.size", "dense.parts[0].size", "experts[0].offset", "safetensors[0].nbytes")
    for label, path in fields:
        decodes = label.endswith(("size", "n_chunks"))
        for vlabel, value in SIZE_VALUES:
            if vlabel in ("0", "2^60", "2^63"):
                pass
            elif vlabel in ("2^32+7", "1e15"):
                if not decodes:
                    continue
            elif label not in typed:
                continue
            quick = vlabel == "2^60" and label in ("dense.parts[0].size", "files[1].blob.n_chunks")
            cases.append(manifest_case("sizes", f"{label}={vlabel}", setter(path, value), "verify", quick=quick))
            if decodes and vlabel in ("2^60", "1e15"):
                cases.append(manifest_case("sizes", f"{label}={vlabel}", setter(path, value), "unpack"))
            if decodes and vlabel == "2^60" and label.startswith(("dense", "expert")):
                cases.append(manifest_case("sizes", f"{label}={vlabel}", setter(path, value), "run"))
            if vlabel == "2^64+1":
                cases.append(manifest_case("sizes", f"{label}={vlabel}", setter(path, value), "inspect", expect=ANY))

    # a zero-size tensor whose shape holds a huge dimension: the parts agree (0 bytes), so sizes alone look fine
    def zero_size(shape: list, index: int = norm) -> Callable[[dict, Ctx, Splicer], None]:
        def mutate(d: dict, ctx: Ctx, splice: Splicer) -> None:
            t = d["tensors"][index]
            t["shape"] = shape
            t["parts"][0].update(size=0, n_chunks=0, nbytes=0)
            t["sha256"] = hashlib.sha256(b"").hexdigest()

        return mutate

    for label, shape in [
        ("[2^63,0]", [2**63, 0]),
        ("[0,2^63]", [0, 2**63]),
        ("[2^64,0]", [2**64, 0]),
        ("[2^62,2^62,0]", [2**62, 2**62, 0]),
        ("[0]*100", [0] * 100),
        ("[0,-1]", [0, -1]),
    ]:
        for command in ("verify", "run"):
            cases.append(manifest_case("sizes", f"norm.shape={label} zero-size", zero_size(shape), command,
                                       quick=label == "[2^63,0]" and command == "run"))  # fmt: skip
    for label, shape, expect in [
        ("flattened", [259 * 128], ANY),
        ("transposed", [128, 259], ANY),
        ("scalar", [], REFUSE),
        ("negative", [-259, -128], REFUSE),
        ("float", [259.0, 128], REFUSE),
        ("string", ["259", 128], REFUSE),
        ("huge", [2**40, 2**40], REFUSE),
    ]:
        mutate = (lambda s: lambda d, ctx, splice: d["tensors"][embed].update(shape=s))(shape)
        cases.append(manifest_case("sizes", f"embed.shape={label}", mutate, "verify", expect=expect))
        cases.append(manifest_case("sizes", f"embed.shape={label}", mutate, "run", expect=REFUSE))
    for label, dtype in [("unknown", "Q4_K"), ("empty", ""), ("int", 5), ("F32-for-BF16", "F32"), ("I8", "I8")]:
        mutate = (lambda v: lambda d, ctx, splice: d["tensors"][embed].update(dtype=v))(dtype)
        cases.append(manifest_case("sizes", f"embed.dtype={label}", mutate, "verify"))
        if label in ("unknown", "F32-for-BF16"):
            cases.append(manifest_case("sizes", f"embed.dtype={label}", mutate, "run"))

    # encodings
    for label, path, value in [
        ("raw.chunk_bytes=0", ("encodings", 1, "chunk_bytes"), 0),
        ("raw.chunk_bytes=1", ("encodings", 1, "chunk_bytes"), 1),
        ("raw.chunk_bytes=2^62", ("encodings", 1, "chunk_bytes"), 2**62),
        ("bf16.chunk_values=0", ("encodings", 0, "chunk_values"), 0),
        ("bf16.chunk_values=2^40", ("encodings", 0, "chunk_values"), 2**40),
        ("rans.lanes=0", ("encodings", 0, "exponent_coder", "lanes"), 0),
        ("rans.lanes=2^31", ("encodings", 0, "exponent_coder", "lanes"), 2**31),
        ("rans.precision_bits=64", ("encodings", 0, "exponent_coder", "precision_bits"), 64),
        ("coder=zstd:10^9", ("encodings", 0, "exponent_coder"), {"id": "zstd", "level": 10**9}),
        ("encoding-id=int", ("encodings", 1, "id"), 5),
    ]:
        mutate = (lambda p, v: lambda d, ctx, splice: set_path(d, p, v))(path, value)
        cases.append(manifest_case("sizes", label, mutate, "verify"))
        if label.endswith(("=0", "2^62", "2^40", "2^31")):
            cases.append(manifest_case("sizes", label, mutate, "run"))

    # format v3: small tensors stored inside gaps of the safetensors data, and their count
    gaps = [j for j, seg in enumerate(doc["safetensors"][0]["segments"]) if seg[0] == "gap"]
    if gaps:
        gap = ("safetensors", 0, "segments", gaps[0], 1)
        for label, field_name, value, commands in [
            ("gap.size=2^60", "size", 2**60, ("verify", "unpack", "run")),
            ("gap.size=0", "size", 0, ("verify", "run")),
            ("gap.n_chunks=2^40", "n_chunks", 2**40, ("verify", "run")),
            ("gap.nbytes=2^63", "nbytes", 2**63, ("verify",)),
        ]:
            mutate = (lambda p, v: lambda d, ctx, splice: set_path(d, p, v))((*gap, field_name), value)
            for command in commands:
                cases.append(manifest_case("sizes", f"safetensors[0].{label}", mutate, command))
    if "small_tensors" in doc:
        for label, value in [("0", 0), ("-1", -1), ("+1", doc["small_tensors"] + 1), ("2^60", 2**60), ("string", "7")]:
            mutate = (lambda v: lambda d, ctx, splice: d.update(small_tensors=v))(value)
            cases.append(manifest_case("sizes", f"small_tensors={label}", mutate, "verify"))
            cases.append(manifest_case("sizes", f"small_tensors={label}", mutate, "run"))
        cases.append(manifest_case("sizes", "small_tensors missing", lambda d, c, s: d.pop("small_tensors"), "run"))

    # counts
    def slices_set(key: str, value: Any) -> Callable[[dict, Ctx, Splicer], None]:
        return lambda d, ctx, splice: d["slices"].__setitem__(key, value)

    for label, mutate, command, source, expect in [
        ("model.n_experts=10^9", lambda d, c, s: d["model"].update(n_experts=10**9), "run", "tiny", ANY),
        ("model.n_layers=10^9", lambda d, c, s: d["model"].update(n_layers=10**9), "run", "tiny", ANY),
        ("model.n_layers=10^9", lambda d, c, s: d["model"].update(n_layers=10**9), "inspect", "tiny", ANY),
        ("experts-empty", lambda d, c, s: d.update(experts=[]), "verify", "tiny", REFUSE),
        ("experts-truncated", lambda d, c, s: d["experts"].pop(), "run", "tiny", REFUSE),
        ("expert-layer=10^9", lambda d, c, s: d["experts"][0].update(layer=10**9), "run", "tiny", REFUSE),
        ("expert-index=2^40", lambda d, c, s: d["experts"][0].update(expert=2**40), "run", "tiny", REFUSE),
        ("tensors-empty", lambda d, c, s: d.update(tensors=[], experts=[]), "run", "tiny", REFUSE),
        ("slices.group_size=0", slices_set("group_size", 0), "run-q4", "sliced", REFUSE),
        ("slices.group_size=2^40", slices_set("group_size", 2**40), "verify", "sliced", REFUSE),
        ("slices.group_size=-32", slices_set("group_size", -32), "run-q4", "sliced", REFUSE),
        ("slices.high_bits=64", slices_set("high_bits", 64), "run-dbsc", "sliced", REFUSE),
        ("slices.low_bits=high", slices_set("low_bits", 8), "run-q4", "sliced", REFUSE),
        ("slices.scale_dtype=F64", slices_set("scale_dtype", "F64"), "verify", "sliced", REFUSE),
        ("slices.records-empty", slices_set("records", []), "run-q4", "sliced", REFUSE),
        ("slices.record.nbytes=2^60", lambda d, c, s: d["slices"]["records"][0].update(nbytes=2**60), "run-q4",
         "sliced", REFUSE),
        ("slices.member.size=2^60", lambda d, c, s: d["slices"]["records"][0]["members"][0][2].update(size=2**60),
         "verify", "sliced", REFUSE),
    ]:  # fmt: skip
        cases.append(manifest_case("sizes", label, mutate, command, source=source, expect=expect))
    return cases


# -- family: json ------------------------------------------------------------------------------------------------------

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
BIG_INT = "9" * 5000
BIG_FLOAT = "1" + "0" * 5000 + ".5"


def _splice_at(path: tuple, text: str) -> Callable[[dict, Ctx, Splicer], None]:
    return lambda d, ctx, splice: set_path(d, path, splice(text))


def _manifest_text(edit: Callable[[str], str | bytes]) -> Callable[[dict, Ctx, Splicer], bytes]:
    def mutate(d: dict, ctx: Ctx, splice: Splicer) -> bytes:
        out = edit(splice.dumps(d))
        return out if isinstance(out, bytes) else out.encode("utf-8", "surrogatepass")

    return mutate


def _ckpt_step(ctx: Ctx, ckpt: Path, *extra: str, expect: str = ANY) -> Step:
    out = ctx.root / "out.zmoe"
    return Step(zm("pack", ckpt, "-o", out, "-q", *extra), expect, [out])


def ckpt_case(
    family: str,
    name: str,
    edit: Callable[[Path, Ctx], None],
    then: str | None = None,
    *,
    pack_expect: str = ANY,
    then_expect: str = REFUSE,
    quick: bool = False,
    timeout: float | None = None,
    check: Callable[[Ctx, list[Result]], str | None] | None = None,
    source: str = "ckpt",
    slow: bool = False,
) -> Case:
    """A copy of the clean checkpoint changed by ``edit(dir, ctx)``, packed, then (optionally) run."""

    def prepare(ctx: Ctx) -> Plan:
        ckpt = ctx.ckpt(source)
        edit(ckpt, ctx)
        steps = [_ckpt_step(ctx, ckpt, expect=pack_expect)]
        out = ctx.root / "out.zmoe"
        if then == "run":
            steps.append(Step(zm("run", out, "Hello", "-n", "2"), then_expect))
        elif then == "run-chat":
            steps.append(Step(zm("run", out, "Hello", "-n", "2", "--chat"), then_expect))
        elif then == "verify":
            steps.append(Step(zm("verify", out, "-q"), then_expect))
        return Plan(steps, check)

    suffix = f" :pack+{then}" if then else " :pack"
    return Case(family, name + suffix, prepare, quick, timeout, slow)


def _edit_json(file: str, edit: Callable[[Any, Splicer], Any]) -> Callable[[Path, Ctx], None]:
    """Change a JSON file of the checkpoint; ``edit(doc, splice)`` may return a replacement document."""

    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / file
        doc = json.loads(path.read_text()) if path.exists() else {}
        splice = Splicer()
        new = edit(doc, splice)
        path.write_text(splice.dumps(doc if new is None else new))

    return apply


def _edit_st_header(edit: Callable[[dict, Splicer], Any]) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / "model.safetensors"
        header, data = read_safetensors(path)
        splice = Splicer()
        new = edit(header, splice)
        text = new if isinstance(new, (str, bytes)) else splice.dumps(header)
        write_safetensors(path, text, data)

    return apply


def family_json(g: Golden) -> list[Case]:
    cases = []
    for label, mutate, commands in [
        ("stats-nested-100k", _splice_at(("stats",), DEEP_ARRAY), ("verify", "inspect")),
        ("config-nested-100k", _splice_at(("config",), DEEP_OBJECT), ("verify", "run")),
        ("whole-manifest-nested-100k", lambda d, c, s: DEEP_ARRAY.encode(), ("verify", "inspect")),
        ("stats-5000-digits", _splice_at(("stats", "x"), BIG_INT), ("verify", "inspect")),
        ("offset-5000-digits", _splice_at(("files", 1, "blob", "offset"), BIG_INT), ("verify",)),
        ("format-version-5000-digits", _splice_at(("format_version",), BIG_INT), ("verify",)),
        ("config-layers-5000-digits", _splice_at(("config", "num_hidden_layers"), BIG_INT), ("run",)),
        ("config-float-5000-digits", _splice_at(("config", "rms_norm_eps"), BIG_FLOAT), ("run",)),
        ("stats-NaN", _splice_at(("stats", "x"), "NaN"), ("verify", "inspect")),
        ("size-NaN", _splice_at(("files", 1, "blob", "size"), "NaN"), ("verify",)),
        ("offset-Infinity", _splice_at(("files", 1, "blob", "offset"), "Infinity"), ("verify",)),
        ("offset-1e999", _splice_at(("files", 1, "blob", "offset"), "1e999"), ("verify",)),
        ("config-eps-NaN", _splice_at(("config", "rms_norm_eps"), "NaN"), ("run",)),
        ("config-theta--Infinity", _splice_at(("config", "rope_theta"), "-Infinity"), ("run",)),
        ("entropy-NaN", _splice_at(("tensors", 0, "exponent_entropy"), "NaN"), ("inspect",)),
        ("invalid-utf8", _manifest_text(lambda t: t.encode()[:-20] + b"\xff\xfe" + t.encode()[-20:]), ("verify",)),
        ("utf8-bom", _manifest_text(lambda t: b"\xef\xbb\xbf" + t.encode()), ("verify",)),
        ("utf16", _manifest_text(lambda t: t.encode("utf-16")), ("verify",)),
        ("empty", lambda d, c, s: b"", ("verify", "inspect")),
        ("null", lambda d, c, s: b"null", ("verify",)),
        ("array", lambda d, c, s: b"[]", ("verify",)),
        ("string", lambda d, c, s: b'"zipmoe"', ("verify",)),
        ("trailing-garbage", _manifest_text(lambda t: t + "}"), ("verify",)),
        ("huge-string-20MB", lambda d, c, s: d.update(created_by="A" * 20_000_000), ("inspect",)),
        ("huge-string-100MB", lambda d, c, s: d.update(created_by="A" * 100_000_000), ("verify",)),
        ("lone-surrogate-created-by", lambda d, c, s: d.update(created_by="\udc80"), ("inspect",)),
    ]:  # fmt: skip
        for command in commands:
            quick = label in ("stats-nested-100k", "config-layers-5000-digits") and command in ("verify", "run")
            informational = ("huge-string-20MB", "huge-string-100MB", "lone-surrogate-created-by")
            expect = ANY if label in informational else REFUSE
            cases.append(manifest_case("json", label, mutate, command, quick=quick, expect=expect))
    # duplicate keys: the last one wins in Python; either reading is fine as long as nothing breaks
    for label, edit in [
        ("duplicate-format-version", lambda t: t[:-1] + ',"format_version":7}'),
        ("duplicate-files-empty", lambda t: t[:-1] + ',"files":[]}'),
        ("duplicate-tensors-null", lambda t: t[:-1] + ',"tensors":null}'),
    ]:
        for command in ("verify", "run"):
            cases.append(manifest_case("json", label, _manifest_text(edit), command, expect=ANY))
    # informational fields of the wrong type or missing: inspect must still answer (or refuse in one line)
    for label, mutate in [
        ("stats=[]", lambda d, c, s: d.update(stats=[])),
        ("stats.classes=5", lambda d, c, s: d["stats"].update(classes=5)),
        ("stats.expert=null", lambda d, c, s: d["stats"]["classes"].update(expert=None)),
        ("histogram=string", lambda d, c, s: d["stats"]["classes"]["expert"].update(exponent_histogram="x")),
        ("histogram=1e30", lambda d, c, s: d["stats"]["classes"]["expert"].update(exponent_histogram=[10**30] * 256)),
        ("histogram=negative", lambda d, c, s: d["stats"]["classes"]["expert"].update(exponent_histogram=[-1] * 256)),
        ("histogram=nested", lambda d, c, s: d["stats"]["classes"]["expert"].update(exponent_histogram=[[1]] * 256)),
        ("model={}", lambda d, c, s: d.update(model={})),
        ("model.family=5", lambda d, c, s: d["model"].update(family=5)),
        ("model.n_layers=string", lambda d, c, s: d["model"].update(n_layers="two")),
        ("source={}", lambda d, c, s: d.update(source={})),
        ("source.kind=hub-no-name", lambda d, c, s: d.update(source={"kind": "hub"})),
        ("source.kind=5", lambda d, c, s: d["source"].update(kind=5)),
        ("source.name=list", lambda d, c, s: d["source"].update(name=["a"])),
        ("created_by=5", lambda d, c, s: d.update(created_by=5)),
        ("created_by=markup", lambda d, c, s: d.update(created_by="[/]")),
        ("encodings[1].chunk_bytes-missing", lambda d, c, s: d["encodings"][1].pop("chunk_bytes")),
        ("exponent_entropy=string", lambda d, c, s: d["tensors"][0].update(exponent_entropy="high")),
    ]:
        cases.append(manifest_case("json", f"info:{label}", mutate, "inspect", expect=ANY,
                                   quick=label == "source={}"))  # fmt: skip
        if label in ("stats=[]", "model={}", "source={}", "created_by=markup"):
            cases.append(manifest_case("json", f"info:{label}", mutate, "inspect-json", expect=ANY))
            cases.append(manifest_case("json", f"info:{label}", mutate, "verify", expect=ANY))
    # the same kinds of JSON in what pack reads
    cases += [
        ckpt_case("json", "safetensors-header-nested-100k",
                  _edit_st_header(lambda h, s: h.__setitem__("__metadata__", {"format": s(DEEP_ARRAY)}))),
        ckpt_case("json", "safetensors-shape-5000-digits",
                  _edit_st_header(lambda h, s: h["model.norm.weight"].__setitem__("shape", [s(BIG_INT)])),
                  quick=True),
        ckpt_case("json", "safetensors-offset-5000-digits",
                  _edit_st_header(lambda h, s: h["model.norm.weight"].__setitem__("data_offsets", [0, s(BIG_INT)]))),
        ckpt_case("json", "safetensors-shape-NaN",
                  _edit_st_header(lambda h, s: h["model.norm.weight"].__setitem__("shape", [s("NaN")]))),
        ckpt_case("json", "safetensors-offset-1e999",
                  _edit_st_header(lambda h, s: h["model.norm.weight"].__setitem__("data_offsets", [0, s("1e999")]))),
        ckpt_case("json", "safetensors-duplicate-key",
                  _edit_st_header(lambda h, s: s.dumps(h)[:-1] + ',"model.norm.weight":{"dtype":"BF16","shape":[1],'
                                                                 '"data_offsets":[0,2]}}')),
        ckpt_case("json", "safetensors-header-invalid-utf8",
                  _edit_st_header(lambda h, s: s.dumps(h).encode()[:-2] + b"\xff\xfe}")),
        ckpt_case("json", "config-nested-100k", _edit_json("config.json", lambda d, s: s(DEEP_OBJECT)), "run"),
        ckpt_case("json", "config-5000-digits",
                  _edit_json("config.json", lambda d, s: d.__setitem__("num_hidden_layers", s(BIG_INT))), "run",
                  quick=True),
        ckpt_case("json", "config-NaN", _edit_json("config.json", lambda d, s: d.__setitem__("rms_norm_eps", s("NaN"))),
                  "run"),
        ckpt_case("json", "config-invalid-utf8",
                  lambda ckpt, ctx: (ckpt / "config.json").write_bytes(b'{"a":"\xff"}'), "run"),
        ckpt_case("json", "config-bom",
                  lambda ckpt, ctx: (ckpt / "config.json").write_bytes(b"\xef\xbb\xbf" +
                                                                        (ckpt / "config.json").read_bytes()),
                  "run", then_expect=ANY),
        ckpt_case("json", "tokenizer-config-nested-100k",
                  _edit_json("tokenizer_config.json", lambda d, s: d.__setitem__("x", s(DEEP_ARRAY))), "run-chat"),
        ckpt_case("json", "tokenizer-json-nested-100k",
                  _edit_json("tokenizer.json", lambda d, s: d.__setitem__("x", s(DEEP_ARRAY))), "run"),
        ckpt_case("json", "generation-config-nested-100k",
                  _edit_json("generation_config.json", lambda d, s: s(DEEP_ARRAY)), "run"),
        ckpt_case("json", "generation-config-not-json",
                  lambda ckpt, ctx: (ckpt / "generation_config.json").write_text("{not json"), "run"),
        ckpt_case("json", "generation-config-array", _edit_json("generation_config.json", lambda d, s: []), "run"),
        ckpt_case("json", "generation-config-eos-strings",
                  _edit_json("generation_config.json", lambda d, s: d.__setitem__("eos_token_id", ["</s>"])), "run"),
        ckpt_case("json", "generation-config-5000-digits",
                  _edit_json("generation_config.json", lambda d, s: d.__setitem__("eos_token_id", s(BIG_INT))),
                  "run"),
        ckpt_case("json", "index-nested-100k", _index_text('{"weight_map":' + DEEP_OBJECT + "}")),
    ]  # fmt: skip
    return cases


def _index_text(text: str) -> Callable[[Path, Ctx], None]:
    return lambda ckpt, ctx: (ckpt / "model.safetensors.index.json").write_text(text)


# -- family: config ----------------------------------------------------------------------------------------------------


def _raw(text: str) -> tuple[str, str]:
    return ("raw", text)


CONFIG_ATTACKS: list[tuple[str, Any, str]] = [
    ("layers=1e9", {"num_hidden_layers": 10**9}, REFUSE),
    ("layers=1e9-float", {"num_hidden_layers": 1e9}, REFUSE),
    ("layers=0", {"num_hidden_layers": 0}, REFUSE),
    ("layers=-1", {"num_hidden_layers": -1}, REFUSE),
    ("layers=string", {"num_hidden_layers": "2"}, REFUSE),
    ("layers=3>tensors", {"num_hidden_layers": 3}, REFUSE),
    ("experts=0", {"num_local_experts": 0}, REFUSE),
    ("experts=1e9", {"num_local_experts": 10**9}, REFUSE),
    ("experts=2<tensors", {"num_local_experts": 2}, REFUSE),
    ("top_k=0", {"num_experts_per_tok": 0}, REFUSE),
    ("top_k=5>experts", {"num_experts_per_tok": 5}, REFUSE),
    ("top_k=-1", {"num_experts_per_tok": -1}, REFUSE),
    ("top_k=1e9", {"num_experts_per_tok": 10**9}, REFUSE),
    ("hidden=0", {"hidden_size": 0}, REFUSE),
    ("hidden=127", {"hidden_size": 127}, REFUSE),
    ("hidden=1e9", {"hidden_size": 10**9}, REFUSE),
    ("heads=0", {"num_attention_heads": 0}, REFUSE),
    ("heads=3-not-dividing", {"num_attention_heads": 3, "head_dim": None}, REFUSE),
    ("kv_heads=0", {"num_key_value_heads": 0}, REFUSE),
    ("kv_heads=3-not-dividing", {"num_key_value_heads": 3}, REFUSE),
    ("kv_heads=8>heads", {"num_key_value_heads": 8}, REFUSE),
    ("head_dim=0", {"head_dim": 0}, REFUSE),
    ("head_dim=16-wrong", {"head_dim": 16}, REFUSE),
    ("intermediate=0", {"intermediate_size": 0}, REFUSE),
    ("intermediate=1e9", {"intermediate_size": 10**9}, REFUSE),
    ("vocab=0", {"vocab_size": 0}, REFUSE),
    ("vocab=1e9", {"vocab_size": 10**9}, REFUSE),
    ("vocab=100<embeddings", {"vocab_size": 100}, REFUSE),
    ("eps=0", {"rms_norm_eps": 0}, ANY),
    ("eps=NaN", {"rms_norm_eps": _raw("NaN")}, REFUSE),
    ("eps=-1", {"rms_norm_eps": -1.0}, REFUSE),
    ("eps=string", {"rms_norm_eps": "1e-5"}, REFUSE),
    ("rope_theta=0", {"rope_theta": 0}, REFUSE),
    ("rope_theta=-1e4", {"rope_theta": -10000.0}, REFUSE),
    ("rope_theta=Infinity", {"rope_theta": _raw("Infinity")}, REFUSE),
    ("rope_theta=1e308", {"rope_theta": 1e308}, ANY),
    ("rope_scaling=yarn-factor-0", {"rope_scaling": {"rope_type": "yarn", "factor": 0}}, ANY),
    ("rope_scaling=linear-factor--1", {"rope_scaling": {"type": "linear", "factor": -1}}, ANY),
    ("rope_scaling=string", {"rope_scaling": "bogus"}, ANY),
    ("sliding_window=-1", {"sliding_window": -1}, ANY),
    ("sliding_window=0", {"sliding_window": 0}, ANY),
    ("context=0", {"max_position_embeddings": 0}, REFUSE),
    ("context=1", {"max_position_embeddings": 1}, ANY),
    ("context=1e12", {"max_position_embeddings": 10**12}, ANY),
    ("eos=string", {"eos_token_id": "x"}, REFUSE),
    ("eos=[1e9]", {"eos_token_id": [10**9]}, ANY),
    ("eos=-5", {"eos_token_id": -5}, ANY),
    ("eos=1.5", {"eos_token_id": 1.5}, REFUSE),
    ("eos=mixed-list", {"eos_token_id": [257, "a", None]}, ANY),
    ("hidden_act=bogus", {"hidden_act": "bogus"}, ANY),
    ("tie_word_embeddings=string", {"tie_word_embeddings": "yes"}, ANY),
    ("model_type=bogus", {"model_type": "bogus"}, REFUSE),
    ("model_type=int", {"model_type": 5}, REFUSE),
    ("model_type=qwen2_moe", {"model_type": "qwen2_moe"}, REFUSE),
    ("config=[]", [], REFUSE),
    ("config=null", None, REFUSE),
]


def _config_edit(change: Any) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / "config.json"
        splice = Splicer()
        if isinstance(change, dict):
            doc = json.loads(path.read_text())
            for key, value in change.items():
                if value is None and key == "head_dim":
                    doc.pop(key, None)
                else:
                    doc[key] = splice(value[1]) if isinstance(value, tuple) else value
            path.write_text(splice.dumps(doc))
        else:
            path.write_text(json.dumps(change))

    return apply


def family_config(g: Golden) -> list[Case]:
    quick = {"layers=1e9", "top_k=0", "heads=3-not-dividing"}
    return [
        ckpt_case("config", label, _config_edit(change), "run", then_expect=expect, quick=label in quick)
        for label, change, expect in CONFIG_ATTACKS
    ]


# -- family: templates -------------------------------------------------------------------------------------------------


def _template(template: Any, *, file: bytes | None = None) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        if file is not None:
            (ckpt / "chat_template.jinja").write_bytes(file)
            return
        path = ckpt / "tokenizer_config.json"
        doc = json.loads(path.read_text())
        doc["chat_template"] = template(ctx) if callable(template) else template
        path.write_text(json.dumps(doc))

    return apply


TEMPLATES: list[tuple[str, Any, str]] = [
    ("str-mult-1e9", "{{ 'a' * 10**9 }}", REFUSE),
    ("str-mult-1e6x1e6", "{{ ('a' * 10**6) * 10**6 }}", REFUSE),
    ("list-mult-1e9", "{{ [0] * 10**9 }}", REFUSE),
    ("nested-range-100k", "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", REFUSE),
    ("range-1e9", "{% for i in range(10**9) %}{% endfor %}ok", ANY),
    ("format-width-1e9", "{{ '{:>1000000000}'.format('x') }}", REFUSE),
    ("percent-width-1e9", "{{ '%1000000000d' % 1 }}", REFUSE),
    ("center-1e9", "{{ 'x'|center(1000000000) }}", REFUSE),
    ("pow-huge", "{{ 10 ** (10 ** 8) }}", REFUSE),  # jinja's ** is left-associative
    ("syntax-error", "{% for %}", REFUSE),
    ("unclosed-block", "{% if true %}x", REFUSE),
    ("undefined-attribute", "{{ nothing.at.all }}", REFUSE),
    ("undefined-call", "{{ nothing() }}", REFUSE),
    ("recursive-macro", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", REFUSE),
    ("include-missing", "{% include 'other.jinja' %}", REFUSE),
    ("raise-exception", "{{ raise_exception('no system messages') }}", REFUSE),
    ("raise-exception-int", "{{ raise_exception(5) }}", REFUSE),
    ("sandbox-mro", "{{ ''.__class__.__mro__[1].__subclasses__() }}", REFUSE),
    ("sandbox-globals-os", lambda ctx: "{{ cycler.__init__.__globals__.os.system('touch " + f"{ctx.victim}/pwned" + "') }}",
     REFUSE),
    ("sandbox-messages-append", "{% set _ = messages.append({'role': 'x'}) %}x", REFUSE),
    ("empty-render", "{% if false %}x{% endif %}", REFUSE),
    ("whitespace-render", "   ", ANY),
    ("render-80k-chars", "{% for i in range(20000) %}abc {% endfor %}", REFUSE),
    ("lipsum-100k", "{{ lipsum(n=100000) }}", REFUSE),
    ("literal-5MB", "{{ '" + "a" * 5_000_000 + "' }}", REFUSE),
    ("template=int", 5, REFUSE),
    ("template=object", {"a": 1}, REFUSE),
    ("template=list-bad", [{"name": "default", "template": 5}], REFUSE),
    ("template=list-nondict", ["x", 1], REFUSE),
]  # fmt: skip


def family_templates(g: Golden) -> list[Case]:
    quick = {"str-mult-1e9", "nested-range-100k", "syntax-error"}
    cases = [
        ckpt_case("templates", label, _template(t), "run-chat", then_expect=expect, quick=label in quick)
        for label, t, expect in TEMPLATES
    ]
    cases.append(ckpt_case("templates", "chat_template.jinja-bad-utf8",
                           _template(None, file=b"\xff\xfe{{ messages[0]['content'] }}"), "run-chat"))  # fmt: skip
    cases.append(ckpt_case("templates", "chat_template.jinja-empty", _template(None, file=b""), "run-chat",
                           then_expect=ANY))  # fmt: skip
    return cases


# -- family: prompts ---------------------------------------------------------------------------------------------------


def _run_case(family: str, name: str, args: list, expect: str, *, source: str = "tiny", quick: bool = False) -> Case:
    def prepare(ctx: Ctx) -> Plan:
        path = ctx.container(source)
        return Plan([Step(zm("run", path, *args), expect)])

    return Case(family, name, prepare, quick)


def family_prompts(g: Golden) -> list[Case]:
    words = "the quick brown fox jumps over the lazy dog "
    long = lambda n: (words * (n // len(words) + 1))[:n]  # noqa: E731
    return [
        _run_case("prompts", "8k chars", [long(8_000), "-n", "2"], REFUSE),
        _run_case("prompts", "20k chars", [long(20_000), "-n", "2"], REFUSE, quick=True),
        _run_case("prompts", "100k chars", [long(100_000), "-n", "2"], REFUSE),
        _run_case("prompts", "20k chars --chat", [long(20_000), "-n", "2", "--chat"], REFUSE),
        _run_case("prompts", "30k emoji (120 KB)", ["\U0001f600" * 30_000, "-n", "2"], REFUSE),
        _run_case("prompts", "4000 chars + 2000 new tokens", [long(4000), "-n", "2000", "--ignore-eos"], ANY),
        _run_case("prompts", "non-UTF-8 bytes", [b"\xff\xfe\xfd", "-n", "2"], ANY, quick=True),
        _run_case("prompts", "non-UTF-8 in text", [b"hello \x80 world", "-n", "2"], ANY),
        _run_case("prompts", "UTF-8 encoded surrogate", [b"\xed\xa0\x80", "-n", "2"], ANY),
        _run_case("prompts", "empty", ["", "-n", "2"], REFUSE),
        _run_case("prompts", "whitespace", ["   \n\t", "-n", "2"], REFUSE),
        _run_case("prompts", "terminal escapes", ["\x1b[2J\x1b]0;pwn\x07hi", "-n", "2"], ANY),
        _run_case("prompts", "rich markup", ["[bold red]hi[/] [/]", "-n", "2"], ANY),
        _run_case("prompts", "special tokens", ["<s></s><pad></s>", "-n", "2"], ANY),
        _run_case("prompts", "looks like an option", ["-n", "2", "--", "--help"], ANY),
        _run_case("prompts", "--chat non-UTF-8", [b"\xff", "-n", "2", "--chat"], ANY),
    ]


# -- family: flags -----------------------------------------------------------------------------------------------------


def _cmd_case(family: str, name: str, build: Callable[[Ctx], list], expect: str = REFUSE, *,
              outputs: Callable[[Ctx], list[Path]] | None = None, quick: bool = False) -> Case:  # fmt: skip
    def prepare(ctx: Ctx) -> Plan:
        argv = build(ctx)
        return Plan([Step(argv, expect, outputs(ctx) if outputs else [])])

    return Case(family, name, prepare, quick)


def family_flags(g: Golden) -> list[Case]:
    cases = []
    run_flags: list[tuple[list, str, str]] = [
        (["--top-p", "0"], ANY, "tiny"),
        (["--top-p", "0", "--temperature", "1"], ANY, "tiny"),
        (["--top-p", "nan", "--temperature", "1"], REFUSE, "tiny"),
        (["--temperature", "nan"], REFUSE, "tiny"),
        (["--temperature", "inf"], REFUSE, "tiny"),
        (["--temperature", "1e308"], ANY, "tiny"),
        (["--seed", str(2**70), "--temperature", "1"], ANY, "tiny"),
        (["--seed", "-1", "--temperature", "1"], ANY, "tiny"),
        (["--storage", "1e-300"], REFUSE, "tiny"),
        (["--storage", "nan"], REFUSE, "tiny"),
        (["--storage", "inf"], ANY, "tiny"),
        (["--storage", "0"], ANY, "tiny"),  # 0: no simulation
        (["--storage", "-1"], REFUSE, "tiny"),
        (["--simulate-storage", "nan"], REFUSE, "tiny"),  # the old spelling, still read
        (["--memory-budget", "1" + "0" * 400], ANY, "tiny"),
        (["--memory-budget", "-1"], REFUSE, "tiny"),
        (["--memory-budget", "-5GiB"], REFUSE, "tiny"),
        (["--memory-budget", "0"], REFUSE, "tiny"),
        (["--memory-budget", "abc"], REFUSE, "tiny"),
        (["--memory-budget", ""], REFUSE, "tiny"),
        (["--memory-budget", "nan"], REFUSE, "tiny"),
        (["--memory-budget", "nanGiB"], REFUSE, "tiny"),
        (["--memory-budget", "1e309"], ANY, "tiny"),
        (["--memory-budget", "1e309%"], ANY, "tiny"),
        (["--memory-budget", "-5%"], REFUSE, "tiny"),
        (["--memory-budget", "1e-300%"], REFUSE, "tiny"),
        (["--memory-budget", "50%%"], REFUSE, "tiny"),
        (["--memory-budget", "2**70"], REFUSE, "tiny"),
        (["--decoded-fraction", "nan"], REFUSE, "tiny"),
        (["--tiers", "decoded=nan"], REFUSE, "tiny"),
        (["--tiers", "decoded=0.9,sm=0.9"], REFUSE, "tiny"),
        (["--tiers", "gpu=1"], REFUSE, "tiny"),
        (["--tiers", "decoded"], REFUSE, "tiny"),
        (["--tiers", "=" * 5000], REFUSE, "tiny"),
        (["--tiers", "sm=1e309"], REFUSE, "tiny"),
        (["--policy", "mru"], REFUSE, "tiny"),
        (["--io", "mmap"], REFUSE, "tiny"),
        (["--io", "direct"], ANY, "tiny"),
        (["--record-routing", "/proc/version"], REFUSE, "tiny"),
        (["--record-routing", "/nonexistent-dir/trace.jsonl"], REFUSE, "tiny"),
        (["--threads", "0"], REFUSE, "tiny"),
        (["--threads", "100000"], ANY, "tiny"),
        (["--max-new-tokens", str(10**9)], ANY, "tiny"),
        (["--max-new-tokens", str(10**9), "--ignore-eos"], ANY, "tiny"),
        (["--max-new-tokens", str(2**70)], REFUSE, "tiny"),
        (["--warmup", "bogus"], REFUSE, "tiny"),
        (["--mode", "garbage"], REFUSE, "tiny"),
        (["--mode", "q4"], REFUSE, "tiny"),
        (["--mode", "garbage"], REFUSE, "sliced"),
        (["--mode", "dbsc", "--warmup", "bogus"], REFUSE, "sliced"),
        (["--mode", "dbsc", "--critical-threshold", "nan"], REFUSE, "sliced"),
        (["--mode", "q4", "--memory-budget", "1B"], REFUSE, "sliced"),
        (["--device", "cuda:99"], REFUSE, "tiny"),
        (["--device", "tpu"], REFUSE, "tiny"),
        (["--dtype", "float8"], REFUSE, "tiny"),
    ]
    quick = {"--storage 1e-300", "--top-p 0", "--memory-budget " + "1" + "0" * 400, "--warmup bogus"}
    for flags, expect, source in run_flags:
        label = " ".join(flags if len(" ".join(flags)) < 60 else [flags[0], f"<{len(flags[1])} chars>"])
        name = f"run {label}" + (" (sliced)" if source == "sliced" else "")
        cases.append(_run_case("flags", name, ["Hello", "-n", "2", *flags], expect, source=source,
                               quick=" ".join(flags) in quick))  # fmt: skip

    def pack_with(*flags: str) -> Callable[[Ctx], list]:
        return lambda ctx: zm("pack", ctx.golden.ckpt, "-o", ctx.root / "out.zmoe", "-q", *flags)

    pack_out = lambda ctx: [ctx.root / "out.zmoe"]  # noqa: E731
    for flags, expect in [
        (["--chunk-values", "0"], REFUSE),
        (["--chunk-values", "-64"], REFUSE),
        (["--chunk-values", "63"], REFUSE),
        (["--chunk-values", str(2**40)], REFUSE),
        (["--coder", "zstd:99"], REFUSE),
        (["--coder", "zstd:-1"], REFUSE),
        (["--coder", "zstd:"], ANY),
        (["--coder", "bogus"], REFUSE),
        (["--slices", "9:4"], REFUSE),
        (["--slices", "0:0"], REFUSE),
        (["--slices", "8:8"], REFUSE),
        (["--slices", "8:4:2"], REFUSE),
        (["--threads", "0"], REFUSE),
        (["--threads", "100000"], ANY),
    ]:
        cases.append(_cmd_case("flags", f"pack {' '.join(flags)}", pack_with(*flags), expect, outputs=pack_out))

    def on_fifo(*command: str) -> Callable[[Ctx], list]:
        return lambda ctx: zm(command[0], ctx.fifo(), *command[1:])

    cases += [
        _cmd_case("flags", "inspect a FIFO", on_fifo("inspect"), quick=True),
        _cmd_case("flags", "verify a FIFO", on_fifo("verify", "-q")),
        _cmd_case("flags", "run a FIFO", on_fifo("run", "Hello")),
        _cmd_case("flags", "unpack a FIFO", lambda ctx: zm("unpack", ctx.fifo(), "-o", ctx.out, "-q"),
                  outputs=lambda ctx: [ctx.out]),
        _cmd_case("flags", "inspect a directory", lambda ctx: zm("inspect", ctx.root / "outside")),
        _cmd_case("flags", "run a directory", lambda ctx: zm("run", ctx.root / "outside", "Hello")),
        _cmd_case("flags", "inspect an empty file", lambda ctx: zm("inspect", _touch(ctx.root / "e.zmoe", b""))),
        _cmd_case("flags", "verify 64 zero bytes", lambda ctx: zm("verify", _touch(ctx.root / "z.zmoe", bytes(64)))),
        _cmd_case("flags", "verify --source missing", lambda ctx: zm("verify", ctx.container(), "--source",
                                                                     ctx.root / "nope", "-q")),
        _cmd_case("flags", "verify --source hub id offline", lambda ctx: zm("verify", ctx.container(), "--source",
                                                                            "org/does-not-exist", "-q")),
        _cmd_case("flags", "verify --threads 0", lambda ctx: zm("verify", ctx.container(), "--threads", "0")),
        _cmd_case("flags", "unpack --threads 100000", lambda ctx: zm("unpack", ctx.container(), "-o", ctx.out, "-q",
                                                                     "--threads", "100000"), ANY,
                  outputs=lambda ctx: [ctx.out]),
        _cmd_case("flags", "unpack -o an existing file", lambda ctx: zm("unpack", ctx.container(), "-o",
                                                                        ctx.root / "in.zmoe", "-q")),
        _cmd_case("flags", "pack -o a directory", lambda ctx: zm("pack", ctx.golden.ckpt, "-o", ctx.root / "outside",
                                                                 "-q")),
        _cmd_case("flags", "pack -o missing parent", lambda ctx: zm("pack", ctx.golden.ckpt, "-o",
                                                                    ctx.root / "no" / "such" / "x.zmoe", "-q")),
        _cmd_case("flags", "pack a file", lambda ctx: zm("pack", ctx.container(), "-o", ctx.root / "out.zmoe", "-q"),
                  outputs=pack_out),
        _cmd_case("flags", "pack a hub id offline", lambda ctx: zm("pack", "org/does-not-exist", "-o",
                                                                   ctx.root / "out.zmoe", "-q"), outputs=pack_out),
        _cmd_case("flags", "pack an empty source", lambda ctx: zm("pack", "", "-o", ctx.root / "out.zmoe", "-q"),
                  outputs=pack_out),
        _cmd_case("flags", "demo-checkpoint --preset bogus", lambda ctx: zm("demo-checkpoint", ctx.out,
                                                                            "--preset", "bogus"),
                  outputs=lambda ctx: [ctx.out]),
        _cmd_case("flags", "demo-checkpoint --seed 2^70", lambda ctx: zm("demo-checkpoint", ctx.out, "--preset",
                                                                         "tiny", "--seed", str(2**70)), ANY,
                  outputs=lambda ctx: [ctx.out]),
        _cmd_case("flags", "demo-checkpoint into a non-empty dir", lambda ctx: zm("demo-checkpoint", ctx.victim,
                                                                                  "--preset", "tiny")),
        _cmd_case("flags", "eval ppl --text missing", lambda ctx: zm("eval", "ppl", ctx.container(), "--text",
                                                                     ctx.root / "nope.txt")),
    ]  # fmt: skip

    def run_plan(text: bytes) -> Callable[[Ctx], list]:
        return lambda ctx: zm("run", ctx.container(), "Hello", "-n", "2", "--plan", _touch(ctx.root / "p.json", text))

    plan_ok = b'{"format": "zipmoe-plan", "version": 1, "container_sha256": "%s", "compact": "sm", '
    cases += [
        _cmd_case("flags", "run --plan missing file", lambda ctx: zm("run", ctx.container(), "Hello", "--plan",
                                                                     ctx.root / "nope.json")),
        _cmd_case("flags", "run --plan binary garbage", run_plan(bytes(range(256)) * 4)),
        _cmd_case("flags", "run --plan nested 100,000 deep", run_plan(b"[" * 100_000 + b"]" * 100_000)),
        _cmd_case("flags", "run --plan another container", run_plan(plan_ok % (b"0" * 64) + b'"decoded_share": 1}')),
        _cmd_case("flags", "run --plan a FIFO", lambda ctx: zm("run", ctx.container(), "Hello", "--plan", ctx.fifo())),
        _cmd_case("flags", "run --plan auto on a sliced mode", lambda ctx: zm("run", ctx.container("sliced"), "Hello",
                                                                              "--mode", "q4", "--plan", "auto")),
        _cmd_case("flags", "pack --routing garbage", lambda ctx: zm("pack", ctx.golden.ckpt, "-o", ctx.root / "out.zmoe",
                                                                    "-q", "--routing",
                                                                    _touch(ctx.root / "t.jsonl", b"\xff\xfe{")),
                  outputs=pack_out),
        _cmd_case("flags", "pack --routing 10^9 experts", lambda ctx: zm(
            "pack", ctx.golden.ckpt, "-o", ctx.root / "out.zmoe", "-q", "--routing", _touch(
                ctx.root / "t.jsonl", b'{"format":"zipmoe-routing","version":1,"num_experts":1000000000,"top_k":2,'
                b'"num_layers":2}\n')), outputs=pack_out),
    ]  # fmt: skip
    return cases


def _touch(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- family: checkpoint ------------------------------------------------------------------------------------------------


def _no_secret(ctx: Ctx, results: list[Result]) -> str | None:
    out = ctx.root / "out.zmoe"
    if out.is_file() and SECRET.encode() in out.read_bytes():
        return "a file outside the checkpoint (secret/passwd, through a symlink) was embedded in the container"
    return None


def _symlink(name: str, target: Callable[[Ctx], Path], *, remove: bool = True) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / name
        if remove and (path.exists() or path.is_symlink()):
            path.unlink()
        path.symlink_to(target(ctx))

    return apply


def _st_rewrite(change: Callable[[dict, bytes], tuple[Any, bytes, int | None]]) -> Callable[[Path, Ctx], None]:
    """Rewrite model.safetensors: ``change(header, data)`` returns (header or raw text, data, length override)."""

    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / "model.safetensors"
        header, data = read_safetensors(path)
        new_header, new_data, length = change(header, data)
        text = new_header if isinstance(new_header, (str, bytes)) else json.dumps(new_header)
        write_safetensors(path, text, new_data, length)

    return apply


def _tensor(h: dict, name: str = "model.norm.weight") -> dict:
    return h[name]


def _with(h: dict, name: str, **fields: Any) -> dict:
    h[name] = {**h[name], **fields}
    return h


def _many_tiny_tensors(n: int) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        for p in list(ckpt.iterdir()):
            p.unlink()
        header = {f"t.{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
        write_safetensors(ckpt / "model.safetensors", json.dumps(header), (bytes(range(256)) * (n // 256 + 1))[:n])

    return apply


def _size_bound(ctx: Ctx, results: list[Result]) -> str | None:
    source = ctx.root / "ckpt" / "model.safetensors"
    out = ctx.root / "out.zmoe"
    if not out.is_file():
        return None
    bound = source.stat().st_size * 1.01 + (1 << 20)
    size = out.stat().st_size
    if size > bound:
        return f"container is {size:,} bytes for a {source.stat().st_size:,}-byte source (bound {bound:,.0f})"
    return None


def family_checkpoint(g: Golden) -> list[Case]:
    secret = lambda ctx: ctx.root / "secret" / "passwd"  # noqa: E731

    def copy_outside(name: str) -> Callable[[Ctx], Path]:
        def target(ctx: Ctx) -> Path:
            path = ctx.root / "outside" / name
            shutil.copyfile(g.ckpt / name, path)
            return path

        return target

    def fifo_target(ctx: Ctx) -> Path:
        return ctx.fifo()

    st = _st_rewrite

    cases = [
        ckpt_case("checkpoint", "symlink tokenizer.json -> secret", _symlink("tokenizer.json", secret),
                  check=_no_secret, quick=True),
        ckpt_case("checkpoint", "symlink chat_template.jinja -> secret",
                  _symlink("chat_template.jinja", secret, remove=False), check=_no_secret),
        ckpt_case("checkpoint", "symlink vocab.tiktoken -> secret", _symlink("vocab.tiktoken", secret, remove=False),
                  check=_no_secret),
        ckpt_case("checkpoint", "symlink config.json -> outside copy", _symlink("config.json", copy_outside(
                  "config.json")), "run", then_expect=ANY),
        ckpt_case("checkpoint", "symlink model.safetensors -> outside copy",
                  _symlink("model.safetensors", copy_outside("model.safetensors")), "verify", then_expect=ANY),
        ckpt_case("checkpoint", "symlink loop tokenizer.json",
                  _symlink("tokenizer.json", lambda ctx: ctx.root / "ckpt" / "tokenizer.json")),
        ckpt_case("checkpoint", "dangling symlink tokenizer.json", _symlink("tokenizer.json",
                                                                            lambda ctx: ctx.root / "nowhere")),
        ckpt_case("checkpoint", "symlink tokenizer.json -> FIFO", _symlink("tokenizer.json", fifo_target),
                  quick=True),
        ckpt_case("checkpoint", "symlink model.safetensors -> FIFO", _symlink("model.safetensors", fifo_target)),
        ckpt_case("checkpoint", "tokenizer.json is a directory",
                  lambda ckpt, ctx: ((ckpt / "tokenizer.json").unlink(), (ckpt / "tokenizer.json").mkdir()),
                  "run", then_expect=REFUSE),
        ckpt_case("checkpoint", "config.json is a directory",
                  lambda ckpt, ctx: ((ckpt / "config.json").unlink(), (ckpt / "config.json").mkdir())),
        ckpt_case("checkpoint", "no config.json", lambda ckpt, ctx: (ckpt / "config.json").unlink(), "run"),
        ckpt_case("checkpoint", "empty directory",
                  lambda ckpt, ctx: [p.unlink() for p in list(ckpt.iterdir())], pack_expect=REFUSE),
        ckpt_case("checkpoint", "truncated to 0 bytes",
                  lambda ckpt, ctx: (ckpt / "model.safetensors").write_bytes(b""), pack_expect=REFUSE),
        ckpt_case("checkpoint", "truncated to 5 bytes", _truncate(5), pack_expect=REFUSE),
        ckpt_case("checkpoint", "truncated inside the header", _truncate(200), pack_expect=REFUSE),
        ckpt_case("checkpoint", "truncated inside the data", _truncate(-100), pack_expect=REFUSE, quick=True),
        ckpt_case("checkpoint", "trailing bytes", lambda ckpt, ctx: _append(ckpt / "model.safetensors", b"x" * 100),
                  "verify", then_expect=ANY),
        ckpt_case("checkpoint", "header length 2^63", st(lambda h, d: (h, d, 2**63)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "header length 2^64-1", st(lambda h, d: (h, d, 2**64 - 1)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "header length past the end", st(lambda h, d: (h, d, 10**9)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "header length 0", st(lambda h, d: (h, d, 0)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "header is a JSON array", st(lambda h, d: ("[]", d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "header is not JSON", st(lambda h, d: ("{" * 10, d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "overlapping offsets",
                  st(lambda h, d: (_with(h, "model.norm.weight", data_offsets=h["lm_head.weight"]["data_offsets"][:1] +
                                         [h["lm_head.weight"]["data_offsets"][0] + 256]), d, None)),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "offsets reversed",
                  st(lambda h, d: (_with(h, "model.norm.weight",
                                         data_offsets=_tensor(h)["data_offsets"][::-1]), d, None)),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "offsets past the end",
                  st(lambda h, d: (_with(h, "model.norm.weight", data_offsets=[len(d), len(d) + 256]), d, None)),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "offsets negative",
                  st(lambda h, d: (_with(h, "model.norm.weight", data_offsets=[-256, 0]), d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "offsets float",
                  st(lambda h, d: (_with(h, "model.norm.weight", data_offsets=[0.0, 256.0]), d, None)),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "dtype unknown (Q4_K)",
                  st(lambda h, d: (_with(h, "model.norm.weight", dtype="Q4_K"), d, None)), "run"),
        ckpt_case("checkpoint", "dtype int", st(lambda h, d: (_with(h, "model.norm.weight", dtype=5), d, None)),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "BF16 with an odd byte count",
                  st(lambda h, d: (_with(h, "model.norm.weight", shape=[127]), d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "shape does not match bytes",
                  st(lambda h, d: (_with(h, "model.norm.weight", shape=[2, 2]), d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "zero-size tensor with a 2^63 dimension",
                  st(lambda h, d: (_with(h, "model.norm.weight", shape=[2**63, 0],
                                         data_offsets=[_tensor(h)["data_offsets"][0]] * 2), d, None)), "run"),
        ckpt_case("checkpoint", "shape negative",
                  st(lambda h, d: (_with(h, "model.norm.weight", shape=[-128]), d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "shape 2^40 with 256 bytes",
                  st(lambda h, d: (_with(h, "model.norm.weight", shape=[2**40]), d, None)), pack_expect=REFUSE),
        ckpt_case("checkpoint", "metadata not strings",
                  st(lambda h, d: ({**h, "__metadata__": {"a": 5, "b": [1]}}, d, None)), "verify", then_expect=ANY),
        ckpt_case("checkpoint", "metadata 10 MB", st(lambda h, d: ({**h, "__metadata__": {"a": "x" * 10_000_000}},
                                                                   d, None)), "verify", then_expect=ANY),
        ckpt_case("checkpoint", "index names ../x", _index({"model.norm.weight": "../x.safetensors"}),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "index names an absolute path", lambda ckpt, ctx: _index(
                  {"lm_head.weight": str(copy_outside("model.safetensors")(ctx))})(ckpt, ctx), pack_expect=REFUSE),
        ckpt_case("checkpoint", "index names a missing file", _index({"x": "missing.safetensors"}),
                  pack_expect=REFUSE),
        ckpt_case("checkpoint", "index weight_map is a list", _index_text('{"weight_map": []}'), pack_expect=REFUSE),
        ckpt_case("checkpoint", "index names a FIFO",
                  lambda ckpt, ctx: (os.mkfifo(ckpt / "b.safetensors"), _index({"x": "b.safetensors"})(ckpt, ctx))),
        ckpt_case("checkpoint", "200,000 one-byte tensors", _many_tiny_tensors(200_000), "verify", then_expect=ANY,
                  check=_size_bound, timeout=240, slow=True),
    ]  # fmt: skip
    return cases


def _truncate(n: int) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        path = ckpt / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[:n])

    return apply


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _index(weight_map: dict) -> Callable[[Path, Ctx], None]:
    def apply(ckpt: Path, ctx: Ctx) -> None:
        header, _ = read_safetensors(ckpt / "model.safetensors")
        full = {name: "model.safetensors" for name in header if name != "__metadata__"}
        full.update(weight_map)
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": full}))

    return apply


# -- family: corruption ------------------------------------------------------------------------------------------------


def _corrupt(key: str, seed: int, kind: str) -> Callable[[Ctx], Plan]:
    def prepare(ctx: Ctx) -> Plan:
        rng = random.Random(seed)
        path = ctx.container(key)
        data = bytearray(path.read_bytes())
        size = len(data)
        doc = ctx.golden.docs[key]
        blobs = [f["blob"] for f in doc["files"]] + [p for t in doc["tensors"] for p in t["parts"]]
        if rng.random() < 0.5:  # anywhere in the file
            offset = rng.randrange(size)
        else:  # the first bytes of a blob: its chunk directory
            b = rng.choice(blobs)
            offset = b["offset"] + rng.randrange(min(b["nbytes"], 24 * b["n_chunks"] + 32))
        if kind == "bit":
            data[offset] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            data[offset] = (data[offset] + rng.randrange(1, 256)) % 256
        elif kind == "zero64":  # zero 64 bytes; in padding (already zero) set one byte instead
            span = data[offset : offset + 64]
            if any(span):
                data[offset : offset + len(span)] = bytes(len(span))
            else:
                data[offset] = 1
        elif kind == "truncate":
            del data[rng.randrange(size) :]
        elif kind == "append":
            data += bytes(rng.randrange(1, 5000))
        elif kind == "swap-pages":
            pages = size // 4096
            a, b = rng.sample(range(pages), 2)
            pa, pb = data[a * 4096 : (a + 1) * 4096], data[b * 4096 : (b + 1) * 4096]
            if pa == pb:
                data[a * 4096] ^= 0xFF
            else:
                data[a * 4096 : (a + 1) * 4096], data[b * 4096 : (b + 1) * 4096] = pb, pa
        path.write_bytes(bytes(data))
        return Plan([Step(zm("verify", path, "-q"), REFUSE)])

    return prepare


def family_corruption(g: Golden, seed: int) -> list[Case]:
    kinds = ["bit"] * 50 + ["byte"] * 20 + ["zero64"] * 10 + ["truncate"] * 10 + ["append"] * 5 + ["swap-pages"] * 5
    cases = []
    for i, kind in enumerate(kinds):
        key = "sliced" if i % 5 == 4 else "tiny"
        case_seed = seed * 1_000_003 + i
        cases.append(Case("corruption", f"{kind} #{i} ({key}, seed {case_seed})", _corrupt(key, case_seed, kind),
                          quick=i in (0, 51, 81)))  # fmt: skip
    return cases


# -- family: writes ----------------------------------------------------------------------------------------------------


def _verify_ok(ctx: Ctx, path: Path) -> tuple[Result, bool]:
    r = ctx.execute(zm("verify", path, "-q"))
    return r, r.rc == 0 and r.killed is None


def _race_pack(force: bool, stagger: float) -> Callable[[Ctx], tuple[list[tuple[Result, str]], str | None]]:
    def run(ctx: Ctx) -> tuple[list[tuple[Result, str]], str | None]:
        out = ctx.root / "out.zmoe"
        argv = zm("pack", ctx.golden.small_ckpt, "-o", out, "-q", *(["--force"] if force else []))
        first = ctx.spawn(argv)
        time.sleep(stagger)
        second = ctx.spawn(argv)
        results = [first.wait(), second.wait()]
        winners = [r for r in results if r.rc == 0]
        problems = []
        if not force and len(winners) != 1:
            problems.append(f"{len(winners)} of 2 packs without --force succeeded (exactly one must)")
        if force and not winners:
            problems.append("neither pack succeeded")
        for r in results:
            if r.rc != 0 and not error_line(r.stderr):
                problems.append("the losing pack did not say why")
        checks = [(r, ANY) for r in results]
        if out.exists():
            v, ok = _verify_ok(ctx, out)
            checks.append((v, ACCEPT))
            if not ok:
                problems.append(f"the output does not verify: {error_line(v.stderr)}")
        elif winners:
            problems.append("a pack succeeded but there is no output")
        problems += _partials_must_not_verify(ctx, ctx.root, checks)
        return checks, "; ".join(problems) or None

    return run


def _partials_must_not_verify(ctx: Ctx, where: Path, checks: list) -> list[str]:
    problems = []
    for p in sorted(where.rglob("*.partial")):
        if p.is_file():
            v, ok = _verify_ok(ctx, p)
            checks.append((v, ANY))
            if ok:
                problems.append(f"{p.name} is left behind and passes zipmoe verify")
    return problems


def _wait_for(predicate: Callable[[], bool], proc: Proc, limit: float) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.running() and not predicate():
        time.sleep(0.01)


def _killed_pack(delay_fraction: float) -> Callable[[Ctx], tuple[list[tuple[Result, str]], str | None]]:
    def run(ctx: Ctx) -> tuple[list[tuple[Result, str]], str | None]:
        out = ctx.root / "out.zmoe"
        argv = zm("pack", ctx.golden.small_ckpt, "-o", out, "-q")
        proc = ctx.spawn(argv)
        _wait_for(lambda: any(p.name.startswith("out.zmoe") for p in ctx.root.iterdir()), proc, 60)
        time.sleep(delay_fraction * ctx.golden.small_pack_seconds)
        proc.kill("ours")
        proc.wait()
        checks: list[tuple[Result, str]] = []
        problems = _partials_must_not_verify(ctx, ctx.root, checks)
        if out.exists():
            v, ok = _verify_ok(ctx, out)
            checks.append((v, ANY))
            if not ok:
                problems.append(f"out.zmoe exists after the kill but does not verify: {error_line(v.stderr)}")
        again = ctx.execute(argv + ["--force"])
        checks.append((again, ACCEPT))
        if again.rc == 0:
            v, ok = _verify_ok(ctx, out)
            checks.append((v, ACCEPT))
        left = [p.name for p in ctx.root.iterdir() if p.name.startswith("out.zmoe.") and p.name != "out.zmoe.lock"]
        if again.rc == 0 and left:
            problems.append(f"after a successful rerun, {left} is still there")
        return checks, "; ".join(problems) or None

    return run


def _unpacked_files_valid(ctx: Ctx, out: Path) -> list[str]:
    """Files under OUT with a final name must be complete (their SHA-256 is the manifest's)."""
    doc = ctx.golden.docs["small"]
    expected = {f["name"]: f["sha256"] for f in doc["files"]} | {s["name"]: s["sha256"] for s in doc["safetensors"]}
    problems = []
    if not out.is_dir():
        return problems
    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.endswith(".partial") or ".partial" in p.relative_to(out).parts[0]:
            continue
        rel = p.relative_to(out).as_posix()
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if expected.get(rel) != digest:
            problems.append(f"OUT/{rel} looks final but is incomplete or wrong")
    return problems


def _killed_unpack(delay_fraction: float) -> Callable[[Ctx], tuple[list[tuple[Result, str]], str | None]]:
    def run(ctx: Ctx) -> tuple[list[tuple[Result, str]], str | None]:
        argv = zm("unpack", ctx.golden.small, "-o", ctx.out, "-q")
        proc = ctx.spawn(argv)
        _wait_for(lambda: any(p.name.startswith("OUT") for p in ctx.out.parent.iterdir()), proc, 60)
        time.sleep(delay_fraction * ctx.golden.small_unpack_seconds)
        proc.kill("ours")
        proc.wait()
        checks: list[tuple[Result, str]] = []
        problems = _unpacked_files_valid(ctx, ctx.out)
        again = ctx.execute(argv + ["--force"])
        checks.append((again, ACCEPT))
        if again.rc == 0:
            problems += [f"after the rerun: {p}" for p in _unpacked_files_valid(ctx, ctx.out)]
            names = {p.relative_to(ctx.out).as_posix() for p in ctx.out.rglob("*") if p.is_file()}
            if len(names) != len(ctx.golden.docs["small"]["files"]) + len(ctx.golden.docs["small"]["safetensors"]):
                problems.append(f"after the rerun OUT holds {sorted(names)}")
        return checks, "; ".join(problems) or None

    return run


def _race_unpack(ctx: Ctx) -> tuple[list[tuple[Result, str]], str | None]:
    argv = zm("unpack", ctx.golden.small, "-o", ctx.out, "-q")
    first, second = ctx.spawn(argv), ctx.spawn(argv)
    results = [first.wait(), second.wait()]
    problems = []
    if not any(r.rc == 0 for r in results):
        problems.append("neither unpack succeeded")
    problems += _unpacked_files_valid(ctx, ctx.out)
    return [(r, ANY) for r in results], "; ".join(problems) or None


def _custom(name: str, run: Callable, quick: bool = False, outputs: str = "pack") -> Case:
    def prepare(ctx: Ctx) -> Plan:
        declared = [ctx.root / "out.zmoe"] if outputs == "pack" else [ctx.out]
        return Plan(custom=run, outputs=declared)

    return Case("writes", name, prepare, quick)


def _planted_partial(ctx: Ctx) -> Plan:
    """pack -o out.zmoe where out.zmoe.partial is already a symlink to a victim file."""
    out = ctx.root / "out.zmoe"
    (ctx.root / "out.zmoe.partial").symlink_to(ctx.victim / "target.bin")
    return Plan([Step(zm("pack", ctx.golden.ckpt, "-o", out, "-q"), ANY, [out])])


def _planted_output_link(ctx: Ctx) -> Plan:
    """pack --force -o out.zmoe where out.zmoe is a symlink to a victim file: the link may go, the victim stays."""
    out = ctx.root / "out.zmoe"
    out.symlink_to(ctx.victim / "target.bin")
    return Plan([Step(zm("pack", ctx.golden.ckpt, "-o", out, "-q", "--force"), ANY, [out])])


def _planted_out_partial_dir(ctx: Ctx) -> Plan:
    """unpack -o OUT where OUT.partial is already a symlink to the victim directory."""
    ctx.out.with_name("OUT.partial").symlink_to(ctx.victim, target_is_directory=True)
    return Plan([Step(zm("unpack", ctx.container(), "-o", ctx.out, "-q"), ANY, [ctx.out])])


def _verify_partial(ctx: Ctx) -> Plan:
    """A complete container renamed to *.partial (what a pack killed just before its rename leaves)."""
    path = ctx.container("tiny", "model.zmoe.partial")
    return Plan([Step(zm("verify", path, "-q"), REFUSE)])


def family_writes(g: Golden, seed: int) -> list[Case]:
    rng = random.Random(seed + 17)
    cases = [
        _custom("two packs at once, no --force", _race_pack(False, 0.0), quick=True),
        _custom("two packs at once, no --force, 0.3 s apart", _race_pack(False, 0.3)),
        _custom("two packs at once, no --force, 1 s apart", _race_pack(False, 1.0)),
        _custom("two packs at once, --force", _race_pack(True, 0.0)),
        _custom("two packs at once, --force, 0.5 s apart", _race_pack(True, 0.5)),
    ]
    for i in range(6):
        fraction = rng.random()
        cases.append(_custom(f"pack SIGKILLed at {fraction:.0%} of its work", _killed_pack(fraction), quick=i == 0))
    for i in range(4):
        fraction = rng.random()
        cases.append(_custom(f"unpack SIGKILLed at {fraction:.0%} of its work", _killed_unpack(fraction),
                             outputs="unpack", quick=i == 0))  # fmt: skip
    cases += [
        _custom("two unpacks at once", _race_unpack, outputs="unpack"),
        Case("writes", "pack with out.zmoe.partial -> victim file", _planted_partial, quick=True),
        Case("writes", "pack --force with out.zmoe -> victim file", _planted_output_link),
        Case("writes", "unpack with OUT.partial -> victim dir", _planted_out_partial_dir),
        Case("writes", "verify a complete container named *.partial", _verify_partial),
    ]
    return cases


# -- setup -------------------------------------------------------------------------------------------------------------


FAMILIES = ("names", "sizes", "json", "config", "templates", "prompts", "flags", "checkpoint", "corruption", "writes")


def build_golden(gdir: Path, logs: Path, limits: Limits, need_small: bool, log: Callable[[str], None]) -> Golden:
    """The clean checkpoint and containers, built with the CLI; fails loudly if the clean path does not work.

    A directory that already holds them (``--golden``, from an earlier run) is reused as it is.
    """
    logs.mkdir(parents=True, exist_ok=True)
    n = [0]

    def run(argv: list, what: str, timeout: float = 300) -> Result:
        n[0] += 1
        proc = Proc(argv, gdir, logs / f"{n[0]:02d}", Limits(timeout, limits.rss_bytes, limits.vm_bytes), fresh=True)
        r = proc.wait()
        if r.rc != 0:
            raise SystemExit(f"setup failed: {what}: exit {r.rc}\n{r.stderr[-3000:]}")
        return r

    gdir.mkdir(parents=True, exist_ok=True)
    ckpt, tiny, sliced = gdir / "ckpt", gdir / "tiny.zmoe", gdir / "sliced.zmoe"
    if not (gdir / "tiny.ok").exists():
        log("building the tiny demo checkpoint and packing it")
        shutil.rmtree(ckpt, ignore_errors=True)
        run(zm("demo-checkpoint", ckpt, "--preset", "tiny"), "demo-checkpoint")
        run(zm("pack", ckpt, "-o", tiny, "-q", "--force"), "pack")
        run(zm("pack", ckpt, "-o", sliced, "-q", "--force", "--slices", "8:4"), "pack --slices 8:4")
        (gdir / "tiny.ok").touch()
    log("checking that zipmoe run serves the clean containers")
    clean = run(zm("run", tiny, "Hello", "-n", "2"), "run (clean)", 120)
    run(zm("run", tiny, "Hello", "-n", "2", "--chat"), "run --chat (clean)", 120)
    run(zm("run", sliced, "Hello", "-n", "2", "--mode", "dbsc"), "run --mode dbsc (clean)", 120)
    golden = Golden(gdir, ckpt, {"tiny": tiny, "sliced": sliced}, {}, clean)
    if need_small:
        golden.small_ckpt, golden.small = gdir / "small-ckpt", gdir / "small.zmoe"
        timings = gdir / "small.ok"
        if not timings.exists():
            log("building the small demo checkpoint for the kill and race cases")
            shutil.rmtree(golden.small_ckpt, ignore_errors=True)
            run(zm("demo-checkpoint", golden.small_ckpt, "--preset", "small"), "demo-checkpoint small")
            started = time.monotonic()
            run(zm("pack", golden.small_ckpt, "-o", golden.small, "-q", "--force"), "pack small")
            pack_seconds = time.monotonic() - started
            started = time.monotonic()
            run(zm("unpack", golden.small, "-o", gdir / "small-unpacked", "-q", "--force"), "unpack small")
            unpack_seconds = time.monotonic() - started
            shutil.rmtree(gdir / "small-unpacked")
            timings.write_text(json.dumps({"pack": pack_seconds, "unpack": unpack_seconds}))
        seconds = json.loads(timings.read_text())
        # the kill cases wait for the output to appear (start-up is over), then up to the rest of the work
        golden.small_pack_seconds = max(0.5, seconds["pack"] - 2.5)
        golden.small_unpack_seconds = max(0.5, seconds["unpack"] - 2.5)
        golden.containers["small"] = golden.small
    for key, path in golden.containers.items():
        golden.docs[key] = read_manifest(path)
    return golden


def build_cases(golden: Golden, families: list[str], seed: int) -> list[Case]:
    builders: dict[str, Callable[[], list[Case]]] = {
        "names": lambda: family_names(golden),
        "sizes": lambda: family_sizes(golden),
        "json": lambda: family_json(golden),
        "config": lambda: family_config(golden),
        "templates": lambda: family_templates(golden),
        "prompts": lambda: family_prompts(golden),
        "flags": lambda: family_flags(golden),
        "checkpoint": lambda: family_checkpoint(golden),
        "corruption": lambda: family_corruption(golden, seed),
        "writes": lambda: family_writes(golden, seed),
    }
    cases = []
    for family in families:
        try:
            cases += builders[family]()
        except Exception as exc:  # a campaign bug (or a format it does not know): one failing case says so

            def broken(ctx: Ctx, exc: Exception = exc) -> Plan:
                raise exc

            cases.append(Case(family, "(building the cases)", broken))
    return cases


def quick_subset(cases: list[Case], target: int = 60) -> list[Case]:
    """The cases marked quick, plus an even spread of each family up to about ``target`` in all."""
    by_family: dict[str, list[Case]] = defaultdict(list)
    for c in cases:
        by_family[c.family].append(c)
    chosen = []
    for family_cases in by_family.values():
        share = max(3, round(target * len(family_cases) / len(cases)))
        picked = [c for c in family_cases if c.quick]
        rest = [c for c in family_cases if not c.quick and not c.slow]
        extra = max(0, share - len(picked))
        if extra and rest:
            step = len(rest) / extra
            picked += [rest[int(i * step)] for i in range(min(extra, len(rest)))]
        chosen += sorted(picked, key=family_cases.index)
    return chosen


# -- running a case ----------------------------------------------------------------------------------------------------


def run_case(case: Case, index: int, golden: Golden, limits: Limits, base: Path, seed: int, keep: bool) -> Verdict:
    started = time.monotonic()
    root = base / "cases" / f"{index:04d}"
    logs = base / "logs" / f"{index:04d}"
    root.mkdir(parents=True)
    logs.mkdir(parents=True)
    results: list[Result] = []
    try:
        ctx = Ctx(root, golden, limits, case, logs, seed * 7919 + index)
        try:
            plan = case.prepare(ctx)
        except Exception as exc:  # a bug in this script, not in zipmoe: say so loudly
            return Verdict(case, "unclean", f"CAMPAIGN BUG while preparing: {type(exc).__name__}: {exc}", [], 0.0)
        before = snapshot(root)
        outputs = list(plan.outputs)
        outcome, detail, deciding = "accepted", "", None
        if plan.custom is not None:
            checks, problem = plan.custom(ctx)
            results = [r for r, _ in checks]
            for r, expect in checks:
                kind, text = classify(r, expect, limits.rss_bytes)
                if kind in FAILURES:
                    outcome, detail, deciding = kind, text, r
                    break
            else:
                if problem:
                    outcome, detail = "wrong", problem
                else:
                    outcome = "clean" if any(r.rc != 0 for r in results) else "accepted"
        else:
            for step in plan.steps:
                outputs += step.outputs
                r = ctx.execute(step.argv, step.timeout)
                results.append(r)
                outcome, detail = classify(r, step.expect, limits.rss_bytes)
                deciding = r
                if outcome != "accepted":
                    break
            if outcome in ("accepted", "clean") and plan.check is not None:
                problem = plan.check(ctx, results)
                if problem:
                    outcome, detail = "wrong", problem
        escaped = outside_writes(before, snapshot(root), outputs, root)
        if escaped:
            outcome, detail = "outside-write", "; ".join(escaped[:5]) + (" ..." if len(escaped) > 5 else "")
        return Verdict(case, outcome, detail, results, time.monotonic() - started, deciding)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------------------------------


def show_argv(argv: list, base: Path, golden: Path) -> str:
    parts = []
    for a in argv:
        if isinstance(a, bytes):
            parts.append(f"$'{a!r}'")
            continue
        a = a.replace(str(base / "cases"), "$CASES").replace(str(golden), "$GOLDEN")
        a = a.replace(sys.executable, "python")
        parts.append(shlex.quote(a if len(a) <= 80 else a[:40] + f"...<{len(a)} chars>"))
    return " ".join(parts)


def summarize(verdicts: list[Verdict], families: list[str], golden: Golden, seconds: float, base: Path) -> dict:
    counts: dict[str, Counter] = {f: Counter() for f in families}
    for v in verdicts:
        counts[v.case.family][v.outcome] += 1
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    failures = [v for v in verdicts if v.outcome in FAILURES]
    kinds: Counter = Counter()
    for v in failures:
        kinds[(v.outcome, _signature(v))] += 1
    run_rss = [
        (v.deciding.maxrss_bytes, v.case.family + "/" + v.case.name)
        for v in verdicts
        if v.deciding is not None and "run" in v.deciding.argv[3:4]
    ]
    corruption = counts.get("corruption", Counter())
    return {
        "seconds": round(seconds, 1),
        "families": {f: {"tried": sum(c.values()), **{k: c[k] for k in OUTCOMES}} for f, c in counts.items()},
        "total": {"tried": sum(total.values()), **{k: total[k] for k in OUTCOMES}},
        "failures": [
            {
                "family": v.case.family,
                "case": v.case.name,
                "outcome": v.outcome,
                "detail": v.detail,
                "command": show_argv(v.deciding.argv, base, golden.base) if v.deciding else "",
                "stderr": _stderr_head(v.deciding.stderr) if v.deciding else [],
            }
            for v in failures
        ],
        "failure_kinds": [{"outcome": o, "signature": s, "count": n} for (o, s), n in kinds.most_common()],
        "peak_rss": {
            "clean_run_bytes": golden.clean_run.maxrss_bytes if golden.clean_run else None,
            "hostile_run_max_bytes": max(run_rss)[0] if run_rss else None,
            "hostile_run_max_case": max(run_rss)[1] if run_rss else None,
            "hostile_run_cases": len(run_rss),
        },
        "corruption": {"detected": corruption["clean"], "missed": corruption["wrong"],
                       "other": sum(corruption.values()) - corruption["clean"] - corruption["wrong"]},
    }  # fmt: skip


def _signature(v: Verdict) -> str:
    if v.outcome == "traceback":
        if v.detail.startswith("Error: internal error ("):
            return "internal error " + v.detail[len("Error: internal error (") :].split(":")[0]
        return v.detail.split(" [")[0].split(":")[0] + (" [" + v.detail.split(" [")[1] if " [" in v.detail else "")
    if v.outcome == "wrong":
        return v.detail[:70]
    if v.outcome == "outside-write":
        return "wrote outside the declared output"
    return v.outcome


def _stderr_head(stderr: str, n: int = 4) -> list[str]:
    lines = [ln.rstrip()[:200] for ln in stderr.splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in stderr:
        return lines[-n:]
    return lines[:n]


def print_report(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"zipmoe hostile-input campaign ({summary['seconds']:.0f} s)")
    table.add_column("family")
    table.add_column("tried", justify="right")
    for key in OUTCOMES:
        table.add_column(COLUMNS[key], justify="right")
    for family, c in summary["families"].items():
        if not c["tried"]:
            continue
        table.add_row(family, str(c["tried"]), *(_cell(c[k], k) for k in OUTCOMES))
    t = summary["total"]
    table.add_row("total", str(t["tried"]), *(_cell(t[k], k) for k in OUTCOMES), style="bold")
    console.print(table)
    corruption = summary["corruption"]
    if sum(corruption.values()):
        console.print(
            f"corruption: {corruption['detected']} detected by verify, {corruption['missed']} missed, "
            f"{corruption['other']} other outcomes"
        )
    rss = summary["peak_rss"]
    if rss["clean_run_bytes"]:
        line = f"peak RSS of zipmoe run: clean {rss['clean_run_bytes'] / 2**20:.0f} MiB"
        if rss["hostile_run_max_bytes"]:
            line += (
                f"; hostile max {rss['hostile_run_max_bytes'] / 2**20:.0f} MiB over {rss['hostile_run_cases']} "
                f"run cases ({rss['hostile_run_max_case']})"
            )
        console.print(line, markup=False)
    if summary["failure_kinds"]:
        console.print("\n[bold]failure kinds[/bold]")
        for k in summary["failure_kinds"]:
            console.print(f"  {k['count']:4d}  {k['outcome']:13s} {k['signature']}", markup=False, highlight=False)
    if summary["failures"]:
        console.print(f"\n[bold]failing cases ({len(summary['failures'])})[/bold]")
        for f in summary["failures"]:
            console.print(f"- [{f['family']}] {f['case']}: {f['outcome']}: {f['detail']}", markup=False,
                          highlight=False)  # fmt: skip
            if f["command"]:
                console.print(f"    $ {f['command']}", markup=False, highlight=False, soft_wrap=True)
            for line in f["stderr"]:
                console.print(f"    | {line}", markup=False, highlight=False, soft_wrap=True)


def print_markdown(summary: dict) -> None:
    """The table and the failure kinds as Markdown (what docs/SECURITY.md shows)."""
    header = ["family", "tried", *(COLUMNS[k] for k in OUTCOMES)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = [(f, c) for f, c in summary["families"].items() if c["tried"]] + [("**total**", summary["total"])]
    for family, c in rows:
        print("| " + " | ".join([family, str(c["tried"]), *(str(c[k]) for k in OUTCOMES)]) + " |")
    corruption = summary["corruption"]
    if sum(corruption.values()):
        print(f"\nCorruption: {corruption['detected']} of {sum(corruption.values())} damaged containers refused by "
              f"`zipmoe verify`, {corruption['missed']} missed.")  # fmt: skip
    rss = summary["peak_rss"]
    if rss["clean_run_bytes"] and rss["hostile_run_max_bytes"]:
        print(f"Peak RSS of `zipmoe run`: {rss['clean_run_bytes'] / 2**20:.0f} MiB clean, at most "
              f"{rss['hostile_run_max_bytes'] / 2**20:.0f} MiB over {rss['hostile_run_cases']} hostile run cases.")  # fmt: skip
    if summary["failure_kinds"]:
        print("\n| failures | outcome | kind |\n|---|---|---|")
        for k in summary["failure_kinds"]:
            print(f"| {k['count']} | {k['outcome']} | {k['signature'].replace('|', '/')} |")


def _cell(n: int, key: str) -> str:
    if n and key in FAILURES:
        return f"[red]{n}[/red]"
    return str(n)


# -- main --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small subset (~60 cases)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs/SECURITY.md)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a command is a hang (default 30)")
    parser.add_argument("--max-rss", type=float, default=3.0, help="GiB of resident memory before a kill (default 3)")
    parser.add_argument("--max-vm", type=float, default=12.0, help="GiB of address space, RLIMIT_AS (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    parser.add_argument("--match", help="only cases whose 'family/name' contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--exec", action="store_true", help="a fresh interpreter per command (slower: ~2.5 s each)")
    parser.add_argument("--golden", help="build the clean inputs here, or reuse them from an earlier run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (printed at the end)")
    args = parser.parse_args(argv)

    families = [f for f in FAMILIES if f in (args.family or FAMILIES)]
    limits = Limits(args.timeout, int(args.max_rss * GIB), int(args.max_vm * GIB))
    base = Path(tempfile.mkdtemp(prefix="zipmoe-attack-"))

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        gdir = Path(args.golden) if args.golden else base / "golden"
        golden = build_golden(gdir.resolve(), base / "logs" / "golden", limits, "writes" in families, say)
        if not args.exec:
            ZYGOTES.append(Zygote(base, base / "logs" / "zygote.err"))
            # the clean run's peak RSS through the same kind of process the cases get
            clean = Proc(zm("run", golden.containers["tiny"], "Hello", "-n", "2"), gdir, base / "logs" / "clean-run",
                         limits).wait()  # fmt: skip
            if clean.rc != 0:
                raise SystemExit(f"the clean run fails in a forked child: {clean.stderr[-2000:]}")
            golden.clean_run = clean
        cases = build_cases(golden, families, args.seed)
        if args.quick:
            cases = quick_subset(cases)
        if args.match:
            cases = [c for c in cases if args.match in f"{c.family}/{c.name}"]
        if args.list:
            for c in cases:
                print(f"{c.family}/{c.name}")
            return 0
        say(f"running {len(cases)} cases, {args.jobs} at a time, timeout {args.timeout:.0f} s")
        verdicts: list[Verdict] = []
        lock = threading.Lock()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {
                pool.submit(run_case, c, i, golden, limits, base, args.seed, args.keep): c for i, c in enumerate(cases)
            }
            for future in as_completed(futures):
                v = future.result()
                with lock:
                    verdicts.append(v)
                    mark = "" if v.outcome in ("clean", "accepted") else f"  <- {v.outcome}: {v.detail[:120]}"
                    say(f"[{len(verdicts):4d}/{len(cases)}] {v.case.family}/{v.case.name}: {v.outcome}"
                        f" ({v.seconds:.1f} s){mark}")  # fmt: skip
        order = {id(c): i for i, c in enumerate(cases)}
        verdicts.sort(key=lambda v: order[id(v.case)])
        summary = summarize(verdicts, families, golden, time.monotonic() - started, base)
        if args.json:
            print(json.dumps(summary, indent=2))
        elif args.markdown:
            print_markdown(summary)
        else:
            print_report(summary)
        return 1 if summary["total"]["tried"] != summary["total"]["clean"] + summary["total"]["accepted"] else 0
    finally:
        for zygote in ZYGOTES:
            zygote.close()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
