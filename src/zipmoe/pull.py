"""Putting models into the store (`zipmoe.store`): a Hub repo downloaded through the Hugging Face cache, or a local
checkpoint directory, packed and verified as `zipmoe pack` does.

A Hub repo is stored per commit. The commit that a revision names is found first, by downloading ``config.json``
alone (offline: by reading the local cache), so that a model already stored is recognised without downloading its
weights again (the Hugging Face cache may have been cleared since: saving that space is what the container is for).
The weights are then downloaded at that commit, so the container holds exactly the commit its entry is named after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipmoe.errors import CheckpointError, VerificationError
from zipmoe.store import (
    CONTAINER_NAME,
    DEFAULT_REVISION,
    ModelStore,
    RepoRef,
    StoredModel,
    directory_fingerprint,
    pack_options_json,
    parse_repo_ref,
)

if TYPE_CHECKING:
    from zipmoe.pack import PackOptions, PackResult

Notify = Callable[[str], None]  # told, in one line, that a model is about to be packed and why


@dataclass(frozen=True)
class PullResult:
    """What `pull` or `store_directory` did."""

    model: StoredModel
    pulled: bool  # False: it was stored already and nothing was done
    seconds: float


def pull(
    name: str,
    options: PackOptions | None = None,
    *,
    force: bool = False,
    store: ModelStore | None = None,
    notify: Notify | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PullResult:
    """Store the Hub repo ``name`` (``org/name[@revision]``): download it through the Hugging Face cache (honouring
    ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), pack and verify it.

    The commit already stored with the same pack options is left as it is, unless ``force``.

    Raises:
        CheckpointError: not a valid repo id; no such repo or revision; offline and not in the Hugging Face cache.
        OutputError: another process is storing the same commit now, or the store cannot be written.
        VerificationError: the container does not hold the commit it was asked for (the revision moved meanwhile).
    """
    from zipmoe.pack import PackOptions

    started = time.perf_counter()
    ref = parse_repo_ref(name)
    store = store or ModelStore()
    options = options or PackOptions()
    wanted = pack_options_json(options)
    commit = hub_commit(ref)
    entry = store.hub_entry(ref, commit)

    def keep(existing: StoredModel) -> bool:
        return not force and existing.pack_options == wanted

    existing = store.entry(entry)
    if existing is not None and keep(existing):
        return PullResult(existing, False, time.perf_counter() - started)

    def write(staging: Path) -> StoredModel:
        if notify:
            notify(f"Pulling {ref.repo}@{commit[:12]} into {entry} (downloaded through the Hugging Face cache)")
        result, digest, source = _pack_into(staging, f"{ref.repo}@{commit}", options, progress_start, progress, warn)
        if source.get("commit") != commit:
            raise VerificationError(f"{ref}: asked for commit {commit}, packed {source.get('commit')}")
        return _described(entry, "hub", ref.repo, result, digest, wanted,
                          revision=ref.revision or DEFAULT_REVISION, commit=commit)  # fmt: skip

    model, written = store.publish(entry, write, keep)
    return PullResult(model, written, time.perf_counter() - started)


def store_directory(
    directory: Path,
    options: PackOptions | None = None,
    *,
    force: bool = False,
    store: ModelStore | None = None,
    notify: Notify | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PullResult:
    """Store a local checkpoint directory: packed once, and again when one of its files changes.

    Args:
        options: how to pack; None accepts whatever the stored container was packed with (and packs with the
            defaults when it must).

    Raises:
        CheckpointError: ``directory`` is not a checkpoint (see `checkpoint_dir_problem`) or cannot be read.
        OutputError: another process is storing it now, or the store cannot be written.
    """
    from zipmoe.pack import PackOptions

    started = time.perf_counter()
    directory = Path(directory).expanduser().resolve()
    problem = checkpoint_dir_problem(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    store = store or ModelStore()
    fingerprint = directory_fingerprint(directory)
    entry = store.local_entry(directory)
    wanted = pack_options_json(options) if options is not None else None

    def keep(existing: StoredModel) -> bool:
        same_options = wanted is None or existing.pack_options == wanted
        return not force and existing.name == str(directory) and existing.fingerprint == fingerprint and same_options

    existing = store.entry(entry)
    if existing is not None and keep(existing):
        return PullResult(existing, False, time.perf_counter() - started)
    options = options or PackOptions()

    def write(staging: Path) -> StoredModel:
        if notify:
            if existing is None:
                why = "first use"
            elif existing.fingerprint != fingerprint:
                why = "its files changed"
            else:
                why = "--force" if force else "other pack options"
            notify(f"Packing {directory} into {entry} ({why}; later runs reuse it, zipmoe rm {directory} removes it)")
        result, digest, _ = _pack_into(staging, str(directory), options, progress_start, progress, warn)
        return _described(entry, "local", str(directory), result, digest, pack_options_json(options),
                          fingerprint=fingerprint)  # fmt: skip

    model, written = store.publish(entry, write, keep)
    return PullResult(model, written, time.perf_counter() - started)


def checkpoint_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a checkpoint that zipmoe can serve (config.json and safetensors), or None."""
    if not (directory / "config.json").is_file():
        return "a directory, but not a checkpoint: it has no config.json (expected a Hugging Face checkpoint directory)"
    if not any(directory.glob("*.safetensors")):
        return "a directory, but not a checkpoint: it has no *.safetensors files"
    return None


def hub_commit(ref: RepoRef) -> str:
    """The commit that ``ref``'s revision names now: from a download of ``config.json`` alone, or from the local cache
    when offline.

    Raises:
        CheckpointError: the repo or revision cannot be found (offline: is not in the Hugging Face cache).
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=["config.json"])).name
    except Exception:  # noqa: BLE001 - whatever went wrong, open_checkpoint says it below, in its words
        pass
    from zipmoe.formats.checkpoint import open_checkpoint

    try:
        checkpoint = open_checkpoint(str(ref))  # raises the error the first try ran into, with its message
    except CheckpointError:
        if _offline() and not _in_hub_cache(ref):
            raise CheckpointError(
                f"{ref}: not in the Hugging Face cache ({_hub_cache()}), and downloads are off (HF_HUB_OFFLINE is "
                f"set): unset HF_HUB_OFFLINE to download it, download it with `hf download {ref.repo}`, or pass a "
                "checkpoint directory instead"
            ) from None
        raise
    return checkpoint.source.commit or ""  # the second try succeeded (a passing network error)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _in_hub_cache(ref: RepoRef) -> bool:
    return (_hub_cache() / f"models--{ref.folder}").is_dir()


def _pack_into(
    staging: Path,
    source: str,
    options: PackOptions,
    progress_start: Callable[[int], None] | None,
    progress: Callable[[int], None] | None,
    warn: Callable[[str], None] | None,
) -> tuple[PackResult, str, dict[str, Any]]:
    """Pack ``source`` into the staging directory: the result, the manifest's SHA-256 and its recorded source."""
    from zipmoe.formats.reader import Container
    from zipmoe.pack import pack
    from zipmoe.summary import manifest_sha256

    result = pack(source, staging / CONTAINER_NAME, replace(options, force=True),
                  progress_start=progress_start, progress=progress, warn=warn)  # fmt: skip
    with Container(result.path) as container:
        return result, manifest_sha256(container), dict(container.manifest.source)


def _described(
    entry: Path,
    kind: str,
    name: str,
    result: PackResult,
    digest: str,
    pack_options: dict[str, Any],
    *,
    revision: str | None = None,
    commit: str | None = None,
    fingerprint: str | None = None,
) -> StoredModel:
    return StoredModel(
        path=entry,
        kind=kind,
        name=name,
        revision=revision,
        commit=commit,
        fingerprint=fingerprint,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        container_bytes=result.container_bytes,
        source_bytes=result.source_bytes,
        manifest_sha256=digest,
        pack_options=pack_options,
    )
