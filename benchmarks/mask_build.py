"""Time to build a sliding-window BlockMask from a token predicate (issue 20).

    python benchmarks/mask_build.py --n 131072 --token-n 16384 --out benchmarks/results/mask_build.md

Three ways to the same mask (causal sliding window of `--window` keys back, block 128x128):
  from_mask_fn               the predicate; blocks proved empty/full by interval arithmetic,
                             tokens evaluated only in the rest
  from_mask_fn(analyze=False) every token of every block evaluated (the path a predicate
                             outside the interval algebra takes), timed at --token-n
  from_block_fn              a rule over block indices (empty / partial / full) plus the
                             token predicate for partial blocks, keyed by q_block - kv_block
Every timed build is checked equal (all block lists and bitmasks) to the from_mask_fn one at
the same N.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time

import torch

from fastattn import sparse
from fastattn.sparse.block_mask import _LIST_NAMES


def predicate(W):
    return lambda b, h, i, j: (j <= i) & (i - j <= W)


def block_rule(W, BM, BN):
    def fn(b, h, qb, kb):
        dmin = qb * BM - (kb * BN + BN - 1)  # smallest i - j in the block
        dmax = qb * BM + BM - 1 - kb * BN    # largest
        full = (dmin >= 0) & (dmax <= W)
        empty = (dmax < 0) | (dmin > W)
        codes = torch.where(full, sparse.FULL_BLOCK,
                            torch.where(empty, sparse.EMPTY_BLOCK, sparse.PARTIAL_BLOCK))
        return codes, qb - kb
    return fn


def same(a, b):
    return (all(torch.equal(getattr(a, n), getattr(b, n)) for n in _LIST_NAMES)
            and torch.equal(a.partial_masks, b.partial_masks))


def timed(f, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_model():
    """lscpu's model name, family, model and core count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    f = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    return (f"{f.get('Model name', '?')} (family {f.get('CPU family', '?')}, model "
            f"{f.get('Model', '?')}), {f.get('CPU(s)', '?')} CPUs")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--token-n", type=int, nargs="*", default=[16384],
                    help="lengths at which the token-only path is timed (N^2 work)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    BM = BN = 128
    fn = predicate(a.window)
    rows = []
    for N in sorted(set(a.n) | set(a.token_n)):
        t_mask, ref = timed(lambda: sparse.from_mask_fn(fn, N, N), a.reps)
        t_block, blk = timed(lambda: sparse.from_block_fn(block_rule(a.window, BM, BN), N, N,
                                                          mask_fn=fn), a.reps)
        assert same(ref, blk), f"N={N}: from_block_fn differs from from_mask_fn"
        t_tok = None
        if N in a.token_n:
            t_tok, tok = timed(lambda: sparse.from_mask_fn(fn, N, N, analyze=False), 1)
            assert same(ref, tok), f"N={N}: the token-only path differs"
        rows.append((N, t_mask, t_tok, t_block))
        print(f"N={N}: from_mask_fn {t_mask:.3f} s, token-only "
              f"{'-' if t_tok is None else f'{t_tok:.2f} s'}, from_block_fn {t_block:.3f} s",
              flush=True)
    lines = [
        "# Building a sliding-window block mask from a predicate",
        "",
        f"- command: `python benchmarks/mask_build.py --n {' '.join(map(str, a.n))} --token-n "
        f"{' '.join(map(str, a.token_n))} --window {a.window} --reps {a.reps}"
        f"{' --out ' + a.out if a.out else ''}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU (lscpu): {cpu_model()}; {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; a shared machine (other jobs were running: times vary)",
        f"- mask: causal sliding window, query i sees keys i-{a.window}..i, "
        f"`lambda b, h, i, j: (j <= i) & (i - j <= {a.window})`, block 128x128, Nq = Nk = N",
        "- times: best of the repetitions (token-only: one run), seconds; every build checked "
        "equal to from_mask_fn's (all lists and bitmasks)",
        "",
        "| N | from_mask_fn (interval-classified blocks) | from_mask_fn(analyze=False) "
        "(every token) | from_block_fn (block rule + key) |",
        "|---|---|---|---|",
    ]
    for N, tm, tt, tb in rows:
        lines.append(f"| {N} | {tm:.3f} | {'-' if tt is None else f'{tt:.2f}'} | {tb:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
