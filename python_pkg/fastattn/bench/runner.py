"""Runs a sweep: predicts skips, feeds groups to a worker process, enforces time limits,
collects results and derives TFLOP/s and speedups.

Order: per config and pattern and mode, N ascending, so each case's time at the previous N
can predict whether the next one fits its budget (quadratic baselines drop out as N grows,
with the prediction as the reason)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

import fastattn

from .spec import BACKEND_ORDER, Case, SweepSpec, attention_flops, predict_skip, work_units

SETUP_TIMEOUT = 600.0  # seconds to build one group's inputs and pattern
GRACE = 10.0  # seconds past a call's allowance before the worker is killed


@dataclass
class Result:
    case: Case
    status: str  # ok | skipped | timeout | error | oom | crashed
    reason: str = ""
    time_s: float | None = None  # median of the timed repetitions
    times: list[float] = field(default_factory=list)
    mem_bytes: int | None = None  # peak extra bytes of one call (see worker.py)
    density: float | None = None
    visited_blocks: float | None = None
    flops: float | None = None
    tflops: float | None = None
    speedup_vs_naive: float | None = None
    speedup_vs_sdpa: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.time_s is not None


def available(backends) -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason)} from fastattn.available_backends(), plus "flex".
    A backend whose own availability check raises is reported unavailable with the error."""
    from .providers import flex_available

    out = {}
    try:
        out.update(fastattn.available_backends())
    except Exception as e:  # noqa: BLE001 - one broken backend must not hide the others
        # Ask each backend through the public API with a tiny call instead.
        for name in ("reference", "sdpa", "cpu", "triton", "cuda"):
            out[name] = _probe(name, e)
    out["flex"] = flex_available()
    return {b: out.get(b, (False, "unknown backend")) for b in backends}


def _probe(name: str, why: Exception) -> tuple[bool, str]:
    q = torch.randn(1, 1, 4, 8)
    try:
        fastattn.attention(q, q, q, backend=name)
        return True, "ok"
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        return False, (msg[1].strip(" -") if len(msg) > 1 else (msg[0] if msg else repr(why)))


class Worker:
    """One spawned worker process and its pipe."""

    def __init__(self, threads: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        from . import worker as wmod

        saved = {k: os.environ.get(k) for k in wmod.MMAP_ENV}
        os.environ.update(wmod.MMAP_ENV)  # read by the child's malloc at start
        try:
            self.proc = ctx.Process(target=wmod.serve, args=(child, threads), daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self):
        try:
            self.conn.send(None)
            self.proc.join(10)
        except (OSError, BrokenPipeError):
            pass
        self.kill()


class Sweep:
    """Runs spec's cases; `results` fills in as groups finish. Callbacks: on_group(desc) when
    a group starts, on_phase(text) per call, on_result(result) per finished case."""

    def __init__(self, spec: SweepSpec, on_group=None, on_phase=None, on_result=None):
        self.spec = spec
        self.on_group = on_group or (lambda desc: None)
        self.on_phase = on_phase or (lambda text: None)
        self.on_result = on_result or (lambda r: None)
        self.avail = available(spec.backends)
        self.results: list[Result] = []
        self._last_ok: dict = {}  # (backend, pattern, mode, config, device) -> prev dict
        self._worker: Worker | None = None
        self._patterns: dict = {}

    # ------------------------------------------------------------------ plumbing
    def groups(self) -> OrderedDict:
        g = OrderedDict()
        for c in self.spec.cases():
            g.setdefault(c.group_key, []).append(c)
        return g

    def _pattern(self, name, N):
        from .patterns import Pattern

        key = (name, N)
        if key not in self._patterns:
            self._patterns = {key: Pattern.build(name, N)}  # keep one: masks can be large
        return self._patterns[key]

    def _get_worker(self) -> Worker:
        if self._worker is None or not self._worker.proc.is_alive():
            self._worker = Worker(self.spec.threads)
        return self._worker

    def close(self):
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # ------------------------------------------------------------------ main loop
    def run(self) -> list[Result]:
        try:
            for cases in self.groups().values():
                self._run_group(cases)
        finally:
            self.close()
        return self.results

    def _run_group(self, cases: list[Case]):
        c0 = cases[0]
        self.on_group(f"{c0.pattern} {c0.mode} N={c0.N} {c0.config.label()}")
        pat = self._pattern(c0.pattern, c0.N)
        info = pat.info()
        pending, done = [], {}
        for c in cases:
            prev = self._last_ok.get(self._series(c))
            why = predict_skip(c, self.spec, self.avail, info, prev)
            if why:
                done[c] = Result(c, "skipped", why, density=pat.density,
                                 visited_blocks=pat.visited_blocks)
            else:
                pending.append(c)
        while pending:
            finished = self._run_in_worker(pending, pat)
            for c, r in finished.items():
                done[c] = r
            pending = [c for c in pending if c not in done]
        ordered = [done[c] for c in cases]
        self._derive(ordered, pat, info)
        for r in ordered:
            self.results.append(r)
            self.on_result(r)

    def _series(self, c: Case):
        return (c.backend, c.pattern, c.mode, c.config, c.device)

    def _run_in_worker(self, cases: list[Case], pat) -> dict:
        """Runs cases as one group; returns results for those that finished or failed. On a
        runaway call the worker is killed, that case fails, the rest is returned unfinished
        (the caller runs them again in a fresh worker)."""
        spec = self.spec
        limits = {"case_timeout": spec.case_timeout, "case_budget": spec.case_budget,
                  "warmup": spec.warmup, "min_reps": spec.min_reps, "max_reps": spec.max_reps,
                  "target_time": spec.target_time, "setup_timeout": SETUP_TIMEOUT}
        msg = {"cases": [c.to_dict() for c in cases], "indices": list(range(len(cases))),
               "limits": limits, "pattern": pat}  # pickled: the worker needn't rebuild it
        w = self._get_worker()
        w.conn.send(msg)
        out: dict = {}
        current, deadline = None, None
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = w.conn.poll(wait if wait is not None else 3600.0)
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    w.kill()
                    self._worker = None
                    return self._fail_current(cases, current, out, "timeout",
                                              f"killed: a call ran past the "
                                              f"{spec.case_timeout:.0f} s case time limit")
                continue
            try:
                m = w.conn.recv()
            except (EOFError, OSError):
                w.proc.join(5)
                code = w.proc.exitcode if w.proc.exitcode is not None else "?"
                w.kill()
                self._worker = None
                hint = " (killed by the OS: out of memory?)" if code in (-9, 137) else ""
                return self._fail_current(cases, current, out, "crashed",
                                          f"worker died, exit code {code}{hint}")
            kind = m[0]
            if kind == "begin":
                current = m[1]
                deadline = time.monotonic() + max(0.0, m[2]) + GRACE
                if m[1] is not None and len(m) > 3:
                    c = cases[m[1]]
                    self.on_phase(f"{c.backend}: {m[3]}")
                else:
                    self.on_phase("building inputs and masks")
            elif kind == "end":
                deadline = None
            elif kind == "result":
                c, res = cases[m[1]], m[2]
                out[c] = Result(c, res["status"], res["reason"], res.get("time_s"),
                                res["times"], res["mem_bytes"], res["density"],
                                res["visited_blocks"])
            elif kind == "group_done":
                return out
            elif kind == "group_error":
                for c in cases:
                    out.setdefault(c, Result(c, "error", m[1]))
                return out

    @staticmethod
    def _fail_current(cases, current, out, status, reason):
        if current is None:  # setup of the group itself failed: every case fails
            for c in cases:
                out.setdefault(c, Result(c, status, f"group setup: {reason}"))
        else:
            out[cases[current]] = Result(cases[current], status, reason)
        return out

    def _derive(self, results: list[Result], pat, info):
        base = {r.case.backend: r for r in results if r.ok}
        for r in results:
            c = r.case
            cfg = c.config
            r.density = pat.density
            r.visited_blocks = pat.visited_blocks
            r.flops = attention_flops(cfg.B, cfg.H, c.N, c.N, cfg.D, c.mode,
                                      visible_pairs=pat.visible_pairs if pat.masked else None)
            if not r.ok:
                continue
            r.tflops = r.flops / r.time_s / 1e12
            if "reference" in base:
                r.speedup_vs_naive = base["reference"].time_s / r.time_s
            if "sdpa" in base:
                r.speedup_vs_sdpa = base["sdpa"].time_s / r.time_s
            self._last_ok[self._series(c)] = {"N": c.N, "time_s": r.time_s,
                                              "work": work_units(c, info)}


def command_line() -> str:
    return " ".join([os.path.basename(sys.argv[0]) or "python"] + sys.argv[1:])


BACKENDS = BACKEND_ORDER
