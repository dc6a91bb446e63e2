"""Which fastattn GPU kernel families have been validated on which GPU architecture: the table
behind backend="auto" on CUDA devices (DESIGN.md, "GPU dispatch policy").

The table is data (fastattn/data/gpu_validation.json, plus the file named by the environment
variable FASTATTN_GPU_VALIDATION if set), one entry per (backend, arch), written from a
`make gpu-check` result (benchmarks/gpu_check.py --record RESULTS_DIR):

    {"backend": "triton", "arch": "sm_90", "gpu": "NVIDIA H100 80GB HBM3",
     "correct": true,             # the family's GPU test suite passed against the float64 oracle
     "sanitizer": "clean",        # compute-sanitizer memcheck/racecheck/synccheck: clean |
                                  #   findings | not run: <why>
     "faster": ["fwd/d64/dense", "fwdbwd/d128/causal", ...],   # problem classes (below) where
                                  #   it was at least as fast as torch SDPA at every length run
     "recorded": "2026-...", "source": "gpu_check_results/..."}

A family is *validated* on an arch when its entry says correct and the sanitizer found
nothing. Problem classes: "<fwd|fwdbwd>/d<64|128>/<dense|causal>", the shapes gpu-check
benchmarks (head dims up to 64 count as d64, up to 128 as d128; larger ones were not timed).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

TABLE_FILE = Path(__file__).resolve().parent / "data" / "gpu_validation.json"
ENV_VAR = "FASTATTN_GPU_VALIDATION"
BENCH_HEAD_DIMS = (64, 128)
CHECK_COMMAND = "make gpu-check"


@dataclass(frozen=True)
class Entry:
    backend: str
    arch: str  # "sm_80", "sm_90", ...
    gpu: str = ""
    correct: bool = False
    sanitizer: str = "not run"
    faster: frozenset = field(default_factory=frozenset)
    recorded: str = ""
    source: str = ""

    @property
    def validated(self) -> bool:
        return bool(self.correct) and self.sanitizer != "findings"

    def to_json(self) -> dict:
        return dict(backend=self.backend, arch=self.arch, gpu=self.gpu, correct=self.correct,
                    sanitizer=self.sanitizer, faster=sorted(self.faster),
                    recorded=self.recorded, source=self.source)


def parse_entry(d: dict) -> Entry:
    """One table entry from its JSON form; a clear error for a malformed one."""
    if not isinstance(d, dict) or not isinstance(d.get("backend"), str) \
            or not isinstance(d.get("arch"), str) or not d["arch"].startswith("sm_"):
        raise ValueError(f"GPU validation entry needs string 'backend' and 'arch' ('sm_XY'), "
                         f"got {d!r}")
    faster = d.get("faster", [])
    if not isinstance(faster, list) or not all(isinstance(c, str) for c in faster):
        raise ValueError(f"GPU validation entry 'faster' must be a list of problem classes, "
                         f"got {faster!r}")
    return Entry(backend=d["backend"], arch=d["arch"], gpu=str(d.get("gpu", "")),
                 correct=d.get("correct") is True, sanitizer=str(d.get("sanitizer", "not run")),
                 faster=frozenset(faster), recorded=str(d.get("recorded", "")),
                 source=str(d.get("source", "")))


def load_table(paths=None) -> dict[tuple[str, str], Entry]:
    """{(backend, arch): Entry} from the package's table and FASTATTN_GPU_VALIDATION's file
    (later files win for the same key)."""
    if paths is None:
        paths = [TABLE_FILE]
        extra = os.environ.get(ENV_VAR, "").strip()
        if extra:
            paths.append(Path(extra))
    table = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            if Path(path) == TABLE_FILE:
                continue
            raise ValueError(f"{ENV_VAR}={path}: no such file") from None
        entries = data.get("entries", []) if isinstance(data, dict) else data
        for d in entries:
            e = parse_entry(d)
            table[(e.backend, e.arch)] = e
    return table


# Read once, at import (torch.compile traces dispatch; it must not read files).
TABLE: dict[tuple[str, str], Entry] = load_table()
_warned: set = set()


def device_arch(device) -> str:
    """'sm_XY' of a CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def entry(backend: str, arch: str) -> Entry | None:
    return TABLE.get((backend, arch))


def validated(backend: str, arch: str) -> bool:
    e = entry(backend, arch)
    return e is not None and e.validated


def sdpa_native(p) -> bool:
    """True when torch SDPA runs attention problem p on its own fused paths: no block mask,
    no score modifier, no log-sum-exp asked for, and either no mask or a causal mask that is
    torch's top-left one (Nq == Nk, or the window (-1, Nq - Nk) with Nq >= Nk)."""
    if p.block_mask is not None or p.has_score_mods or p.return_lse:
        return False
    if p.window == (-1, -1):
        return True
    return p.window[0] == -1 and p.Nq >= p.Nk and p.window[1] == p.Nq - p.Nk


def problem_class(p) -> str | None:
    """The benchmarked class of an SDPA-native problem ("fwdbwd/d128/causal"), None when
    gpu-check does not time such shapes."""
    d = max(p.D, p.Dv)
    bucket = next((b for b in BENCH_HEAD_DIMS if d <= b), None)
    if bucket is None:
        return None
    mask = "dense" if p.window == (-1, -1) else "causal"
    return f"{'fwdbwd' if p.needs_grad else 'fwd'}/d{bucket}/{mask}"


def faster(backend: str, arch: str, p) -> bool:
    """Validated on arch and recorded as at least as fast as torch SDPA for p's class."""
    e = entry(backend, arch)
    cls = problem_class(p)
    return e is not None and e.validated and cls is not None and cls in e.faster


def warn_unvalidated(backend: str, arch: str) -> None:
    """Says once per (backend, arch) that auto runs a kernel family no GPU check validated."""
    if (backend, arch) in _warned:
        return
    _warned.add((backend, arch))
    e = entry(backend, arch)
    state = ("no GPU check has validated it there" if e is None else
             f"its recorded GPU check is not clean (correct={e.correct}, "
             f"sanitizer={e.sanitizer})")
    warnings.warn(
        f"fastattn: backend='auto' runs the {backend!r} kernels on this {arch} GPU because no "
        f"other backend serves this call (block mask, score modifier, log-sum-exp, "
        f"bottom-right causal or window, or decode), but {state}. Run `{CHECK_COMMAND}` on "
        f"this machine to check and record it (README: 'Checking a GPU').",
        RuntimeWarning, stacklevel=4)


def describe() -> list[str]:
    """Lines for `fastattn info`."""
    extra = os.environ.get(ENV_VAR, "").strip()
    src = f"{TABLE_FILE}" + (f" + {extra}" if extra else "")
    if not TABLE:
        return [f"GPU validation table ({src}): empty -- no GPU check recorded; on a CUDA "
                f"device backend='auto' gives plain attention to torch SDPA and uses fastattn "
                f"kernels only where nothing else serves the call (run `{CHECK_COMMAND}`)"]
    lines = [f"GPU validation table ({src}):"]
    for (backend, arch), e in sorted(TABLE.items()):
        state = "validated" if e.validated else "NOT validated"
        lines.append(f"  {backend:7s} {arch:6s} {state} (correct={e.correct}, sanitizer="
                     f"{e.sanitizer}) on {e.gpu or '?'}, recorded {e.recorded or '?'}; at least "
                     f"as fast as SDPA for: {', '.join(sorted(e.faster)) or 'none'}")
    return lines
