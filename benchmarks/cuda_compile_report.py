"""Compile every CUDA kernel of csrc/cuda with nvcc for sm_80 and sm_90 and record what ptxas
reports (registers, spills, stack) plus each kernel's dynamic shared memory.

    python benchmarks/cuda_compile_report.py [--archs 80,90] [--jobs 2] [--out PATH] [--check]
                                             [--baseline PATH] [--note TEXT ...]

Writes benchmarks/results/cuda_compile_report.md (command, date, machine, nvcc version, one
table row per kernel and arch). --check exits 1 if a default configuration spills registers or
a kernel fails to compile. --baseline (default: the report being overwritten) adds a column with
each kernel's register change against that earlier report; --note adds lines to its notes.
No GPU is needed: this is compile-only. Flags match setup.py's CUDA
extension plus the -D__CUDA_NO_HALF*__ flags torch's CUDAExtension adds.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "cuda_compile_report.md")

NVCC_FLAGS = [
    "-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
    # torch.utils.cpp_extension.CUDAExtension adds these; the kernels must build with them.
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]

# Host-only program printing each configuration's dynamic shared memory (kernel_traits.h).
SMEM_PROGRAM = r"""
#include <cstdio>
#include "cuda/kernel_traits.h"
#include "cuda/fa2_fwd_kernel.h"
#include "cuda/fa2_bwd_kernel.h"
using namespace fastattn::cuda;
template <int D, typename T> void row(const char* t) {
  using F = typename Fa2FwdConfig<D, T>::type;
  std::printf("fa2_fwd_kernel %d %s %d\n", D, t, F::kSmemBytes);
  std::printf("INTENSITY fa2_fwd_kernel %d %s %d %d %d %d %ld %ld %ld\n", D, t, F::kBlockM,
              F::kBlockN, F::kNWarps, F::kStages, F::kFlopsPerTile, F::kSmemWriteBytesPerTile,
              F::kSmemReadBytesPerTile);
  std::printf("flash_fwd_kernel %d %s %d\n", D, t, FwdConfig<D, T>::type::kSmemBytes);
  std::printf("flash_bwd_dkdv_kernel %d %s %d\n", D, t, BwdDkdvConfig<D, T>::type::kSmemBytes);
  std::printf("flash_bwd_dq_kernel %d %s %d\n", D, t, BwdDqConfig<D, T>::type::kSmemBytes);
  std::printf("flash_bwd_preprocess_kernel %d %s 0\n", D, t);
  std::printf("fa2_bwd_dkdv_kernel %d %s %d\n", D, t, Fa2BwdConfig<D, T>::type::kSmemBytes);
}
// Head dims of the FA2 class kernels alone (the wmma kernels are compiled for 64 / 128 only).
template <int D, typename T> void row_fa2(const char* t) {
  using F = typename Fa2FwdConfig<D, T>::type;
  std::printf("fa2_fwd_kernel %d %s %d\n", D, t, F::kSmemBytes);
  std::printf("INTENSITY fa2_fwd_kernel %d %s %d %d %d %d %ld %ld %ld\n", D, t, F::kBlockM,
              F::kBlockN, F::kNWarps, F::kStages, F::kFlopsPerTile, F::kSmemWriteBytesPerTile,
              F::kSmemReadBytesPerTile);
  std::printf("fa2_bwd_dkdv_kernel %d %s %d\n", D, t, Fa2BwdConfig<D, T>::type::kSmemBytes);
}
// The FA2 backward's static counts (every head dim): tile N keys x M queries, 2 stages.
template <int D, typename T> void bwd_intensity(const char* t) {
  using B = typename Fa2BwdConfig<D, T>::type;
  std::printf("INTENSITY fa2_bwd_dkdv_kernel %d %s %d %d %d %d %ld %ld %ld\n", D, t, B::kBlockN,
              B::kBlockM, B::kNWarps, 2, B::kFlopsPerTile, B::kSmemWriteBytesPerTile,
              B::kSmemReadBytesPerTile);
}
int main() {
  row_fa2<32, __half>("fp16"); row_fa2<32, __nv_bfloat16>("bf16");
  row<64, __half>("fp16"); row<64, __nv_bfloat16>("bf16");
  row_fa2<96, __half>("fp16"); row_fa2<96, __nv_bfloat16>("bf16");
  row<128, __half>("fp16"); row<128, __nv_bfloat16>("bf16");
  row_fa2<192, __half>("fp16"); row_fa2<192, __nv_bfloat16>("bf16");
  row_fa2<256, __half>("fp16"); row_fa2<256, __nv_bfloat16>("bf16");
  bwd_intensity<32, __half>("fp16"); bwd_intensity<32, __nv_bfloat16>("bf16");
  bwd_intensity<64, __half>("fp16"); bwd_intensity<64, __nv_bfloat16>("bf16");
  bwd_intensity<96, __half>("fp16"); bwd_intensity<96, __nv_bfloat16>("bf16");
  bwd_intensity<128, __half>("fp16"); bwd_intensity<128, __nv_bfloat16>("bf16");
  bwd_intensity<192, __half>("fp16"); bwd_intensity<192, __nv_bfloat16>("bf16");
  bwd_intensity<256, __half>("fp16"); bwd_intensity<256, __nv_bfloat16>("bf16");
}
"""


# Static counts per forward tile (filled by dynamic_smem from the tile constants of
# fa2_fwd_kernel.h): FLOPs of S = Q K^T and O += P V for one (query tile, key tile), bytes
# written to shared memory (cp.async of the K and V tiles) and read from it (ldmatrix of the K
# and V tiles by every warp, and of each warp's Q rows).
INTENSITY: list[dict] = []
SMEM_PER_SM = {"80": 164 * 1024, "90": 228 * 1024}


def blocks_per_sm(arch: str, regs: int, threads: int, smem: int) -> int:
    """Resident blocks per SM: registers (allocated per warp in units of 256), shared memory
    (plus 1 KB reserved per block), threads (2048) and the 32-block cap, whichever binds."""
    warps = threads // 32
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps if per_warp else 32
    by_smem = SMEM_PER_SM[arch] // (smem + 1024)
    return max(0, min(by_regs, by_smem, 2048 // threads, 32))


def find_nvcc() -> str | None:
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> tuple[str, str]:
    """('flash_fwd_kernel', 'hdim128 bf16 dense') from a demangled template name."""
    m = re.search(r"((?:flash|fa2)_\w+_kernel)<(.*)>\(", demangled)
    if not m:
        return demangled, ""
    kern, args = m.group(1), m.group(2)
    if kern.startswith("flash_decode_"):  # <T, kHeadDim, kRows> (split) or <T> (combine)
        dtype = "bf16" if "bfloat16" in args else "fp16"
        d = re.search(r", (\d+), (\d+)$", args.strip())
        return kern, (f"hdim{d.group(1)} {dtype} rows{d.group(2)}" if d else dtype)
    dims = re.findall(r"<(\d+), (\d+)", args)
    dtype = "bf16" if "bfloat16" in args else "fp16"
    sparse = "sparse" if args.rstrip().endswith("true") else ("dense" if "bool" in args or args.rstrip().endswith("false") else "")
    hd = ""
    if dims:
        hd = f"hdim{dims[0][0]}"
    return kern, " ".join(x for x in (hd, dtype, sparse) if x)


def compile_one(nvcc: str, src: str, arch: str, tmp: str) -> tuple[str, str, int, str]:
    obj = os.path.join(tmp, f"{os.path.basename(src)}.sm{arch}.o")
    cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
           "-I", CSRC, "-c", src, "-o", obj]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return src, arch, r.returncode, r.stdout + r.stderr


def parse_ptxas(text: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    return rows


def dynamic_smem(nvcc: str, tmp: str) -> dict[tuple[str, str, str], int]:
    src = os.path.join(tmp, "smem_sizes.cu")
    exe = os.path.join(tmp, "smem_sizes")
    with open(src, "w") as f:
        f.write(SMEM_PROGRAM)
    r = subprocess.run([nvcc, "-std=c++17", *NVCC_FLAGS[4:], "-I", CSRC, src, "-o", exe],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("could not build the shared-memory size program:\n" + r.stderr)
    out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout
    table = {}
    INTENSITY.clear()
    for line in out.splitlines():
        if line.startswith("INTENSITY "):
            kern, d, t, bm, bn, nw, st, flops, wr, rd = line.split()[1:]
            INTENSITY.append({"kernel": kern, "hdim": int(d), "dtype": t, "block_m": int(bm),
                              "block_n": int(bn), "warps": int(nw), "stages": int(st),
                              "flops": int(flops), "smem_write": int(wr), "smem_read": int(rd)})
            continue
        kern, d, t, b = line.split()
        table[(kern, f"hdim{d}", t)] = int(b)
    return table


def read_registers(path: str) -> dict[tuple[str, str, str], int]:
    """(kernel, config, arch) -> registers of an earlier report ({} if there is none). path is a
    file, or git:REV for the recorded report as of commit REV."""
    if path.startswith("git:"):
        rel = os.path.relpath(DEFAULT_OUT, ROOT)
        r = subprocess.run(["git", "show", f"{path[4:]}:{rel}"], cwd=ROOT, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SystemExit(f"--baseline {path}: {r.stderr.strip()}")
        text = r.stdout
    elif path and os.path.exists(path):
        text = open(path).read()
    else:
        return {}
    regs = {}
    for line in text.splitlines():
        if line.startswith("| flash_") or line.startswith("| fa2_"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            try:
                regs[(cells[0], cells[1], cells[2])] = int(cells[3])
            except (IndexError, ValueError):
                continue
    return regs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 on spills or compile errors")
    ap.add_argument("--baseline", default=None,
                    help="earlier report to diff registers against: a path, or git:REV for the "
                         "recorded one at commit REV (default: --out, if present)")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes section")
    args = ap.parse_args(argv)
    baseline_path = args.baseline if args.baseline is not None else args.out
    baseline = read_registers(baseline_path)

    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found on PATH: skipping the CUDA compile report")
        return 0
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    t0 = datetime.datetime.now()
    failures, rows = [], []
    with tempfile.TemporaryDirectory(prefix="fastattn-ptxas-") as tmp:
        smem = dynamic_smem(nvcc, tmp)
        with cf.ThreadPoolExecutor(args.jobs) as ex:
            futs = [ex.submit(compile_one, nvcc, s, a, tmp) for s in sources for a in archs]
            for fut in cf.as_completed(futs):
                src, arch, rc, text = fut.result()
                if rc != 0:
                    failures.append((src, arch, text))
                    continue
                for r in parse_ptxas(text):
                    r["source"] = os.path.relpath(src, ROOT)
                    rows.append(r)
    elapsed = (datetime.datetime.now() - t0).total_seconds()
    names = demangle(sorted({r["mangled"] for r in rows}))
    table, seen = [], set()
    for r in rows:
        kern, cfg = short_name(names[r["mangled"]])
        key = (kern, cfg, r["arch"])
        if key in seen:  # the preprocess kernel is instantiated in several files
            continue
        seen.add(key)
        parts = cfg.split()
        dyn = smem.get((kern, parts[0], parts[1]), 0) if len(parts) >= 2 else 0
        table.append((kern, cfg, r["arch"], r.get("regs", -1), r.get("spill_st", 0),
                      r.get("spill_ld", 0), r.get("stack", 0), r.get("static_smem", 0), dyn))
    table.sort(key=lambda t: (t[0], t[1], t[2]))
    spills = [t for t in table if t[4] or t[5]]

    def delta(t) -> str:
        old = baseline.get((t[0], t[1], f"sm_{t[2]}"))
        return "" if old is None or t[3] < 0 else f"{t[3] - old:+d}"

    grew = [t for t in table if delta(t) not in ("", "+0") and not delta(t).startswith("-")]

    cmd = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else "python",
                      "benchmarks/cuda_compile_report.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# CUDA kernels: ptxas report",
        "",
        f"- command: `{cmd}`",
        f"- date: {t0:%Y-%m-%d %H:%M:%S}",
        f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} cores, no GPU needed)",
        f"- nvcc: {nvcc_version(nvcc)}; flags: `{' '.join(NVCC_FLAGS)} -Xptxas -v`",
        f"- {len(sources)} sources x {len(archs)} archs compiled in {elapsed:.0f} s with {args.jobs} jobs",
        f"- spills: {'none' if not spills else f'{len(spills)} kernels spill'}; compile failures: {len(failures)}",
        "",
        "dynamic smem = bytes the launcher requests (kernel_traits.h); static smem from ptxas.",
    ]
    if baseline:
        what = (f"the recorded report at commit {baseline_path[4:]}" if baseline_path.startswith("git:")
                else f"{os.path.relpath(baseline_path, ROOT)} as it was before this run")
        lines.append(f"registers vs previous = change against {what} ({len(grew)} of {len(table)} "
                     f"rows grew).")
    if args.note:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in args.note]
    lines += [
        "",
        "| kernel | config | arch | registers | spill stores (B) | spill loads (B) | stack (B) | static smem (B) | dynamic smem (B) | registers vs previous |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in table:
        lines.append(f"| {t[0]} | {t[1]} | sm_{t[2]} | {t[3]} | {t[4]} | {t[5]} | {t[6]} | {t[7]} | {t[8]} | {delta(t)} |")
    fwd_int = [it for it in INTENSITY if it["kernel"] == "fa2_fwd_kernel"]
    bwd_int = [it for it in INTENSITY if it["kernel"] == "fa2_bwd_dkdv_kernel"]

    def intensity_rows(items, tile_word):
        out = []
        for it in items:
            occ = []
            for arch in ("80", "90"):
                cells = [t for t in table if t[0] == it["kernel"] and t[2] == arch
                         and t[1].startswith(f"hdim{it['hdim']} {it['dtype']}") and t[3] > 0]
                occ.append(", ".join(
                    f"{t[1].split()[-1]} {blocks_per_sm(arch, t[3], it['warps'] * 32, t[8])}"
                    for t in cells) or "-")
            ratio = it["flops"] / (it["smem_write"] + it["smem_read"])
            out.append(
                f"| {it['kernel']} | hdim{it['hdim']} {it['dtype']} | {it['block_m']} x "
                f"{it['block_n']}{tile_word}, {it['warps']} warps, {it['stages']} stages | "
                f"{it['flops']} | {it['smem_write']} | {it['smem_read']} | {ratio:.1f} | "
                f"{occ[0]} | {occ[1]} |")
        return out

    if fwd_int:
        lines += [
            "",
            "## FlashAttention-2 class forward: occupancy and static intensity per tile",
            "",
            "Per (query tile, key tile), all warps, from the tile constants (fa2_fwd_kernel.h): "
            "FLOPs of Q K^T and P V (4 M N d); shared-memory bytes written (cp.async of the K and V "
            "tiles) and read (ldmatrix of K and V by every warp, and of each warp's Q rows: Q is "
            "re-read per key tile, not held in registers). No st.shared/ld.shared on the main path "
            "(S, P and O stay in registers). The wmma forward moves about 6 FLOP per byte "
            "(issue 16's count); A100 needs ~16, H100 ~32 to be compute-bound. Blocks/SM from "
            "ptxas registers and the requested shared memory (not measured on a GPU).",
            "",
            "| kernel | config | tile (M x N, warps, stages) | FLOP / tile | smem write (B) | smem read (B) | FLOP / smem byte | blocks/SM sm_80 | blocks/SM sm_90 |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        ] + intensity_rows(fwd_int, "")
    if bwd_int:
        lines += [
            "",
            "## FlashAttention-2 class backward (dK/dV kernel, atomic dQ): static intensity per tile",
            "",
            "Per (key tile, query tile), all warps, from the tile constants (fa2_bwd_kernel.h): "
            "FLOPs of the 5 GEMMs (S^T, dP^T, dV, dK, dQ: 10 N M d); shared-memory bytes written "
            "(cp.async of Q and dO, st.shared of P^T and dS^T) and read by ldmatrix (K / V rows and "
            "Q / dO slices for S^T / dP^T, P^T / dS^T rows and dO / Q columns for dV / dK, dS^T "
            "and K for dQ). Blocks/SM from ptxas registers and the requested shared memory.",
            "",
            "| kernel | config | tile (N keys x M queries, warps, stages) | FLOP / tile | smem write (B) | smem read (B) | FLOP / smem byte | blocks/SM sm_80 | blocks/SM sm_90 |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        ] + intensity_rows(bwd_int, "")
    for src, arch, text in failures:
        lines += ["", f"## FAILED: {os.path.relpath(src, ROOT)} sm_{arch}", "", "```", text.strip()[-4000:], "```"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    print(f"wrote {os.path.relpath(args.out, ROOT)} ({len(table)} rows)")
    if args.check and (spills or failures):
        for t in spills:
            print(f"SPILL: {t[0]} {t[1]} sm_{t[2]}: {t[4]} B stores, {t[5]} B loads")
        for src, arch, text in failures:
            print(f"FAILED: {src} sm_{arch}\n{text[-2000:]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
