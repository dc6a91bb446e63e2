"""Peak extra memory of attention on the CPU: shows the cpu backend's is O(N), not O(N^2).

Each case runs in a fresh child process: it allocates q, k, v (and the output gradient),
records its resident set size (RSS), resets the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs; ru_maxrss is not used because a child inherits its parent's peak
across fork/exec), runs the call once, and reports the peak RSS (VmHWM) minus that
baseline minus the bytes of the outputs it returns. That is the
memory the attention call needed beyond its inputs and outputs. The naive reference
backend is shown beside it where it fits, with the N^2 bytes its score matrix needs.

    python benchmarks/memory_cpu.py [--lengths 2048 4096 8192 16384] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, sys, torch, fastattn
N, H, D, backend, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def status(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ':'))
torch.manual_seed(0)
grad = mode == 'fwd+bwd'
q, k, v = (torch.randn(1, H, N, D, requires_grad=grad) for _ in range(3))
dout = torch.randn(1, H, N, D) if grad else None
base = status('VmRSS')
with open('/proc/self/clear_refs', 'w') as f:  # reset VmHWM to the current RSS
    f.write('5')
out = fastattn.attention(q, k, v, causal=True, backend=backend)
outputs = out.numel() * out.element_size()
if grad:
    out.backward(dout)
    outputs += sum(t.grad.numel() * t.grad.element_size() for t in (q, k, v))
peak = status('VmHWM')
print(json.dumps(dict(extra=peak - base - outputs, inputs=3 * q.numel() * 4, outputs=outputs,
                      base=base, peak=peak)))
"""


def measure(N, H, D, backend, mode):
    r = subprocess.run([sys.executable, "-c", CHILD, str(N), str(H), str(D), backend, mode],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return None, r.stderr.strip().splitlines()[-1] if r.stderr else "failed"
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--naive-max", type=int, default=8192,
                    help="largest N for the naive reference backend (its N^2 scores)")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()
    H, D = args.heads, args.head_dim
    rows = []
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        tqdm = lambda x, **k: x
    cases = [(N, b, m) for N in args.lengths for b in ("cpu", "reference")
             for m in ("fwd", "fwd+bwd") if b == "cpu" or N <= args.naive_max]
    for N, backend, mode in tqdm(cases, desc="memory cases"):
        res, err = measure(N, H, D, backend, mode)
        scores = H * N * N * 4
        rows.append(dict(N=N, backend=backend, mode=mode,
                         extra_mib=None if res is None else res["extra"] / 2**20,
                         inputs_mib=3 * H * N * D * 4 / 2**20, n2_scores_mib=scores / 2**20,
                         error=err))
    head = ("| N | backend | mode | extra peak MiB (beyond inputs+outputs) | inputs MiB | "
            "one fp32 N x N score matrix per head, all heads (MiB) | extra / N^2-scores |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        extra = "failed: " + r["error"] if r["extra_mib"] is None else f"{r['extra_mib']:.1f}"
        ratio = "" if r["extra_mib"] is None else f"{r['extra_mib'] / r['n2_scores_mib']:.4f}"
        lines.append(f"| {r['N']} | {r['backend']} | {r['mode']} | {extra} | {r['inputs_mib']:.1f} | "
                     f"{r['n2_scores_mib']:.0f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        import torch

        with open(args.out, "w") as f:
            f.write("# Peak extra memory of causal attention on the CPU (B=1, "
                    f"H={H}, D={D}, float32)\n\n")
            f.write(f"- command: `python {' '.join(sys.argv)}`\n")
            f.write(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n")
            f.write(f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
                    f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
            f.write("- method: each case in a fresh process; peak RSS (VmHWM, reset through "
                    "/proc/self/clear_refs after allocating inputs) minus RSS after allocating "
                    "inputs, minus the bytes of the returned outputs (and gradients).\n\n")
            f.write(table + "\n")


if __name__ == "__main__":
    main()
