"""`make gpu-check`: everything fastattn needs to learn from a machine with a CUDA GPU, in one
run of about ten minutes, written to one results directory.

    .venv/bin/python benchmarks/gpu_check.py [--out DIR] [--dry-run] [--budget-scale X]
    .venv/bin/python benchmarks/gpu_check.py --record DIR     # DIR's validation.json -> the
                                                              # package's GPU validation table

Steps, each under its own time cap (seconds, scaled by --budget-scale); a failure or a
timeout in one step does not stop the others:

  build_cuda    (130) the CUDA extension for this GPU's arch only (FASTATTN_CUDA_ARCHS=<XY>;
                      its instantiations are head dims 64 and 128, fp16 and bf16, dense and
                      sparse), then an import check
  tests_triton  (150) tests/gpu/test_gpu_triton.py: fp16/bf16, head dims 40/64/128/256,
                      dense/causal/window/block-sparse, GQA/MQA, ragged lengths, softcap,
                      ALiBi, dropout, decode; forward + backward against the float64 oracle
  tests_cuda     (70) tests/gpu/test_gpu_cuda.py (same cases, those the cuda backend serves,
                      with each backward: deterministic=True and False; decode included) and
                      the GPU tests of tests/test_cuda_backend.py
  tests_triton_tma (45) sm_90+ only: tests/gpu/test_gpu_triton_tma.py, the triton forward's
                      tensor-descriptor (TMA) variant (FASTATTN_TRITON_TMA=1) on the
                      attention cases; its result is the "triton-tma" validation entry
  sanitizer      (90) compute-sanitizer memcheck, racecheck, synccheck on one small causal
                      forward + backward per kernel family (cuda: both backwards; a decode
                      call for triton and cuda; triton-tma on sm_90+)
  int64          (30) a strided (B, N, H, D) view past 2^31 elements through each family
                      (windowed, so the work stays small) and a KV cache of >= 2^31 elements
                      through triton decode, checked on slices against the float64 oracle
  bench         (140) TFLOP/s forward and forward+backward, bf16, head dims 64/128,
                      N 1k-16k, causal and not: triton, cuda, torch SDPA, FlexAttention, and
                      triton-tma (the TMA forward, sm_90+)

Results directory (default gpu_check_results/<UTC time>_<GPU>): results.json (versions, GPU,
every step's commands, status, time and details), summary.md (the same, readable),
validation.json (the GPU validation entries for fastattn.gpu_validation: one per kernel
family for this arch), bench.jsonl (one timing per line), logs/<step>.log.

Without a GPU (or with --dry-run) it is a dry run: it builds every command line, collects
every GPU test module (pytest --collect-only; each must collect > 0 tests), marks each step
"skipped: no GPU", writes the directory and exits 0 (1 if a collection failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = str(Path(__file__).resolve())
CAPS = {"build_cuda": 130, "tests_triton": 150, "tests_cuda": 70, "tests_triton_tma": 45,
        "sanitizer": 90, "int64": 30, "bench": 140}
STEPS = tuple(CAPS)
TEST_MODULES = {"tests_triton": ["tests/gpu/test_gpu_triton.py"],
                "tests_cuda": ["tests/gpu/test_gpu_cuda.py", "tests/test_cuda_backend.py"],
                "tests_triton_tma": ["tests/gpu/test_gpu_triton_tma.py"]}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
FAMILIES = ("triton", "cuda")
# The triton forward's tensor-descriptor variant: validated apart ("triton-tma" entries), run
# only on sm_90+ (TMA hardware), switched on by this env var (backends/triton/ops.py).
TMA_FAMILY, TMA_ENV, TMA_MIN_MAJOR = "triton-tma", "FASTATTN_TRITON_TMA", 9


def tma_arch(env: dict) -> bool:
    """The GPU has TMA (sm_90+)."""
    arch = (env.get("arch") or "").removeprefix("sm_")
    return arch.isdigit() and int(arch) // 10 >= TMA_MIN_MAJOR
BENCH_N = (1024, 2048, 4096, 8192, 16384)
BENCH_D = (64, 128)
NO_GPU = "skipped: no GPU"
PROVIDERS = ("sdpa", "flex", "triton", "triton-tma", "cuda")  # bench.jsonl providers


# --------------------------------------------------------------------------- environment


def _run_text(cmd, timeout=30) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def environment(dry_run: bool) -> dict:
    import torch

    env = dict(python=platform.python_version(), platform=platform.platform(),
               torch=torch.__version__, torch_cuda=torch.version.cuda,
               cpu_count=os.cpu_count(), gpu=None, capability=None, arch=None)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    sys.path.insert(0, str(ROOT / "python_pkg"))
    try:
        import fastattn

        env["fastattn"] = fastattn.__version__
    except Exception as e:  # report, do not stop
        env["fastattn"] = f"import failed: {e}"
    env["git_commit"] = _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    nvcc = shutil.which("nvcc")
    env["nvcc"] = _run_text([nvcc, "--version"]).splitlines()[-2:] if nvcc else None
    env["compute_sanitizer"] = shutil.which("compute-sanitizer")
    smi = shutil.which("nvidia-smi")
    env["driver"] = _run_text([smi, "--query-gpu=driver_version,name,memory.total",
                               "--format=csv,noheader"]) if smi else None
    if torch.cuda.is_available() and not dry_run:
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                   arch=f"sm_{major}{minor}", gpu_count=torch.cuda.device_count(),
                   gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return env


# --------------------------------------------------------------------------- steps


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(cmd, env_add, deadline, log) -> dict:
    """Runs cmd (its own process group, killed at the deadline); output appended to log."""
    env = dict(os.environ, **env_add)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python_pkg"), env.get("PYTHONPATH", "")])
    left = deadline - time.time()
    if left <= 1:
        return dict(cmd=cmd, status="skipped: step time cap reached", seconds=0.0)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=left)
            status = "pass" if rc == 0 else f"FAIL (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            rc, status = None, "TIMEOUT (step time cap)"
    return dict(cmd=cmd, status=status, returncode=rc, seconds=round(time.time() - t0, 1))


def collect(modules) -> tuple[dict, str]:
    """({module: tests collected}, error text) of one pytest --collect-only over modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python_pkg"), env.get("PYTHONPATH", "")])
    r = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *modules], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    counts = {m: 0 for m in modules}
    for line in r.stdout.splitlines():
        path = line.split("::", 1)[0]
        if "::" in line and path in counts:
            counts[path] += 1
    return counts, ("" if r.returncode == 0 else (r.stdout + r.stderr)[-2000:])


def plan(env: dict, out: Path) -> dict:
    """Every step's command lines (with the env vars they add)."""
    arch = (env.get("arch") or "sm_XY").removeprefix("sm_")
    jobs = str(max(1, os.cpu_count() or 1))
    cmds = {}
    cmds["build_cuda"] = [
        ([PY, "setup.py", "-q", "build_ext", "--inplace"],
         {"FASTATTN_BUILD_CUDA": "1", "FASTATTN_CUDA_ARCHS": arch, "MAX_JOBS": jobs}),
        ([PY, "-c", "import sys, fastattn; ok, why = fastattn.available_backends()['cuda']; "
                    "print('cuda backend:', why); sys.exit(0 if ok else 1)"], {}),
    ]
    for step, mods in TEST_MODULES.items():
        cmds[step] = [([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        f"--junitxml={out / (step + '.xml')}", *mods],
                       {TMA_ENV: "1"} if step == "tests_triton_tma" else {})]
    san = shutil.which("compute-sanitizer") or "compute-sanitizer"
    cmds["sanitizer"] = [
        ([san, "--tool", tool, "--error-exitcode", "3", "--target-processes", "all",
          *(["--racecheck-report", "hazard"] if tool == "racecheck" else []),
          PY, SCRIPT, "--worker", "sanitize", "--family", fam],
         {"FASTATTN_TRITON_AUTOTUNE": "0", "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        for fam in FAMILIES + ((TMA_FAMILY,) if tma_arch(env) else ())
        for tool in SANITIZER_TOOLS]
    cmds["int64"] = [([PY, SCRIPT, "--worker", "int64", "--jsonl", str(out / "int64.jsonl")],
                      {"FASTATTN_TRITON_AUTOTUNE": "0"})]
    cmds["bench"] = [([PY, SCRIPT, "--worker", "bench", "--jsonl", str(out / "bench.jsonl"),
                       "--deadline", "{deadline}"], {})]
    return cmds


def run_steps(env, out: Path, dry_run: bool, scale: float, only=None) -> list[dict]:
    cmds = plan(env, out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = []
    collected, collect_err = collect([m for mods in TEST_MODULES.values() for m in mods])
    for name in STEPS:
        cap = round(CAPS[name] * scale)
        step = dict(name=name, cap_s=cap, commands=[dict(cmd=c, env=e) for c, e in cmds[name]])
        if name in TEST_MODULES:
            step["collected"] = {m: collected[m] for m in TEST_MODULES[name]}
            if collect_err:
                step["collect_errors"] = collect_err
        if dry_run:
            step["status"] = NO_GPU
        elif only and name not in only:
            step["status"] = "skipped: not selected (--only)"
        elif name == "tests_triton_tma" and not tma_arch(env):
            step["status"] = f"skipped: TMA needs sm_90+, this GPU is {env.get('arch')}"
        elif name == "sanitizer" and not shutil.which("compute-sanitizer"):
            step["status"] = "skipped: compute-sanitizer not on PATH (CUDA toolkit)"
        elif name == "build_cuda" and not shutil.which("nvcc"):
            step["status"] = "skipped: nvcc not on PATH (CUDA toolkit)"
        else:
            log = out / "logs" / f"{name}.log"
            t0 = time.time()
            deadline = t0 + cap
            print(f"[gpu-check] {name} (cap {cap} s) ...", flush=True)
            runs = []
            for c, e in cmds[name]:
                c = [a.replace("{deadline}", str(deadline)) for a in c]
                runs.append(run_command(c, e, deadline, log))
            step["runs"] = runs
            step["seconds"] = round(time.time() - t0, 1)
            step["log"] = str(log.relative_to(out))
            step["status"] = _step_status(name, runs)
            _step_details(name, step, out)
            print(f"[gpu-check] {name}: {step['status']} ({step['seconds']} s)", flush=True)
        steps.append(step)
    return steps


def _step_status(name, runs) -> str:
    if name == "sanitizer":
        bad = [r for r in runs if r.get("returncode") == 3]
        err = [r for r in runs if r["status"] != "pass" and r.get("returncode") != 3]
        if bad:
            return f"findings ({len(bad)} of {len(runs)} runs)"
        if err:
            return f"FAIL ({len(err)} of {len(runs)} runs did not complete)"
        return "pass"
    if all(r["status"] == "pass" for r in runs):
        return "pass"
    return next(r["status"] for r in runs if r["status"] != "pass")


def _step_details(name, step, out: Path):
    if name in TEST_MODULES:
        xml = out / f"{name}.xml"
        if xml.exists():
            t = xml.read_text()
            m = re.search(r'<testsuite [^>]*errors="(\d+)" failures="(\d+)" skipped="(\d+)" '
                          r'tests="(\d+)"', t)
            if m:
                e, f, s, n = map(int, m.groups())
                step["tests"] = dict(total=n, passed=n - e - f - s, failed=f + e, skipped=s)
    if name == "sanitizer":
        step["per_family"] = {}
        for fam in FAMILIES + (TMA_FAMILY,):
            runs = [r for r in step["runs"] if fam == r["cmd"][-1]]
            if fam == TMA_FAMILY and not runs:
                continue  # not an sm_90+ GPU
            if any(r.get("returncode") == 3 for r in runs):
                step["per_family"][fam] = "findings"
            elif runs and all(r["status"] == "pass" for r in runs):
                step["per_family"][fam] = "clean"
            else:
                step["per_family"][fam] = "not run: " + ", ".join(
                    sorted({r["status"] for r in runs if r["status"] != "pass"}) or ["no runs"])
    if name in ("int64", "bench"):
        path = out / f"{name}.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        step["rows"] = len(rows)
        if name == "int64":
            step["probes"] = rows


# --------------------------------------------------------------------------- validation


def faster_classes(rows, family) -> list[str]:
    """Problem classes (fastattn.gpu_validation) where `family` was at least as fast as torch
    SDPA at every length both ran (at least 3 lengths)."""
    out = []
    for mode, tag in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
        for d in BENCH_D:
            for causal in (False, True):
                sel = [r for r in rows if r.get("mode") == mode and r.get("D") == d
                       and r.get("causal") == causal and r.get("ms")]
                fam = {r["N"]: r["ms"] for r in sel if r["provider"] == family}
                ref = {r["N"]: r["ms"] for r in sel if r["provider"] == "sdpa"}
                both = sorted(set(fam) & set(ref))
                if len(both) >= 3 and all(fam[n] <= ref[n] for n in both):
                    out.append(f"{tag}/d{d}/{'causal' if causal else 'dense'}")
    return out


def validation_entries(env, steps, out: Path) -> list[dict]:
    if not env.get("arch"):
        return []
    by = {s["name"]: s for s in steps}
    bench = out / "bench.jsonl"
    rows = [json.loads(x) for x in bench.read_text().splitlines()] if bench.exists() else []
    san = by["sanitizer"].get("per_family", {})
    entries = []
    for fam in FAMILIES:
        tests = by[f"tests_{fam}"]
        correct = tests["status"] == "pass" and tests.get("tests", {}).get("passed", 0) > 0
        if fam == "cuda":
            correct = correct and by["build_cuda"]["status"] == "pass"
        sanitizer = san.get(fam) or f"not run: {by['sanitizer']['status']}"
        entries.append(dict(backend=fam, arch=env["arch"], gpu=env.get("gpu") or "",
                            correct=correct, sanitizer=sanitizer,
                            faster=faster_classes(rows, fam),
                            recorded=datetime.datetime.now(datetime.timezone.utc)
                            .isoformat(timespec="seconds"),
                            source=f"make gpu-check: {out.name}"))
    if tma_arch(env):  # the TMA forward: its own tests, sanitizer runs and timings
        tests = by["tests_triton_tma"]
        correct = tests["status"] == "pass" and tests.get("tests", {}).get("passed", 0) > 0
        entries.append(dict(backend=TMA_FAMILY, arch=env["arch"], gpu=env.get("gpu") or "",
                            correct=correct,
                            sanitizer=san.get(TMA_FAMILY)
                            or f"not run: {by['sanitizer']['status']}",
                            faster=faster_classes(rows, TMA_FAMILY),
                            recorded=datetime.datetime.now(datetime.timezone.utc)
                            .isoformat(timespec="seconds"),
                            source=f"make gpu-check: {out.name}"))
    return entries


def record(results_dir: Path, table: Path) -> int:
    """Merges results_dir/validation.json into the table file (replacing the same
    (backend, arch) entries)."""
    new = json.loads((results_dir / "validation.json").read_text()).get("entries", [])
    data = json.loads(table.read_text()) if table.exists() else {"entries": []}
    keep = [e for e in data.get("entries", [])
            if (e["backend"], e["arch"]) not in {(n["backend"], n["arch"]) for n in new}]
    data["entries"] = keep + new
    table.write_text(json.dumps(data, indent=2) + "\n")
    print(f"recorded {len(new)} entries from {results_dir} into {table}")
    for e in new:
        print(f"  {e['backend']} {e['arch']}: correct={e['correct']} sanitizer={e['sanitizer']} "
              f"faster={e['faster']}")
    return 0


# --------------------------------------------------------------------------- report


def write_results(out: Path, env, steps, validation, dry_run, t0) -> None:
    results = dict(kind="fastattn gpu-check", dry_run=dry_run, seconds=round(time.time() - t0, 1),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   environment=env, steps=steps, validation=validation)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "versions.json").write_text(json.dumps(env, indent=1))
    (out / "validation.json").write_text(json.dumps(dict(
        about="GPU validation entries of this run; `python benchmarks/gpu_check.py --record "
              "DIR` merges them into python_pkg/fastattn/data/gpu_validation.json",
        entries=validation), indent=1))
    lines = [f"# fastattn gpu-check{' (dry run: no GPU)' if dry_run else ''}", "",
             f"- date: {results['date']}, {results['seconds']} s",
             f"- GPU: {env.get('gpu') or 'none'} ({env.get('arch') or '-'}), driver "
             f"{env.get('driver') or '-'}",
             f"- torch {env['torch']} (CUDA {env['torch_cuda']}), triton {env.get('triton')}, "
             f"fastattn {env.get('fastattn')} ({env.get('git_commit')}), python {env['python']}",
             f"- nvcc: {' '.join(env['nvcc']) if env.get('nvcc') else 'not found'}; "
             f"compute-sanitizer: {env.get('compute_sanitizer') or 'not found'}", "",
             "| step | cap (s) | status | time (s) | details |", "|---|---|---|---|---|"]
    for s in steps:
        det = []
        if "collected" in s:
            det.append("collected " + ", ".join(f"{Path(m).name} {n}" for m, n in
                                                s["collected"].items()))
        if "tests" in s:
            t = s["tests"]
            det.append(f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
        if "per_family" in s:
            det.append(", ".join(f"{k} {v}" for k, v in s["per_family"].items()))
        if "rows" in s:
            det.append(f"{s['rows']} rows")
        lines.append(f"| {s['name']} | {s['cap_s']} | {s['status']} | {s.get('seconds', '-')} | "
                     f"{'; '.join(det)} |")
    lines += ["", "## Commands", ""]
    for s in steps:
        for c in s["commands"]:
            envs = " ".join(f"{k}={v}" for k, v in c["env"].items())
            lines.append(f"- {s['name']}: `{(envs + ' ') if envs else ''}{' '.join(c['cmd'])}`")
    probes = next((s.get("probes") for s in steps if s["name"] == "int64"), None)
    if probes:
        lines += ["", "## int64 probes", "", "| probe | family | status | detail |",
                  "|---|---|---|---|"]
        lines += [f"| {p['probe']} | {p['family']} | {p['status']} | {p.get('detail', '')} |"
                  for p in probes]
    bench = out / "bench.jsonl"
    if bench.exists():
        rows = [json.loads(x) for x in bench.read_text().splitlines()]
        lines += ["", "## TFLOP/s (bf16)", "",
                  "| mode | D | causal | N | " + " | ".join(PROVIDERS)
                  + " |", "|---|---|---|---|" + "---|" * len(PROVIDERS)]
        keys = sorted({(r["mode"], r["D"], r["causal"], r["N"]) for r in rows})
        for key in keys:
            cell = {r["provider"]: (f"{r['tflops']:.1f}" if r.get("tflops") else r["status"])
                    for r in rows if (r["mode"], r["D"], r["causal"], r["N"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(
                cell.get(p, "-") for p in PROVIDERS) + " |")
    lines += ["", "## Validation entries (validation.json)", ""]
    if validation:
        for e in validation:
            lines.append(f"- {e['backend']} {e['arch']}: correct={e['correct']}, sanitizer="
                         f"{e['sanitizer']}, at least as fast as SDPA for: "
                         f"{', '.join(e['faster']) or 'none'}")
        lines.append(f"\nRecord them: `python benchmarks/gpu_check.py --record {out}`")
    else:
        lines.append("none (no GPU)")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- workers (GPU)


def _worker_sanitize(family: str) -> int:
    import torch

    import fastattn

    if family == TMA_FAMILY:  # the triton family with the TMA forward requested
        os.environ[TMA_ENV] = "1"
        family = "triton"

    q, k, v = (torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    out = fastattn.attention(q, k, v, causal=True, backend=family)
    out.backward(torch.randn_like(out))
    if family == "cuda":  # and the FlashAttention-2 class backward (atomic dQ)
        out = fastattn.attention(q, k, v, causal=True, backend=family, deterministic=False)
        out.backward(torch.randn_like(out))
    if family in ("triton", "cuda"):
        with torch.no_grad():
            kc, vc = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.float16)
                      for _ in range(2))
            for splits in (1, 3):
                fastattn.decode_attention(q[:, :, :2].detach().repeat(2, 1, 1, 1), kc, vc,
                                          cache_seqlens=torch.tensor([300, 77], device="cuda"),
                                          backend=family, num_splits=splits)
    torch.cuda.synchronize()
    print(f"sanitize {family}: ran")
    return 0


def _emit(path, row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _worker_int64(jsonl: str) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import fastattn
    from fastattn.backends.reference import reference_attention
    from oracle import assert_by_rule

    bf16 = torch.bfloat16
    failed = False

    def free_gb():
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0] / 2**30

    # a (B, N, H, D) tensor viewed as (B, H, N, D): row stride H * D, N * H * D > 2^31
    H, D, W = 16, 128, 127
    N = (1 << 31) // (H * D) + 256
    for fam in FAMILIES:
        row = dict(probe=f"strided view (1, {N}, {H}, {D}) bf16, {N * H * D} elements", family=fam)
        need = 5 * N * H * D * 2 / 2**30 + 1
        if free_gb() < need:
            _emit(jsonl, dict(row, status=f"skipped: needs ~{need:.0f} GB free GPU memory"))
            continue
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=bf16, generator=g)
                       .transpose(1, 2) for _ in range(3))
            with torch.no_grad():
                out = fastattn.attention(q, k, v, window=(W, 0), backend=fam)
                # the last rows (largest offsets) against the oracle on their window's slice
                sl = (slice(None), slice(None), slice(N - 64, N))
                kv = (slice(None), slice(None), slice(N - 64 - W, N))
                ref, _ = reference_attention(q[sl].double(), k[kv].double(), v[kv].double(),
                                             scale=D ** -0.5, window=(W, 0))
                low, _ = reference_attention(q[sl], k[kv], v[kv], scale=D ** -0.5,
                                             window=(W, 0), compute_dtype=bf16)
                assert_by_rule("out", out[sl], ref, low, bf16)
            _emit(jsonl, dict(row, status="pass"))
        except Exception as e:
            failed = True
            _emit(jsonl, dict(row, status="FAIL", detail=f"{type(e).__name__}: {e}"[:500]))
        finally:
            q = k = v = out = None

    # a KV cache of >= 2^31 elements per tensor: batch 2 starts at 2 * 2^30 elements
    B, Hkv, Nc, Hq = 3, 8, 1 << 20, 32
    row = dict(probe=f"KV cache ({B}, {Hkv}, {Nc}, {D}) bf16, {B * Hkv * Nc * D} elements",
               family="triton")
    need = 2 * B * Hkv * Nc * D * 2 / 2**30 + 1
    if free_gb() < need:
        _emit(jsonl, dict(row, status=f"skipped: needs ~{need:.0f} GB free GPU memory"))
    else:
        try:
            kc = torch.empty(B, Hkv, Nc, D, device="cuda", dtype=bf16).normal_()
            vc = torch.empty(B, Hkv, Nc, D, device="cuda", dtype=bf16).normal_()
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=bf16)
            L = 1000
            sl = torch.full((B,), L, dtype=torch.int32, device="cuda")
            with torch.no_grad():
                out = fastattn.decode_attention(q, kc, vc, cache_seqlens=sl, backend="triton")
                ref = fastattn.decode_attention(q[2:].double(), kc[2:, :, :L].double(),
                                                vc[2:, :, :L].double(), backend="reference")
                low = fastattn.decode_attention(q[2:], kc[2:, :, :L], vc[2:, :, :L],
                                                backend="reference")
            assert_by_rule("out", out[2:], ref, low, bf16)
            _emit(jsonl, dict(row, status="pass"))
        except Exception as e:
            failed = True
            _emit(jsonl, dict(row, status="FAIL", detail=f"{type(e).__name__}: {e}"[:500]))
    return 1 if failed else 0


def _worker_bench(jsonl: str, deadline: float) -> int:
    import torch
    import torch.nn.functional as F
    import triton.testing

    import fastattn
    from fastattn.bench.spec import attention_flops

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # an older torch
        flex, flex_why = None, f"skipped: FlexAttention unavailable ({e})"
    cuda_ok, cuda_why = fastattn.available_backends()["cuda"]
    major, _ = torch.cuda.get_device_capability()
    tma_ok = major >= TMA_MIN_MAJOR

    def with_tma(fn):  # the triton backend with its TMA forward requested (read per call)
        def run():
            old = os.environ.get(TMA_ENV)
            os.environ[TMA_ENV] = "1"
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop(TMA_ENV, None)
                else:
                    os.environ[TMA_ENV] = old
        return run

    bf16 = torch.bfloat16
    # the most telling comparisons first, so a time cap still leaves them
    order = [(d, c, n) for d in (128, 64) for c in (True, False) for n in BENCH_N]
    for d, causal, N in order:
        B, H = max(1, 16384 // N), 2048 // d
        shape = dict(B=B, H=H, N=N, D=d, causal=causal, dtype="bfloat16")
        q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=bf16, requires_grad=True)
                   for _ in range(3))
        bm = None
        if flex is not None and causal:
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N)
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
               "flex": (lambda: flex(q, k, v, block_mask=bm)) if flex is not None else None,
               "triton": lambda: fastattn.attention(q, k, v, causal=causal, backend="triton"),
               "triton-tma": with_tma(lambda: fastattn.attention(q, k, v, causal=causal,
                                                                 backend="triton"))
               if tma_ok else None,
               "cuda": (lambda: fastattn.attention(q, k, v, causal=causal, backend="cuda"))
               if cuda_ok else None}
        for provider, fn in fns.items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(provider=provider, mode=mode, **shape)
                if time.time() > deadline - 5:
                    _emit(jsonl, dict(row, status="skipped: time cap"))
                    continue
                if fn is None:
                    why = (flex_why if provider == "flex" else
                           "skipped: TMA needs sm_90+" if provider == "triton-tma" else
                           f"skipped: {cuda_why}")
                    _emit(jsonl, dict(row, status=why))
                    continue
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = triton.testing.do_bench(fn, warmup=10, rep=40)
                    else:
                        do = torch.randn(B, H, N, d, device="cuda", dtype=bf16)
                        ms = triton.testing.do_bench(lambda: fn().backward(do), warmup=10, rep=40,
                                                     grad_to_none=[q, k, v])
                    fl = attention_flops(B, H, N, N, d, mode, causal=causal)
                    _emit(jsonl, dict(row, status="ok", ms=ms, tflops=fl / (ms * 1e-3) / 1e12))
                except Exception as e:
                    _emit(jsonl, dict(row, status=f"FAIL: {type(e).__name__}: {e}"[:300]))
        del q, k, v
        torch.cuda.empty_cache()
    return 0


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results directory (default gpu_check_results/<time>_<gpu>)")
    ap.add_argument("--dry-run", action="store_true", help="behave as on a machine without GPU")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every step's time cap")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--record", metavar="DIR",
                    help="merge DIR/validation.json into the GPU validation table and exit")
    ap.add_argument("--table", default=str(ROOT / "python_pkg/fastattn/data/gpu_validation.json"),
                    help="the table --record writes (default: the package's)")
    ap.add_argument("--worker", choices=("sanitize", "int64", "bench"), help=argparse.SUPPRESS)
    ap.add_argument("--family", choices=FAMILIES + (TMA_FAMILY,), help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.record:
        return record(Path(args.record), Path(args.table))
    if args.worker == "sanitize":
        return _worker_sanitize(args.family)
    if args.worker == "int64":
        return _worker_int64(args.jsonl)
    if args.worker == "bench":
        return _worker_bench(args.jsonl, args.deadline or time.time() + 600)

    t0 = time.time()
    import torch

    dry_run = args.dry_run or not torch.cuda.is_available()
    env = environment(dry_run)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "no-gpu").strip("-")
    out = Path(args.out or ROOT / "gpu_check_results" / f"{stamp}_{gpu}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    for f in ("bench.jsonl", "int64.jsonl"):
        (out / f).unlink(missing_ok=True)
    print(f"[gpu-check] {'dry run (no GPU)' if dry_run else env['gpu'] + ' ' + env['arch']}; "
          f"results in {out}", flush=True)
    steps = run_steps(env, out, dry_run, args.budget_scale, args.only)
    validation = [] if dry_run else validation_entries(env, steps, out)
    write_results(out, env, steps, validation, dry_run, t0)
    print((out / "summary.md").read_text().split("## Commands")[0].rstrip())
    bad_collect = [(s["name"], m) for s in steps for m, n in s.get("collected", {}).items()
                   if n == 0]
    if bad_collect:
        print(f"[gpu-check] collected no tests from {bad_collect}", file=sys.stderr)
        return 1
    if dry_run:
        return 0
    return 0 if all(s["status"] == "pass" or s["status"].startswith("skipped")
                    for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
