"""Compile every default config of the triton backend's kernels ahead of time for sm_80 and
sm_90 (no GPU needed) and record registers, spills, shared memory and MMA use.

    PYTHONPATH=python_pkg .venv/bin/python benchmarks/triton_compile_report.py [--jobs 2]

For each kernel (fwd, bwd_preprocess, bwd_dkdv, bwd_dq), dtype (float16, bfloat16),
head dim (16, 32, 64, 128, 256), masking mode ("causal", which contains the masked and the
unmasked inner loops and so covers dense and window; "sparse", a BlockMask of 128 x 128
blocks with bitmasks) and every tile config the autotuner may pick there
(kernels.default_tiles on that arch's shared memory), each without score modifiers and with
softcap + ALiBi + dropout all on (--mods), Triton compiles for a GPUTarget and
`ptxas -v` (the CUDA toolkit's, from PATH) reads the PTX. Writes
benchmarks/results/triton_compile_report.md; exits 1 if any config spills, exceeds shared
memory, fails to compile, or does its products without mma.sync (sm_80) / wgmma (sm_90).

--tma adds the forward's tensor-descriptor variant (TMA=True; sm_90 only, every default tile
of the chosen dtypes/head dims/modes/mods), which must also show TMA copies
(cp.async.bulk.tensor) in its PTX; --tma-only compiles just those (default output
benchmarks/results/triton_tma_compile_report.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_pkg"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud

from fastattn.bench import triton_compile as aot  # noqa: E402


def _compile(v):
    t0 = time.time()
    r = aot.compile_variant(v)
    return r, time.time() - t0


def _machine() -> str:
    import torch
    import triton

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ptxas = aot.ptxas_path()
    pv = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip() \
        .splitlines()[-1] if ptxas else "absent"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (ahead-of-time only)"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, GPU {gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"ptxas {ptxas} ({pv})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--modes", nargs="+", default=["causal", "sparse"])
    ap.add_argument("--mods", nargs="+", default=["none", aot.ALL_MODS],
                    help="score-modifier sets: 'none' or '+'-joined names from "
                         f"{'/'.join(aot.SCORE_MODS)} (default: none and all three together)")
    ap.add_argument("--tma", action="store_true",
                    help="also compile the forward's TMA variant for sm_90")
    ap.add_argument("--tma-only", action="store_true",
                    help="compile only the forward's TMA variant for sm_90")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.out is None:
        name = "triton_tma_compile_report.md" if args.tma_only else "triton_compile_report.md"
        args.out = str(ROOT / "benchmarks/results" / name)

    if aot.ptxas_path() is None:
        print("ptxas not found on PATH: install the CUDA toolkit (registers and spills come "
              "from ptxas -v)", file=sys.stderr)
        return 2
    mods = ["" if m == "none" else m for m in args.mods]
    variants = [] if args.tma_only else aot.default_variants(
        dtypes=args.dtypes, head_dims=args.head_dims, modes=args.modes, archs=args.archs,
        mods=mods)
    if (args.tma or args.tma_only) and 90 in args.archs:
        variants += aot.tma_variants(dtypes=args.dtypes, head_dims=args.head_dims,
                                     modes=args.modes, mods=mods)
    command = "PYTHONPATH=python_pkg python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/triton_compile_report.py", *(argv or sys.argv[1:])])
    print(f"{len(variants)} variants, {args.jobs} jobs", flush=True)
    t0 = time.time()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, (r, dt) in enumerate(pool.map(_compile, variants), 1):
            results.append(r)
            v = r.variant
            print(f"[{i}/{len(variants)}] {v.kernel} {v.dtype} d{v.head_dim} {v.mode} "
                  f"{v.mods or 'no mods'} {v.config} sm_{v.arch}: regs {r.registers} spills {r.spills} smem {r.smem} "
                  f"mma {r.mma} {'OK' if r.ok else 'FAIL ' + r.error} ({dt:.1f}s)", flush=True)
    elapsed = time.time() - t0

    bad = [r for r in results if not r.ok]
    lines = [
        "# Triton kernels: ahead-of-time compile report "
        + ("(sm_90, the forward's TMA variant)" if args.tma_only else "(sm_80, sm_90)"),
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {_machine()}",
        f"- {len(results)} variants in {elapsed / 60:.1f} min; "
        f"**{len(results) - len(bad)} pass, {len(bad)} fail** "
        "(pass = compiles, 0 spill bytes, shared memory within the arch's opt-in limit "
        "(sm_80 164 KB, sm_90 228 KB), and matrix products on tensor cores: mma.sync on sm_80, "
        "wgmma on sm_90 wherever the tile has a 64-row MMA side over 4-warp groups; the one "
        "exception is dK/dV at head dim 256, whose 32-row tiles use mma.sync, because 64-row "
        "tiles spill there; bwd_preprocess does no matrix product)",
        "- float32 is not listed: the backend does not serve float32 on GPUs (its products, "
        "as float32 FMAs or as 3xTF32 MMAs, spilled registers at every tile tried; TF32 would "
        "miss the DESIGN.md accuracy rule); float32 is verified in Triton's interpreter.",
        "",
        "How: `triton.compile(ASTSource(kernel, signature, constexprs), "
        "target=GPUTarget('cuda', arch, 32))` with the arguments specialized as a launch on "
        "contiguous tensors would (16-byte aligned pointers, unit inner strides), PTX ISA "
        "capped to what the system ptxas accepts, then `ptxas -arch=sm_80|sm_90a -v`. Shared "
        "memory is Triton's dynamic allocation for the config. Modes: `causal` holds the "
        "masked and unmasked inner loops (so it covers dense and window calls); `sparse` is a "
        "BlockMask of 128 x 128 blocks with window rule and bitmasks. Config = "
        "BLOCK_M x BLOCK_N, warps, pipeline stages, and `r255` where the config sets "
        "triton.Config(maxnreg=255) (the PTX's `.maxnreg`: every config with score modifiers, "
        "and dK/dV at head dim 256); bwd_dkdv part 1/2 = the dV-only and "
        "dK-only launches used at head dim 256. Score mods: `none`, or `softcap+alibi+dropout` "
        "(the three constexpr switches on together: tanh from exp2, the ALiBi bias, the "
        "dropout hash; bwd_preprocess has none). `tma` in the config = the forward's "
        "tensor-descriptor variant (sm_90 only; FASTATTN_TRITON_TMA=1 or a validated "
        "'triton-tma' entry selects it), which must also issue TMA copies "
        "(`cp.async.bulk.tensor`, column TMA).",
        "",
    ]
    with_mods = [r for r in results if r.variant.mods]
    if with_mods:
        bad_m = [r for r in with_mods if not r.ok]
        lines[6:6] = [f"- with score modifiers on: {len(with_mods) - len(bad_m)} of "
                      f"{len(with_mods)} variants pass; without: "
                      f"{len(results) - len(with_mods) - len(bad) + len(bad_m)} of "
                      f"{len(results) - len(with_mods)}"]
    occ = [r for r in bad if r.spills > 0 and r.spills_maxnreg == 0]
    if occ:
        lines[6:6] = [f"- {len(occ)} of the {len(bad)} failures spill only because ptxas, given "
                      "no register cap, trades a few spilled bytes for occupancy (128 registers "
                      "at 8 warps, 168 at 4): the same PTX with `.maxnreg 255` (what "
                      "triton.Config(maxnreg=255) emits) compiles with 0 spills (status column). "
                      "Which is faster needs a GPU."]
    for arch in args.archs:
        sub = [r for r in results if r.variant.arch == arch]
        if not sub:
            continue
        lines += [f"## sm_{arch}", "",
                  "| kernel | dtype | head dim | mode | score mods | config | registers | "
                  "spills (B) | smem (KB) | " + ("wgmma" if arch >= 90 else "mma.sync")
                  + " | TMA | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            v = r.variant
            name = v.kernel + (f" (part {v.part})" if v.part else "")
            status = "ok" if r.ok else f"FAIL {r.error}".strip()
            if r.spills > 0 and r.spills_maxnreg >= 0:
                status += (f" (.maxnreg 255: {r.registers_maxnreg} regs, "
                           f"{r.spills_maxnreg} B spilled)")
            if arch >= 90:
                mma = "yes" if r.wgmma else ("no (mma.sync: 32-row tile)" if r.mma_sync else "no")
            else:
                mma = "yes" if r.mma_sync else "no"
            lines.append(f"| {name} | {v.dtype} | {v.head_dim} | {v.mode} | "
                         f"{v.mods or 'none'} | {v.config} | "
                         f"{r.registers} | {r.spills} | {r.smem / 1024:.1f} | {mma} | "
                         f"{'yes' if r.tma_ops else 'no'} | {status} |")
        lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}: {len(results) - len(bad)} pass, {len(bad)} fail", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
