"""Longest sequence that fits a per-process memory budget: one process (fastattn.attention)
vs ring attention over W gloo processes (fastattn.distributed.ring_attention), causal,
forward + backward, and the time of each.

    python benchmarks/ring_attention.py --budget-mb 192 --out benchmarks/results/ring_attention.md

Memory of a run = per process, the peak resident memory (VmHWM, reset through
/proc/self/clear_refs just before) minus the resident memory before the inputs exist
(after imports, process-group setup and a small warm-up call). It therefore counts the
inputs, the output, dout, the gradients, the kernels' workspace and, for the ring, the
K/V and dK/dV buffers in flight. A length fits when every process stays within the budget.
Every run is a fresh process (or W fresh processes), with malloc returning 64 KiB+ blocks
to the OS (MALLOC_MMAP_THRESHOLD_) so resident memory follows live tensors.

Search: memory is affine in N, so two small probes predict the limit; then the predicted
length is run for real, stepping down by --step until it fits, and the next length up is
run to show it does not.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _one(rank, world, N, a, init_file, result_q):
    import gc

    import fastattn
    from fastattn.distributed import ring_attention

    torch.set_num_threads(a.threads_per_proc)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)

    def run(n_local, seed):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, a.heads, n_local, a.dim, generator=g, requires_grad=True)
        k = torch.randn(1, a.heads, n_local, a.dim, generator=g, requires_grad=True)
        v = torch.randn(1, a.heads, n_local, a.dim, generator=g, requires_grad=True)
        if world > 1:
            out = ring_attention(q, k, v, causal=True, layout="zigzag", backend="cpu")
        else:
            out = fastattn.attention(q, k, v, causal=True, backend="cpu")
        out.backward(torch.randn(out.shape, generator=g))
        return out.shape

    run(64, 0)  # warm-up: kernels, threads, gloo buffers
    gc.collect()
    base = _rss()
    _reset_hwm()
    t0 = time.perf_counter()
    run(N // world, 1)
    dt = time.perf_counter() - t0
    peak = _hwm() - base
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    result_q.put((rank, peak, dt))


def measure(N, world, a):
    """(max peak MiB over the processes, max seconds) of one causal fwd+bwd at length N."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_one, args=(r, world, N, a, os.path.join(d, "init"), q))
                 for r in range(world)]
        for p in procs:
            p.start()
        res = [q.get(timeout=a.timeout) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"worker failed at N={N}, world={world}")
    peak = max(r[1] for r in res) / 2**20
    dt = max(r[2] for r in res)
    print(f"  world={world} N={N}: peak {peak:.1f} MiB/process, {dt:.2f} s", flush=True)
    return peak, dt


def longest(world, a, rows):
    step = a.step
    n1, n2 = 2 * step, 4 * step
    p1, _ = measure(n1, world, a)
    p2, _ = measure(n2, world, a)
    rows.append((world, n1, p1, None, "probe"))
    rows.append((world, n2, p2, None, "probe"))
    slope = max((p2 - p1) / (n2 - n1), 1e-9)
    n = max(step, int((a.budget_mb - p2) / slope + n2) // step * step)
    best = None
    while True:
        p, t = measure(n, world, a)
        fits = p <= a.budget_mb
        rows.append((world, n, p, t, "fits" if fits else "over budget"))
        if fits:
            best = (n, p, t)
            n += step
        elif best is not None or n <= step:
            return best
        else:
            n -= step


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mb", type=float, default=192.0, help="per-process memory budget")
    ap.add_argument("--world", type=int, nargs="+", default=[2], help="ring sizes to try")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--step", type=int, default=1024, help="length granularity")
    ap.add_argument("--threads", type=int, default=2, help="total threads (split over the ring)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    worlds = [1, *a.world]
    if any(a.step % (2 * w) for w in a.world):
        ap.error("--step must be a multiple of 2*world for every world (zigzag chunks)")
    rows = []
    results = {}
    for world in worlds:
        a.threads_per_proc = max(1, a.threads // world)
        print(f"world={world} (threads/process {a.threads_per_proc}):", flush=True)
        results[world] = longest(world, a, rows)
    load = os.getloadavg()
    lines = [
        "# Longest causal attention (fwd+bwd) within a per-process memory budget: "
        f"1 process vs ring attention over {' or '.join(map(str, a.world))} processes",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), "
        f"torch {torch.__version__}, backend cpu, float32",
        f"- shape: B=1, H={a.heads}, D={a.dim}, causal; ring: zigzag shards, gloo; "
        f"{a.threads} threads in total, split over the processes (at least 1 each)",
        f"- budget: {a.budget_mb:g} MiB per process: peak RSS during one fwd+bwd (VmHWM after a "
        "clear_refs reset) minus RSS before the inputs exist; counts q/k/v, out, dout, "
        "gradients, kernel workspace and ring buffers. Lengths step by "
        f"{a.step}; the first two rows per world are probes that predict the limit.",
        "- time: one fwd+bwd call (wall clock, the slowest process), on a loaded machine: "
        "indicative only.",
        "",
        "| processes | N (whole sequence) | peak MiB / process | time s | |",
        "|---|---|---|---|---|",
    ]
    for world, n, p, t, what in rows:
        lines.append(f"| {world} | {n} | {p:.1f} | {'' if t is None else f'{t:.2f}'} | {what} |")
    lines.append("")
    lines.append("## Result")
    lines.append("")
    for world in worlds:
        r = results[world]
        if r is None:
            lines.append(f"- {world} process(es): nothing fits in {a.budget_mb:g} MiB")
        else:
            lines.append(f"- {world} process(es): longest N = {r[0]} "
                         f"({r[1]:.1f} MiB/process, {r[2]:.2f} s fwd+bwd)")
    for w in a.world:
        if results[1] and results[w]:
            lines.append(f"- {w} processes: {results[w][0] / results[1][0]:.2f}x the longest "
                         f"single-process length")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
