"""Models by name: the model store (zipmoe.store), `zipmoe pull/list/rm`, and MODEL arguments (zipmoe.resolve).

Hub code runs offline against a locally built Hugging Face cache, as in tests/test_hub.py; each test has its own
ZIPMOE_HOME.
"""

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, copy_of, run_cli
from test_hub import COMMIT, populate_cache
from zipmoe._partial import open_locked, partial_path
from zipmoe.errors import CheckpointError, ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.resolve import resolve_model
from zipmoe.store import METADATA_NAME, ModelStore, RepoRef, StoredModel, parse_repo_ref, store_root
from zipmoe.summary import manifest_sha256

REPO = "tiny-org/tiny-moe"


@pytest.fixture(scope="module")
def hf_home(checkpoints, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf-home")
    populate_cache(hf_home, REPO, checkpoints.demo("tiny"))
    return hf_home


@pytest.fixture
def env(hf_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ZIPMOE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", ZIPMOE_HOME=str(tmp_path / "store"))
    return env


@pytest.fixture
def home(tmp_path, monkeypatch):
    """ZIPMOE_HOME for in-process tests."""
    monkeypatch.setenv("ZIPMOE_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


def zipmoe(*args, env):
    return subprocess.run([sys.executable, "-m", "zipmoe", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


CPU = ("--device", "cpu", "-n", "2")


# -- repo ids ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, repo, revision",
    [
        ("org/name", "org/name", None),
        ("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B", None),
        ("a_b/c.d@main", "a_b/c.d", "main"),
        ("org/name@refs/pr/1", "org/name", "refs/pr/1"),
        (f"org/name@{COMMIT}", "org/name", COMMIT),
    ],
)
def test_repo_ids_that_the_hub_accepts(text, repo, revision, tmp_path):
    ref = parse_repo_ref(text)
    assert (ref.repo, ref.revision) == (repo, revision)
    entry = ModelStore(tmp_path).hub_entry(ref, COMMIT)
    assert entry.parent.parent == tmp_path / "hub" and entry.name == COMMIT


@pytest.mark.parametrize(
    "text, reason",
    [
        ("../x", "neither starts nor ends"),
        ("a/b/c", "expected org/name"),
        ("/etc/passwd", "expected org/name"),
        ("org/..", "neither starts nor ends"),
        ("../../etc", "expected org/name"),
        ("org/.hidden", "neither starts nor ends"),
        ("org/na..me", "'..'"),
        ("org/na--me", "'--'"),
        ("org/name.git", ".git"),
        ("org/", "neither starts nor ends"),
        ("org\\name", "expected org/name"),
        ("org/naïve", "ASCII"),
        ("o" * 97 + "/name", "1 to 96"),
        ("org/" + "n" * 97, "1 to 96"),
        ("org/name@", "revision"),
        ("org/name@has space", "revision"),
        ("org/name@a@b", "revision"),
        ("org/name@" + "r" * 257, "revision"),
    ],
)
def test_hostile_repo_ids_are_refused(text, reason):
    with pytest.raises(CheckpointError, match="Hub repo id|revision") as info:
        parse_repo_ref(text)
    assert reason in str(info.value)
    assert len(str(info.value)) < 400  # a 10,000-character name is not echoed whole


def test_hostile_commits_never_name_a_directory(tmp_path):
    for commit in ("../../x", "0" * 39, "0" * 40 + "/..", "G" * 40):
        with pytest.raises(CheckpointError, match="40 hex digits"):
            ModelStore(tmp_path).hub_entry(RepoRef("org/name"), commit)


def test_pull_refuses_hostile_names_before_touching_the_store(capsys, home):
    hostile = [("../x", "not a checkpoint directory"), ("a/b/c", "expected org/name"),
               ("/etc/passwd", "not a checkpoint directory"), ("org/" + "n" * 5000, "1 to 96")]  # fmt: skip
    for name, fragment in hostile:
        code, out, err = run_cli(capsys, "pull", name)
        assert_one_line_error(code, err, fragment)
        assert out == ""
    assert not home.exists()


def test_store_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ZIPMOE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert store_root() == tmp_path / "cache" / "zipmoe" / "models"
    monkeypatch.setenv("ZIPMOE_HOME", str(tmp_path / "elsewhere"))
    assert store_root() == tmp_path / "elsewhere"


# -- Hub repos ---------------------------------------------------------------------------------------------------------


def test_a_hub_model_from_first_run_to_removal(env, tmp_path):
    store = tmp_path / "store"
    container = store / "hub" / "tiny-org--tiny-moe" / COMMIT / "model.zmoe"

    first = ok(zipmoe("run", REPO, "Hello", *CPU, "--json", env=env))  # pulled on first use, with a message
    assert f"Pulling {REPO}@{COMMIT[:12]}" in first.stderr and json.loads(first.stdout)["new_tokens"] == 2
    packed_at = container.stat().st_mtime_ns

    pulled = json.loads(ok(zipmoe("pull", REPO, "--json", "-q", env=env)).stdout)  # already stored: nothing done
    assert pulled["pulled"] is False and pulled["path"] == str(container)
    assert (pulled["name"], pulled["revision"], pulled["commit"]) == (REPO, "main", COMMIT)
    with Container(container) as c:
        assert c.manifest.source["commit"] == COMMIT
        assert pulled["manifest_sha256"] == manifest_sha256(c)
    assert pulled["container_bytes"] == container.stat().st_size and 0.5 < pulled["ratio"] < 0.9
    assert "already stored" in ok(zipmoe("pull", REPO, env=env)).stdout

    again = ok(zipmoe("run", f"{REPO}@main", "Hello", *CPU, env=env))  # uses the stored container
    assert "Pulling" not in again.stderr and "Packing" not in again.stderr
    assert container.stat().st_mtime_ns == packed_at

    listed = json.loads(ok(zipmoe("list", "--json", env=env)).stdout)
    assert [(m["name"], m["commit"], m["path"]) for m in listed] == [(REPO, COMMIT, str(container))]
    table = ok(zipmoe("list", env=env)).stdout
    assert REPO in table and f"main ({COMMIT[:12]})" in table

    one_line_error(zipmoe("rm", REPO, env=env), "pass -y/--yes")  # stdin is not a terminal
    assert container.is_file()
    removed = json.loads(ok(zipmoe("rm", f"{REPO}@{COMMIT[:8]}", "-y", "--json", env=env)).stdout)
    assert [m["commit"] for m in removed] == [COMMIT]
    assert not container.exists() and not container.parent.parent.exists()
    assert json.loads(ok(zipmoe("list", "--json", env=env)).stdout) == []
    one_line_error(zipmoe("rm", REPO, "-y", env=env), f"{REPO}: not in the model store")

    # pulled again, explicitly; then packed again when other pack options are asked for
    assert json.loads(ok(zipmoe("pull", REPO, "--json", "-q", env=env)).stdout)["pulled"] is True
    sliced = json.loads(ok(zipmoe("pull", REPO, "--slices", "8:4", "--json", "-q", env=env)).stdout)
    assert sliced["pulled"] is True and sliced["pack_options"]["slices"]["low_bits"] == 4
    with Container(container) as c:
        assert c.slice_spec is not None
    assert not list(container.parent.parent.glob("*.partial"))


def test_offline_and_not_cached(env, tmp_path):
    for args in (("pull", "tiny-org/not-there"), ("run", "tiny-org/not-there", "Hello", *CPU)):
        one_line_error(
            zipmoe(*args, env=env),
            "tiny-org/not-there: not in the Hugging Face cache",
            "HF_HUB_OFFLINE",
            "hf download tiny-org/not-there",
            "checkpoint directory",
        )
    assert not (tmp_path / "store" / "hub" / "tiny-org--not-there").exists()


def test_concurrent_pulls_of_one_model(env, tmp_path):
    runs = [
        subprocess.Popen([sys.executable, "-m", "zipmoe", "pull", REPO, "-q"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(), p.stdout.read(), p.stderr.read()) for p in runs]
    for code, _, err in results:  # each one stores it, finds it stored, or is told at once that the other is at it
        # (or, if it looked just as the other renamed its finished entry into place, that it could not write it)
        assert code == 0 or (code == 1 and ("another zipmoe process is writing" in err or "cannot write" in err)), err
    assert any(code == 0 for code, _, _ in results)
    models, problems = ModelStore(tmp_path / "store").models()
    assert problems == [] and [(m.name, m.commit) for m in models] == [(REPO, COMMIT)]
    assert not list((tmp_path / "store" / "hub" / "tiny-org--tiny-moe").glob("*.partial"))


# -- checkpoint directories --------------------------------------------------------------------------------------------


def test_run_a_checkpoint_directory_packs_it_once(capsys, checkpoints, tmp_path, home):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    code, out, err = run_cli(capsys, "run", str(source), "Hello", *CPU, "--json")
    assert code == 0, err
    assert f"Packing {source} into {home / 'local'}" in err and "first use" in err
    assert json.loads(out)["new_tokens"] == 2
    (model,) = ModelStore().models()[0]
    assert (model.kind, model.name) == ("local", str(source))
    packed_at = model.container.stat().st_mtime_ns

    code, _, err = run_cli(capsys, "run", str(source), "Hello", *CPU)
    assert code == 0 and "Packing" not in err and model.container.stat().st_mtime_ns == packed_at

    told = []
    os.utime(source / "model.safetensors", ns=(packed_at, packed_at + 10**9))  # a file of it changes
    assert resolve_model(str(source), notify=told.append) == model.container
    assert len(told) == 1 and "its files changed" in told[0]
    assert ModelStore().find_local(source.resolve()).fingerprint != model.fingerprint
    assert resolve_model(source, notify=told.append) == model.container and len(told) == 1

    code, out, _ = run_cli(capsys, "rm", str(source), "-y")
    assert code == 0 and out.startswith(f"Removed {source}") and not model.path.exists()


class _Terminal(io.StringIO):
    """Standard input that says it is a terminal, holding what the user types."""

    def isatty(self) -> bool:
        return True


def test_rm_asks_on_a_terminal(capsys, checkpoints, home, monkeypatch):
    source = checkpoints.demo("tiny").resolve()
    assert run_cli(capsys, "pull", str(source), "-q")[0] == 0
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, out, err = run_cli(capsys, "rm", str(source))
    assert code == 1 and f"Remove {source}" in err and "Nothing removed." in err and out.strip() == ""
    assert ModelStore().find_local(source) is not None
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    code, out, _ = run_cli(capsys, "rm", str(source))
    assert code == 0 and out.lstrip().startswith(f"Removed {source}") and ModelStore().find_local(source) is None


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("missing.zmoe", "missing.zmoe: no such file or directory (MODEL is a .zmoe container, a checkpoint directory"),
        ("./not/here", "./not/here: no such file or directory"),
        ("a/b/c", "a/b/c: no such file or directory"),
    ],
)
def test_missing_models(capsys, home, name, fragment):
    code, out, err = run_cli(capsys, "run", name, "Hello", *CPU)
    assert_one_line_error(code, err, fragment)
    assert out == "" and not home.exists()


def test_a_directory_that_is_not_a_checkpoint(capsys, home, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "run", str(tmp_path / "empty"), "Hello", *CPU)
    assert_one_line_error(code, err, "a directory, but not a checkpoint: it has no config.json")
    (tmp_path / "empty" / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", "ppl", str(tmp_path / "empty"), "--text", __file__)
    assert_one_line_error(code, err, "it has no *.safetensors files")
    assert not home.exists()


def test_a_second_writer_is_told_at_once(capsys, checkpoints, home):
    source = checkpoints.demo("tiny")
    entry = ModelStore().local_entry(source.resolve())
    entry.parent.mkdir(parents=True)
    lock = open_locked(partial_path(entry), directory=True)  # as another process writing it would hold it
    try:
        code, out, err = run_cli(capsys, "pull", str(source), "-q")
    finally:
        os.close(lock)
    assert_one_line_error(code, err, "is locked: another zipmoe process is writing")
    assert ModelStore().models() == ([], [])
    code, out, err = run_cli(capsys, "pull", str(source), "--json", "-q")  # the lock is gone: it works
    assert code == 0 and json.loads(out)["pulled"] is True, err


def test_metadata_is_checked(capsys, checkpoints, home):
    source = checkpoints.demo("tiny")
    code, out, err = run_cli(capsys, "pull", str(source), "-q", "--json")
    assert code == 0, err
    entry = ModelStore().find_local(source.resolve()).path
    doc = json.loads((entry / METADATA_NAME).read_text())
    for change, reason in (
        ({"kind": "hub", "name": "../../etc", "commit": COMMIT, "revision": "main"}, "not a Hub repo id"),
        ({"container_bytes": 1}, "records 1 bytes"),
        ({"manifest_sha256": "x"}, "manifest_sha256: expected 64 hex digits"),
        ({"created": 5}, "created: expected str"),
        ({"version": 99}, "version 1"),
    ):
        (entry / METADATA_NAME).write_text(json.dumps({**doc, **change}))
        with pytest.raises(ZipmoeError, match="model.json") as info:
            StoredModel.read(entry)
        assert reason in str(info.value)
        code, out, err = run_cli(capsys, "list", "--json")
        assert code == 0 and json.loads(out) == [] and "skipped an unreadable entry" in err
    (entry / METADATA_NAME).write_text("[" * 10_000)
    assert ModelStore().models()[0] == [] and "nested deeper" in ModelStore().models()[1][0]
