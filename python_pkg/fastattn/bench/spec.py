"""What a sweep is made of: cases, the FLOP formula, presets, and the predictions that skip a
case before it runs (absent backend, memory the machine cannot give, time past the limit).

A *case* is one measurement: (backend, pattern, mode, N, config) on one device, where config
is (B, H, D, dtype). Cases that differ only in backend form a *group*: they share inputs and
masks and are timed interleaved (round-robin), so the speedups inside a group compare runs
made under the same machine load.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of a mode relative to the forward pass: forward is 2 matmuls (QK^T, PV), backward 5
# (recompute QK^T, dV, dP, dQ, dK) -> 2.5x, forward+backward 3.5x (as in Triton's tutorial).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Plot/table order; the first two are the baselines speedups are taken against.
BACKEND_ORDER = ("reference", "sdpa", "flex", "cpu", "triton", "cuda")
BACKEND_LABEL = {"reference": "naive", "sdpa": "sdpa", "flex": "flex", "cpu": "cpu",
                 "triton": "triton", "cuda": "cuda"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 1 << 30


def attention_flops(B: int, H: int, Nq: int, Nk: int, D: int, mode: str,
                    visible_pairs: float | None = None, causal: bool = False) -> float:
    """Standard attention FLOPs, the one formula every fastattn benchmark uses:
    4 * B * H * Nq * Nk * D for the forward (2 for QK^T, 2 for PV, per multiply-add), x2.5
    for the backward, x3.5 for forward+backward. For masked work `visible_pairs` (per batch
    element and head) replaces Nq * Nk: only the (query, key) pairs the mask lets through
    count, so every backend is credited with the same useful work whatever it actually
    computes (naive attention computes all Nq * Nk). causal=True is the usual shorthand for
    half the pairs (Nq * Nk / 2)."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pairs = Nq * Nk * (0.5 if causal else 1.0) if visible_pairs is None else visible_pairs
    return 4.0 * B * H * pairs * D * MODE_FLOP_FACTOR[mode]


@dataclass(frozen=True)
class Config:
    B: int = 1
    H: int = 2
    D: int = 64
    dtype: str = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def label(self) -> str:
        return f"B={self.B} H={self.H} D={self.D} {self.dtype}"


@dataclass(frozen=True)
class Case:
    backend: str
    pattern: str
    mode: str
    N: int
    config: Config
    device: str = "cpu"

    @property
    def group_key(self):
        return (self.pattern, self.mode, self.N, self.config, self.device)

    def label(self) -> str:
        return f"{self.pattern} {self.mode} N={self.N} {self.backend}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @staticmethod
    def from_dict(d: dict) -> Case:
        return Case(**{**d, "config": Config(**d["config"])})


@dataclass
class SweepSpec:
    """The grid of a sweep and its limits."""

    backends: tuple[str, ...] = BACKEND_ORDER
    patterns: tuple[str, ...] = ("dense", "causal", "window", "bigbird")
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    seqlens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    configs: tuple[Config, ...] = (Config(),)
    device: str = "cpu"
    # N cap per pattern kind: dense-cost work (dense, causal) and sparse (everything else).
    max_dense_n: int = 1 << 16
    max_sparse_n: int = 1 << 20
    mem_budget: int = 8 * GiB  # bytes a case may use (inputs + masks + its own peak)
    case_timeout: float = 120.0  # seconds: warm-up + memory run + timed repetitions
    case_budget: float | None = None  # skip a case predicted to need more seconds than this
    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 15
    target_time: float = 1.0  # seconds of timed repetitions per case (at least min_reps)
    threads: int = field(default_factory=lambda: torch.get_num_threads())

    def cases(self) -> list[Case]:
        out = []
        # N outside mode: one pattern build per (pattern, N); N still ascends per series.
        for cfg in self.configs:
            for pattern in self.patterns:
                cap = self.max_dense_n if pattern in DENSE_COST_PATTERNS else self.max_sparse_n
                for N in sorted(self.seqlens):
                    for mode in self.modes:
                        if N > cap:
                            continue
                        for backend in self.backends:
                            out.append(Case(backend, pattern, mode, N, cfg, self.device))
        return out


# Patterns whose block-sparse work grows as N^2 (the others grow ~linearly in N). Strided
# is one: its every-l-th-key column touches every key block below the diagonal.
DENSE_COST_PATTERNS = ("dense", "causal", "strided")


def pow2_range(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return tuple(out)


def preset(name: str) -> dict:
    """Keyword overrides of SweepSpec for a named preset."""
    if name == "quick":
        # The README's main job: < 3 min on 2 cores. Naive vs fused vs sparse at growing N;
        # the per-case budget skips the quadratic baselines once they would take too long.
        # No flex: torch.compile would spend most of the budget compiling per shape.
        return dict(backends=("reference", "sdpa", "cpu", "triton", "cuda"),
                    patterns=("causal", "window", "bigbird"), modes=("fwd", "fwd+bwd"),
                    seqlens=pow2_range(1024, 16384), configs=(Config(1, 2, 64, "fp32"),),
                    case_budget=6.0, case_timeout=60.0, target_time=0.4, max_reps=7)
    if name == "full":
        # The recorded CPU sweep (benchmarks/results/cpu_sweep): ~20 min on 2 cores.
        return dict(patterns=("dense", "causal", "window", "bigbird", "longformer", "strided",
                              "streaming"),
                    modes=("fwd", "fwd+bwd"), seqlens=pow2_range(512, 1 << 20),
                    configs=(Config(1, 1, 64, "fp32"),), max_dense_n=1 << 14,
                    case_budget=10.0, case_timeout=120.0, target_time=0.3, max_reps=5)
    if name == "tiny":
        # Seconds; the tests' end-to-end sweep.
        return dict(patterns=("dense", "causal", "bigbird"), modes=("fwd", "fwd+bwd"),
                    seqlens=(256, 512), configs=(Config(1, 1, 32, "fp32"),),
                    case_timeout=60.0, target_time=0.02, min_reps=3, max_reps=3)
    raise ValueError(f"unknown preset {name!r}; choose quick, full or tiny")


def meminfo() -> dict:
    """/proc/meminfo in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def default_mem_budget() -> int:
    """Half of the memory available now: the machine is shared, and a prediction is only an
    estimate."""
    avail = meminfo().get("MemAvailable")
    return int(avail * 0.5) if avail else 4 * GiB


# ---------------------------------------------------------------------------- predictions
def input_bytes(case: Case) -> int:
    c = case.config
    el = torch.tensor([], dtype=c.torch_dtype).element_size()
    n_tensors = 4 if case.mode == "fwd" else 8  # q k v out (+ do, dq, dk, dv)
    return n_tensors * c.B * c.H * case.N * c.D * el


def predicted_extra_bytes(case: Case, info: dict) -> int:
    """Bytes a case needs beyond its inputs, from how each backend works (conservative).
    info: pattern facts {"masked": bool, "layouts": Bm*Hm, "flex_mask_bytes_per_pair": x}."""
    c, N = case.config, case.N
    BH = c.B * c.H
    pairs = N * N
    layouts = info.get("layouts", 1)
    masked = info.get("masked", False)
    dense_mask = pairs * layouts if masked else 0  # bool (Bm, Hm, N, N), built once per group
    if case.backend == "reference":
        # fp32 scores (B, H, N, N): scores + probabilities in the forward; the backward holds
        # probabilities, their gradient and the score gradient.
        copies = {"fwd": 2, "bwd": 3, "fwd+bwd": 4}[case.mode]
        return copies * BH * pairs * 4 + dense_mask
    if case.backend == "sdpa":
        if not masked or info.get("pattern") == "causal":  # is_causal=True: no mask
            return 8 * BH * N * c.D * 4  # flash path: O(N) workspace
        # torch turns a bool attn_mask into an additive float mask of the same shape.
        return dense_mask + 4 * pairs * layouts + 8 * BH * N * c.D * 4
    if case.backend == "flex" and masked:
        return int(pairs * layouts * info.get("flex_mask_bytes_per_pair", 16))
    return 2 * BH * N * c.D * 4  # fused kernels: O(N) workspace and lse


def work_units(case: Case, info: dict) -> float:
    """What a backend's time scales with: Nq*Nk pairs for naive and masked SDPA (they
    compute every pair), visited (query, key) block area for block-sparse kernels."""
    N = case.N
    if case.backend == "reference" or (case.backend == "sdpa" and info.get("masked")):
        return float(N * N)
    return float(info.get("visited_pairs", N * N))


def predict_skip(case: Case, spec: SweepSpec, avail: dict, info: dict,
                 prev: dict | None = None) -> str | None:
    """The reason a case cannot run here, or None. prev: the same case's measurement at the
    largest smaller N ({"N", "time_s", "work"}), used to extrapolate its time."""
    ok, why = avail.get(case.backend, (False, "unknown backend"))
    if not ok:
        return f"{case.backend} unavailable: {why}"
    dev = case.device
    if case.backend in ("triton", "cuda") and dev == "cpu":
        return (f"{case.backend} kernels need a GPU to be timed (on CPU they run only under "
                f"{'the Triton interpreter' if case.backend == 'triton' else 'the CUDA emulation'}"
                ", a correctness tool)")
    if case.backend == "cpu" and dev != "cpu":
        return "the cpu backend runs on CPU tensors only"
    if case.backend == "flex" and dev == "cpu" and case.mode != "fwd":
        return "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
    need = input_bytes(case) + predicted_extra_bytes(case, info) + info.get("pattern_bytes", 0)
    if need > spec.mem_budget:
        what = {"reference": "naive N^2 scores", "sdpa": "SDPA's dense N^2 mask",
                "flex": "create_block_mask's N^2 evaluation"}.get(case.backend, "inputs")
        return f"needs ~{fmt_bytes(need)} ({what}) > budget {fmt_bytes(spec.mem_budget)}"
    if prev and prev.get("time_s"):
        est = prev["time_s"] * work_units(case, info) / max(prev["work"], 1.0)
        calls = spec.warmup + 1 + spec.min_reps  # warm-up, memory run, timed repetitions
        limit = spec.case_budget if spec.case_budget is not None else spec.case_timeout
        if est * calls > limit:
            return (f"predicted {est:.1f} s/call (from {prev['time_s']:.2f} s at N={prev['N']})"
                    f" x {calls} calls > {limit:.0f} s per case")
    return None


def machine_info() -> dict:
    import platform

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mi = meminfo()
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(mi.get("MemTotal", 0) / GiB, 1),
        "ram_available_gib": round(mi.get("MemAvailable", 0) / GiB, 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def versions() -> dict:
    import fastattn

    v = {"fastattn": fastattn.__version__, "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken install: just not reported
        v["triton"] = None
    return v


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, div in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"
