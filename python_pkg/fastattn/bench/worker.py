"""The child process that runs cases, and the measurements it makes.

The parent (runner.py) starts one worker (multiprocessing "spawn") and sends it one group at a
time: cases that differ only in backend. The worker builds the inputs and the pattern once,
then per case: warm-up, one memory run, and finally the timed repetitions of all cases
interleaved round-robin (each round starts one case later, so no backend always runs first).
Before every call it tells the parent how long the call may take; a call past that is killed
with the process (the parent restarts a worker for the rest of the group).

Memory on CPU: the worker starts with MALLOC_MMAP_THRESHOLD_=65536, so every allocation of
64 KiB or more is its own mmap and goes back to the OS when freed; resident memory then
follows the live tensors. For a case, after the inputs, masks and (for bwd) the forward
graph exist and after its warm-up: baseline = VmRSS; the kernel's high-water mark VmHWM is
reset (echo 5 > /proc/self/clear_refs); one call; peak = VmHWM - baseline: the extra bytes
the call needed (intermediates, outputs, gradients). Where clear_refs is not writable a
thread samples VmRSS every 0.5 ms instead (may miss short peaks). On GPU:
torch.cuda.max_memory_allocated() above memory_allocated() before the call.
Timing: time.perf_counter() around each call on CPU; CUDA events (synchronized) on GPU.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
import traceback

import torch

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ---------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(fn, device: str) -> tuple[int, float]:
    """(peak extra bytes of one fn() call over the memory in use before it, seconds)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return max(0, torch.cuda.max_memory_allocated() - base), dt
    base = rss_bytes()
    if reset_hwm():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        return max(0, hwm_bytes() - base), dt
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return max(0, peak[0] - base), dt


def time_call(fn, device: str) -> float:
    """Seconds of one fn() call."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- a group
class _CaseState:
    def __init__(self, idx, case):
        self.idx, self.case = idx, case
        self.runner = None
        self.spent = 0.0  # seconds of calls so far
        self.times: list[float] = []
        self.reps = 0
        self.mem = None
        self.status = "ok"
        self.reason = ""


def _fail(st: _CaseState, e: BaseException):
    st.status = "error"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    st.reason = f"{type(e).__name__}: {msg}"[:300]
    if isinstance(e, torch.OutOfMemoryError | MemoryError):
        st.status, st.reason = "oom", f"out of memory: {msg}"[:300]


def run_group(msg: dict, send) -> None:
    """msg: {"cases": [case dicts], "limits": {...}}. Sends ("begin", idx, seconds_allowed),
    ("end", idx), ("result", idx, dict) per case and ("group_done",) at the end."""
    from .patterns import Pattern
    from .providers import ModeRunner, attention_fn, make_inputs
    from .spec import Case

    lim = msg["limits"]
    cases = [Case.from_dict(d) for d in msg["cases"]]
    c0 = cases[0]
    cfg, device = c0.config, c0.device
    states = [_CaseState(i, c) for i, c in zip(msg["indices"], cases, strict=True)]

    send(("begin", None, lim["setup_timeout"]))
    pattern = msg.get("pattern") or Pattern.build(c0.pattern, c0.N)
    q, k, v, dout = make_inputs(cfg.B, cfg.H, c0.N, cfg.D, cfg.torch_dtype, device, c0.mode)
    send(("end", None))

    def call(st, fn, what):
        allowed = lim["case_timeout"] - st.spent
        send(("begin", st.idx, allowed, what))
        t = fn()
        st.spent += t[1] if isinstance(t, tuple) else t
        send(("end", st.idx))
        if st.spent > lim["case_timeout"]:
            st.status = "timeout"
            st.reason = f"exceeded the {lim['case_timeout']:.0f} s case time limit"
        return t

    # Warm-up (compiles, first touches, lazy inits) and one memory run per case.
    for st in states:
        try:
            send(("begin", st.idx, lim["case_timeout"], "setup"))
            t0 = time.perf_counter()
            fn = attention_fn(st.case.backend, pattern, device)
            st.runner = ModeRunner(fn, q, k, v, dout, st.case.mode)
            st.runner.prepare()
            st.spent += time.perf_counter() - t0
            send(("end", st.idx))
            warm = []
            for _ in range(lim["warmup"]):
                warm.append(call(st, lambda r=st.runner: time_call(r.call, device), "warm-up"))
                if st.status != "ok":
                    break
            if st.status != "ok":
                continue
            st.mem, t_mem = call(st, lambda r=st.runner: measure_peak(r.call, device), "memory")
            est = min(warm + [t_mem])
            reps = math.ceil(lim["target_time"] / max(est, 1e-6))
            if lim.get("case_budget"):
                left = lim["case_budget"] - st.spent
                reps = min(reps, int(left / max(est, 1e-6)))
            st.reps = max(lim["min_reps"], min(lim["max_reps"], reps))
        except Exception as e:  # noqa: BLE001 - one case failing must not stop the sweep
            _fail(st, e)
            traceback.print_exc()
        if st.status != "ok" and st.runner is not None:
            st.runner.release()

    # Timed repetitions, interleaved round-robin.
    live = [st for st in states if st.status == "ok"]
    rnd = 0
    while True:
        todo = [st for st in live if st.status == "ok" and len(st.times) < st.reps]
        if not todo:
            break
        shift = rnd % len(todo)
        for st in todo[shift:] + todo[:shift]:
            try:
                st.times.append(call(st, lambda r=st.runner: time_call(r.call, device), "timing"))
            except Exception as e:  # noqa: BLE001
                _fail(st, e)
        rnd += 1

    for st in states:
        res = {"status": st.status, "reason": st.reason, "times": st.times, "mem_bytes": st.mem,
               "density": pattern.density, "visited_blocks": pattern.visited_blocks,
               "block_size": list(pattern.block_size)}
        if st.status == "ok" and st.times:
            res["time_s"] = statistics.median(st.times)
        send(("result", st.idx, res))
        if st.runner is not None:
            st.runner.release()
    send(("group_done",))


def serve(conn, threads: int) -> None:
    """Worker main loop: receive groups until None."""
    torch.set_num_threads(threads)
    try:  # many (shape, mask) combinations: let dynamo keep compiled flex variants
        import importlib

        cfg = importlib.import_module("torch._dynamo").config
        cfg.cache_size_limit = 256
        if hasattr(cfg, "recompile_limit"):
            cfg.recompile_limit = 256
        cfg.accumulated_cache_size_limit = 4096
    except Exception:  # noqa: BLE001 - compile tuning only
        pass

    def send(m):
        conn.send(m)

    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            run_group(msg, send)
        except Exception as e:  # noqa: BLE001 - report the group's failure and go on
            send(("group_error", f"{type(e).__name__}: {e}"[:300], traceback.format_exc()))
        gc.collect()
