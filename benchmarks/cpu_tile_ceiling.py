"""How close the CPU kernels' tile products run to what a tuned BLAS reaches on the same shapes,
per ISA, single thread: the ceiling analysis behind the AVX2 rows of the CPU suite.

    python benchmarks/cpu_tile_ceiling.py [--out benchmarks/results/cpu_tile_ceiling] [--reps 7]

For each ISA level the host runs (avx2; avx512 where present) one child process is started with
every library held to that level (FASTATTN_CPU_ISA, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS: they are read at load time, hence a process each) and one thread. It
measures, as medians of interleaved repetitions:
  - torch.mm (MKL sgemm) on the forward kernel's tile products: S = Q K^T (64 x 64 @ 64 x 512),
    P V (64 x 512 @ 512 x 64), and torch SDPA's own larger tile (256 x 64 @ 64 x 512);
  - the dense float32 forward (B=1, H=2, N=4096, D=64, not causal) of fastattn's cpu backend and
    of torch SDPA.
Rates are GFLOP/s and fractions of one core's float32 FMA peak (benchmarks/cpu_peak.py). The
fused forward spends ~85% of its time in the two products (the rest: softmax, bookkeeping), so
its rate is bounded by ~0.85 x the product rate; the suite's bar (fastattn <= 0.8 x SDPA's time)
needs it at >= 1.25 x SDPA's rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LEVELS = {  # ISA -> the environment that holds every library to it
    "avx2": {"FASTATTN_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"FASTATTN_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512",
               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
SHAPES = [("S = Q K^T tile (fastattn)", 64, 512, 64), ("P V tile (fastattn)", 64, 64, 512),
          ("S tile of torch SDPA", 256, 512, 64)]
N, H, D = 4096, 2, 64


def child(reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import fastattn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {"fastattn_isa": fastattn.cpu_info()["variant"],
           "torch_capability": torch.backends.cpu.get_cpu_capability(), "mm": {}}
    for name, m, n, k in SHAPES:
        a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        inner = max(1, int(2e8 / (2 * m * n * k)))
        for _ in range(inner):
            torch.mm(a, b, out=c)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b, out=c)
            ts.append((time.perf_counter() - t0) / inner)
        out["mm"][name] = 2 * m * n * k / statistics.median(ts) / 1e9
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    calls = {"fastattn": lambda: fastattn.attention(q, k, v, backend="cpu"),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    times = {n: [] for n in calls}
    with torch.no_grad():
        for f in calls.values():
            f()
        for _ in range(reps):
            for n, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    fl = 4 * H * N * N * D
    out["attn"] = {n: fl / statistics.median(t) / 1e9 for n, t in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/cpu_tile_ceiling")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.reps)))
        return

    import cpu_peak
    from tqdm import tqdm

    peak = cpu_peak.measure()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    levels = [lv for lv in LEVELS if lv != "avx512" or " avx512f" in flags]
    res = {}
    for lv in tqdm(levels, desc="ISA levels"):
        env = dict(os.environ, OMP_NUM_THREADS="1", **LEVELS[lv])
        r = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps)], env=env,
                           capture_output=True, text=True, check=True)
        res[lv] = json.loads(r.stdout.strip().splitlines()[-1])

    import fastattn

    model = fastattn.cpu_info()["cpu"]
    core_peak = {lv: peak["isa"][lv]["peak_gflops"] / peak["cores"] for lv in levels if lv in peak["isa"]}
    pct = lambda lv, x: f"{x:.0f} ({100 * x / core_peak[lv]:.0f}%)" if lv in core_peak else f"{x:.0f}"
    lines = [
        "# CPU tile products against MKL on the same shapes, per ISA (single thread)", "",
        f"- command: `python benchmarks/cpu_tile_ceiling.py --out {args.out} --reps {args.reps}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M UTC')}",
        f"- machine: {model} ({platform.machine()}), clock under load {peak['clock_ghz']:.2f} GHz; "
        "single-core float32 FMA peak: " + ", ".join(f"{lv} {core_peak[lv]:.0f} GFLOP/s" for lv in core_peak),
        "- each ISA in its own process with every library held to it (FASTATTN_CPU_ISA, "
        "ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), 1 thread, medians of "
        f"{args.reps} interleaved repetitions; GFLOP/s (fraction of one core's peak)", "",
        "| ISA (fastattn variant / torch capability) | " + " | ".join(f"torch.mm {s[0]}" for s in SHAPES)
        + f" | fastattn fwd N={N} | SDPA fwd N={N} | fastattn time / SDPA time |",
        "|---|" + "---|" * (len(SHAPES) + 3)]
    for lv, r in res.items():
        a = r["attn"]
        lines.append(f"| {lv} ({r['fastattn_isa']} / {r['torch_capability']}) | "
                     + " | ".join(pct(lv, r["mm"][s[0]]) for s in SHAPES)
                     + f" | {pct(lv, a['fastattn'])} | {pct(lv, a['sdpa'])} | {a['sdpa'] / a['fastattn']:.2f} |")
    lines += ["", "What the suite's bar (fastattn time <= 0.8 x SDPA's) asks of each level, from these rows: "
              "the forward at >= 1.25 x SDPA's rate; with ~85% of the fused forward's time in its two "
              "tile products (perf, this host), the products then have to run at >= that / 0.85:", ""]
    for lv, r in res.items():
        need = 1.25 * r["attn"]["sdpa"]
        mm = [r["mm"][s[0]] for s in SHAPES]
        frac = (lambda x: f" ({100 * x / core_peak[lv]:.0f}% of peak)") if lv in core_peak else (lambda x: "")
        lines.append(f"- {lv}: forward >= {need:.0f} GFLOP/s{frac(need)}, products >= {need / 0.85:.0f} "
                     f"GFLOP/s{frac(need / 0.85)}; MKL on the same tile shapes: {min(mm):.0f}-{max(mm):.0f} "
                     f"GFLOP/s; fastattn's forward: {r['attn']['fastattn']:.0f} GFLOP/s")
    lines.append("")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(args.out + ".json", "w") as f:
        json.dump({"peak": peak, "results": res}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
