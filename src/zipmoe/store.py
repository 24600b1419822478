"""zipmoe's cache directory and its model store: one verified container per Hub repo and commit, and one per local
checkpoint directory, each with a small metadata file.

Layout (docs/MODELS.md)::

    $ZIPMOE_HOME/                          default: $XDG_CACHE_HOME/zipmoe/models, i.e. ~/.cache/zipmoe/models
      hub/ORG--NAME/COMMIT/model.zmoe      a Hub repo at one commit (`zipmoe pull ORG/NAME[@REVISION]`)
                          /model.json      what it is: a `StoredModel`
      local/DIRNAME-KEY/model.zmoe         a checkpoint directory, packed on first use; KEY hashes its resolved path
                       /model.json         ... with a fingerprint of its files, to notice when they change

An entry is written into ``ENTRY.partial/``, held under an exclusive lock (`zipmoe._partial`, as `unpack` writes), and
renamed into place only when its container is packed, verified and described: an entry directory is always complete,
and of two processes storing the same model the second is told at once that the first is writing it.

Repo ids and revisions are typed by users and come from the Hub, i.e. from strangers: a repo id must follow the Hub's
own rules before it names a directory, a commit must be 40 hex digits, and a metadata file is parsed with bounded
depth and checked field by field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipmoe.errors import CheckpointError, OutputError, ZipmoeError

if TYPE_CHECKING:
    from zipmoe.pack import PackOptions

CONTAINER_NAME = "model.zmoe"
METADATA_NAME = "model.json"
METADATA_FORMAT = "zipmoe-model"
METADATA_VERSION = 1
MAX_METADATA_NBYTES = 1 << 16  # a real one is under 1 kB
DEFAULT_REVISION = "main"  # what huggingface_hub downloads when no revision is given

# The Hub's rules (huggingface_hub.utils.validate_repo_id), with the namespace required: ASCII letters, digits, "_",
# "-" and "."; 1 to 96 characters per part; no "--" or ".."; neither starting nor ending with "-" or "."; no ".git".
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REVISION = re.compile(r"[\x21-\x3f\x41-\x7e]{1,256}")  # printable ASCII without space and "@": branch, tag, commit


def cache_dir() -> Path:
    """zipmoe's cache directory: ``$XDG_CACHE_HOME/zipmoe``, or ``~/.cache/zipmoe`` (demo checkpoints, calibrations,
    and the model store unless ``$ZIPMOE_HOME`` moves it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "zipmoe"


def store_root() -> Path:
    """The model store: ``$ZIPMOE_HOME``, or ``models`` in `cache_dir`."""
    home = os.environ.get("ZIPMOE_HOME")
    return Path(home).expanduser().absolute() if home else cache_dir() / "models"


@dataclass(frozen=True)
class RepoRef:
    """A Hub repo id and the revision asked for (``org/name[@revision]``), both checked."""

    repo: str
    revision: str | None = None  # None: the default branch

    @property
    def folder(self) -> str:
        """The repo's directory name in the store (and, with ``models--``, in the Hugging Face cache)."""
        return self.repo.replace("/", "--")  # unambiguous: "--" is not allowed in repo ids

    def __str__(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def repo_id_problem(repo: str) -> str | None:
    """Why ``repo`` is not a Hub repo id ``org/name`` (the Hub's rules), or None if it is one."""
    parts = repo.split("/")
    if len(parts) != 2:
        return "expected org/name"
    for part in parts:
        if not _REPO_PART.fullmatch(part):
            return (
                "each part has 1 to 96 ASCII letters, digits, '_', '-' or '.', and neither starts nor ends with "
                "'-' or '.'"
            )
    if "--" in repo or ".." in repo:
        return "'--' and '..' are not allowed"
    if repo.endswith(".git"):
        return "it cannot end with '.git'"
    return None


def parse_repo_ref(text: str) -> RepoRef:
    """``org/name`` or ``org/name@revision``, checked before it names anything on disk.

    Raises:
        CheckpointError: not a valid repo id or revision (the message says which rule).
    """
    repo, at, revision = text.partition("@")
    shown = text if len(text) <= 120 else text[:117] + "..."
    problem = repo_id_problem(repo)
    if problem:
        raise CheckpointError(f"{shown!r} is not a Hub repo id org/name[@revision]: {problem}")
    if at and not _REVISION.fullmatch(revision):
        raise CheckpointError(
            f"{shown!r}: the revision after '@' must be 1 to 256 printable ASCII characters without spaces"
        )
    return RepoRef(repo, revision or None)


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` is a valid ``org/name[@revision]``."""
    try:
        parse_repo_ref(text)
    except CheckpointError:
        return False
    return True


@dataclass(frozen=True)
class StoredModel:
    """One entry of the store: a container and what it was packed from (``model.json``)."""

    path: Path  # the entry directory
    kind: str  # "hub" or "local"
    name: str  # the repo id, or the checkpoint directory's resolved path
    revision: str | None  # hub: as asked ("main" when none was)
    commit: str | None  # hub: the commit packed
    fingerprint: str | None  # local: `directory_fingerprint` of the directory when it was packed
    created: str  # ISO 8601, UTC
    container_bytes: int
    source_bytes: int
    manifest_sha256: str
    pack_options: dict[str, Any]

    @property
    def container(self) -> Path:
        return self.path / CONTAINER_NAME

    @property
    def ratio(self) -> float | None:
        return self.container_bytes / self.source_bytes if self.source_bytes else None

    @property
    def label(self) -> str:
        """``org/name@COMMIT12`` or the directory: how messages name it."""
        return f"{self.name}@{self.commit[:12]}" if self.commit else self.name

    def to_json(self) -> dict[str, Any]:
        """The metadata file's document."""
        return {
            "format": METADATA_FORMAT,
            "version": METADATA_VERSION,
            "kind": self.kind,
            "name": self.name,
            "revision": self.revision,
            "commit": self.commit,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "container_bytes": self.container_bytes,
            "source_bytes": self.source_bytes,
            "manifest_sha256": self.manifest_sha256,
            "pack_options": self.pack_options,
        }

    @classmethod
    def read(cls, entry: Path) -> StoredModel:
        """The entry in directory ``entry``, checked against its directory and its container.

        Raises:
            ZipmoeError: the metadata file is missing, malformed, or does not match the directory or the container.
        """
        from zipmoe._json import load_json

        path = entry / METADATA_NAME

        def fail(reason: str) -> ZipmoeError:
            return ZipmoeError(f"{path}: {reason}")

        try:
            with open(path, "rb") as f:
                data = f.read(MAX_METADATA_NBYTES + 1)
        except OSError as exc:
            raise fail(f"cannot read ({exc.strerror or exc})") from None
        if len(data) > MAX_METADATA_NBYTES:
            raise fail(f"larger than {MAX_METADATA_NBYTES} bytes")
        doc = load_json(data, fail)
        if not isinstance(doc, dict):
            raise fail("expected a JSON object")

        def get(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = doc.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise fail(f"{key}: expected {getattr(kind, '__name__', 'a value')}, got {type(value).__name__}")
            return value

        if get("format", str) != METADATA_FORMAT or get("version", int) != METADATA_VERSION:
            raise fail(f"expected format {METADATA_FORMAT!r} version {METADATA_VERSION}")
        kind, name = get("kind", str), get("name", str)
        revision, commit = get("revision", str, True), get("commit", str, True)
        fingerprint = get("fingerprint", str, True)
        if kind == "hub":
            problem = repo_id_problem(name)
            if problem:
                raise fail(f"name {name[:120]!r} is not a Hub repo id ({problem})")
            if revision is None or not _REVISION.fullmatch(revision):
                raise fail("revision: expected a Hub revision")
            if commit is None or not _COMMIT.fullmatch(commit):
                raise fail("commit: expected 40 hex digits")
            if (entry.parent.name, entry.name) != (RepoRef(name).folder, commit):
                raise fail(f"describes {name}@{commit}, which is not stored in this directory")
        elif kind == "local":
            if not os.path.isabs(name) or len(name) > 4096:
                raise fail("name: expected the absolute path of a checkpoint directory")
            if fingerprint is None or not _HEX64.fullmatch(fingerprint):
                raise fail("fingerprint: expected 64 hex digits")
        else:
            raise fail(f"kind: expected 'hub' or 'local', got {kind[:40]!r}")
        digest = get("manifest_sha256", str)
        if not _HEX64.fullmatch(digest):
            raise fail("manifest_sha256: expected 64 hex digits")
        model = cls(
            path=entry,
            kind=kind,
            name=name,
            revision=revision,
            commit=commit,
            fingerprint=fingerprint,
            created=get("created", str)[:64],
            container_bytes=get("container_bytes", int),
            source_bytes=get("source_bytes", int),
            manifest_sha256=digest,
            pack_options=get("pack_options", dict),
        )
        try:
            size = os.stat(model.container, follow_symlinks=False).st_size
        except OSError:
            size = None
        if size != model.container_bytes:
            raise ZipmoeError(
                f"{model.container}: {'missing' if size is None else f'{size} bytes'}, but {path} records "
                f"{model.container_bytes} bytes (remove the entry with zipmoe rm and store it again)"
            )
        return model


def pack_options_json(options: PackOptions) -> dict[str, Any]:
    """What the metadata records of how a container was packed; two equal documents pack equal containers."""
    spec = options.slices
    return {
        "coder": options.coder.get_config() if options.coder is not None else None,
        "chunk_values": options.chunk_values,
        "slices": None
        if spec is None
        else {"high_bits": spec.high_bits, "low_bits": spec.low_bits, "group_size": spec.group_size},
    }


def describe_pack_options(doc: dict[str, Any]) -> str:
    """``rans``, ``zstd-3, slices 8:4``: the recorded pack options in the CLI's words."""
    coder = doc.get("coder")
    words = ["none"]  # BF16 stored uncompressed
    if isinstance(coder, dict):
        words = [f"{coder.get('id')}-{coder['level']}" if "level" in coder else str(coder.get("id"))]
    slices = doc.get("slices")
    if isinstance(slices, dict):
        words.append(f"slices {slices.get('high_bits')}:{slices.get('low_bits')}")
    return ", ".join(words)


def directory_fingerprint(directory: Path) -> str:
    """SHA-256 of the name, size and modification time of every file `pack` reads from ``directory``.

    Cheap (no file is read), and it changes when a file is replaced, edited, added or removed, which is what decides
    whether a directory's stored container is still its packed copy.
    """
    from zipmoe.formats.checkpoint import aux_role

    h = hashlib.sha256()
    try:
        names = sorted(p.name for p in directory.iterdir() if p.name.endswith(".safetensors") or aux_role(p.name))
        for name in names:
            st = os.stat(directory / name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


class ModelStore:
    """The stored models under ``root`` (default: `store_root`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else store_root()

    def hub_entry(self, ref: RepoRef, commit: str) -> Path:
        if not _COMMIT.fullmatch(commit):
            raise CheckpointError(f"{ref}: the Hub gave commit {commit[:60]!r}, expected 40 hex digits")
        return self.root / "hub" / ref.folder / commit

    def local_entry(self, directory: Path) -> Path:
        """The entry of a checkpoint directory (a resolved path): its name, made safe, and a hash of the path."""
        key = hashlib.sha256(os.fsencode(directory)).hexdigest()[:16]
        readable = re.sub(r"[^A-Za-z0-9._-]", "_", directory.name)[:64].lstrip(".-") or "checkpoint"
        return self.root / "local" / f"{readable}-{key}"

    def entry(self, entry: Path) -> StoredModel | None:
        """The model stored in ``entry``, or None if there is none (or what is there cannot be used)."""
        if not (entry / METADATA_NAME).is_file():
            return None
        try:
            return StoredModel.read(entry)
        except ZipmoeError:
            return None

    def models(self) -> tuple[list[StoredModel], list[str]]:
        """Every stored model (by kind, name, date), and a line for each entry that cannot be read."""
        entries = [*self._children(self.root / "local")]
        for repo in self._children(self.root / "hub"):
            entries += self._children(repo)
        models, problems = [], []
        for entry in entries:
            try:
                models.append(StoredModel.read(entry))
            except ZipmoeError as exc:
                problems.append(str(exc))
        models.sort(key=lambda m: (m.kind, m.name, m.created))
        return models, problems

    @staticmethod
    def _children(directory: Path) -> list[Path]:
        """Sub-directories, without entries being written (``.partial``) or removed (hidden)."""
        try:
            found = list(directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ZipmoeError(f"{directory}: cannot read the model store ({exc.strerror or exc})") from None
        return sorted(p for p in found if not p.name.startswith(".") and not p.name.endswith(".partial") and p.is_dir())

    def find(self, ref: RepoRef) -> list[StoredModel]:
        """The stored models of ``ref``'s repo that its revision names, oldest first.

        A revision names the models pulled with that revision (none given means the default branch, "main"), and the
        models whose commit starts with it (seven hex digits or more, as git abbreviates).
        """
        wanted = ref.revision or DEFAULT_REVISION
        abbreviated = wanted.lower() if re.fullmatch(r"[0-9a-fA-F]{7,40}", wanted) else None
        return [
            m
            for m in self.models()[0]
            if m.kind == "hub"
            and m.name == ref.repo
            and (m.revision == wanted or (abbreviated is not None and m.commit.startswith(abbreviated)))
        ]

    def find_local(self, directory: Path) -> StoredModel | None:
        return self.entry(self.local_entry(directory))

    def remove(self, model: StoredModel) -> None:
        """Delete an entry: renamed out of sight first, so that no reader ever finds half of it.

        A process serving the container keeps reading it until it closes it (the file lives on until then).

        Raises:
            OutputError: the entry cannot be removed.
        """
        trash = model.path.with_name(f".{model.path.name}.removing-{os.getpid()}")
        try:
            os.rename(model.path, trash)
            shutil.rmtree(trash)
        except OSError as exc:
            raise OutputError(f"cannot remove {model.path}: {exc.strerror or exc}") from None
        if model.kind == "hub":
            try:
                model.path.parent.rmdir()  # the repo's directory, once its last commit is gone
            except OSError:
                pass

    def publish(
        self, entry: Path, write: Callable[[Path], StoredModel], keep: Callable[[StoredModel], bool]
    ) -> tuple[StoredModel, bool]:
        """Write an entry with ``write(staging)`` and rename it into place; return ``(model, written)``.

        ``keep(existing)`` says whether an entry already in place (perhaps published by another process just now) is
        what is wanted; then nothing is written. ``write`` packs into the staging directory and returns the model
        (described with its final path); this method records it in ``model.json`` and publishes.

        Raises:
            OutputError: another process is writing the same entry, or the store cannot be written.
        """
        from zipmoe._partial import fsync_dir, open_locked, partial_path

        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write the model store {self.root}: {exc.strerror or exc}") from None
        staging = partial_path(entry)
        lock = open_locked(staging, directory=True)  # a second writer is told at once (OutputError)
        try:
            existing = self.entry(entry)  # checked again under the lock: another process may have finished
            if existing is not None and keep(existing):
                shutil.rmtree(staging, ignore_errors=True)
                return existing, False
            try:
                model = write(staging)
                _write_json(staging / METADATA_NAME, model.to_json())
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                if os.path.lexists(entry):
                    old = entry.with_name(f".{entry.name}.removing-{os.getpid()}")
                    os.rename(entry, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.rename(staging, entry)  # the lock goes with the directory and ends when it is closed
                fsync_dir(entry.parent)
            except OSError as exc:
                raise OutputError(f"cannot write {entry}: {exc.strerror or exc}") from None
            return StoredModel.read(entry), True  # what the next run will read
        finally:
            os.close(lock)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
