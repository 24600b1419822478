"""Hugging Face checkpoints as pack's input: a local directory or a Hub repo ``org/name[@revision]``.

A local path that exists is always a directory; anything else that looks like ``org/name`` is fetched with
``huggingface_hub.snapshot_download``, limited to the files a packed model needs, which honours ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` (then only the local cache is read).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipmoe._json import load_json
from zipmoe.errors import CheckpointError
from zipmoe.formats.constants import ROLE_CONFIG, ROLE_GENERATION_CONFIG, ROLE_INDEX, ROLE_TOKENIZER
from zipmoe.formats.names import name_problem

if TYPE_CHECKING:  # numpy-backed: imported when a checkpoint is opened, so that a bad source fails before numpy loads
    from zipmoe.formats.safetensors_file import SafetensorsFile, SourceTensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Files kept verbatim in the container next to the weights, with their role.
AUX_FILES = {
    "config.json": ROLE_CONFIG,
    "generation_config.json": ROLE_GENERATION_CONFIG,
    INDEX_NAME: ROLE_INDEX,
    "tokenizer.json": ROLE_TOKENIZER,
    "tokenizer_config.json": ROLE_TOKENIZER,
    "special_tokens_map.json": ROLE_TOKENIZER,
    "added_tokens.json": ROLE_TOKENIZER,
    "tokenizer.model": ROLE_TOKENIZER,
    "vocab.json": ROLE_TOKENIZER,
    "vocab.txt": ROLE_TOKENIZER,
    "merges.txt": ROLE_TOKENIZER,
    "chat_template.jinja": ROLE_TOKENIZER,
    "chat_template.json": ROLE_TOKENIZER,
    "*.tiktoken": ROLE_TOKENIZER,
}

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^\s@]+))?$")


def aux_role(name: str) -> str | None:
    """The role of a file kept verbatim, or None if pack does not keep it."""
    return next((role for pattern, role in AUX_FILES.items() if fnmatch.fnmatchcase(name, pattern)), None)


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint came from, as recorded in the manifest."""

    kind: str  # "local" or "hub"
    name: str  # directory name, or repo id
    revision: str | None = None  # as asked for (hub)
    commit: str | None = None  # resolved snapshot (hub)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.kind == "hub":
            out.update(revision=self.revision, commit=self.commit)
        return out

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.name}@{self.commit or self.revision or 'main'}"
        return self.name


@dataclass
class Checkpoint:
    """A resolved checkpoint directory: its config, the files to keep, and every tensor."""

    root: Path
    source: CheckpointSource
    config: dict[str, Any] | None
    aux_files: list[tuple[str, str]]  # (file name, role), sorted by name
    files: list[SafetensorsFile]
    tensors: dict[str, tuple[int, SourceTensor]]  # name -> (index into files, tensor)

    @property
    def n_bytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors.values())


def check_source(source: str) -> None:
    """Fail at once, reading and downloading nothing, when ``source`` can be neither a checkpoint directory nor a Hub
    repo id; commands call it before they load their kernels.

    Raises:
        CheckpointError: ``source`` is a file, or a missing path that is not ``org/name[@revision]`` either.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: not a directory (expected a Hugging Face checkpoint directory)")
    elif _REPO_ID.match(source) is None:
        raise CheckpointError(f"{source}: no such directory, and not a Hub repo id (org/name[@revision])")


def open_checkpoint(source: str) -> Checkpoint:
    """Resolve ``source`` (local directory or ``org/name[@revision]``) and parse every safetensors header.

    Raises:
        CheckpointError: the directory or repo does not exist, has no safetensors, or a file is malformed.
    """
    check_source(source)
    path = Path(source).expanduser()
    if path.exists():
        return _open_dir(path.resolve(), CheckpointSource("local", path.resolve().name))
    m = _REPO_ID.match(source)
    return _open_hub(m["repo"], m["revision"])


def read_json_file(path: Path) -> Any:
    """A JSON file of a checkpoint, parsed with bounded depth and number length (`zipmoe._json`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return load_json(data, lambda reason: CheckpointError(f"{path}: {reason}"))


def _index_files(index_path: Path) -> list[str]:
    """The shard names a ``model.safetensors.index.json`` lists."""
    index = read_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
        raise CheckpointError(f"{index_path}: not a valid safetensors index (expected a weight_map of file names)")
    names = sorted(set(weight_map.values()))
    for n in names:
        if name_problem(n) or "/" in n:
            raise CheckpointError(f"{index_path}: weight_map must name files in the same directory, got {n!r}")
    return names


def _blob_store(root: Path) -> Path | None:
    """The blob store of the Hugging Face cache repo that ``root`` is a snapshot of (``models--*/blobs``), if any."""
    if root.parent.name == "snapshots" and "--" in root.parent.parent.name:
        return root.parent.parent / "blobs"
    return None


def checked_file(root: Path, name: str) -> Path:
    """``root / name``, refusing a symbolic link that leads outside ``root`` (or its Hub cache blob store).

    A published checkpoint may hold links; following ``tokenizer.json -> /etc/passwd`` would embed a file of the
    packing machine in a container meant for others.
    """
    path = root / name
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    allowed = [root] + [b for b in [_blob_store(root)] if b is not None]
    if not any(target.is_relative_to(Path(os.path.realpath(a))) for a in allowed):
        raise CheckpointError(
            f"{path}: a symbolic link to {target}, outside the checkpoint directory (copy the file in instead)"
        )
    return path


def _weight_files(root: Path) -> list[str]:
    index_path = root / INDEX_NAME
    if index_path.is_file():
        names = _index_files(index_path)
        missing = [n for n in names if not checked_file(root, n).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: lists {len(missing)} missing file(s), first {missing[0]!r}")
        return names
    if checked_file(root, SINGLE_NAME).is_file():
        return [SINGLE_NAME]
    return sorted(p.name for p in root.glob("*.safetensors") if checked_file(root, p.name).is_file())


def _open_dir(root: Path, source: CheckpointSource) -> Checkpoint:
    names = _weight_files(root)
    if not names:
        raise CheckpointError(f"{root}: no *.safetensors files (expected a Hugging Face checkpoint directory)")
    config = None
    if checked_file(root, "config.json").is_file():
        config = read_json_file(root / "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{root / 'config.json'}: expected a JSON object")
    aux = sorted(
        (p.name, role) for p in root.iterdir() if (role := aux_role(p.name)) and checked_file(root, p.name).is_file()
    )
    from zipmoe.formats.safetensors_file import read_safetensors_header

    files = [read_safetensors_header(root / name) for name in names]
    tensors: dict[str, tuple[int, SourceTensor]] = {}
    for i, f in enumerate(files):
        for t in f.tensors:
            if t.name in tensors:
                raise CheckpointError(
                    f"{root}: tensor {t.name!r} is in both {files[tensors[t.name][0]].name} and {f.name}"
                )
            tensors[t.name] = (i, t)
    return Checkpoint(root, source, config, aux, files, tensors)


def _open_hub(repo_id: str, revision: str | None) -> Checkpoint:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("reading from the Hub needs huggingface_hub: pip install huggingface_hub") from None

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(AUX_FILES)))
        index_path = root / INDEX_NAME
        patterns = _index_files(index_path) if index_path.is_file() else ["*.safetensors"]
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(AUX_FILES) + patterns))
    except GatedRepoError:
        raise CheckpointError(f"{label}: gated repo; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{label}: no such repo on the Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{label}: no such revision") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{label}: not a local directory, and Hub repo {repo_id} is not in the local cache "
            "(offline: HF_HUB_OFFLINE is set or the Hub is unreachable)"
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{label}: Hub request failed ({exc})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: cannot download ({exc})") from None
    source = CheckpointSource("hub", repo_id, revision, root.name)
    return _open_dir(root, source)
