"""``zipmoe inspect``."""

from __future__ import annotations

from typing import Annotated

import typer

from zipmoe.cli._checks import check_container
from zipmoe.cli._options import ContainerArg, JsonOpt
from zipmoe.cli._output import human_bytes, percent, print_json, stdout, styled, table

NAME = "inspect"
EPILOG = """Examples:

  zipmoe inspect mixtral.zmoe

  zipmoe inspect mixtral.zmoe --tensors --json | jq '.tensors[0]'
"""


def command(
    container: ContainerArg,
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Show what a container holds: source, model, codecs, and sizes, ratios and exponent entropy per section."""
    check_container(container)  # before numba loads: a mistyped path fails at once
    from zipmoe.formats.reader import Container
    from zipmoe.summary import summarize

    with Container(container) as c:
        doc = summarize(c, tensors=tensors)
    if json_output:
        print_json(doc)
        return
    model = doc["model"]
    source = doc["source"]
    where = (
        f"{source['name']}@{source.get('commit') or source.get('revision') or 'main'}"
        if source["kind"] == "hub"
        else source["name"]
    )
    size = human_bytes(doc["file_bytes"])
    stdout.print(
        styled(doc["path"], "bold", f": zipmoe container v{doc['format_version']}, {size}, {doc['created_by']}")
    )
    stdout.print(f"source    {source['kind']}: {where}")
    stdout.print(
        f"manifest  sha256 {doc['manifest_sha256']} (publish it: an equal digest and a passing verify authenticate the file)"
    )
    if model.get("family"):
        stdout.print(
            f"model     {model.get('model_type')} ({model['family']}), {model.get('n_layers', '?')} layers, "
            f"{model.get('n_experts', '?')} experts per layer, {doc['n_expert_records']} expert records"
        )
    else:
        stdout.print(
            f"model     {model.get('model_type') or 'unknown'}: no routed experts recognised, all tensors dense"
        )
    for config in doc["encodings"]:
        stdout.print(f"encoding  {_describe(config)}")
    if doc["slices"]:
        sl = doc["slices"]
        stdout.print(
            f"slices    AMAT {sl['label']}, groups of {sl['group_size']}: per expert an MSB record of "
            f"{human_bytes(sl['msb']['record_bytes'])} and an LSB record of {human_bytes(sl['lsb']['record_bytes'])}"
        )
    t = table("section", "count", "source", "stored", "ratio", "exp. entropy", "bound (8+H)/16")
    for s in doc["sections"]:
        entropy = "-" if s["exponent_entropy"] is None else f"{s['exponent_entropy']:.3f} bits"
        style = "bold" if s["name"] == "total" else None
        source = human_bytes(s["source_bytes"]) if s["source_bytes"] else "-"
        stored = human_bytes(s["stored_bytes"])
        t.add_row(
            s["name"],
            str(s["count"]),
            source,
            stored,
            percent(s["ratio"]),
            entropy,
            percent(s["entropy_bound"]),
            style=style,
        )
    stdout.print(t)
    if tensors:
        tt = table("tensor", "dtype", "shape", "class", "stored", "ratio", "exp. entropy")
        for x in doc["tensors"]:
            entropy = "-" if x["exponent_entropy"] is None else f"{x['exponent_entropy']:.3f}"
            shape = "x".join(map(str, x["shape"]))
            stored = "in a raw run" if x["stored_bytes"] is None else human_bytes(x["stored_bytes"])
            tt.add_row(x["name"], x["dtype"], shape, x["class"], stored, percent(x["ratio"]), entropy)
        stdout.print(tt)


def _describe(config: dict) -> str:
    if config["id"] in ("bf16-split", "fp8-split"):
        coder = config["exponent_coder"]
        params = ", ".join(f"{k}={v}" for k, v in coder.items() if k != "id")
        return f"{config['id']}: exponents {coder['id']} ({params}), {config['chunk_values']} values per chunk"
    return f"{config['id']}: {config.get('chunk_bytes', '')} bytes per chunk"
