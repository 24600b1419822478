"""One flag vocabulary: every command spells a concept the same way, old spellings still work (with a warning),
choices and defaults in help, sizes need a unit; and the frictions fixed with it: pack's progress adds up to its
total, eval reports a standard error, bench tables fit 100 columns."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import typer
from rich.console import Console

from conftest import assert_one_line_error, run_cli
from zipmoe.cli import _options
from zipmoe.cli._options import ALIASES, SPELLINGS, rewrite_aliases
from zipmoe.cli.app import app

# Every spelling a concept has had, old ones included: a command may show only the canonical set (SPELLINGS).
EVERY_SPELLING = {concept: set(spellings) for concept, spellings in SPELLINGS.items()}
for _alias in ALIASES:
    EVERY_SPELLING[next(c for c, s in SPELLINGS.items() if _alias.new in s)].add(_alias.old)

# Where each concept must exist (commands added later may have it too).
EXPECTED = {
    "--max-new-tokens": {"run", "bench run", "bench cache", "bench slices"},
    "--memory-budget": {"run", "plan", "eval ppl", "bench run", "bench cache", "bench slices"},
    "--storage": {"run", "plan", "bench run", "bench cache", "bench slices"},
    "--io": {"run", "plan"},
    "--device": {"run", "plan", "eval ppl", "bench run", "bench cache", "bench slices"},
    "--threads": {"pack", "verify", "unpack", "run", "plan", "eval ppl", "bench codecs", "bench pack", "bench run",
                  "bench cache", "bench slices"},
    "--quiet": {"pack", "verify", "unpack", "run", "plan", "eval ppl", "demo-checkpoint", "bench codecs", "bench pack",
                "bench run", "bench cache", "bench slices"},
    "--json": {"pack", "verify", "inspect", "unpack", "run", "plan", "eval ppl", "demo-checkpoint", "bench codecs",
               "bench pack", "bench run", "bench cache", "bench slices"},
    "--eval-tokens": {"eval ppl", "bench slices"},
}  # fmt: skip


def _commands() -> dict[str, object]:
    """Every leaf command of the click tree, by its path (``bench run``)."""
    out = {}

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            out[" ".join(path)] = command
            return
        for name, sub in subcommands.items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def _visible_options(command) -> set[str]:
    return {
        opt
        for param in command.params
        if not getattr(param, "hidden", False)
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("-")
    }


COMMANDS = _commands()


def test_every_command_spells_each_concept_one_way():
    for path, command in COMMANDS.items():
        shown = _visible_options(command)
        for concept, spellings in EVERY_SPELLING.items():
            used = shown & spellings
            assert used in (set(), set(SPELLINGS[concept])), (path, concept, used)
    # A short option means one long option everywhere, and a long option has the same short one everywhere.
    partners: dict[str, set[str]] = {}
    for command in COMMANDS.values():
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            shorts = [o for o in param.opts if o.startswith("-") and not o.startswith("--")]
            for long in longs:
                partners.setdefault(long, set()).add(tuple(shorts))
            for short in shorts:
                partners.setdefault(short, set()).add(tuple(longs))
    assert {opt: p for opt, p in partners.items() if len(p) > 1} == {}


@pytest.mark.parametrize("flag", sorted(EXPECTED))
def test_each_canonical_flag_exists_where_its_concept_does(flag):
    having = {path for path, command in COMMANDS.items() if flag in _visible_options(command)}
    assert EXPECTED[flag] <= having, EXPECTED[flag] - having


def test_old_spellings_are_hidden():
    for command in COMMANDS.values():
        assert not _visible_options(command) & {a.old for a in ALIASES}


def test_choice_lists_are_the_runtimes():
    from zipmoe.runtime import engine, pipeline, policies, storage

    assert _options.DTYPES == tuple(engine.DTYPES)
    assert _options.IO_MODES == storage.IO_MODES
    assert set(_options.POLICIES) == set(policies.POLICIES) and _options.POLICIES[0] == engine.DEFAULT_POLICY
    assert _options.SCHEDULES == pipeline.SCHEDULES
    assert _options.WARMUPS == policies.WARMUPS
    assert engine.resolve_device("auto").type in _options.DEVICES and engine.resolve_device("cpu").type == "cpu"
    with pytest.raises(engine.DeviceError, match="cpu, cuda or auto"):
        engine.resolve_device("tpu")


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_shows_examples_choices_and_no_bool(capsys, monkeypatch, path):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option: choices are not folded
    code, out, err = run_cli(capsys, *path.split(), "--help")
    assert code == 0, err
    assert "Examples:" in out and "<bool>" not in out
    shown = _visible_options(COMMANDS[path])
    for flag, choices in (("--device", _options.DEVICES), ("--io", _options.IO_MODES), ("--dtype", _options.DTYPES),
                          ("--policy", _options.POLICIES), ("--schedule", _options.SCHEDULES),
                          ("--warmup", _options.WARMUPS)):  # fmt: skip
        if flag in shown:
            assert "[" + "|".join(choices) + "]" in out, (path, flag)
    if "--device" in shown:
        assert "[default: auto]" in out


@pytest.mark.parametrize(
    "args, listing",
    [
        (["run", "--device", "tpu"], "'tpu' is not one of auto, cpu, cuda"),
        (["run", "--io", "mmap"], "'mmap' is not one of buffered, direct"),
        (["run", "--policy", "mru"], "'mru' is not one of lfu, lru, fifo"),
        (["run", "--warmup", "bogus"], "'bogus' is not one of pcw, last-layer, random, empty"),
        (["run", "--schedule", "lifo"], "'lifo' is not one of fifo, affinity"),
        (["plan", "--dtype", "int8"], "'int8' is not one of float32, bfloat16, float16"),
        (["eval", "ppl", "--device", "gpu"], "'gpu' is not one of auto, cpu, cuda"),
        (["bench", "cache", "--preset", "huge"], "'huge' is not one of qwen-moe-bench, deepseek-v2-lite"),
        (["demo-checkpoint", "--preset", "huge"], "'huge' is not one of tiny, tiny-deepseek, small"),
    ],
)
def test_bad_choices_are_usage_errors_listing_the_choices(capsys, args, listing):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert listing in " ".join((out + err).replace("│", " ").split())


# -- old spellings ----------------------------------------------------------------------------------------------------

ALIAS_VALUES = {"--new-tokens": "5", "--max-tokens": "7", "--budget": "25%", "--budgets": "10,20.5",
                "--simulate-storage": "2"}  # fmt: skip


def _invoke(path: str, args: list[str]) -> dict:
    """The keyword arguments ``zipmoe PATH ARGS`` calls its command with (the command itself does not run)."""
    root = typer.main.get_command(app)
    command = root
    for name in path.split():
        command = command.commands[name]
    seen: dict = {}
    command.callback = lambda **kwargs: seen.update(kwargs)
    root.main(args=[*path.split(), *args], prog_name="zipmoe", standalone_mode=False)
    return seen


def _required(command, container: str) -> list[str]:
    """Arguments that satisfy ``command``'s required parameters."""
    args = []
    for param in command.params:
        if not param.required:
            continue
        if param.param_type_name == "argument":
            args.append(container)
        else:
            args += [param.opts[0], "1GiB" if "--memory-budget" in param.opts else "x"]
    return args


@pytest.mark.parametrize("alias", ALIASES, ids=lambda a: a.old)
def test_old_spellings_still_work_and_warn(capsys, tmp_path, alias):
    container = str(tmp_path / "model.zmoe")
    paths = [p for p, c in COMMANDS.items() if alias.new in _visible_options(c) and p in alias.commands]
    assert len(paths) == len(alias.commands)
    value = ALIAS_VALUES[alias.old]
    for path in paths:
        base = _required(COMMANDS[path], container)
        old = _invoke(path, [*base, alias.old, value])
        assert capsys.readouterr().err.count(f"{alias.old} is deprecated") == 1, path
        new = _invoke(path, [*base, alias.new, (alias.convert or str)(value)])
        assert "deprecated" not in capsys.readouterr().err
        assert old == new, path
        default = _invoke(path, base)
        assert old != default, path  # the value arrived


def test_rewrite_leaves_values_and_what_follows_double_dash_alone():
    command = COMMANDS["bench cache"]
    warned = []
    args = ["--routing", "--budgets", "--budgets=10", "-qt", "2", "--", "--budgets"]
    out = rewrite_aliases(command, args, warned.append)
    assert out == ["--routing", "--budgets", "--memory-budget=10%", "-qt", "2", "--", "--budgets"]
    assert len(warned) == 1
    assert rewrite_aliases(COMMANDS["inspect"], ["--budgets", "5"]) == ["--budgets", "5"]  # no such concept there
    assert rewrite_aliases(COMMANDS["run"], ["--budgets", "5"], path="run") == ["--budgets", "5"]  # never had it


# -- sizes ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "-m", "10", "{c}", "hello"], "--memory-budget 10: give a unit, e.g. 10GiB, 10GB or 10%"),
        (["plan", "-m", "2.5", "{c}", "-o", "{c}.json"], "--memory-budget 2.5: give a unit, e.g. 2.5GiB, 2.5GB or 2.5%"),
        (["eval", "ppl", "--memory-budget", "8", "{c}", "--text", "t"], "--memory-budget 8: give a unit"),
        (["bench", "slices", "-m", "30"], "--memory-budget 30: give a unit"),
        (["bench", "run", "-m", "25%,2GiB"], "--memory-budget 2GiB: benchmarks take budgets as percentages"),
        (["bench", "cache", "-m", "10,20"], "--memory-budget 10: benchmarks take budgets as percentages of the BF16 "
                                            "expert bytes, e.g. 10%"),
        (["run", "-m", "3 parsecs", "{c}", "hello"], "--memory-budget: unknown size unit 'parsecs'"),
    ],
)  # fmt: skip
def test_sizes_without_a_unit_are_one_line_errors(capsys, tmp_path, args, message):
    args = [a.format(c=tmp_path / "model.zmoe") for a in args]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, message)


def test_sizes_are_checked_before_torch_loads(tmp_path):
    script = (
        "import sys\nfrom zipmoe.cli.app import main\n"
        "try:\n    main(['plan', '-m', '10', 'x.zmoe', '-o', 'p.json'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'numba' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.split() == ["1", "False", "False"], done.stdout + done.stderr
    assert "give a unit" in done.stderr


def test_parse_size_reads_units_and_refuses_bare_numbers():
    from zipmoe.runtime.engine import parse_size as reexported
    from zipmoe.sizes import BudgetError, parse_percentages, parse_size

    assert reexported is parse_size
    assert parse_size("2GiB") == 2 << 30 and parse_size("500MB") == 500_000_000 and parse_size("1.5g") == 3 << 29
    assert parse_size("50%", percent_of=1000) == 500 and parse_size("123B") == 123
    with pytest.raises(BudgetError, match="give a unit, e.g. 123GiB"):
        parse_size("123")
    with pytest.raises(BudgetError, match="a percentage needs something"):
        parse_size("5%")
    assert parse_percentages("25%, 50%,100%") == (25.0, 50.0, 100.0)
    with pytest.raises(BudgetError, match="e.g. 25%"):
        parse_percentages("1GiB")


# -- pack's progress ----------------------------------------------------------------------------------------------------


def test_pack_progress_adds_up_to_its_total(checkpoints, tmp_path):
    from zipmoe.pack import PackOptions, pack

    source = tmp_path / "src"
    shutil.copytree(checkpoints.demo("tiny"), source)
    shard = sorted(source.glob("*.safetensors"))[0]
    with open(shard, "ab") as f:  # bytes after the last tensor: kept, and counted, like the embedded files
        f.write(bytes(range(256)) * 4)
    totals, steps = [], []
    result = pack(str(source), tmp_path / "x.zmoe", PackOptions(threads=1), progress_start=totals.append,
                  progress=steps.append)  # fmt: skip
    assert len(totals) == 1 and min(steps) >= 0
    assert sum(steps) == totals[0] == result.source_bytes
    assert any(p.suffix == ".json" for p in source.iterdir())  # the embedded files were part of the count


def test_chunk_values_errors_name_the_flag():
    from zipmoe.pack import PackOptionError, PackOptions

    with pytest.raises(PackOptionError, match=r"^--chunk-values must be a multiple of 64 between 64 and \d+, got 100$"):
        PackOptions(chunk_values=100)


# -- eval ppl's standard error ------------------------------------------------------------------------------------------


def test_nll_stderr_is_the_standard_error_of_the_mean():
    from zipmoe.evaluate import nll_stderr

    x = np.random.default_rng(0).gamma(2.0, 1.5, 777)
    expected = np.std(x, ddof=1) / math.sqrt(x.size)
    assert nll_stderr(float(x.sum()), float((x * x).sum()), x.size) == pytest.approx(expected, rel=1e-9)
    assert nll_stderr(3.0, 3.0, 3) == 0.0 and math.isnan(nll_stderr(1.0, 1.0, 1))


def test_eval_ppl_reports_a_standard_error_and_warns_on_few_tokens(capsys, checkpoints, tmp_path):
    import torch
    import torch.nn.functional as F

    from zipmoe.runtime.engine import Engine, EngineOptions

    packed = checkpoints.packed(checkpoints.demo("tiny"))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    args = ["eval", "ppl", str(packed), "--text", str(text), "--mode", "lossless", "--device", "cpu", "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    doc = json.loads(out)
    result = doc["results"][0]
    assert result["tokens"] < 512 and "fewer than 512" in err and doc["warnings"]
    assert result["perplexity_stderr"] == pytest.approx(result["perplexity"] * result["nll_stderr"])
    # The same tokens scored here: the sample standard deviation of their NLLs over sqrt(N).
    with Engine(packed, EngineOptions(device="cpu")) as engine:
        ids = engine.tokenizer.encode(text.read_text(encoding="utf-8"))
        tokens = torch.tensor(ids)
        logits = engine.model.forward(tokens[:-1], 0, engine.model.new_cache(len(ids) - 1), all_logits=True)
        nll = F.cross_entropy(logits, tokens[1:], reduction="none").double()
    assert result["tokens"] == nll.numel()
    assert result["nll_stderr"] == pytest.approx(float(nll.std() / math.sqrt(nll.numel())), rel=1e-4)
    code, out, err = run_cli(capsys, *args[:-1], "--quiet")
    assert code == 0 and "Warning" not in err and "±" in out


# -- bench tables ---------------------------------------------------------------------------------------------------


def _width(renderable) -> int:
    console = Console(file=io.StringIO(), width=1000, color_system=None)
    console.print(renderable)
    return max(len(line.rstrip()) for line in console.file.getvalue().splitlines())


def _codec_report(threads):
    from zipmoe.bench.codecs import CodecReport, Row

    rows = [
        Row("rans", c, 660, 1000, {n: 1.63 for n in threads}, {n: 12.34 for n in threads}) for c in (16384, 1 << 20)
    ]
    rows += [
        Row("rans", 65536, 660, 1000, {}, {n: 1.9 for n in threads}, "decode without checksum verification",
            "rans, no checksums"),
        Row("lz4hc-12", 65536, 790, 1000, {n: 0.01 for n in threads}, {n: 1.5 for n in threads}),
        Row("zstd-3 on raw BF16 bytes", None, 780, 1000, {1: 0.8}, {1: 0.3}, label="zstd-3, raw"),
        Row("zipnn", None, 662, 1000, {n: 0.5 for n in threads}, {n: 0.9 for n in threads}, "byte mode, bfloat16"),
    ]  # fmt: skip
    return CodecReport("a/checkpoint", False, 24, 1 << 30, 2.545, list(threads), rows)


@pytest.mark.parametrize("threads", [(1,), (1, 2), (1, 128)])
def test_bench_codecs_table_fits_and_has_each_column_once(threads):
    from zipmoe.cli.bench import _codecs_table

    table, notes = _codecs_table(_codec_report(threads), 5)
    headers = [str(c.header) for c in table.columns]
    assert len(headers) == len(set(headers)) == 5 + 2 * len(threads)
    assert _width(table) <= 100 and all(len(n) <= 100 for n in notes)


def test_bench_tables_fit_100_columns():
    from zipmoe.bench.cache import CacheRow
    from zipmoe.bench.pack import PackBenchReport
    from zipmoe.bench.serving import ServingRow
    from zipmoe.bench.slices import SliceBenchReport, SliceBenchRow
    from zipmoe.cli.bench import _cache_table, _pack_table, _serving_tables, _slices_table

    pack = PackBenchReport("org/model", 10**11, 10**9, 30.0, 80.0, 95.0, 6 * 10**10, 3 * 10**9, 10**9, 16)
    cache = {"served_from": {"decoded": 12345, "compressed": 0, "sm": 678, "storage": 23456}, "bytes_read": 10**11,
             "storage_busy": 0.987, "peak_bytes": 12 * 10**9}  # fmt: skip
    result = {"ttft_seconds": 12.345, "tpot_seconds": 1.2345, "cache": cache, "budget_bytes": 14 * 10**9,
              "peak_rss": 3 * 10**10, "rss_after_load": 10**10, "tokens_match_full": True}  # fmt: skip
    serving = [ServingRow(m, b, s, result, c) for m, b, s, c in [
        ("full", None, None, ""), ("uncompressed candidate", 100, 1.25, "compressed=1 lfu"),
        ("uncompressed", 100, "direct", "decoded=1 lru"), ("zipmoe-planned, fifo", 12.5, 3.5, ""),
        ("zipmoe, all hits", None, None, "decoded=1"),
    ]]  # fmt: skip
    rates = {"decoded": 0.1234, "compressed": 0.0, "sm": 0.5, "storage": 0.3766}
    cache_rows = [CacheRow(m, 50, {"served_rate": rates, "bytes_read": 10**11, "tpot_seconds": 1.2345,
                                   "predicted_tpot_seconds": 1.1}) for m in ("fifo", "planned+affinity")]  # fmt: skip
    phases = {"decode": {"bytes_read": 10**11, "miss_rate": 0.1234}}
    slice_rows = [SliceBenchRow(m, "q8", "pcw", 12345.678, [1.2345], [2.0], [], {"phases": phases, "decode_misses":
                  [100] * 16}) for m in ("q8", "dbsc+random")]  # fmt: skip
    settings = {"budget": "30%", "storage_gbps": 1.25, "prompt_tokens": 256, "new_tokens": 32, "device": "cpu"}
    tables = [_pack_table(pack, 2), *_serving_tables(serving, "zipmoe run"), _cache_table(cache_rows, "cache"),
              _slices_table(SliceBenchReport(slice_rows, settings), "sliced.zmoe", 16)]  # fmt: skip
    for table in tables:
        assert _width(table) <= 100, [str(c.header) for c in table.columns]
