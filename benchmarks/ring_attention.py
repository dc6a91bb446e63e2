"""Longest sequence that fits a per-process memory budget: one process (fastattn.attention)
vs ring attention over W gloo processes (fastattn.distributed.ring_attention), causal,
forward + backward, and the time of each.

    python benchmarks/ring_attention.py --budget-mb 96 --world 2 4 --step 256 \
        --out benchmarks/results/ring_attention.md

Memory of a run = per process, the peak resident memory (VmHWM, reset through
/proc/self/clear_refs just before) minus the resident memory before the inputs exist
(after imports, process-group setup and a small warm-up call). It therefore counts the
inputs, the output, dout, the gradients, the kernels' workspace and, for the ring, the
K/V and dK/dV buffers in flight. A length fits when every process stays within the budget.
Every run is a fresh process (or W fresh processes), with malloc returning 64 KiB+ blocks
to the OS (MALLOC_MMAP_THRESHOLD_) so resident memory follows live tensors.

Search: memory is affine in N, so --probes lengths (at least three) give the per-token slope
by least squares and predict the limit; then the predicted length is run for real, stepping
down by --step until it fits and up by --step until it does not.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
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
        dt = getattr(torch, a.dtype)
        q, k, v = (torch.randn(1, a.heads, n_local, a.dim, generator=g).to(dt).requires_grad_(True)
                   for _ in range(3))
        if world > 1:
            out = ring_attention(q, k, v, causal=True, layout="zigzag", backend="cpu",
                                 chunk_size=a.chunk_size)
        else:
            out = fastattn.attention(q, k, v, causal=True, backend="cpu")
        out.backward(torch.randn(out.shape, generator=g).to(dt))
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


def fit(points):
    """Least-squares (slope MiB per token of N, intercept MiB) of [(N, MiB)]."""
    m = len(points)
    mx = sum(n for n, _ in points) / m
    my = sum(p for _, p in points) / m
    sxx = sum((n - mx) ** 2 for n, _ in points)
    slope = sum((n - mx) * (p - my) for n, p in points) / sxx
    return slope, my - slope * mx


def longest(world, a, rows, fits_out):
    step = a.step
    pts = []
    for n in a.probes:
        p, _ = measure(n, world, a)
        rows.append((world, n, p, None, "probe"))
        pts.append((n, p))
    slope, icpt = fit(pts)
    fits_out[world] = (slope, icpt, [n for n, _ in pts])
    n = max(step, int((a.budget_mb - icpt) / max(slope, 1e-12)) // step * step)
    best, over = None, None
    while True:
        p, t = measure(n, world, a)
        fits = p <= a.budget_mb
        rows.append((world, n, p, t, "fits" if fits else "over budget"))
        if fits:
            best = (n, p, t)
            if over is not None and over <= n + step:
                return best
            n += step
        else:
            over = n if over is None else min(over, n)
            if best is not None or n <= step:
                return best
            n -= step


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-mb", type=float, default=192.0, help="per-process memory budget")
    ap.add_argument("--world", type=int, nargs="+", default=[2], help="ring sizes to try")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--step", type=int, default=256, help="length granularity")
    ap.add_argument("--probes", type=int, nargs="+", default=[1024, 2048, 3072],
                    help="whole-sequence lengths the per-token slope is fitted over (>= 3)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="ring_attention(chunk_size=...) (default: the function's)")
    ap.add_argument("--threads", type=int, default=2, help="total threads (split over the ring)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    worlds = [1, *a.world]
    if any(n % (2 * w) for w in a.world for n in [a.step, *a.probes]):
        ap.error("--step and --probes must be multiples of 2*world for every world (zigzag)")
    if len(set(a.probes)) < 3:
        ap.error("--probes needs at least three different lengths")
    rows = []
    results = {}
    fits = {}
    for world in worlds:
        a.threads_per_proc = max(1, a.threads // world)
        print(f"world={world} (threads/process {a.threads_per_proc}):", flush=True)
        results[world] = longest(world, a, rows, fits)
    load = os.getloadavg()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    lines = [
        "# Longest causal attention (fwd+bwd) within a per-process memory budget: "
        f"1 process vs ring attention over {' or '.join(map(str, a.world))} processes",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {cpu} (lscpu), {platform.machine()}, {os.cpu_count()} cores shared with "
        f"other jobs (this run under nice -n 19) "
        f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), "
        f"torch {torch.__version__}, backend cpu, {a.dtype}",
        f"- shape: B=1, H={a.heads}, D={a.dim}, causal; ring: zigzag shards, gloo, chunk_size "
        f"{a.chunk_size or 'default'}; {a.threads} threads in total, split over the processes "
        f"(at least 1 each)",
        f"- budget: {a.budget_mb:g} MiB per process: peak RSS during one fwd+bwd (VmHWM after a "
        "clear_refs reset) minus RSS before the inputs exist; counts q/k/v, out, dout, "
        "gradients, kernel workspace and ring buffers. Lengths step by "
        f"{a.step}; the probe rows per world ({', '.join(map(str, a.probes))}) give the "
        "per-token slope (least squares) that predicts the limit.",
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
    lines.append("")
    lines.append("| processes | fitted slope, KiB per token of N | KiB per token a process holds "
                 "(N / processes) | intercept MiB | fitted over N = |")
    lines.append("|---|---|---|---|---|")
    for world in worlds:
        slope, icpt, ns = fits[world]
        lines.append(f"| {world} | {slope * 1024:.2f} | {slope * 1024 * world:.2f} | "
                     f"{icpt:.1f} | {', '.join(map(str, ns))} |")
    lines.append("")
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
