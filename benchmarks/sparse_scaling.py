"""Block-sparse cost on the cpu backend scales with the visited blocks, not with N^2.

For N in {4096, 16384, 65536} (B=1, H=8, D=64, float32): dense causal attention,
sliding window (left=512, causal) and BigBird (64-token blocks, 3 random, 1 global), all on
the cpu backend, timed as medians of interleaved repetitions. The ideal time of a pattern
is density x dense time, where density is the fraction of visible (query, key) pairs and
the dense time is the causal time scaled to the full square (t_causal x density / density_causal).

    python benchmarks/sparse_scaling.py --out benchmarks/results/sparse_scaling.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from cpu_suite import interleaved  # same directory
from tqdm import tqdm

import fastattn
from fastattn import sparse
from fastattn.bench.providers import ModeRunner, make_inputs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--bwd-max", type=int, default=16384, help="largest N timed with fwd+bwd")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    cases = [(N, m) for N in args.lengths for m in ("fwd", "fwd+bwd") if m == "fwd" or N <= args.bwd_max]
    for N, mode in tqdm(cases, desc="sparse scaling"):
        masks = {
            "dense causal": sparse.causal(N),
            "sliding window (512, causal)": sparse.sliding_window(N, N, 512, causal=True),
            "bigbird": sparse.bigbird(N, bigbird_block_size=64, num_random_blocks=3),
        }
        q, k, v, dout = make_inputs(1, 8, N, 64, torch.float32, "cpu", mode)
        runners = {}
        for name, bm in masks.items():
            if name == "dense causal":  # the analytic causal path (no block lists)
                fn = lambda a, b, c: fastattn.attention(a, b, c, causal=True, backend="cpu")
            else:
                fn = lambda a, b, c, bm=bm: fastattn.attention(a, b, c, block_mask=bm, backend="cpu")
            runners[name] = ModeRunner(fn, q, k, v, dout, mode)
        reps = args.reps if N < 65536 else max(1, args.reps - 1)
        t = interleaved(runners, reps)
        t_full = t["dense causal"] / masks["dense causal"].density  # full-square dense time
        for name, bm in masks.items():
            rows.append(dict(N=N, mode=mode, pattern=name, density=bm.density,
                             visited=bm.num_visited_blocks, t=t[name], ideal=bm.density * t_full))
    lines = ["# Block-sparse scaling on the cpu backend", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads",
             "- B=1, H=8, D=64, float32, block size 128x128; medians of interleaved repetitions; "
             "ideal = density x (dense causal time / causal density)", "",
             "| N | mode | pattern | density | visited blocks | time s | vs dense causal | ideal s | time / ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dc = next(x for x in rows if x["N"] == r["N"] and x["mode"] == r["mode"]
                  and x["pattern"] == "dense causal")
        lines.append(f"| {r['N']} | {r['mode']} | {r['pattern']} | {r['density']:.4f} | {r['visited']} | "
                     f"{r['t']:.3f} | {r['t'] / dc['t']:.3f}x | {r['ideal']:.3f} | **{r['t'] / r['ideal']:.2f}** |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
