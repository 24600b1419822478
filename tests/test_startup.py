"""Start-up and layers: --help and bad input load neither torch nor numba, the core works without torch, the commands
that need torch say how to install it, and the kernel compilation notice appears only when numba will compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from zipmoe import _kernels
from zipmoe.cli import _output
from zipmoe.errors import FormatError, ZipmoeError
from zipmoe.extras import require

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError, as if absent


def python(code: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess[str]:
    """``code`` run by a fresh interpreter of this environment (HF_HUB_OFFLINE and the rest of os.environ kept)."""
    env = {k: v for k, v in (env or os.environ).items() if k != "ZIPMOE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def zipmoe_without_torch(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    """``zipmoe ARGS`` in a process where torch cannot be imported."""
    return python(BLOCK_TORCH + "from zipmoe.cli.app import main\nmain(sys.argv[1:])", *args, cwd=cwd)


# Walks the command tree and runs --help of every command and group, then usage errors and missing inputs, all in
# one process (a fresh process per command would take minutes here); prints what it ran and the heavy modules loaded.
_NO_HEAVY_IMPORTS = """
import json, sys
import typer
from zipmoe.cli.app import app, main

def paths(command, prefix=()):
    yield prefix
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        for name, sub in command.commands.items():
            if not sub.hidden:
                yield from paths(sub, (*prefix, name))

def status(args):
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code
    return 0

ran = {}
for path in paths(typer.main.get_command(app)):
    ran[" ".join([*path, "--help"])] = status([*path, "--help"])
for args in json.loads(sys.argv[1]):
    ran[" ".join(args)] = status(args)
print(json.dumps({"ran": ran, "heavy": [m for m in ("torch", "numba", "transformers", "matplotlib")
                                        if m in sys.modules]}))
"""
# (arguments, exit status): usage errors are click's (2), missing inputs zipmoe's one line (1).
USAGE_ERRORS = [
    (["pack"], 2),
    (["pack", "x", "--no-such-flag"], 2),
    (["run", "model.zmoe", "hi", "--max-new-tokens", "zero"], 2),
    (["bench", "codecs", "--repeat", "0"], 2),
    (["eval", "ppl"], 2),
    (["pack", "./missing"], 1),
    (["bench", "codecs", "./missing"], 1),
    (["verify", "missing.zmoe"], 1),
    (["verify", "missing.zmoe", "--source", "./missing"], 1),
    (["inspect", "missing.zmoe"], 1),
    (["unpack", "missing.zmoe", "-o", "out"], 1),
    (["run", "missing.zmoe", "hi"], 1),
    (["plan", "missing.zmoe", "-m", "50%", "-o", "plan.json"], 1),
]


def test_help_and_usage_errors_load_neither_torch_nor_numba(tmp_path):
    done = python(_NO_HEAVY_IMPORTS, json.dumps([args for args, _ in USAGE_ERRORS]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    ran = doc["ran"]
    helps = [name for name in ran if name.endswith("--help")]
    for command in ("pack", "verify", "inspect", "unpack", "run", "plan", "demo-checkpoint", "bench codecs",
                    "bench run", "bench startup", "eval ppl"):  # fmt: skip
        assert f"{command} --help" in helps
    assert all(ran[name] == 0 for name in helps), ran
    for args, code in USAGE_ERRORS:
        assert ran[" ".join(args)] == code, (args, ran[" ".join(args)], done.stderr)
    assert doc["heavy"] == [], f"loaded {doc['heavy']} for --help or a usage error"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("code", ["import zipmoe", "import zipmoe.cli.app", "import zipmoe.extras, zipmoe.defaults"])
def test_imports_are_light(code):
    done = python(code + "\nimport sys\nprint([m for m in ('torch', 'numba', 'rich.progress') if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_sources_fail_before_kernels_load(tmp_path):
    """The one line a missing input gives, from a process that never imported numba (checked after the error)."""
    code = (
        "import sys\nfrom zipmoe.cli.app import main\n"
        "try:\n    main(sys.argv[1:])\nfinally:\n    print('numba' in sys.modules, 'torch' in sys.modules)"
    )
    for args, message in (
        (["pack", "./missing"], "./missing: no such directory, and not a Hub repo id"),
        (["verify", "gone.zmoe"], "gone.zmoe: no such file"),
        (["unpack", ".", "-o", "out"], ".: is a directory, not a container file"),
    ):
        done = python(code, *args, cwd=tmp_path)
        assert done.stdout.split() == ["False", "False"], (args, done.stdout)
        assert_one_line_error(done.returncode, done.stderr, message)


def test_cheap_container_check_says_what_the_reader_says(tmp_path):
    from zipmoe.cli._checks import check_container
    from zipmoe.formats.reader import Container

    for path in (tmp_path / "missing.zmoe", tmp_path):
        with pytest.raises(FormatError) as cheap:
            check_container(path)
        with pytest.raises(FormatError) as reader:
            Container(path)
        assert str(cheap.value) == str(reader.value)


def test_core_works_without_torch(tmp_path):
    """demo-checkpoint, pack, verify, inspect and unpack end to end in processes that cannot import torch."""
    model, container, unpacked = tmp_path / "model", tmp_path / "model.zmoe", tmp_path / "unpacked"
    out = {}
    for args in (
        ["demo-checkpoint", str(model), "--preset", "tiny"],
        ["pack", str(model), "-o", str(container), "--quiet"],
        ["verify", str(container), "--source", str(model), "--quiet"],
        ["unpack", str(container), "-o", str(unpacked), "--quiet"],
        ["inspect", str(container), "--json"],
    ):
        done = zipmoe_without_torch(*args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        out[args[0]] = done.stdout
    assert out["verify"].startswith("OK ") and "bit for bit against model" in out["verify"]
    assert json.loads(out["inspect"])["model"]["family"] == "mixtral"
    originals = sorted(p.name for p in model.iterdir())
    assert sorted(p.name for p in unpacked.iterdir()) == originals
    for name in originals:
        assert (unpacked / name).read_bytes() == (model / name).read_bytes(), name


def test_pack_from_the_hub_cache_without_torch(tmp_path):
    """``pack org/name`` through huggingface_hub (offline, a locally built cache) with torch absent."""
    from test_hub import COMMIT, populate_cache
    from zipmoe.demo import build_demo_checkpoint

    hf_home = tmp_path / "hf-home"
    populate_cache(hf_home, "tiny-org/demo", build_demo_checkpoint(tmp_path / "model", "tiny"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    code = BLOCK_TORCH + "from zipmoe.cli.app import main\nmain(sys.argv[1:])"
    out = tmp_path / "hub.zmoe"
    done = python(code, "pack", "tiny-org/demo", "-o", str(out), "--json", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == f"tiny-org/demo@{COMMIT}"
    done = python(code, "verify", str(out), "--source", "tiny-org/demo", "--quiet", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    absent = python(code, "pack", "tiny-org/absent", "-o", str(tmp_path / "absent.zmoe"), env=env)
    assert_one_line_error(absent.returncode, absent.stderr, "tiny-org/absent", "not in the local cache")


def test_import_zipmoe_without_torch():
    done = python(BLOCK_TORCH + "import zipmoe\nprint(zipmoe.__version__, 'numba' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "False"


@pytest.mark.parametrize(
    "args, command, extra",
    [
        (["run", "missing.zmoe", "hi"], "zipmoe run", "run"),
        (["plan", "missing.zmoe", "-m", "50%", "-o", "plan.json"], "zipmoe plan", "run"),
        (["eval", "ppl", "missing.zmoe", "--text", "missing.txt"], "zipmoe eval ppl", "run"),
        (["bench", "run"], "zipmoe bench run", "bench"),
        (["bench", "cache"], "zipmoe bench cache", "run"),
        (["bench", "cache", "--plot", "cache.png"], "zipmoe bench cache", "bench"),
    ],
)
def test_commands_that_need_torch_say_how_to_install_it(tmp_path, args, command, extra):
    done = zipmoe_without_torch(*args, cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stderr)
    assert done.stderr.strip() == f"Error: {command} needs PyTorch: pip install 'zipmoe[{extra}]'"


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ZipmoeError, match=r"^zipmoe run needs PyTorch: pip install 'zipmoe\[run\]'$"):
        require("zipmoe run", "torch", "json")
    with pytest.raises(ZipmoeError, match=r"^--plot needs PyTorch: pip install 'zipmoe\[bench\]'$"):
        require("--plot", "torch", "matplotlib")  # the first missing one named, the extra that brings both
    with pytest.raises(ZipmoeError, match=r"^--plot needs matplotlib: pip install 'zipmoe\[bench\]'$"):
        require("--plot", "json", "matplotlib")
    with pytest.raises(ZipmoeError, match=r"^zipmoe chat needs PyTorch: pip install 'zipmoe\[run\]'$"):
        require("zipmoe chat", "torch", "jinja2")
    require("zipmoe pack", "numpy", "json")  # present: no error


def test_demo_weights_round_like_torch():
    """The torch-free demo checkpoint rounds float32 to BF16 exactly as ``tensor.to(torch.bfloat16)`` does."""
    torch = pytest.importorskip("torch")
    from zipmoe.demo import _to_bf16

    rng = np.random.default_rng(1)
    values = np.concatenate(
        [
            rng.standard_normal(100_000, dtype=np.float32) * np.float32(0.02),
            np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40], np.float32),  # ties, extremes
            (np.arange(1 << 16, dtype=np.uint32) << 16 | 0x8000).view(np.float32)[:0x7F00],  # exact ties
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(_to_bf16(values), expected)


def test_demo_checkpoint_is_what_safetensors_writes(tmp_path):
    """The torch-free writer gives safetensors' own bytes; the weights are N(0, 0.02), norms one, seeded."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from zipmoe.demo import build_demo_checkpoint

    out = build_demo_checkpoint(tmp_path / "demo", "tiny", seed=3)
    tensors = load_file(out / "model.safetensors")
    save_file(tensors, tmp_path / "by-safetensors.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "by-safetensors.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    norm = tensors["model.norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    weight = tensors["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(weight.std().item() - 0.02) < 0.002 and weight.abs().max().item() > 0  # N(0, 0.02), not zeros
    again = load_file(build_demo_checkpoint(tmp_path / "again", "tiny", seed=3) / "model.safetensors")
    assert all(torch.equal(again[k].view(torch.int16), tensors[k].view(torch.int16)) for k in tensors)


def test_compile_notice_only_when_numba_compiles(monkeypatch, capsys):
    """One line on a captured (non-terminal) stderr when numba compiles, however many functions; else nothing."""
    numba = pytest.importorskip("numba")
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        pytest.skip("nothing compiles without the JIT")

    def compile_two() -> None:
        numba.njit(lambda x: x + 1)(1)  # new functions: always a compilation
        numba.njit(lambda x: x * 2)(1)

    monkeypatch.setattr(_kernels, "warm_up", compile_two)
    _output.prepare_codecs(quiet=False)
    assert capsys.readouterr().err.splitlines() == [_kernels.COMPILING]
    _output.prepare_codecs(quiet=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(_kernels, "warm_up", lambda: None)
    _output.prepare_codecs(quiet=False)
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiles without the JIT")
def test_a_kernel_loaded_from_numba_cache_is_not_announced(tmp_path):
    """numba's compile event, which the notice hangs on, fires on a cache miss only: the second process is silent."""
    (tmp_path / "kern.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n")
    code = (
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport kern\nfrom zipmoe import _kernels\n"
        "_kernels.warm_up = lambda: kern.f(1)\nprint(_kernels.prepare(lambda: print('announced')))"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    first, second = (python(code, str(tmp_path), env=env) for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["announced", "True"]
    assert second.stdout.split() == ["False"]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiles without the JIT")
def test_zipmoe_kernels_compile_at_most_once():
    """After one warm-up (``make install`` runs it) no process compiles zipmoe's kernels again."""
    code = "from zipmoe import _kernels\nprint(_kernels.prepare())"
    python(code)
    again = python(code)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no kernels are compiled without the JIT")
def test_compile_notice_is_shown_once(checkpoints, tmp_path):
    """With a cold numba cache the first command says it compiles (on a pipe), the second does not."""
    container = checkpoints.packed(checkpoints.demo("tiny"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    code = "import sys\nfrom zipmoe.cli.app import main\nmain(sys.argv[1:])"
    first = python(code, "verify", str(container), env=env)
    second = python(code, "verify", str(container), env=env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stderr.splitlines() == [_kernels.COMPILING]
    assert second.stderr == ""


def test_bench_startup_json(capsys):
    code, out, err = run_cli(capsys, "bench", "startup", "--repeat", "1", "--json", "--quiet")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["case"] for r in rows][:3] == ["python -c pass", "import zipmoe", "zipmoe --help"]
    assert rows[0]["vs_python"] == 1.0 and all(r["median_seconds"] > 0 for r in rows)
    assert all(r["heavy_modules_loaded"] == [] for r in rows), rows
