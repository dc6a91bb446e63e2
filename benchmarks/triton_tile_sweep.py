"""Compile the tutorial-class tile space of the triton backend's attention kernels ahead of
time (sm_80, sm_90; no GPU needed) and record which configs fit shared memory and compile
without register spills, per kernel, head dim, masking mode and score modifiers.

    PYTHONPATH=python_pkg .venv/bin/python benchmarks/triton_tile_sweep.py [--jobs 2]

The space is kernels.SEARCH_SPACE (fwd and dQ: BLOCK_M 64/128 x BLOCK_N 32/64/128; dK/dV:
BLOCK_M 16/32/64 x BLOCK_N 64/128; 4 or 8 warps; 2-5 pipeline stages). A config is pruned
for an arch when kernels.smem_estimate exceeds its shared memory (not compiled), and
recorded as spilling, over shared memory, or off tensor cores from the compile otherwise.
Score-modifier configs carry maxnreg 255 as the tables' do. Writes
benchmarks/results/triton_tile_sweep.json (every compile) and .md (per kernel and head dim:
the configs clean everywhere, and why each other one was dropped). The tables
kernels.TILES / TILES_MODS are chosen from the clean ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_pkg"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from fastattn.bench import triton_compile as aot  # noqa: E402


# --candidates: a tutorial-class subset per (kernel, head dim), compiled in the two hardest
# settings (block-sparse with softcap + ALiBi + dropout; causal without modifiers) -- what
# picked the d64/d128 entries of kernels.TILES when the full space was too slow to sweep on
# the 2-core development machine.
CANDIDATES = {
    ("fwd", 128): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                   (64, 128, 4, 3)],
    ("fwd", 64): [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
    ("dkdv", 128): [(32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 4, 2), (32, 64, 4, 3),
                    (32, 64, 8, 2), (16, 128, 8, 2)],
    ("dkdv", 64): [(32, 128, 4, 3), (64, 128, 8, 2)],
    ("dq", 128): [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
    ("dq", 64): [(128, 64, 4, 3), (128, 32, 4, 3)],
}


def _compile(v):
    return aot.compile_variant(v)


def write_report(rows, pruned, pairs, out: Path, command: str, minutes: float, dtype: str):
    """out.md: per (kernel, head dim) the configs clean everywhere, and why each other is not."""
    why = defaultdict(list)
    seen = defaultdict(set)
    for row in rows:
        key = (row["kernel"], row["head_dim"],
               f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}")
        seen[key].add(row["arch"])
        where = f"sm_{row['arch']} {row['mode']} {row['mods'] or 'no mods'}"
        if row["error"]:
            why[key].append(f"{where}: {row['error']}")
        elif row["spills"]:
            capped = row.get("spills_maxnreg", -1)
            why[key].append(f"{where}: {row['spills']} B spilled ({row['registers']} regs"
                            + (f"; {capped} B with .maxnreg 255" if capped >= 0 else "") + ")")
        elif not row["tensor_cores"]:
            why[key].append(f"{where}: products not on tensor cores")
    for p in pruned:
        key = ("fwd" if p["kernel"] == "fwd" else f"bwd_{p['kernel']}", p["head_dim"], p["config"])
        why[key].append(f"sm_{p['arch']}: shared memory estimate {p['smem_estimate'] // 1024} KB "
                        f"over the limit")
    lines = ["# Triton tile sweep: tutorial-class tiles, ahead of time (sm_80, sm_90)", "",
             f"- command: `{command}`",
             f"- {len(rows)} compiles in {minutes:.1f} min; dtype {dtype}; "
             "(mode, score mods): " + ", ".join(f"{a}:{b or 'none'}" for a, b in pairs),
             "- clean = fits shared memory and compiles with 0 spill bytes and tensor-core "
             "products on both archs, for every (mode, score mods) pair compiled; score-mod "
             "compiles carry maxnreg 255 as the tables do", ""]
    for kernel in sorted({k[0] for k in list(seen) + list(why)}):
        for d in sorted({k[1] for k in list(seen) + list(why) if k[0] == kernel}):
            keys = sorted({k for k in list(seen) + list(why) if k[:2] == (kernel, d)},
                          key=lambda k: k[2])
            clean = [k[2] for k in keys if not why[k]]
            lines += [f"## {kernel}, head dim {d}", "",
                      f"clean ({len(clean)}): " + (", ".join(clean) or "none"), "",
                      "| config | why not clean |", "|---|---|"]
            for k in keys:
                if why[k]:
                    lines.append(f"| {k[2]} | {'; '.join(why[k][:4])}"
                                 f"{f' (+{len(why[k]) - 4} more)' if len(why[k]) > 4 else ''} |")
            lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kernels", nargs="+", default=["fwd", "dkdv", "dq"])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--archs", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--modes", nargs="+", default=["causal", "sparse"])
    ap.add_argument("--mods", nargs="+", default=["none", aot.ALL_MODS])
    ap.add_argument("--candidates", action="store_true",
                    help="compile CANDIDATES (default pairs sparse:all causal:none) instead of "
                         "the full space")
    ap.add_argument("--pairs", nargs="+", metavar="MODE:MODS",
                    help="compile only these (mode, score mods) pairs instead of --modes x "
                         "--mods, e.g. causal:none sparse:all (all = softcap+alibi+dropout)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/triton_tile_sweep"))
    args = ap.parse_args(argv)
    from fastattn.backends.triton.ops import load_kernels

    kern = load_kernels(interpret=False)
    mods = ["" if m == "none" else m for m in args.mods]
    if args.candidates and not args.pairs:
        args.pairs = ["sparse:all", "causal:none"]
    if args.pairs:
        pairs = [(p.split(":")[0], {"none": "", "all": aot.ALL_MODS}.get(p.split(":")[1],
                                                                        p.split(":")[1]))
                 for p in args.pairs]
    else:
        pairs = [(mode, m) for mode in args.modes for m in mods]
    variants, pruned = [], []
    for kernel in args.kernels:
        full = "fwd" if kernel == "fwd" else f"bwd_{kernel}"
        for d in args.head_dims:
            bd = kern.pad_dim(d)
            space = (CANDIDATES.get((kernel, d), []) if args.candidates
                     else kern.search_space(kernel))
            for arch in args.archs:
                for bm, bn, w, st in space:
                    need = kern.smem_estimate(kernel, bm, bn, bd, bd, st, 2)
                    if need > kern.SMEM_LIMIT[arch]:
                        pruned.append(dict(kernel=kernel, head_dim=d, arch=arch,
                                           config=f"{bm}x{bn} w{w} s{st}", smem_estimate=need))
                        continue
                    for mode, m in pairs:
                        if True:
                            for part in kern.dkdv_parts(bd, bd) if kernel == "dkdv" else (0,):
                                variants.append(aot.Variant(
                                    full, args.dtype, d, mode, bm, bn, w, st, arch,
                                    (128, 128) if mode == "sparse" else (16, 16), part, m,
                                    kern.MODS_MAXNREG if m else None))
    variants.sort(key=lambda v: (v.kernel, v.head_dim))
    print(f"{len(variants)} compiles ({len(pruned)} (config, arch) pairs pruned by shared "
          f"memory), {args.jobs} jobs", flush=True)
    t0 = time.time()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, r in enumerate(pool.map(_compile, variants, chunksize=4), 1):
            row = r.row()
            row.update(tensor_cores=r.tensor_cores, stack=r.stack,
                       spills_maxnreg=r.spills_maxnreg)
            rows.append(row)
            if i % 50 == 0:
                print(f"[{i}/{len(variants)}] {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(pruned=pruned, compiles=rows), indent=0))

    command = ("PYTHONPATH=python_pkg python benchmarks/triton_tile_sweep.py "
               + " ".join(argv if argv is not None else sys.argv[1:]))
    write_report(rows, pruned, pairs, out, command, (time.time() - t0) / 60, args.dtype)
    print(f"wrote {out}.json/.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
