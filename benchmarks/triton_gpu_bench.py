"""GPU benchmark of the triton backend (forward/backward TFLOP/s vs torch SDPA).

    PYTHONPATH=python_pkg python benchmarks/triton_gpu_bench.py [--dtype bfloat16] [--quick]

Writes benchmarks/results/triton_gpu_bench.md (command, date, machine at the top). On a
machine without a GPU it records that no GPU is present and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_pkg"))

import torch  # noqa: E402

from fastattn.bench.triton_gpu import gpu_benchmark  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="N in (1024, 4096), D = 64 only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/triton_gpu_bench.md"))
    args = ap.parse_args(argv)
    kw = dict(dtype=getattr(torch, args.dtype))
    if args.quick:
        kw.update(seq_lens=(1024, 4096), head_dims=(64,))
    res = gpu_benchmark(**kw)
    command = "PYTHONPATH=python_pkg python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/triton_gpu_bench.py", *(argv or sys.argv[1:])])
    text = "\n".join([
        "# Triton backend: GPU benchmark (triton.testing.do_bench)",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}",
        "- TFLOP/s = 4 * B * Hq * N * N * D / time (x0.5 causal, x2.5 backward)",
        "",
        res.to_markdown(),
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
