"""`fastattn generate`: sample from a checkpoint written by `fastattn train`.

    fastattn generate --ckpt runs/gpt/ckpt.pt --prompt "def " --max-new-tokens 200 \\
                      --temperature 0.8 --top-k 40 --top-p 0.95
    fastattn generate --ckpt runs/gpt/ckpt.pt --greedy              # from the start token
    fastattn generate --ckpt runs/s2s/ckpt.pt --num-samples 4       # seq2seq: random sources

Text models (byte vocabulary) take a prompt string, or start from the BOS token when none
is given. Seq2seq checkpoints draw sources from their task and decode from the start token,
printing source, output and target. Generation runs one token at a time through the KV
cache (split-KV decode kernel); --no-cache recomputes the whole sequence at every step.
"""

from __future__ import annotations

import argparse
import time

import torch

from .data import BOS, make_task
from .model import ModelConfig, Transformer


def load_model(path: str) -> tuple[Transformer, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = Transformer(ModelConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def decode_bytes(tokens) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def generate(ckpt: str, prompt: str = "", max_new_tokens: int = 200, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             greedy: bool = False, seed: int = 0, use_cache: bool = True, dtype: str = "float32",
             backend: str | None = None) -> list[str]:
    model, ck = load_model(ckpt)
    if backend:
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = backend
    g = torch.Generator().manual_seed(seed)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
              use_cache=use_cache, generator=g)
    texts = []
    t0 = time.time()
    with ac:
        if model.cfg.kind == "encdec":
            task = make_task(ck.get("task", "reverse"))
            T = ck["train_config"]["seq_len"]
            b = task.batch("val", num_samples, T, g)
            out = model.generate(b["idx"][:, :1], T + 1, src=b["src"], **kw)[:, 1:]
            for s, o, t in zip(b["src"].tolist(), out.tolist(), b["targets"].tolist(), strict=True):
                texts.append(f"source: {s}\noutput: {o}\ntarget: {t}\nexact match: {o == t}")
        elif model.cfg.kind == "gpt":
            ids = list(prompt.encode()) or [BOS]
            x = torch.tensor([ids] * num_samples)
            out = model.generate(x, max_new_tokens, **kw)
            texts = [decode_bytes(row) for row in out.tolist()]
        else:
            raise ValueError("bert checkpoints do not generate; use a gpt or encdec checkpoint")
    dt = time.time() - t0
    n_tok = num_samples * max_new_tokens if model.cfg.kind == "gpt" else 0
    if n_tok:
        print(f"[generate] {n_tok} tokens in {dt:.2f}s ({n_tok / dt:.1f} tok/s, "
              f"{'KV cache' if use_cache else 'no cache'})")
    return texts


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="sample from a fastattn.models checkpoint",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `fastattn train`")
    p.add_argument("--prompt", default="", help="text prompt (default: start from BOS)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the sequence every step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--backend", default=None, help="override the checkpoint's attention backend")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    texts = generate(args.ckpt, args.prompt, args.max_new_tokens, args.num_samples,
                     args.temperature, args.top_k, args.top_p, args.greedy, args.seed,
                     not args.no_cache, args.dtype, args.backend)
    for i, t in enumerate(texts):
        print(f"--- sample {i} ---\n{t}")
    return 0


def main(argv=None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="fastattn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subparser(sub)
    args = parser.parse_args(["generate", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
