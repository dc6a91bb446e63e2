"""Sweep output: long-format rows (CSV/JSON), the terminal table (rich), log-log plots, and
the markdown record of benchmarks/results/.

One row per (kernel, backend, pattern, mode, metric, N, config, device), Liger-Kernel style;
a case that did not run has one row per metric with an empty value, its status and reason.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

from .spec import BACKEND_LABEL, BACKEND_ORDER, fmt_bytes

KERNEL = "attention"
METRICS = ("time_ms", "tflops", "peak_mem_mib", "speedup_vs_naive", "speedup_vs_sdpa")
CSV_FIELDS = ("kernel", "backend", "provider", "pattern", "mode", "metric", "x_name", "N",
              "value", "status", "reason", "config", "B", "H", "D", "dtype", "device",
              "density", "visited_blocks", "flops", "reps", "time_min_ms", "time_max_ms",
              "timestamp", "device_name", "fastattn", "torch", "triton", "command")
FUSED = ("cpu", "triton", "cuda")


def _metric_value(r, metric):
    if metric == "time_ms":
        return None if r.time_s is None or not r.ok else r.time_s * 1e3
    if metric == "tflops":
        return r.tflops
    if metric == "peak_mem_mib":
        return None if r.mem_bytes is None or not r.ok else r.mem_bytes / (1 << 20)
    return getattr(r, metric)


def rows(results, meta) -> list[dict]:
    out = []
    v = meta["versions"]
    dev_name = meta["machine"].get("gpu") or meta["machine"].get("cpu")
    for r in results:
        c, cfg = r.case, r.case.config
        for metric in METRICS:
            val = _metric_value(r, metric)
            out.append({
                "kernel": KERNEL, "backend": c.backend, "provider": BACKEND_LABEL[c.backend],
                "pattern": c.pattern, "mode": c.mode, "metric": metric, "x_name": "N",
                "N": c.N, "value": None if val is None else round(float(val), 6),
                "status": r.status, "reason": r.reason, "config": cfg.label(), "B": cfg.B,
                "H": cfg.H, "D": cfg.D, "dtype": cfg.dtype, "device": c.device,
                "density": None if r.density is None else round(r.density, 6),
                "visited_blocks": r.visited_blocks, "flops": r.flops, "reps": len(r.times),
                "time_min_ms": round(min(r.times) * 1e3, 4) if r.times else None,
                "time_max_ms": round(max(r.times) * 1e3, 4) if r.times else None,
                "timestamp": meta["timestamp"], "device_name": dev_name,
                "fastattn": v["fastattn"], "torch": v["torch"], "triton": v["triton"],
                "command": meta["command"],
            })
    return out


def write_csv(path, results, meta):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows(results, meta):
            w.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})


def write_json(path, results, meta):
    doc = {"meta": meta, "rows": rows(results, meta),
           "cases": [{**r.case.to_dict(), "status": r.status, "reason": r.reason,
                      "times_s": r.times, "mem_bytes": r.mem_bytes} for r in results]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


# ---------------------------------------------------------------------------- table
def _cell(r, notes: dict) -> str:
    if r is None:
        return ""
    if r.ok:
        t = r.time_s * 1e3
        ts = f"{t:.0f}" if t >= 100 else f"{t:.1f}" if t >= 1 else f"{t:.2f}"
        tf = f"{r.tflops * 1e3:.1f}" if r.tflops is not None else "-"
        return f"{ts}ms {tf}GF {fmt_bytes(r.mem_bytes).replace(' ', '')}"
    key = f"{r.status}: {r.reason}"
    if key not in notes:
        notes[key] = len(notes) + 1
    return f"{'skip' if r.status == 'skipped' else r.status}[{notes[key]}]"


def _by_group(results):
    groups = defaultdict(dict)
    for r in results:
        groups[r.case.group_key][r.case.backend] = r
    return groups


def _best_fused(row: dict):
    ok = [row[b] for b in FUSED if b in row and row[b].ok]
    return min(ok, key=lambda r: r.time_s) if ok else None


def unavailable(results) -> dict:
    """{backend: reason} for backends skipped as unavailable in every case."""
    out = {}
    for b in BACKEND_ORDER:
        rs = [r for r in results if r.case.backend == b]
        if rs and all(r.status == "skipped" and " unavailable: " in r.reason for r in rs):
            out[b] = rs[0].reason.split(" unavailable: ", 1)[1]
    return out


def table_data(results):
    """(header, rows, notes) of the summary table; shared by rich and markdown. Backends
    unavailable on this machine get no column (see unavailable())."""
    gone = unavailable(results)
    backends = [b for b in BACKEND_ORDER
                if b not in gone and any(r.case.backend == b for r in results)]
    multi = len({r.case.config for r in results}) > 1
    header = ["pattern", "mode", "N"] + (["config"] if multi else []) + ["density"]
    header += [BACKEND_LABEL[b] for b in backends] + ["vs naive", "vs sdpa"]
    notes: dict = {}
    body = []
    for key, row in _by_group(results).items():
        pattern, mode, N, cfg, _dev = key
        any_r = next(iter(row.values()))
        dens = f"{any_r.density:.3g}" if any_r.density is not None else "-"
        cells = [pattern, mode, _n_label(N)] + ([cfg.label()] if multi else []) + [dens]
        cells += [_cell(row.get(b), notes) for b in backends]
        best = _best_fused(row)
        sn = f"{best.speedup_vs_naive:.1f}x" if best and best.speedup_vs_naive else "-"
        ss = f"{best.speedup_vs_sdpa:.2f}x" if best and best.speedup_vs_sdpa else "-"
        body.append(cells + [sn, ss])
    return header, body, notes


def _n_label(N: int) -> str:
    if N >= 1 << 20 and N % (1 << 20) == 0:
        return f"{N >> 20}M"
    if N >= 1024 and N % 1024 == 0:
        return f"{N >> 10}k"
    return str(N)


def print_table(results, console=None, title="fastattn bench"):
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, body, notes = table_data(results)
    cfgs = sorted({r.case.config.label() for r in results})
    if len(cfgs) == 1:
        title = f"{title} ({cfgs[0]}, {results[0].case.device})"
    t = Table(title=title, caption="cell: median time, useful GFLOP/s (visible pairs), peak "
              "extra memory; vs: best fastattn kernel's speedup")
    for h in header:
        t.add_column(h, justify="left" if h in ("pattern", "mode", "config") else "right",
                     overflow="fold")
    for cells in body:
        t.add_row(*cells)
    console.print(t)
    for text, i in notes.items():
        console.print(f"[{i}] {text}", highlight=False, soft_wrap=True)
    for b, why in unavailable(results).items():
        console.print(f"not run: {b}: {why}", highlight=False, soft_wrap=True)


def markdown_table(results) -> str:
    header, body, notes = table_data(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if notes:
        lines.append("")
        lines += [f"[{i}] {text.replace('|', '/')}  " for text, i in notes.items()]
    gone = unavailable(results)
    if gone:
        lines.append("")
        lines += [f"not run: {b}: {why}  " for b, why in gone.items()]
    return "\n".join(lines)


def headline(results) -> list[dict]:
    """Per (pattern, mode): the largest N where fastattn ran, with naive/sdpa there (or their
    skip reason) and the largest N naive reached."""
    out = {}
    for key, row in _by_group(results).items():
        pattern, mode, N, cfg, _dev = key
        best = _best_fused(row)
        if best is None:
            continue
        cur = out.get((pattern, mode, cfg))
        if cur is None or N >= cur["N"]:
            out[(pattern, mode, cfg)] = {"pattern": pattern, "mode": mode, "N": N,
                                         "config": cfg.label(), "best": best, "row": row}
    naive_max = defaultdict(int)
    for r in results:
        if r.case.backend == "reference" and r.ok:
            k = (r.case.pattern, r.case.mode, r.case.config)
            naive_max[k] = max(naive_max[k], r.case.N)
    groups = _by_group(results)
    for k, h in out.items():
        h["naive_max_N"] = naive_max.get(k, 0)
        # fastattn's speedup over naive at the largest N where both ran
        h["vs_naive_at_max"] = None
        if h["naive_max_N"]:
            row = groups[(k[0], k[1], h["naive_max_N"], k[2], h["best"].case.device)]
            best = _best_fused(row)
            if best is not None:
                h["vs_naive_at_max"] = best.speedup_vs_naive
    return list(out.values())


def markdown_headline(results) -> str:
    """Per (pattern, mode), at the largest N fastattn ran: its time and the peers' (or why
    they did not run); the speedup over naive is taken at the largest N naive reached."""
    lines = ["| pattern | mode | N | fastattn | sdpa | flex | naive | vs sdpa | "
             "vs naive (at N) |", "|---|---|---|---|---|---|---|---|---|"]

    def t(r):
        if r is None:
            return "-"
        if r.ok:
            return f"{r.time_s * 1e3:.0f} ms" if r.time_s >= 0.1 else f"{r.time_s * 1e3:.1f} ms"
        if r.status != "skipped":
            return r.status
        if "no backward on CPU" in r.reason:
            return "skip: no backward on CPU"
        why = r.reason.split(" (")[0].replace("predicted", "pred.")
        return f"skip: {why}"[:40]

    for h in headline(results):
        row, best = h["row"], h["best"]
        ss = f"{best.speedup_vs_sdpa:.2f}x" if best.speedup_vs_sdpa else "-"
        sn = (f"{h['vs_naive_at_max']:.1f}x ({_n_label(h['naive_max_N'])})"
              if h.get("vs_naive_at_max") else "-")
        lines.append(f"| {h['pattern']} | {h['mode']} | {_n_label(h['N'])} | "
                     f"{t(best)} ({best.case.backend}) | {t(row.get('sdpa'))} | "
                     f"{t(row.get('flex'))} | {t(row.get('reference'))} | {ss} | {sn} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots
COLORS = {"reference": "tab:red", "sdpa": "tab:blue", "flex": "tab:purple", "cpu": "tab:green",
          "triton": "tab:orange", "cuda": "tab:olive"}


def plot(results, outdir) -> list[str]:
    """time_<mode>.png and memory_<mode>.png: one panel per pattern, log-log axes, one line
    per backend; dotted guides show N^2 and N slopes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    modes = list(dict.fromkeys(r.case.mode for r in results))
    patterns = list(dict.fromkeys(r.case.pattern for r in results))
    configs = list(dict.fromkeys(r.case.config for r in results))
    for metric, ylabel, get in (
        ("time", "median time (ms)", lambda r: r.time_s * 1e3),
        ("memory", "peak extra memory (MiB)",
         lambda r: r.mem_bytes / (1 << 20) if r.mem_bytes else None),
    ):
        for mode in modes:
            n = len(patterns)
            cols = min(n, 4)
            nrows = math.ceil(n / cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows),
                                     squeeze=False)
            drawn = False
            for ax, pattern in zip(axes.flat, patterns, strict=False):
                series = False
                for cfg in configs:
                    for b in BACKEND_ORDER:
                        pts = sorted((r.case.N, get(r)) for r in results
                                     if r.case.backend == b and r.case.pattern == pattern
                                     and r.case.mode == mode and r.case.config == cfg and r.ok
                                     and get(r))
                        if not pts:
                            continue
                        xs, ys = zip(*pts, strict=True)
                        lab = BACKEND_LABEL[b] + ("" if len(configs) == 1 else f" {cfg.label()}")
                        ax.plot(xs, ys, marker="o", ms=3, color=COLORS[b], label=lab)
                        series = drawn = True
                if series:
                    _guides(ax)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.legend(fontsize=7)
                ax.set_title(f"{pattern} ({mode})", fontsize=9)
                ax.set_xlabel("sequence length N", fontsize=8)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            if not drawn:
                plt.close(fig)
                continue
            fig.tight_layout()
            path = f"{outdir}/{metric}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _guides(ax):
    """Dotted N^2 and N slopes from the panel's lowest-N point, clipped to the data's range."""
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    if not lines:
        return
    x0 = min(min(ln.get_xdata()) for ln in lines)
    x1 = max(max(ln.get_xdata()) for ln in lines)
    ymax = max(max(ln.get_ydata()) for ln in lines)
    if x1 <= x0:
        return
    y0 = min(ln.get_ydata()[list(ln.get_xdata()).index(x0)] for ln in lines
             if x0 in list(ln.get_xdata()))
    for power, lab in ((2, r"$\propto N^2$"), (1, r"$\propto N$")):
        xe = min(x1, x0 * (ymax / y0) ** (1 / power)) if ymax > y0 else x1
        ye = y0 * (xe / x0) ** power
        ax.plot([x0, xe], [y0, ye], ls=":", lw=0.8, color="gray")
        ax.annotate(lab, (xe, ye), fontsize=7, color="gray", ha="right", va="bottom")


def load_json(path):
    """(results, meta) from a results.json this module wrote (to re-render or compare)."""
    from .runner import Result
    from .spec import Case

    with open(path) as f:
        doc = json.load(f)
    by_key = defaultdict(dict)
    for row in doc["rows"]:
        key = (row["backend"], row["pattern"], row["mode"], row["N"], row["config"],
               row["device"])
        by_key[key][row["metric"]] = row
    out = []
    for c in doc["cases"]:
        case = Case.from_dict({k: c[k] for k in ("backend", "pattern", "mode", "N", "config",
                                                  "device")})
        m = by_key[(case.backend, case.pattern, case.mode, case.N, case.config.label(),
                    case.device)]
        first = next(iter(m.values()))
        val = {name: row["value"] for name, row in m.items()}
        t = val.get("time_ms")
        out.append(Result(case, c["status"], c["reason"], None if t is None else t / 1e3,
                          c["times_s"], c["mem_bytes"], first["density"],
                          first["visited_blocks"], first["flops"], val.get("tflops"),
                          val.get("speedup_vs_naive"), val.get("speedup_vs_sdpa")))
    return out, doc["meta"]
