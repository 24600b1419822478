"""The Python API (`zipmoe.open`, `zipmoe.load`, `zipmoe.to_transformers`) and every example of docs/API.md."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import zipmoe
from conftest import COMMON, bf16_bytes, run_cli, write_safetensors
from zipmoe.api.arrays import FrameworkError
from zipmoe.errors import ChecksumError, FormatError, ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.formats.safetensors_file import read_safetensors_header
from zipmoe.pack import pack
from zipmoe.quant.spec import SliceSpec

DOCS = Path(__file__).resolve().parents[1] / "docs" / "API.md"
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaNs and signed zeros included)."""
    flat = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def source_tensors(source: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, as safetensors loads it."""
    out = {}
    for f in sorted(source.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def data_order(source: Path, container: Path) -> list[str]:
    """Tensor names file by file in the container's file order, each file by data offset (from the source files)."""
    with Container(container) as c:
        files = [s.name for s in c.manifest.safetensors]
    return [t.name for name in files for t in read_safetensors_header(source / name).tensors]


@pytest.fixture(scope="module")
def dtypes_checkpoint(tmp_path_factory):
    """A hand-written checkpoint with every dtype torch and safetensors share, a scalar, an empty tensor, small
    tensors (kept in raw runs) and large ones (records of their own), in two files; and its container."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("dtypes")
    source = root / "src"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "olmoe", "num_experts": 2, "num_hidden_layers": 1}')
    small = {
        f"small.{dtype.lower()}": (dtype, [3, 5], rng.bytes(15 * size))
        for dtype, size in [("F16", 2), ("F32", 4), ("F64", 8), ("I8", 1), ("I16", 2), ("I32", 4), ("I64", 8),
                            ("U8", 1), ("U16", 2), ("U32", 4), ("U64", 8), ("C64", 8), ("F8_E4M3", 1),
                            ("F8_E5M2", 1)]
    }  # fmt: skip
    small["small.flags"] = ("BOOL", [7], bytes([0, 1, 1, 0, 1, 0, 0]))
    small["small.scalar"] = ("F32", [], rng.bytes(4))
    small["small.empty"] = ("BF16", [0, 4], b"")
    small["small.nan_inf"] = ("BF16", [4], np.array([0x7FC1, 0xFF80, 0x7F80, 0x8000], "<u2").tobytes())
    write_safetensors(source / "model-00001-of-00002.safetensors", small)
    large = {
        "model.layers.0.mlp.experts.0.up_proj.weight": ("BF16", [64, 64], bf16_bytes((64, 64), 1)),
        "model.layers.0.mlp.experts.1.up_proj.weight": ("BF16", [64, 64], bf16_bytes((64, 64), 2)),
        "model.layers.0.mlp.experts.1.up_proj.weight_scale_inv": ("F32", [1], rng.bytes(4)),
        "large.f32": ("F32", [128, 160], rng.bytes(128 * 160 * 4)),
        "large.bf16": ("BF16", [256, 160], bf16_bytes((256, 160), 3)),
        "large.i64": ("I64", [9000], rng.bytes(9000 * 8)),
    }
    write_safetensors(source / "model-00002-of-00002.safetensors", large)
    out = root / "dtypes.zmoe"
    pack(str(source), out)
    return source, out


@pytest.fixture(scope="module")
def sources(checkpoints, dtypes_checkpoint):
    """Checkpoint directories and their containers: BF16 per-expert (one and several shards), fused experts, shared
    experts, AMAT slices, every dtype."""
    demo = checkpoints.demo("tiny")
    cases = {
        "demo": (demo, checkpoints.packed(demo)),
        "demo-sliced": (demo, checkpoints.packed(demo, SliceSpec(8, 4, 32))),
        "dtypes": dtypes_checkpoint,
    }
    for family, kwargs in [("mixtral", {"max_shard_size": "100KB"}), ("qwen3_moe", {"fused": True}),
                           ("qwen2_moe", {})]:  # fmt: skip
        source = checkpoints.family(family, **kwargs)
        cases[source.name] = (source, checkpoints.packed(source))
    return cases


CASES = ["demo", "demo-sliced", "dtypes", "mixtral-sharded-100KB", "qwen3_moe-fused", "qwen2_moe"]


# -- zipmoe.open --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_tensor_is_bit_identical_to_safetensors(sources, case):
    source, packed = sources[case]
    expected = source_tensors(source)
    with zipmoe.open(packed) as checkpoint:
        assert checkpoint.names == tuple(data_order(source, packed))
        assert len(checkpoint) == len(expected) and set(checkpoint) == expected.keys()
        seen = []
        for name, tensor in checkpoint.tensors():
            assert same_bits(tensor, expected[name]), name
            assert same_bits(checkpoint.tensor(name), expected[name]), name
            info = checkpoint.info(name)
            assert (info.shape, info.nbytes) == (tuple(tensor.shape), tensor.numel() * tensor.element_size())
            seen.append(name)
        assert seen == list(checkpoint.names)
    assert same_bits(tensor, expected[name])  # tensors own their memory: valid after close


def info_of(checkpoint, name):
    info = checkpoint.info(name)
    return info.dtype, info.shape


def test_numpy_arrays_hold_the_source_bytes(sources):
    source, packed = sources["dtypes"]
    raw = {}
    for f in source.glob("*.safetensors"):
        data = f.read_bytes()
        raw.update({t.name: data[t.start : t.start + t.nbytes] for t in read_safetensors_header(f).tensors})
    with zipmoe.open(packed, framework="np") as checkpoint:
        arrays = dict(checkpoint.tensors())
        assert info_of(checkpoint, "small.scalar") == ("F32", ())
        expert = checkpoint.expert(0, 1)  # a member of no known role keeps its name
        assert sorted(expert) == ["up", "up_proj.weight_scale_inv"]
        assert (
            expert["up_proj.weight_scale_inv"].tobytes() == raw["model.layers.0.mlp.experts.1.up_proj.weight_scale_inv"]
        )
    assert arrays.keys() == raw.keys()
    for name, array in arrays.items():
        assert isinstance(array, np.ndarray) and array.tobytes() == raw[name], name
    assert arrays["large.bf16"].dtype == np.uint16 and arrays["large.bf16"].shape == (256, 160)
    assert arrays["small.f8_e4m3"].dtype == np.uint8 and arrays["small.f8_e4m3"].shape == (3, 5)
    assert arrays["small.f32"].dtype == np.float32 and arrays["small.flags"].dtype == np.bool_
    assert arrays["small.i64"].dtype == np.int64 and arrays["small.scalar"].shape == ()
    bf16 = torch.from_numpy(arrays["large.bf16"].view(np.int16)).view(torch.bfloat16)
    assert torch.equal(bf16, load_file(source / "model-00002-of-00002.safetensors")["large.bf16"])


def test_sub_byte_dtypes_come_back_as_packed_bytes(tmp_path):
    source = tmp_path / "f4"
    source.mkdir()
    write_safetensors(source / "model.safetensors", {"w.f4": ("F4", [4, 6], bytes(range(12)))})
    pack(str(source), tmp_path / "f4.zmoe")
    with zipmoe.open(tmp_path / "f4.zmoe", framework="np") as checkpoint:
        assert checkpoint.tensor("w.f4").tobytes() == bytes(range(12))
    with zipmoe.open(tmp_path / "f4.zmoe") as checkpoint:
        with pytest.raises(FrameworkError, match=r"tensor 'w.f4' is F4, which torch .* framework='np'"):
            checkpoint.tensor("w.f4")


def test_experts_by_role_in_per_expert_and_fused_layouts(checkpoints):
    demo = checkpoints.packed(checkpoints.demo("tiny"))
    with zipmoe.open(demo) as checkpoint:
        assert checkpoint.experts == tuple((layer, e) for layer in range(2) for e in range(4))
        expert = checkpoint.expert(1, 2)
        prefix = "model.layers.1.block_sparse_moe.experts.2"
        for role, member in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            assert same_bits(expert[role], checkpoint.tensor(f"{prefix}.{member}.weight")), role
        with pytest.raises(KeyError, match=r"no routed expert \(layer 2, expert 0\)"):
            checkpoint.expert(2, 0)
    # the same model saved per expert and fused: the same experts, by role
    per_expert = checkpoints.packed(checkpoints.family("qwen3_moe"))
    fused = checkpoints.packed(checkpoints.family("qwen3_moe", fused=True))
    with zipmoe.open(per_expert) as a, zipmoe.open(fused) as b:
        assert "model.layers.1.mlp.experts.gate_up_proj" in b and "model.layers.1.mlp.experts.gate_up_proj" not in a
        gate_up = b.tensor("model.layers.1.mlp.experts.gate_up_proj")
        for layer, e in a.experts:
            x, y = a.expert(layer, e), b.expert(layer, e)
            assert sorted(x) == sorted(y) == ["down", "gate", "up"]
            assert all(same_bits(x[role], y[role]) for role in x), (layer, e)
        assert same_bits(y["gate"], gate_up[3, :32]) and same_bits(y["up"], gate_up[3, 32:])


def test_config_digest_and_metadata(capsys, sources):
    source, packed = sources["qwen2_moe"]
    code, out, _ = run_cli(capsys, "inspect", str(packed), "--json")
    assert code == 0
    with zipmoe.open(packed) as checkpoint:
        assert checkpoint.manifest_sha256 == json.loads(out)["manifest_sha256"]
        assert checkpoint.config == json.loads((source / "config.json").read_text())
        checkpoint.config["model_type"] = "changed"  # a copy
        assert checkpoint.config["model_type"] == "qwen2_moe"
        assert checkpoint.metadata["model"]["family"] == "qwen2_moe" and checkpoint.metadata["format_version"] >= 1
        assert sorted(checkpoint.files) == sorted(p.name for p in source.iterdir() if p.suffix == ".json")
        assert checkpoint.read_file("config.json") == (source / "config.json").read_bytes()
        info = checkpoint.info("model.layers.0.mlp.experts.3.down_proj.weight")
        assert (info.dtype, info.layer, info.expert, info.file) == ("BF16", 0, 3, "model.safetensors")
        assert "qwen2_moe.zmoe" in repr(checkpoint)


def test_errors_name_what_is_wrong(sources, tmp_path):
    _, packed = sources["demo"]
    with pytest.raises(FormatError, match="nothing.zmoe: no such file"):
        zipmoe.open(tmp_path / "nothing.zmoe")
    with pytest.raises(FormatError, match="is a directory"):
        zipmoe.open(tmp_path)
    with pytest.raises(FrameworkError, match="unknown framework 'tf'"):
        zipmoe.open(packed, framework="tf")
    with zipmoe.open(packed) as checkpoint:
        with pytest.raises(KeyError) as caught:
            checkpoint.tensor("model.norm.wieght")
        assert isinstance(caught.value, ZipmoeError)
        assert str(caught.value) == f"{packed}: no tensor named 'model.norm.wieght' (did you mean 'model.norm.weight'?)"
        with pytest.raises(zipmoe.NotInContainerError, match="no tensor named 'x'$"):
            checkpoint.info("x")
    # a flipped bit in the middle of one tensor's stored bytes: that tensor fails, with its file offset; others read
    victim = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    with Container(packed) as c:
        blob = c.tensors[victim].parts[0]
    damaged = tmp_path / "damaged.zmoe"
    shutil.copy(packed, damaged)
    offset = blob.offset + blob.nbytes // 2
    with open(damaged, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    with zipmoe.open(damaged) as checkpoint:
        with pytest.raises(ChecksumError, match=rf"damaged.zmoe: .*{re.escape(victim)}.*offset"):
            checkpoint.tensor(victim)
        with pytest.raises(ChecksumError, match=rf"damaged.zmoe: .*{re.escape(victim)}.*offset"):
            checkpoint.expert(0, 1)
        assert checkpoint.tensor("model.norm.weight").shape == (128,)
    with pytest.raises(ZipmoeError, match="damaged.zmoe: the container is closed"):
        checkpoint.tensor("model.norm.weight")


# -- import zipmoe, torch absent ------------------------------------------------------------------------------------


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_import_is_light_and_names_load_on_first_use():
    done = run_python(
        """
        import sys, json
        import zipmoe
        heavy = ("torch", "numba", "numpy", "rich", "typer", "transformers")
        after_import = sorted(m for m in heavy if m in sys.modules)
        zipmoe.open  # the reader: numpy and numba, never torch
        after_open = sorted(m for m in heavy if m in sys.modules)
        print(json.dumps([after_import, after_open, sorted(zipmoe.__all__), "load" in dir(zipmoe)]))
        """
    )
    assert done.returncode == 0, done.stderr
    after_import, after_open, names, listed = json.loads(done.stdout)
    assert after_import == []
    assert "torch" not in after_open and "numba" in after_open
    assert {"open", "load", "to_transformers", "PackedCheckpoint", "Model", "Generation", "ZipmoeError"} <= set(names)
    assert listed
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zipmoe.nope  # noqa: B018


def test_open_works_without_torch_and_load_says_what_to_install(sources):
    source, packed = sources["demo"]
    done = run_python(
        f"""
        import sys, json
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np
        import zipmoe
        out = {{}}
        with zipmoe.open({str(packed)!r}) as checkpoint:
            norm = checkpoint.tensor("model.norm.weight")
            out["type"], out["dtype"], out["shape"] = type(norm).__name__, str(norm.dtype), list(norm.shape)
            out["hex"] = norm.tobytes().hex()
            out["expert"] = sorted((k, str(v.dtype)) for k, v in checkpoint.expert(0, 1).items())
        for call in (lambda: zipmoe.open({str(packed)!r}, framework="pt"), lambda: zipmoe.load({str(packed)!r}),
                     lambda: zipmoe.to_transformers({str(packed)!r})):
            try:
                call()
            except zipmoe.ZipmoeError as exc:
                out.setdefault("errors", []).append(str(exc))
        print(json.dumps(out))
        """
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["type"], out["dtype"], out["shape"]) == ("ndarray", "uint16", [128])
    expected = load_file(source / "model.safetensors")["model.norm.weight"]
    assert bytes.fromhex(out["hex"]) == expected.view(torch.int16).numpy().tobytes()
    assert out["expert"] == [["down", "uint16"], ["gate", "uint16"], ["up", "uint16"]]
    assert out["errors"] == [
        "framework='pt' needs PyTorch: pip install 'zipmoe[run]' (or use framework='np')",
        "zipmoe.load needs PyTorch: pip install 'zipmoe[run]'",
        "zipmoe.to_transformers needs PyTorch: pip install 'zipmoe[bench]'",
    ]


# -- zipmoe.load ----------------------------------------------------------------------------------------------------


def test_generate_gives_the_tokens_of_zipmoe_run(capsys, sources):
    _, packed = sources["demo"]
    code, out, _ = run_cli(capsys, "run", str(packed), "Hello", "-n", "6", "--device", "cpu", "--dtype", "float32",
                           "--json")  # fmt: skip
    assert code == 0
    expected = json.loads(out)
    with zipmoe.load(packed, device="cpu", dtype="float32", memory_budget="2MB") as model:
        result = model.generate("Hello", max_new_tokens=6)
        assert result.text == expected["text"] and str(result) == result.text
        assert len(result.tokens) == expected["new_tokens"] and result.prompt_tokens == expected["prompt_tokens"]
        assert result.finish_reason in ("stop", "length") and result.ttft_seconds > 0
        pieces = []
        again = model.generate("Hello", max_new_tokens=6, on_text=pieces.append)
        assert again.tokens == result.tokens and "".join(pieces) == result.text
        assert model.stats["requests"] > 0 and model.memory_budget == 2_000_000 and model.device == "cpu"
        assert model.config["model_type"] == "mixtral"


def test_generate_from_token_ids_matches_transformers(sources):
    import transformers

    source, packed = sources["qwen3_moe-fused"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)[0, len(PROMPT) :]
    with zipmoe.load(packed, device="cpu", dtype="float32") as model:
        result = model.generate(PROMPT, max_new_tokens=12, stop_at_eos=False)
    assert result.tokens == expected.tolist()
    assert result.text is None and result.finish_reason == "length" and result.prompt_tokens == len(PROMPT)


def test_load_errors(sources, tmp_path):
    _, packed = sources["demo"]
    with pytest.raises(TypeError, match=r"unknown option\(s\) budget \(the options are .*memory_budget"):
        zipmoe.load(packed, budget="1GB")
    with pytest.raises(ZipmoeError, match="below the minimum"):
        zipmoe.load(packed, device="cpu", memory_budget=1000)
    with pytest.raises(ZipmoeError, match="no such file"):
        zipmoe.load(tmp_path / "nothing.zmoe")
    with zipmoe.load(packed, device="cpu") as model:
        with pytest.raises(ZipmoeError, match="the prompt is empty"):
            model.generate("  ")
        with pytest.raises(ZipmoeError, match="--temperature must be"):
            model.generate("Hello", temperature=-1)


# -- zipmoe.to_transformers -----------------------------------------------------------------------------------------


def tied_checkpoint(root: Path) -> Path:
    """A tiny Qwen3-MoE with tied embeddings (save_pretrained leaves lm_head.weight out)."""
    import transformers

    out = root / "qwen3_moe-tied"
    if not out.exists():
        config = transformers.Qwen3MoeConfig(
            **{**COMMON, "tie_word_embeddings": True}, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            intermediate_size=64, head_dim=16,
        )  # fmt: skip
        torch.manual_seed(1)
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["mixtral-sharded-100KB", "qwen3_moe-fused", "qwen2_moe", "tied"])
def test_to_transformers_equals_from_pretrained_bit_for_bit(checkpoints, sources, case):
    import transformers

    if case == "tied":
        source = tied_checkpoint(checkpoints.root)
        packed = checkpoints.packed(source)
    else:
        source, packed = sources[case]
    before = sorted(p.name for p in packed.parent.iterdir())
    model = zipmoe.to_transformers(packed)
    assert sorted(p.name for p in packed.parent.iterdir()) == before  # no file written
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(same_bits(ours[k], theirs[k]) for k in theirs), [k for k in theirs if not same_bits(ours[k], theirs[k])]
    stored = source_tensors(source)
    for name, parameter in model.named_parameters():
        if name in stored:  # fused checkpoints and dense tensors keep their names: the packed bits, unconverted
            assert same_bits(parameter, stored[name]), name
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    if case == "tied":
        assert "lm_head.weight" not in stored
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_to_transformers_converts_when_asked(sources):
    import transformers

    source, packed = sources["qwen3_moe-fused"]
    model = zipmoe.to_transformers(packed, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert model.dtype == torch.float32 and not model.training
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_to_transformers_errors(tmp_path):
    source = tmp_path / "no-config"
    source.mkdir()
    write_safetensors(source / "model.safetensors", {"w": ("BF16", [2], bf16_bytes((2,)))})
    pack(str(source), tmp_path / "no-config.zmoe")
    with pytest.raises(FormatError, match="no-config.zmoe: the packed checkpoint had no config.json"):
        zipmoe.to_transformers(tmp_path / "no-config.zmoe")
    (source / "config.json").write_text('{"model_type": "not-a-model"}')
    pack(str(source), tmp_path / "unknown.zmoe")
    with pytest.raises(FormatError, match="model_type 'not-a-model', which transformers .* does not know"):
        zipmoe.to_transformers(tmp_path / "unknown.zmoe")
    (source / "config.json").write_text('{"model_type": "mixtral", "hidden_size": "big"}')
    pack(str(source), tmp_path / "bad.zmoe")
    with pytest.raises(FormatError, match=r"bad.zmoe: transformers cannot build a mixtral config .*'hidden_size'") as e:
        zipmoe.to_transformers(tmp_path / "bad.zmoe")
    assert "\n" not in str(e.value)


# -- docs/API.md ----------------------------------------------------------------------------------------------------


def doc_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), flags=re.S | re.M)


def test_the_docs_have_examples_of_every_function():
    text = "\n".join(doc_examples())
    assert len(doc_examples()) >= 6
    for call in ("zipmoe.open(", "zipmoe.load(", "zipmoe.to_transformers(", ".expert(", ".generate(", "framework="):
        assert call in text, call


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_docs_example_runs(checkpoints, tmp_path, monkeypatch, capsys, index):
    source = checkpoints.demo("tiny")
    shutil.copy(checkpoints.packed(source), tmp_path / "model.zmoe")
    shutil.copytree(source, tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    code = doc_examples()[index]
    exec(compile(code, f"docs/API.md example {index + 1}", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    for comment in re.findall(r"print\(exc\)  # (.+)$", code, flags=re.M):  # the errors the page shows, verbatim
        assert comment in out
