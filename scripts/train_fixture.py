"""Train the tiny Qwen2-MoE checkpoint that the AMAT perplexity tests and `zipmoe bench slices` use.

Random weights make perplexity meaningless, so the quality tests need a model that has learned something. This
script trains one from nothing, offline: the text is the Python standard library's source code (present on every
machine), the tokenizer a byte-level BPE trained on the same text, the model transformers' `Qwen2MoeForCausalLM`
(16 routed experts, 4 per token, one shared expert), about 14 M parameters, saved in BF16 with `save_pretrained`.

    python scripts/train_fixture.py --out tests/fixtures/qwen2-moe-stdlib            # CPU: about 40 minutes
    python scripts/train_fixture.py --out DIR --device cuda --steps 3000               # a GPU: a few minutes

Every file of the standard library is in the corpus except every 16th (sorted by path), which is held out: the
first 48 kB of held-out text are written next to the model as ``heldout.txt`` for evaluation. The same Python version
and the same arguments give the same corpus, tokenizer and initial weights; `train.json` records the run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

HELDOUT_EVERY = 16
HELDOUT_BYTES = 48_000
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS.isdisjoint(path.relative_to(root).parts):
            files.append(path)
    return files


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token=None, pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return fast


def build_model(vocab_size: int, eos: int, args: argparse.Namespace):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.moe_intermediate,
        shared_expert_intermediate_size=2 * args.hidden,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=False,
        max_position_embeddings=args.context * 4,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(args.seed)
    return Qwen2MoeForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--moe-intermediate", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    files = stdlib_files(args.corpus)
    heldout = files[::HELDOUT_EVERY]
    train_files = [f for f in files if f not in set(heldout)]
    train_texts = read_texts(train_files)
    heldout_text = "\n".join(read_texts(heldout))[:HELDOUT_BYTES]
    (args.out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    tokenizer = train_tokenizer(train_texts, args.vocab, args.out)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in train_texts:
        ids += tokenizer(text)["input_ids"] + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"corpus: {len(train_files)} files, {sum(map(len, train_texts)) / 1e6:.1f} MB, {data.numel()} tokens")

    device = torch.device(args.device)
    model = build_model(len(tokenizer), eos, args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f} M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    rng = random.Random(args.seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    model.train()
    log = []
    for step in range(args.steps):
        starts = [rng.randrange(0, data.numel() - args.context - 1) for _ in range(args.batch)]
        batch = torch.stack([data[s : s + args.context] for s in starts]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        with autocast:
            out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            lm_loss = float(out.loss - model.config.router_aux_loss_coef * out.aux_loss)
            log.append({"step": step, "loss": round(lm_loss, 4), "seconds": round(time.time() - started, 1)})
            print(f"step {step:5d}  loss {lm_loss:.3f}  {time.time() - started:.0f} s", flush=True)

    model.eval()
    model.to(torch.bfloat16).save_pretrained(args.out)
    (args.out / "train.json").write_text(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "corpus_files": len(train_files),
                "corpus_tokens": data.numel(),
                "heldout_files": [str(f.relative_to(args.corpus)) for f in heldout],
                "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
                "parameters": n_params,
                "seconds": round(time.time() - started, 1),
                "log": log,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"saved {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
