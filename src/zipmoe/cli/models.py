"""``zipmoe pull``, ``zipmoe list``, ``zipmoe rm``: the model store (`zipmoe.store`); and `model_container`, the MODEL
argument of the commands that serve a model (run, chat, eval ppl, plan)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zipmoe.cli._options import JsonOpt, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, percent, print_json, progress_bar, stderr, stdout, table, warn
from zipmoe.errors import ZipmoeError

_STORE = "The store is $ZIPMOE_HOME (default ~/.cache/zipmoe/models); docs/MODELS.md describes it."

PULL_EPILOG = f"""Examples:

  zipmoe pull Qwen/Qwen1.5-MoE-A2.7B                  # download (through the Hugging Face cache), pack, verify

  zipmoe pull mistralai/Mixtral-8x7B-v0.1@main --slices 8:4 --force    # pack again, with AMAT slices

  HF_HUB_OFFLINE=1 zipmoe pull org/model               # from the local Hugging Face cache only

  zipmoe run Qwen/Qwen1.5-MoE-A2.7B "Hello"            # serves the stored container (pulled first if needed)

{_STORE}
"""
LIST_EPILOG = f"""Examples:

  zipmoe list

  zipmoe list --json | jq -r '.[].path'

{_STORE}
"""
RM_EPILOG = f"""Examples:

  zipmoe rm Qwen/Qwen1.5-MoE-A2.7B                     # asks first; -y does not

  zipmoe rm org/model@0123abc -y                       # one revision, by commit (7 hex digits or more)

  zipmoe rm org/model --all-revisions -y

  zipmoe rm ./my-checkpoint -y                         # the container packed when it was first run

{_STORE}
"""

_MODEL_HELP = "A Hub repo id org/name\\[@revision], or a checkpoint directory."  # \\[: not rich markup


def pull(
    model: Annotated[str, typer.Argument(help=_MODEL_HELP, metavar="MODEL", show_default=False)],
    coder: Annotated[
        str,
        typer.Option(
            "--coder", help="Exponent coder: rans, zstd[:LEVEL], lz4 or lz4hc[:LEVEL]; none stores BF16 uncompressed."
        ),
    ] = "rans",
    slices: Annotated[
        Optional[str],
        typer.Option(
            "--slices",
            help="Also store AMAT slices of every expert: HIGH:LOW bits, 8:4, 6:3 or 4:2 (for run --mode dbsc|q8|q4).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Pack it again even if it is stored.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a model from the Hub and pack it into the model store, verified (or store a checkpoint directory)."""
    from zipmoe.resolve import path_kind
    from zipmoe.store import parse_repo_ref

    kind = path_kind(model)  # the name is checked before anything heavy loads
    if kind not in (None, "dir") or (kind is None and model.startswith(("/", ".", "~"))):
        raise ZipmoeError(
            f"{model}: not a checkpoint directory, and not a Hub repo id org/name[@revision] "
            "(zipmoe pull takes one or the other)"
        )
    if kind is None:
        parse_repo_ref(model)

    from zipmoe.codecs.coders import parse_coder
    from zipmoe.pack import PackOptions
    from zipmoe.pull import pull as pull_model
    from zipmoe.pull import store_directory
    from zipmoe.quant.spec import parse_slices

    options = PackOptions(
        coder=parse_coder(coder),
        threads=threads,
        slices=parse_slices(slices) if slices is not None else None,
    )
    with _PackingHooks(model, quiet) as hooks:
        if kind == "dir":
            result = store_directory(Path(model).expanduser(), options, force=force, **hooks.kwargs())
        else:
            result = pull_model(model, options, force=force, **hooks.kwargs())
    m = result.model
    if json_output:
        print_json({"pulled": result.pulled, "seconds": result.seconds, **model_json(m)})
        return
    if result.pulled:
        stdout.print(
            f"Stored {m.label}: {human_bytes(m.container_bytes)}, {percent(m.ratio)} of "
            f"{human_bytes(m.source_bytes)} ({describe(m)}), verified, in {result.seconds:.1f} s"
        )
    else:
        stdout.print(f"{m.label} is already stored ({describe(m)}); --force packs it again")
    stdout.print(str(m.container))


def list_models(json_output: JsonOpt = False) -> None:
    """Show the models in the model store: what each is, its size, and where its container is."""
    from zipmoe.store import ModelStore

    store = ModelStore()
    models, problems = store.models()
    for problem in problems:
        warn(f"skipped an unreadable entry: {problem}")
    if json_output:
        print_json([model_json(m) for m in models])
        return
    if not models:
        stdout.print(f"No models in {store.root} (zipmoe pull org/name stores one)")
        return
    t = table("model", "revision", "size", "ratio", "created", "path", title=str(store.root))
    for i, column in enumerate(t.columns):
        column.justify = "right" if i in (2, 3) else "left"
        column.no_wrap = i < 5  # a long path folds, the rest stays on one line
    t.columns[5].overflow = "fold"
    for m in models:
        revision = f"{m.revision} ({m.commit[:12]})" if m.commit else "-"
        created = m.created.replace("T", " ").rstrip("Z")[:16]
        t.add_row(m.name, revision, human_bytes(m.container_bytes), percent(m.ratio), created, str(m.container))
    stdout.print(t)


def rm(
    model: Annotated[
        str,
        typer.Argument(
            help="A Hub repo id org/name\\[@revision], or a checkpoint directory stored when it was first run.",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    all_revisions: Annotated[
        bool, typer.Option("--all-revisions", help="Remove every stored revision of the repo.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Remove a model from the model store (the Hugging Face cache is left as it is)."""
    from zipmoe.store import ModelStore

    store = ModelStore()
    doomed = _matching(store, model, all_revisions)
    if not yes:
        if not sys.stdin.isatty():
            raise ZipmoeError("zipmoe rm asks before removing, and stdin is not a terminal: pass -y/--yes")
        size = human_bytes(sum(m.container_bytes for m in doomed))
        if not typer.confirm(f"Remove {', '.join(m.label for m in doomed)} ({size})?", default=False, err=True):
            stderr.print("Nothing removed.")
            raise typer.Exit(1)
    for m in doomed:
        store.remove(m)
        if not json_output:
            stdout.print(f"Removed {m.label} ({human_bytes(m.container_bytes)})")
    if json_output:
        print_json([model_json(m) for m in doomed])


def _matching(store: Any, model: str, all_revisions: bool) -> list[Any]:
    """The stored models that ``zipmoe rm MODEL`` means: one, or every revision with ``--all-revisions``."""
    from zipmoe.resolve import path_kind
    from zipmoe.store import looks_like_repo_id, parse_repo_ref

    if path_kind(model) is not None or not looks_like_repo_id(model):
        found = store.find_local(Path(model).expanduser().resolve())
        if found is None:
            raise ZipmoeError(f"{model}: not in the model store {store.root} (zipmoe list shows what is)")
        return [found]
    ref = parse_repo_ref(model)
    if ref.revision is None or all_revisions:
        matches = [m for m in store.models()[0] if m.kind == "hub" and m.name == ref.repo]
    else:
        matches = store.find(ref)
    if not matches:
        raise ZipmoeError(f"{model}: not in the model store {store.root} (zipmoe list shows what is)")
    if len(matches) > 1 and not all_revisions:
        raise ZipmoeError(
            f"{model}: {len(matches)} revisions are stored ({', '.join(m.label for m in matches)}): name one as "
            f"{ref.repo}@COMMIT, or pass --all-revisions"
        )
    return matches


def model_json(m: Any) -> dict[str, Any]:
    """A stored model for --json: its metadata, the container's path and the ratio."""
    doc = m.to_json()
    del doc["format"], doc["version"]
    return {**doc, "path": str(m.container), "ratio": m.ratio}


def describe(m: Any) -> str:
    from zipmoe.store import describe_pack_options

    return describe_pack_options(m.pack_options)


def model_container(model: str | Path, *, quiet: bool = False) -> Path:
    """The container that MODEL names (`zipmoe.resolve`): a checkpoint directory or Hub repo not yet in the model
    store is packed into it first, with a line and a progress bar on stderr (``quiet``: neither).

    Raises:
        ZipmoeError: no such file, directory or repo (one line that says what MODEL may be), and pack's errors.
    """
    from zipmoe.resolve import resolve_model

    with _PackingHooks(str(model), quiet) as hooks:
        return resolve_model(model, **hooks.kwargs())


class _PackingHooks:
    """The callbacks through which pull and the resolver report packing: a message, then a progress bar on stderr
    that opens only when packing starts (a model already stored shows nothing)."""

    def __init__(self, model: str, quiet: bool) -> None:
        from contextlib import ExitStack

        self.model = model
        self.quiet = quiet
        self.stack = ExitStack()
        self.advance: Any = None

    def __enter__(self) -> _PackingHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def kwargs(self) -> dict[str, Any]:
        return dict(notify=self.notify, progress_start=self.start, progress=self.step,
                    warn=None if self.quiet else warn)  # fmt: skip

    def notify(self, message: str) -> None:
        from zipmoe.cli._output import prepare_codecs

        if self.quiet:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        else:
            stderr.print(message)
        prepare_codecs(self.quiet)

    def start(self, total: int) -> None:
        start, self.advance = self.stack.enter_context(progress_bar(f"Packing {self.model}", self.quiet))
        start(total)

    def step(self, n: int) -> None:
        if self.advance is not None:
            self.advance(n)


COMMANDS = (("pull", PULL_EPILOG, pull), ("list", LIST_EPILOG, list_models), ("rm", RM_EPILOG, rm))
