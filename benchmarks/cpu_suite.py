"""The cpu backend against its peers on this machine, in one run (issue: CPU kernels that
beat torch SDPA and FlexAttention on long sequences).

Sections, each timed as medians of interleaved repetitions (providers alternate within
every repetition, after one warm-up call each):
  peak      this host's float32 FMA peak (benchmarks/cpu_peak.py: cores x FMA units x lanes
            x 2 x the clock measured under load)
  dense     fastattn cpu vs torch SDPA (its CPU flash kernel): B=1, H=8, D=64 (--head-dims),
            N in {4096, 8192, 16384}, float32/bfloat16, causal or not, fwd and fwd+bwd
  sparse    N=16384, D=64, float32: sliding window (left=511, causal) and BigBird, fastattn
            cpu vs torch.compile(flex_attention) with the equivalent block mask (fwd; flex
            has no CPU backward), and against density x fastattn's own dense time
  naive     N=8192: fastattn cpu vs the naive reference backend (materialized scores)
  gemm      torch.mm on 4096^2 float32/bfloat16 in the same run; the fraction of it that the
            dense forward reaches (FLOPs 4*B*H*N^2*D, x0.5 causal)
  memory    N=65536 causal forward: peak bytes beyond inputs and outputs (child process)

    python benchmarks/cpu_suite.py --out benchmarks/results/cpu_suite_avx512   [--quick]
    FASTATTN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 \
        python benchmarks/cpu_suite.py --out benchmarks/results/cpu_suite_avx2

The second form times fastattn's AVX2 kernels on an AVX-512 host, with torch's own kernels
(SDPA, flex, torch.mm) held to AVX2 as well, so both sides run the ISA of an AVX2-only CPU.
Writes OUT.md (command, date, CPU model, kernel variant, tables) and OUT.png (ratio chart).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fastattn
from fastattn.bench.spec import attention_flops
from fastattn import sparse
from fastattn.bench.patterns import layout_mask_mod
from fastattn.bench.providers import ModeRunner, compiled_flex, make_inputs, naive_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_peak  # noqa: E402  (benchmarks/cpu_peak.py)


# Repetition policy (set from the command line in main): at least `reps` per case, and for
# short calls more, until every provider has run about MIN_SECONDS in total (at most
# MAX_REPS): a median of 3 on this shared host is one slow spell away from a wrong ratio.
MIN_SECONDS, MAX_REPS = 0.0, 15


def interleaved(runners: dict, reps: int) -> dict:
    """Median seconds per provider; providers alternate inside each repetition. The first
    repetition's slowest call sets how many follow (the repetition policy above)."""
    times = {n: [] for n in runners}
    for r in runners.values():
        r.prepare()
        r.call()  # warm-up (and torch.compile for flex)
    target = reps
    while len(next(iter(times.values()))) < target:
        for n, r in runners.items():
            t0 = time.perf_counter()
            r.call()
            times[n].append(time.perf_counter() - t0)
        if len(next(iter(times.values()))) == 1 and MIN_SECONDS > 0:
            slowest = max(t[0] for t in times.values())
            target = max(reps, min(MAX_REPS, math.ceil(MIN_SECONDS / max(slowest, 1e-9))))
    for r in runners.values():
        r.release()
    return {n: statistics.median(t) for n, t in times.items()}


def flops(N, D, causal, H=8, mode="fwd", density=None):
    return attention_flops(1, H, N, N, D, mode, causal=causal,
                           visible_pairs=None if density is None else density * N * N)


def dense_cases(args):
    return [(N, D, dtype, causal, mode) for N in args.lengths for D in args.head_dims
            for dtype in (getattr(torch, d) for d in args.dtypes) for causal in (False, True)
            for mode in ("fwd", "fwd+bwd")]


def dense_section(args, rows, pbar):
    for N, D, dtype, causal, mode in dense_cases(args):
        q, k, v, dout = make_inputs(1, 8, N, D, dtype, "cpu", mode)
        runners = {
            "fastattn": ModeRunner(lambda a, b, c: fastattn.attention(
                a, b, c, causal=causal, backend="cpu"), q, k, v, dout, mode),
            "sdpa": ModeRunner(lambda a, b, c: F.scaled_dot_product_attention(
                a, b, c, is_causal=causal), q, k, v, dout, mode),
        }
        t = interleaved(runners, args.reps)
        rows.append(dict(section="dense", N=N, D=D, dtype=str(dtype)[6:], causal=causal,
                         mode=mode, fastattn=t["fastattn"], peer="sdpa", peer_t=t["sdpa"],
                         gflops=flops(N, D, causal, mode=mode) / t["fastattn"] / 1e9,
                         sdpa_gflops=flops(N, D, causal, mode=mode) / t["sdpa"] / 1e9))
        pbar.update(1)


def sparse_section(args, rows, pbar):
    N, D = args.sparse_n, 64
    patterns = {
        "sliding_window(511, causal)": sparse.sliding_window(N, N, 511, causal=True),
        "bigbird(64, r=3, g=1)": sparse.bigbird(N, bigbird_block_size=64),
    }
    from torch.nn.attention.flex_attention import create_block_mask

    for name, bm in patterns.items():
        for mode in ("fwd", "fwd+bwd"):
            q, k, v, dout = make_inputs(1, 8, N, D, torch.float32, "cpu", mode)
            runners = {"fastattn": ModeRunner(lambda a, b, c: fastattn.attention(
                a, b, c, block_mask=bm, backend="cpu"), q, k, v, dout, mode),
                       # the ideal's base, timed in the same repetitions: a slow spell of the
                       # shared host then moves both sides of fastattn / ideal alike
                       "dense": ModeRunner(lambda a, b, c: fastattn.attention(a, b, c, backend="cpu"),
                                           q, k, v, dout, mode)}
            if mode == "fwd":  # FlexAttention has no CPU backward
                fbm = create_block_mask(layout_mask_mod(bm), None, None, N, N, device="cpu")
                flex = compiled_flex()
                runners["flex"] = ModeRunner(lambda a, b, c: flex(a, b, c, block_mask=fbm),
                                             q, k, v, dout, mode)
            t = interleaved(runners, args.sparse_reps)
            dense = t["dense"]
            rows.append(dict(section="sparse", N=N, D=D, dtype="float32", pattern=name, mode=mode,
                             density=bm.density, fastattn=t["fastattn"],
                             peer="flex" if "flex" in t else "", peer_t=t.get("flex"),
                             ideal=bm.density * dense))
            pbar.update(1)


def naive_section(args, rows, pbar):
    N, D = 8192, 64
    for mode in ("fwd", "fwd+bwd"):
        q, k, v, dout = make_inputs(1, 8, N, D, torch.float32, "cpu", mode)
        hidden = ~torch.ones(N, N, dtype=torch.bool).tril_()
        runners = {
            "fastattn": ModeRunner(lambda a, b, c: fastattn.attention(a, b, c, causal=True,
                                                                      backend="cpu"),
                                   q, k, v, dout, mode),
            "naive": ModeRunner(lambda a, b, c: naive_attention(a, b, c, hidden), q, k, v, dout, mode),
        }
        t = interleaved(runners, max(1, args.reps - 1))
        rows.append(dict(section="naive", N=N, D=D, dtype="float32", causal=True, mode=mode,
                         fastattn=t["fastattn"], peer="naive", peer_t=t["naive"]))
        pbar.update(1)


def gemm_rate(dtype, n=4096, reps=3):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)


def memory_section(args, rows, pbar):
    path = os.path.join(os.path.dirname(__file__), "memory_cpu.py")
    spec = importlib.util.spec_from_file_location("memory_cpu", path)
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    res, err = mem.measure(args.memory_n, 8, 64, "cpu", "fwd")
    rows.append(dict(section="memory", N=args.memory_n, D=64, dtype="float32", causal=True,
                     mode="fwd", extra_bytes=None if res is None else res["extra"],
                     n2_bytes=8 * args.memory_n**2 * 4, error=err))
    pbar.update(1)


def machine_lines(peak):
    info = fastattn.cpu_info()
    env = {k: os.environ[k] for k in ("FASTATTN_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                      "MKL_ENABLE_INSTRUCTIONS", "GLIBC_TUNABLES", "LD_PRELOAD")
           if k in os.environ}
    lines = [f"- CPU: {info['cpu']}; {platform.machine()}, {os.cpu_count()} logical cores, "
             f"{torch.get_num_threads()} threads",
             f"- fastattn kernel variant run: **{info['variant']}** ({info['features']})",
             f"- torch {torch.__version__}, its CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
             f"environment: {env or 'none set'}",
             f"- build: {info['build']}"]
    if peak:
        isa = "; ".join(f"{n}: {v['fma_units']:g} FMA units x {v['lanes']} lanes (measured "
                        f"{v['fma_per_cycle_measured']:.2f} FMA/cycle/core) = {v['peak_gflops']:.0f} GFLOP/s"
                        for n, v in peak["isa"].items())
        lines.append(f"- float32 FMA peak: {peak['cores']} cores x FMA units x lanes x 2 x "
                     f"{peak['clock_ghz']:.2f} GHz (clock measured under load, all cores): {isa} "
                     f"(benchmarks/cpu_peak.py)")
    return lines


def variant_peak(peak):
    """(GFLOP/s, ISA name) of the float32 FMA peak at the width of the kernel variant that runs:
    the avx2 variant is held to the 8-lane peak even on an AVX-512 host (its fraction of the
    16-lane peak would read as half)."""
    if not peak:
        return None, None
    variant = fastattn.cpu_info()["variant"]
    isa = "avx512" if variant.startswith("avx512") else variant
    if isa in peak.get("isa", {}):
        return peak["isa"][isa]["peak_gflops"], isa
    return None, None  # generic (SSE/NEON) width: no measured peak


def write_report(args, rows, gemm, out, peak=None):
    def f(x, nd=3):
        return "" if x is None else f"{x:.{nd}f}"

    pk, pk_isa = variant_peak(peak)
    lines = ["# fastattn cpu backend vs peers (one run)", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             *machine_lines(peak),
             "- timing: medians of interleaved repetitions after a warm-up call per provider "
             f"(at least {args.reps} per case, sparse section {args.sparse_reps}; shorter calls repeated "
             f"until each provider ran ~{args.min_seconds:g} s, at most {args.max_reps}: the host is "
             "noisy); seconds per call; B=1, H=8", "",
             "## Dense: fastattn cpu vs torch SDPA", "",
             "FLOPs: 4*B*H*N^2*D (x0.5 causal, x3.5 fwd+bwd). Fractions: of the float32 FMA peak "
             f"above at the vector width of the kernel variant run ({pk_isa or 'not measured'}) and of "
             "torch.mm's best float32 rate in this run. On the avx512bf16 variant "
             "bfloat16 rows run vdpbf16ps (two bfloat16 products per float32 lane), so their "
             "fractions of the float32 figures can exceed 1.", "",
             "| N | D | dtype | causal | mode | fastattn s | sdpa s | fastattn / sdpa | GFLOP/s "
             "(sdpa) | of peak | of torch.mm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "dense":
            frac = r["gflops"] * 1e9 / gemm["float32"]
            ofp = "" if not pk else f"{r['gflops'] / pk:.2f}"
            lines.append(f"| {r['N']} | {r['D']} | {r['dtype']} | {r['causal']} | {r['mode']} | "
                         f"{f(r['fastattn'])} | {f(r['peer_t'])} | **{r['fastattn'] / r['peer_t']:.2f}** | "
                         f"{r['gflops']:.0f} ({r['sdpa_gflops']:.0f}) | {ofp} | {frac:.2f} |")
    lines += ["", f"torch.mm 4096^2 in this run (best of 3): float32 {gemm['float32'] / 1e9:.1f} GFLOP/s, "
              f"bfloat16 (2048^2) {gemm['bfloat16'] / 1e9:.1f} GFLOP/s.", "",
              "## Sparse: fastattn cpu vs torch.compile(flex_attention)", "",
              "ideal = density x fastattn's own dense (non-causal) time at the same N, D, mode, timed "
              "interleaved with the sparse calls (same repetitions).", "",
              "| pattern | N | mode | density | fastattn s | flex s | flex / fastattn | ideal s | "
              "fastattn / ideal |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "sparse":
            sp = "" if r["peer_t"] is None else f"**{r['peer_t'] / r['fastattn']:.2f}x**"
            idl = "" if r["ideal"] is None else f"{r['fastattn'] / r['ideal']:.2f}"
            lines.append(f"| {r['pattern']} | {r['N']} | {r['mode']} | {r['density']:.4f} | "
                         f"{f(r['fastattn'])} | {f(r['peer_t']) or 'no CPU backward'} | {sp} | "
                         f"{f(r['ideal'])} | {idl} |")
    lines += ["", "## Against naive attention (reference backend), causal, D=64, float32", "",
              "| N | mode | fastattn s | naive s | speedup |", "|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "naive":
            lines.append(f"| {r['N']} | {r['mode']} | {f(r['fastattn'])} | {f(r['peer_t'])} | "
                         f"**{r['peer_t'] / r['fastattn']:.1f}x** |")
    lines += ["", "## Peak memory", ""]
    for r in rows:
        if r["section"] == "memory":
            if r["extra_bytes"] is None:
                lines.append(f"N={r['N']}: failed: {r['error']}")
            else:
                lines.append(f"N={r['N']}, H=8, D=64, causal fwd: {r['extra_bytes'] / 2**20:.1f} MiB "
                             f"beyond inputs and outputs (one fp32 N x N score matrix for 8 heads "
                             f"would be {r['n2_bytes'] / 2**30:.1f} GiB).")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["section"] == "dense"]
    labels = [f"N={r['N']} D={r['D']} {r['dtype'][:4]} {'causal' if r['causal'] else 'full'} "
              f"{r['mode']}" for r in dense]
    ratios = [r["fastattn"] / r["peer_t"] for r in dense]
    sp = [r for r in rows if r["section"] == "sparse" and r["peer_t"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4, 0.3 * len(dense))),
                             gridspec_kw=dict(width_ratios=[3, 1]))
    axes[0].barh(range(len(dense)), ratios, color=["tab:green" if x <= 1 else "tab:red" for x in ratios])
    axes[0].set_yticks(range(len(dense)), labels, fontsize=7)
    axes[0].axvline(1.0, color="k", lw=1)
    axes[0].axvline(0.8, color="k", lw=1, ls="--")
    axes[0].set_xlabel("fastattn cpu time / torch SDPA time (lower is better; target <= 1, aim 0.8)")
    axes[0].invert_yaxis()
    axes[1].bar(range(len(sp)), [r["peer_t"] / r["fastattn"] for r in sp], color="tab:blue")
    axes[1].set_xticks(range(len(sp)), [r["pattern"].split("(")[0] for r in sp], rotation=20)
    axes[1].axhline(3.0, color="k", ls="--", lw=1)
    axes[1].set_ylabel("flex time / fastattn time (target >= 3)")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/cpu_suite")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per case, at least")
    ap.add_argument("--min-seconds", type=float, default=5.0,
                    help="more repetitions for short calls until each provider ran this long "
                         "(0: exactly --reps)")
    ap.add_argument("--max-reps", type=int, default=15)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="dense-section dtypes (e.g. float32 alone when torch's bf16 path is capped)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["dense", "sparse", "naive", "memory"],
                    help="sections to leave out")
    ap.add_argument("--sparse-n", type=int, default=16384)
    ap.add_argument("--sparse-reps", type=int, default=9, help="repetitions of the (short) sparse calls")
    ap.add_argument("--memory-n", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    global MIN_SECONDS, MAX_REPS
    MIN_SECONDS, MAX_REPS = args.min_seconds, args.max_reps
    if args.quick:
        args.lengths, args.sparse_n, args.memory_n, args.reps, args.sparse_reps = [1024], 2048, 4096, 2, 2
        MIN_SECONDS = 0.0
    rows: list[dict] = []
    steps = {"dense": len(dense_cases(args)), "sparse": 4, "naive": 2, "memory": 1}
    with tqdm(total=sum(n for sec, n in steps.items() if sec not in args.skip), desc="cpu suite") as pbar:
        peak = cpu_peak.measure()
        # bfloat16 at 2048: held to AVX2 (MKL/oneDNN ISA caps) torch's bf16 GEMM has no fast
        # kernel and 4096^3 would take minutes
        gemm = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16, n=2048)}
        if "dense" not in args.skip:
            dense_section(args, rows, pbar)
        if "sparse" not in args.skip:
            sparse_section(args, rows, pbar)
        if "naive" not in args.skip:
            naive_section(args, rows, pbar)
        if "memory" not in args.skip:
            memory_section(args, rows, pbar)
    write_report(args, rows, gemm, args.out, peak)
    plot(rows, args.out)


if __name__ == "__main__":
    main()
