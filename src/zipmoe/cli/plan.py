"""``zipmoe plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._options import DeviceOpt, DtypeOpt, IoOpt, JsonOpt, ModelArg, QuietOpt, StorageOpt, ThreadsOpt
from zipmoe.cli._options import memory_budget as memory_budget_option
from zipmoe.cli._output import percent, prepare_codecs, print_json, stderr, stdout, table

NAME = "plan"
EPILOG = """Examples:

  zipmoe plan qwen-moe.zmoe -m 25% -o plan.json                        # the architecture's synthetic routing

  zipmoe plan qwen-moe.zmoe -m 8GiB --routing trace.jsonl -o plan.json  # recorded with zipmoe run --record-routing

  zipmoe run qwen-moe.zmoe "Hello" --plan plan.json
"""


def command(
    container: ModelArg,
    memory_budget: Annotated[str, memory_budget_option("Memory for experts: 2GiB, 500MB, or 50% of the BF16 experts.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the plan (JSON).")],
    routing: Annotated[
        Optional[str],
        typer.Option(
            "--routing",
            help="A routing trace (zipmoe run --record-routing), or synthetic:qwen / synthetic:deepseek "
            "(default: the architecture's synthetic routing).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    io: IoOpt = "buffered",
    simulate_storage: StorageOpt = None,
    decoded_share: Annotated[
        Optional[float],
        typer.Option(
            "--decoded-share", min=0.0, max=1.0, help="Use this split of the tier bytes instead of the cheapest."
        ),
    ] = None,
    threads: ThreadsOpt = None,
    plot_path: Annotated[
        Optional[Path], typer.Option("--plot", help="Draw predicted TPOT and hit rates against the split (PNG).")
    ] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose how the expert memory is split between decoded experts and compact forms, and which experts each tier
    holds, from a model of which experts tokens use and this machine's measured costs."""
    from zipmoe.cli.models import model_container
    from zipmoe.extras import RUNTIME, require

    require("zipmoe plan", *RUNTIME, *(("matplotlib",) if plot_path is not None else ()))
    container = model_container(container, quiet=quiet)  # a directory or Hub repo: packed into the store once
    from zipmoe.planning.build import plan_engine
    from zipmoe.runtime.engine import Engine, EngineOptions

    options = EngineOptions(
        device=device, dtype=dtype, memory_budget=memory_budget, threads=threads, io=io,
        simulate_storage_gbps=simulate_storage or None,
    )  # fmt: skip
    prepare_codecs(quiet)
    with Engine(container, options) as engine:
        plan = plan_engine(engine, routing, decoded_share=decoded_share)
    plan.write(output)
    if plot_path is not None:
        _plot(plan, plot_path, f"zipmoe plan: {Path(container).name}, budget {memory_budget}, routing {plan.routing}")
    if json_output:
        print_json(plan.to_json())
        return
    t = table("decoded share", "decoded", plan.compact, "hit decoded", f"hit {plan.compact}", "miss", "predicted TPOT",
              title=f"zipmoe plan: {container}, budget {memory_budget}, routing {plan.routing}")  # fmt: skip
    for c in plan.candidates:
        mark = " <" if c.decoded_share == plan.decoded_share else ""
        t.add_row(f"{c.decoded_share:.2f}{mark}", str(c.n_decoded), str(c.n_compact), percent(c.hit_decoded),
                  percent(c.hit_compact), percent(c.miss), f"{c.tpot_seconds * 1000:.1f} ms")  # fmt: skip
    stdout.print(t)
    costs = plan.costs
    if not quiet:
        stderr.print(
            f"measured: reads {costs.read_bytes_per_second / 1e9:.2f} GB/s, decode {costs.decode_seconds * 1000:.1f} "
            f"ms, compute {costs.compute_seconds * 1000:.2f} ms per expert, dense {costs.dense_seconds * 1000:.1f} ms "
            f"per token, overlap loss {costs.overlap_loss:.2f}; per-layer splits (each layer an equal part of the "
            f"bytes) would predict {plan.extra['per_layer_tpot_seconds'] * 1000:.1f} ms"
        )
    stdout.print(f"plan: {output} (decoded share {plan.decoded_share:.2f}, {len(plan.pinned['decoded'])} experts pinned "
                 f"decoded, {len(plan.pinned[plan.compact])} as {plan.compact})")  # fmt: skip


def _plot(plan, path: Path, title: str) -> None:
    """Predicted TPOT and expected hit rates against the decoded share of the tier bytes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = [c.decoded_share for c in plan.candidates]
    fig, (tpot, hits) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=150)
    tpot.plot(shares, [c.tpot_seconds * 1000 for c in plan.candidates], marker="o")
    tpot.axvline(plan.decoded_share, color="grey", linestyle="--", label="chosen")
    tpot.set_xlabel("share of the tier bytes decoded")
    tpot.set_ylabel("predicted TPOT (ms)")
    tpot.legend(fontsize=8)
    for label, values in (("decoded", [c.hit_decoded for c in plan.candidates]),
                          (plan.compact, [c.hit_compact for c in plan.candidates]),
                          ("storage", [c.miss for c in plan.candidates])):  # fmt: skip
        hits.plot(shares, values, marker=".", label=label)
    hits.set_xlabel("share of the tier bytes decoded")
    hits.set_ylabel("expected share of expert uses")
    hits.legend(fontsize=8)
    for ax in (tpot, hits):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
