"""The Hub code path, offline: `snapshot_download` against a locally built Hugging Face cache (HF_HOME)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from zipmoe.formats.reader import Container

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(hf_home, repo_id, source, commit=COMMIT):
    """Lay out ``source`` as huggingface_hub caches a download: blobs named by hash, snapshot symlinks, refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def zipmoe(*args, env):
    return subprocess.run([sys.executable, "-m", "zipmoe", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def hub_env(checkpoints, tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf-home")
    populate_cache(hf_home, "tiny-org/tiny-moe", checkpoints.family("mixtral", max_shard_size="100KB"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    return env


@pytest.mark.parametrize("repo", ["tiny-org/tiny-moe", f"tiny-org/tiny-moe@{COMMIT}", "tiny-org/tiny-moe@main"])
def test_pack_from_the_hub_cache(hub_env, checkpoints, tmp_path, repo):
    out = tmp_path / "hub.zmoe"
    result = zipmoe("pack", repo, "-o", str(out), "--json", "--quiet", env=hub_env)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"] == f"tiny-org/tiny-moe@{COMMIT}" and doc["expert_records"] == 8
    with Container(out) as c:
        revision = repo.partition("@")[2] or None
        assert c.manifest.source == {"kind": "hub", "name": "tiny-org/tiny-moe", "revision": revision, "commit": COMMIT}
    # verify against the same Hub id, bit for bit
    check = zipmoe("verify", str(out), "--source", repo, "--quiet", env=hub_env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "bit for bit against tiny-org/tiny-moe" in check.stdout


def test_missing_repo_offline(hub_env, tmp_path):
    result = zipmoe("pack", "tiny-org/not-there", "-o", str(tmp_path / "x.zmoe"), env=hub_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: tiny-org/not-there: not a local directory, and Hub repo tiny-org/not-there is not in the local cache "
        "(offline: HF_HUB_OFFLINE is set or the Hub is unreachable)"
    ]
    assert not (tmp_path / "x.zmoe").exists()


def test_unknown_revision_offline(hub_env, tmp_path):
    result = zipmoe("pack", "tiny-org/tiny-moe@v9", "-o", str(tmp_path / "x.zmoe"), env=hub_env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tiny-org/tiny-moe@v9" in result.stderr
