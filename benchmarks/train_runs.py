"""Recorded end-to-end runs of fastattn.models (issue 8); each writes
benchmarks/results/models_<run>.md (command, date, machine, sizes, numbers) and its curves.

    python benchmarks/train_runs.py gpt          # GPT on stdlib bytes + a generated sample
    python benchmarks/train_runs.py mlm          # MLM+NSP pre-train, frozen fine-tune (+ control)
    python benchmarks/train_runs.py seq2seq      # encoder-decoder on reverse, exact match
    python benchmarks/train_runs.py throughput   # tokens/s + peak memory at 4096 / 8192
    python benchmarks/train_runs.py longrange    # global majority at 4096, dense vs sparse

Sizes are tiny on purpose: the machine has 2 CPU cores shared with other jobs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
RUNS = os.environ.get("FASTATTN_RUNS", "/tmp/fastattn_runs")


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}; "
            f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            f"(the cores are shared with other jobs)")


def header(title: str, argv) -> list[str]:
    return [f"# {title}", "",
            f"- command: `python benchmarks/{os.path.basename(__file__)} {' '.join(argv)}`",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- machine: {machine()}", ""]


def write(name: str, lines: list[str]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"models_{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def keep_curves(out_dir: str, name: str) -> str:
    dst = os.path.join(RESULTS, f"models_{name}_curves.png")
    shutil.copyfile(os.path.join(out_dir, "curves.png"), dst)
    return os.path.basename(dst)


def cfg_line(c) -> str:
    return (f"model {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads, patterns {c.patterns}, "
            f"backend {c.backend}; seq_len {c.seq_len}, batch {c.batch_size}x{c.grad_accum}, "
            f"{c.steps} steps, AdamW lr {c.lr} -> {c.min_lr} (warm-up {c.warmup}, cosine), "
            f"clip {c.grad_clip}, {c.dtype}, seed {c.seed}")


# ----------------------------------------------------------------------------- runs

def run_gpt(a, argv):
    from fastattn.models.data import stdlib_corpus, unigram_entropy
    from fastattn.models.train import TrainConfig, train

    c = TrainConfig(task="text", out=f"{RUNS}/gpt", seq_len=256, batch_size=16, steps=a.steps,
                    lr=2e-3, min_lr=2e-4, warmup=30, eval_every=50, eval_batches=8,
                    n_layer=4, n_embd=128, n_head=4, dropout=0.0, max_time=a.minutes * 60,
                    progress=a.progress)
    s = train(c)
    train_bytes, val_bytes = stdlib_corpus()
    h_uni = unigram_entropy(train_bytes)
    model = s["model"].eval()
    prompt = "def "
    x = torch.tensor([list(prompt.encode())])
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    out = model.generate(x, 240, temperature=0.8, top_k=40, top_p=0.95, generator=g)
    t_cache = time.time() - t0
    t0 = time.time()
    ref = model.generate(x, 240, temperature=0.8, top_k=40, top_p=0.95,
                         generator=torch.Generator().manual_seed(0), use_cache=False)
    t_nocache = time.time() - t0
    text = bytes(t for t in out[0].tolist() if t < 256).decode("utf-8", errors="replace")
    greedy = model.generate(x, 200, greedy=True)
    gtext = bytes(t for t in greedy[0].tolist() if t < 256).decode("utf-8", errors="replace")
    f = s["final"]
    lines = header("GPT pre-training on the Python standard library's sources (bytes)", argv) + [
        f"- data: {len(train_bytes) / 1e6:.1f} MB train / {len(val_bytes) / 1e6:.2f} MB val "
        "(held-out files) of stdlib .py sources, byte vocabulary (260 with specials)",
        f"- {cfg_line(c)}; {s['params'] / 1e6:.2f}M parameters",
        f"- wall time {s['wall_s'] / 60:.1f} min for {s['steps']} steps "
        f"({s['steps'] * c.batch_size * c.seq_len / 1e6:.2f}M tokens), "
        f"{s['tok_s']:.0f} tokens/s, peak RSS {s['peak_mb']:.0f} MB",
        "",
        "| | nats/byte | bits/byte |", "|---|---|---|",
        f"| unigram entropy of the train bytes (best context-free model) | {h_uni:.3f} | {h_uni / 0.6931:.3f} |",
        f"| final val loss (held-out files) | {f['val_loss']:.3f} | {f['val_loss'] / 0.6931:.3f} |",
        "",
        f"Val loss is {h_uni - f['val_loss']:.2f} nats/byte below the unigram entropy "
        f"({100 * (1 - f['val_loss'] / h_uni):.0f}% lower).", "",
        f"Training curves: ![curves]({keep_curves(c.out, 'gpt_text')})", "",
        f"## Sample (prompt {prompt!r}, temperature 0.8, top-k 40, top-p 0.95, KV cache)", "",
        "```", text, "```", "",
        "## Greedy (prompt 'def ')", "", "```", gtext, "```", "",
        f"KV-cache generation of 240 tokens: {t_cache:.2f} s; recomputing the sequence every "
        f"step: {t_nocache:.2f} s; same tokens: {bool(torch.equal(out, ref))}.",
    ]
    write("gpt_text", lines)


def run_mlm(a, argv):
    from fastattn.models.train import TrainConfig, train

    pre = TrainConfig(task="mlm", out=f"{RUNS}/bert", seq_len=128, batch_size=32, steps=a.steps,
                      lr=2e-3, min_lr=2e-4, warmup=30, eval_every=50, eval_batches=8,
                      n_layer=4, n_embd=128, n_head=4, max_time=a.minutes * 60, progress=a.progress)
    sp = train(pre)
    ft_kw = dict(task="classify", seq_len=128, batch_size=32, steps=a.ft_steps, lr=3e-3,
                 min_lr=3e-4, warmup=10, eval_every=50, eval_batches=16, progress=a.progress)
    ft = train(TrainConfig(out=f"{RUNS}/bert_cls", init_from=f"{pre.out}/ckpt.pt",
                           freeze_backbone=True, **ft_kw))
    # control: the same frozen fine-tune on a randomly initialised backbone
    os.makedirs(f"{RUNS}/bert_rand", exist_ok=True)
    from fastattn.models.data import MLMNSP
    from fastattn.models.model import Transformer
    from fastattn.models.train import model_config_for, save_checkpoint

    torch.manual_seed(pre.seed)
    rand = Transformer(model_config_for(pre, MLMNSP.__new__(MLMNSP)))
    save_checkpoint(f"{RUNS}/bert_rand/ckpt.pt", {"model_config": rand.cfg.to_dict(),
                                                  "model": rand.state_dict()})
    ctl = train(TrainConfig(out=f"{RUNS}/bert_rand_cls", init_from=f"{RUNS}/bert_rand/ckpt.pt",
                            freeze_backbone=True, **ft_kw))
    fp, ff, fc = sp["final"], ft["final"], ctl["final"]
    lines = header("BERT-style MLM + NSP pre-training, then frozen-backbone fine-tuning", argv) + [
        "- pre-training data: stdlib .py sources as [CLS] A [SEP] B [SEP] byte pairs (61 + 64 "
        "bytes); MLM masks 15% of tokens (80% [MASK] / 10% random / 10% kept), NSP: B is the "
        "true continuation half the time",
        f"- pre-training: {cfg_line(pre)}; {sp['params'] / 1e6:.2f}M parameters; "
        f"{sp['wall_s'] / 60:.1f} min, {sp['tok_s']:.0f} tokens/s, peak RSS {sp['peak_mb']:.0f} MB",
        "- fine-tuning task (labelled, offline): which stdlib package a 127-byte source snippet "
        "comes from, 4 balanced classes (asyncio, email, tkinter, multiprocessing); train and "
        "val are different files (every 4th file held out); chance = 25%",
        f"- fine-tuning: backbone frozen, only the linear classifier on the mean final hidden "
        f"state trains "
        f"({a.ft_steps} steps, batch 32, lr 3e-3); val accuracy on {ft_kw['eval_batches'] // 2 * 32} "
        "held-out snippets",
        "",
        "| stage | result |", "|---|---|",
        f"| MLM+NSP pre-train, val | loss {fp['val_loss']:.3f}, MLM accuracy "
        f"{100 * fp['mlm_acc']:.1f}%, NSP accuracy {100 * fp['nsp_acc']:.1f}% |",
        f"| frozen fine-tune from the pre-trained backbone | val accuracy **{100 * ff['acc']:.1f}%** "
        f"(val loss {ff['val_loss']:.3f}) |",
        f"| control: same frozen fine-tune on a random backbone | val accuracy {100 * fc['acc']:.1f}% "
        f"(val loss {fc['val_loss']:.3f}) |",
        "",
        f"Pre-training curves: ![curves]({keep_curves(pre.out, 'mlm_pretrain')}); "
        f"fine-tuning: ![curves]({keep_curves(f'{RUNS}/bert_cls', 'mlm_finetune')})",
    ]
    write("mlm_finetune", lines)


def run_seq2seq(a, argv):
    from fastattn.models.data import CopyReverse
    from fastattn.models.train import TrainConfig, train

    c = TrainConfig(task="reverse", out=f"{RUNS}/s2s", seq_len=a.seq_len, batch_size=64,
                    steps=a.steps, lr=2e-3, min_lr=1e-4, warmup=30, eval_every=100, eval_batches=4,
                    n_layer=2, n_dec_layer=2, n_embd=128, n_head=4, max_time=a.minutes * 60,
                    progress=a.progress)
    s = train(c)
    model = s["model"].eval()
    task = CopyReverse(reverse=True)
    t0 = time.time()
    m = task.evaluate(model, "val", 128, c.seq_len, 8, torch.Generator().manual_seed(123))
    dt = time.time() - t0
    b = task.batch("val", 2, c.seq_len, torch.Generator().manual_seed(7))
    outs = model.generate(b["idx"][:, :1], c.seq_len + 1, src=b["src"], greedy=True)[:, 1:]
    lines = header("Encoder-decoder on a synthetic seq2seq task (reverse)", argv) + [
        f"- task: source = {c.seq_len} random symbols from 16; target = the source reversed, then "
        "EOS. Training uses teacher forcing (decoder input = BOS + target)",
        f"- {cfg_line(c)} (encoder {c.n_layer} + decoder {c.n_dec_layer} layers); "
        f"{s['params'] / 1e6:.2f}M parameters; {s['wall_s'] / 60:.1f} min, {s['tok_s']:.0f} tokens/s",
        f"- evaluation: 1024 fresh sequences decoded greedily from the start token (BOS) one token "
        f"at a time with the KV cache and cross-attention to the encoder ({dt:.1f} s)",
        "",
        "| exact match (whole sequence + EOS) | token accuracy | final val loss |",
        "|---|---|---|",
        f"| **{100 * m['exact_match']:.1f}%** | {100 * m['token_acc']:.2f}% | {s['final']['val_loss']:.4f} |",
        "",
        "Examples (source -> decoded):", "", "```",
        *[f"{src} -> {o}" for src, o in zip(b["src"].tolist(), outs.tolist(), strict=True)], "```", "",
        f"Training curves: ![curves]({keep_curves(c.out, 'seq2seq')})",
    ]
    write("seq2seq", lines)


# -- throughput: one subprocess per configuration, so peak memory is per configuration

THROUGHPUT = [  # label, backend, patterns
    ("naive (reference)", "reference", "dense"),
    ("sdpa", "sdpa", "dense"),
    ("cpu fused", "cpu", "dense"),
    ("cpu sparse: window 256", "cpu", "window:256"),
    ("cpu sparse: BigBird", "cpu", "bigbird"),
]


def throughput_one(a):
    import resource

    from fastattn.models.model import ModelConfig, Transformer

    torch.manual_seed(0)
    T = a.seq_len
    cfg = ModelConfig(kind="gpt", block_size=T, n_layer=2, n_embd=128, n_head=2,
                      backend=a.backend, patterns=a.patterns, sparse_block=64, n_random_blocks=2)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (1, T))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up (allocations, mask construction)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": med, "tok_s": T / med, "peak_mb": peak, "base_mb": base}))


def run_throughput(a, argv):
    rows = []
    for T in a.lengths:
        for label, backend, pat in THROUGHPUT:
            cmd = [sys.executable, __file__, "_throughput_one", "--seq-len", str(T), "--backend",
                   backend, "--patterns", pat, "--steps", str(a.steps), "--threads", str(a.threads)]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                res = {"error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"}
            else:
                res = json.loads(r.stdout.strip().splitlines()[-1])
            res["load"] = os.getloadavg()[0]  # the machine is shared: record how busy it was
            print(T, label, res, f"({time.time() - t0:.0f}s)", flush=True)
            rows.append((T, label, res))
    lines = header("End-to-end training throughput and peak memory at long sequence lengths", argv) + [
        f"- model: GPT, 2 layers x 128 wide, 2 heads (head dim 64), causal, batch 1, float32; "
        f"one training step = forward + backward + AdamW; median of {a.steps} steps after one "
        "warm-up step, each configuration in a fresh process",
        "- peak memory = peak RSS of that process (ru_maxrss), which includes the interpreter, "
        "torch and the model; `base` is the RSS before the first step",
        "- window 256: each query sees the previous 256 tokens; BigBird: 64-token blocks, 1 global "
        "block at each end, 3-block sliding window, 2 random blocks per row, intersected with causal",
        "",
        "- the 2 cores are shared with other engineers' jobs: the last column is the 1-minute load "
        "average when the measurement ended (2.0 = both cores busy); timings are noisy at this load",
        "",
        "| seq len | attention | tokens/s | step time (s) | peak RSS (MB) | base RSS (MB) | speed-up vs naive | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    naive = {T: r.get("tok_s") for T, lbl, r in rows if lbl.startswith("naive")}
    for T, label, r in rows:
        if "error" in r:
            lines.append(f"| {T} | {label} | failed: {r['error'][:80]} | | | | | |")
            continue
        sp = f"{r['tok_s'] / naive[T]:.2f}x" if naive.get(T) else "-"
        lines.append(f"| {T} | {label} | {r['tok_s']:.0f} | {r['step_s']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['base_mb']:.0f} | {sp} | {r['load']:.1f} |")
    write("throughput", lines)


def run_longrange(a, argv):
    from fastattn.models.train import TrainConfig, train

    results = []
    for label, patterns in (("dense (cpu fused)", "dense"), ("sparse: BigBird (cpu)", "bigbird"),
                            ("sparse: window 256 (cpu)", "window:256")):
        name = patterns.split(":")[0]
        c = TrainConfig(task="majority", task_args=f"margin_lo={a.margin_lo},margin_hi={a.margin_hi}",
                        out=f"{RUNS}/lr_{name}", seq_len=a.seq_len,
                        batch_size=a.batch, steps=a.steps, lr=3e-3, min_lr=3e-4, warmup=10,
                        eval_every=max(1, a.steps // 2), eval_batches=a.eval_batches, n_layer=2,
                        n_embd=64, n_head=2, backend="cpu", patterns=patterns, sparse_block=64,
                        max_time=a.minutes * 60, progress=a.progress, seed=a.seed)
        s = train(c)
        results.append((label, c, s))
        keep_curves(c.out, f"longrange_{name}")
    n_val = a.eval_batches // 2 * a.batch
    lines = header(f"Long-range task at length {a.seq_len}: global majority, dense vs sparse", argv) + [
        f"- task (`majority`, fastattn.models.data.Majority): [CLS] + {a.seq_len - 1} shuffled "
        f"tokens of two symbols a/b; one of them occurs more often by a surplus of "
        f"{100 * a.margin_lo:g}-{100 * a.margin_hi:g}% of the length "
        f"({int(a.margin_lo * a.seq_len)}-{int(a.margin_hi * a.seq_len)} tokens); EVERY position must "
        "name the majority symbol (token-level labels through the encoder's token head). "
        "Chance = 50%. A token that sees only a window estimates the answer from a sample "
        "(2 layers of a 256-token window on each side reach ~1025 tokens); one that attends "
        "to all tokens can read the exact mean. BigBird's global blocks attend to everything "
        "and every token attends to them",
        f"- model: BERT-style encoder (bidirectional), 2 layers x 64 wide, 2 heads, rope, "
        f"backend cpu, float32; seq_len {a.seq_len}, batch {a.batch}, {a.steps} steps "
        f"(time cap {a.minutes} min per model), AdamW 3e-3 -> 3e-4; accuracy on {n_val} fresh "
        "val sequences",
        "- BigBird: 64-token blocks, 1 global block at each end, 3-block sliding window, "
        "2 random blocks per query block (fixed seed)",
        "",
        "| attention | val accuracy (all positions) | at [CLS] | val loss | steps | wall time (min) | tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _c, s in results:
        f = s["final"]
        lines.append(f"| {label} | **{100 * f['acc']:.1f}%** | {100 * f['cls_acc']:.1f}% | "
                     f"{f['val_loss']:.3f} | {s['steps']} | {s['wall_s'] / 60:.1f} | {s['tok_s']:.0f} |")
    lines += ["", "Curves: " + ", ".join(f"![{p}](models_longrange_{p}_curves.png)"
                                          for p in ("dense", "bigbird", "window"))]
    write("longrange", lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="run", required=True)
    for name, steps, minutes in (("gpt", 200, 14), ("mlm", 150, 6), ("seq2seq", 600, 8)):
        s = sub.add_parser(name)
        s.add_argument("--steps", type=int, default=steps)
        s.add_argument("--minutes", type=float, default=minutes)
        s.add_argument("--progress", action="store_true")
        if name == "mlm":
            s.add_argument("--ft-steps", type=int, default=150)
        if name == "seq2seq":
            s.add_argument("--seq-len", type=int, default=12)
    s = sub.add_parser("throughput")
    s.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    s.add_argument("--steps", type=int, default=3)
    s = sub.add_parser("_throughput_one")
    s.add_argument("--seq-len", type=int, required=True)
    s.add_argument("--backend", required=True)
    s.add_argument("--patterns", required=True)
    s.add_argument("--steps", type=int, default=3)
    s = sub.add_parser("longrange")
    s.add_argument("--seq-len", type=int, default=4096)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--margin-lo", type=float, default=0.04)
    s.add_argument("--margin-hi", type=float, default=0.12)
    s.add_argument("--minutes", type=float, default=8)
    s.add_argument("--progress", action="store_true")
    for s in sub.choices.values():
        s.add_argument("--threads", type=int, default=1,
                       help="torch threads (1: on a shared, oversubscribed machine OpenMP "
                            "barriers with 2 threads ran ~10x slower than 1 thread)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    argv = sys.argv[1:]
    {"gpt": run_gpt, "mlm": run_mlm, "seq2seq": run_seq2seq, "throughput": run_throughput,
     "_throughput_one": lambda a, _: throughput_one(a), "longrange": run_longrange}[a.run](a, argv)


if __name__ == "__main__":
    main()
