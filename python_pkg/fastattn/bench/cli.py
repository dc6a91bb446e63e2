"""`fastattn bench` / `python -m fastattn.bench`: arguments, progress, outputs."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shlex
import sys
import time

from .spec import (
    BACKEND_ORDER,
    DTYPES,
    MODES,
    Config,
    GiB,
    SweepSpec,
    default_mem_budget,
    machine_info,
    pow2_range,
    preset,
    versions,
)

HELP = "sweep sequence lengths x backends x patterns x modes; time, TFLOP/s, memory, plots"


def parse_n(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def parse_seqlens(text: str) -> tuple[int, ...]:
    """"1k,4k,16k" or a power-of-two range "512-64k"."""
    if "-" in text and "," not in text:
        lo, hi = (parse_n(x) for x in text.split("-", 1))
        return pow2_range(lo, hi)
    return tuple(parse_n(x) for x in text.split(",") if x.strip())


def _csv(choices=None, conv=str):
    def parse(text):
        vals = tuple(conv(x.strip()) for x in text.split(",") if x.strip())
        if choices is not None:
            bad = [v for v in vals if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"{', '.join(map(str, bad))} not in {', '.join(map(str, choices))}")
        return vals
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .patterns import PATTERNS

    g = p.add_argument_group("grid (defaults come from the preset)")
    g.add_argument("--quick", action="store_const", dest="preset", const="quick",
                   help="the README's main job: naive vs fused vs sparse, N 1k..16k, < 3 min")
    g.add_argument("--preset", choices=("quick", "full", "tiny"), default=None,
                   help="named grid: quick, full (the recorded CPU sweep), tiny (tests)")
    g.add_argument("--backends", type=_csv(BACKEND_ORDER),
                   help=f"comma list of {','.join(BACKEND_ORDER)} (reference = naive; flex = "
                        "torch.compile(flex_attention)); default: all, unavailable ones skipped")
    g.add_argument("--patterns", type=_csv(PATTERNS), help=f"comma list of {','.join(PATTERNS)}")
    g.add_argument("--modes", type=_csv(MODES), help="comma list of fwd,bwd,fwd+bwd")
    g.add_argument("--seqlens", type=parse_seqlens,
                   help="'1k,4k,16k' or a power-of-two range '512-64k'")
    g.add_argument("--batch", type=_csv(conv=int), help="batch sizes, e.g. 1,4")
    g.add_argument("--heads", type=_csv(conv=int), help="head counts, e.g. 2,8")
    g.add_argument("--head-dims", type=_csv(conv=int), help="head dims, e.g. 64,128")
    g.add_argument("--dtypes", type=_csv(tuple(DTYPES)), help="comma list of fp32,bf16,fp16")
    g.add_argument("--device", default=None, help="cpu (default) or cuda")
    g.add_argument("--max-dense-n", type=parse_n, help="cap N for dense-cost patterns")
    g.add_argument("--max-sparse-n", type=parse_n, help="cap N for sparse patterns")
    lim = p.add_argument_group("limits and timing")
    lim.add_argument("--mem-budget-gb", type=float,
                     help="skip cases predicted to need more (default: half the available RAM)")
    lim.add_argument("--case-timeout", type=float, help="seconds before a case is killed")
    lim.add_argument("--case-budget", type=float,
                     help="skip a case whose time, extrapolated from the previous N, exceeds this")
    lim.add_argument("--warmup", type=int, help="warm-up calls per case")
    lim.add_argument("--min-reps", type=int)
    lim.add_argument("--max-reps", type=int)
    lim.add_argument("--target-time", type=float, help="seconds of timed calls per case")
    lim.add_argument("--threads", type=int, help="torch threads in the worker (default: all)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="output directory (default: bench_results/<UTC timestamp>)")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--from-json", metavar="PATH",
                     help="re-render table, results.md and plots from a results.json")
    out.add_argument("--dry-run", action="store_true",
                     help="list the cases and predicted skips without running anything")


def add_subparser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def spec_from_args(args) -> SweepSpec:
    kw = preset(args.preset) if args.preset else preset("quick")
    kw = dict(kw)
    for name in ("backends", "patterns", "modes", "seqlens"):
        if getattr(args, name, None):
            kw[name] = getattr(args, name)
    base = kw.get("configs", (Config(),))[0]
    if any(getattr(args, n, None) for n in ("batch", "heads", "head_dims", "dtypes")):
        kw["configs"] = tuple(
            Config(B, H, D, dt_)
            for dt_ in (args.dtypes or (base.dtype,))
            for D in (args.head_dims or (base.D,))
            for H in (args.heads or (base.H,))
            for B in (args.batch or (base.B,)))
    simple = {"device": "device", "max_dense_n": "max_dense_n", "max_sparse_n": "max_sparse_n",
              "case_timeout": "case_timeout", "case_budget": "case_budget", "warmup": "warmup",
              "min_reps": "min_reps", "max_reps": "max_reps", "target_time": "target_time",
              "threads": "threads"}
    for a, f in simple.items():
        if getattr(args, a, None) is not None:
            kw[f] = getattr(args, a)
    kw["mem_budget"] = (int(args.mem_budget_gb * GiB) if args.mem_budget_gb
                        else default_mem_budget())
    return SweepSpec(**kw)


def _spec_dict(spec: SweepSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["configs"] = [c.label() for c in spec.configs]
    return d


def run(args) -> int:
    from rich.console import Console

    from . import report
    from .runner import Sweep

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: keep the table on one line per row
    if args.from_json:
        return _rerender(args, console)
    spec = spec_from_args(args)
    sweep = Sweep(spec)
    cases = spec.cases()
    if args.dry_run:
        console.print(f"{len(cases)} cases in {len(sweep.groups())} groups; backends: "
                      + ", ".join(f"{b}={'yes' if ok else 'no (' + why + ')'}"
                                  for b, (ok, why) in sweep.avail.items()), highlight=False)
        return 0
    out = args.out or os.path.join(
        "bench_results", dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    meta = {"command": command_line(args),
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "versions": versions(), "spec": _spec_dict(spec),
            "method": METHOD}
    t0 = time.time()
    results = _run_with_progress(sweep, len(cases), console, not args.no_progress)
    meta["elapsed_s"] = round(time.time() - t0, 1)
    meta["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report.print_table(results, console)
    report.write_csv(os.path.join(out, "results.csv"), results, meta)
    report.write_json(os.path.join(out, "results.json"), results, meta)
    paths = [] if args.no_plots else report.plot(results, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_record(results, meta, paths, out))
    n_ok = sum(r.ok for r in results)
    console.print(f"{n_ok}/{len(results)} cases measured in {meta['elapsed_s']:.0f} s; "
                  f"wrote {out}/results.{{csv,json,md}}"
                  + (f" and {len(paths)} plots" if paths else ""), highlight=False)
    return 0


def _run_with_progress(sweep, total, console, show) -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not show or not console.is_terminal:
        # Logs (CI, pipes): one line per finished case instead of a live bar; a skip is said
        # once per (backend, reason) -- "triton unavailable" needs saying once, not per case.
        state = {"n": 0, "said": set(), "quiet": 0}

        def on_result(r):
            state["n"] += 1
            if not show:
                return
            if r.status == "skipped":
                key = (r.case.backend, r.reason)
                if key in state["said"]:
                    state["quiet"] += 1
                    return
                state["said"].add(key)
                print(f"[{state['n']}/{total}] {r.case.backend}: skipped: {r.reason} "
                      f"(said once; every {r.case.backend} case it applies to is skipped)",
                      flush=True)
                return
            st = f"{r.time_s * 1e3:.2f} ms" if r.ok else f"{r.status}: {r.reason[:70]}"
            print(f"[{state['n']}/{total}] {r.case.label()}: {st}", flush=True)

        sweep.on_result = on_result
        results = sweep.run()
        if show and state["quiet"]:
            print(f"({state['quiet']} more cases skipped for the reasons above)", flush=True)
        return results
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[phase]}"),
                  console=console, transient=False) as prog:
        task = prog.add_task("bench", total=total, phase="")
        sweep.on_group = lambda desc: prog.update(task, description=desc)
        sweep.on_phase = lambda text: prog.update(task, phase=text)
        sweep.on_result = lambda r: prog.advance(task)
        return sweep.run()


METHOD = {
    "timing": "warm-up call(s), then the median of repetitions interleaved round-robin across "
              "the backends of a group (same pattern, mode, N, config; inputs shared); "
              "perf_counter on CPU, CUDA events on GPU",
    "flops": "4*B*H*Nq*Nk*D forward, x2.5 backward, x3.5 forward+backward; masked patterns "
             "count only the visible (query, key) pairs (density * N^2), the same for every "
             "backend",
    "memory": "peak extra resident memory of one call above the memory in use just before it "
              "(inputs, masks and for bwd the forward graph already allocated), in a child "
              "process with MALLOC_MMAP_THRESHOLD_=65536 and VmHWM reset via "
              "/proc/self/clear_refs; torch.cuda.max_memory_allocated on GPU",
    "skips": "predicted before running: backend unavailable, flex backward on CPU, memory "
             "over budget (naive N^2 scores, SDPA's dense mask, create_block_mask's N^2 "
             "evaluation), time extrapolated from the previous N over the case budget; a "
             "call past the case time limit is killed with its worker process",
}


def markdown_record(results, meta, plot_paths, out) -> str:
    from . import report

    m, v, s = meta["machine"], meta["versions"], meta["spec"]
    lines = [
        "# fastattn bench", "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['timestamp']}; elapsed {meta.get('elapsed_s', '?')} s",
        f"- machine: {m['cpu']}, {m['cpu_count']} cores, {m['ram_gib']} GiB RAM, "
        f"benchmark threads {s['threads']}, load average (1/5/15 min) at start / end "
        f"{_load(m.get('loadavg_start'))} / {_load(m.get('loadavg_end'))}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        f"- versions: fastattn {v['fastattn']}, torch {v['torch']}, triton {v['triton']}",
        f"- grid: patterns {', '.join(s['patterns'])}; modes {', '.join(s['modes'])}; "
        f"N {', '.join(str(n) for n in s['seqlens'])} (dense-cost patterns up to "
        f"{s['max_dense_n']}, sparse up to {s['max_sparse_n']}); configs "
        f"{'; '.join(s['configs'])}; device {s['device']}",
        f"- limits: memory budget {s['mem_budget'] / GiB:.1f} GiB, case time limit "
        f"{s['case_timeout']} s, case budget {s['case_budget']} s, reps "
        f"{s['min_reps']}..{s['max_reps']} (target {s['target_time']} s), warm-up {s['warmup']}",
        "", "## Method", "",
    ]
    lines += [f"- {k}: {t}" for k, t in meta["method"].items()]
    lines += ["", "## Headline", "", report.markdown_headline(results), ""]
    if plot_paths:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plot_paths]
        lines.append("")
    lines += ["## All cases", "",
              "cell: median time, useful GFLOP/s (visible pairs only), peak extra memory", "",
              report.markdown_table(results), ""]
    return "\n".join(lines)


def _rerender(args, console) -> int:
    from . import report

    results, meta = report.load_json(args.from_json)
    out = args.out or os.path.dirname(os.path.abspath(args.from_json))
    os.makedirs(out, exist_ok=True)
    report.print_table(results, console)
    paths = [] if args.no_plots else report.plot(results, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_record(results, meta, paths, out))
    console.print(f"re-rendered {len(results)} cases into {out}", highlight=False)
    return 0


def command_line(args) -> str:
    """The command as a user would retype it."""
    argv = getattr(args, "_argv", None)
    if argv is not None:  # main(argv): python -m fastattn.bench or a script calling main
        return shlex.join(["python", "-m", "fastattn.bench", *argv])
    if os.path.basename(sys.argv[0]) == "fastattn":
        return shlex.join(["fastattn", *sys.argv[1:]])
    if sys.argv[0].endswith(os.path.join("fastattn", "__main__.py")):
        return shlex.join(["python", "-m", "fastattn", *sys.argv[1:]])
    return shlex.join(sys.argv)


def _load(x):
    return "?" if not x else "/".join(f"{a:.1f}" for a in x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.bench", description=HELP)
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args._argv = argv
    return run(args)
