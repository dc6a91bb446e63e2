"""The recorded CPU sweep: fastattn.bench's "full" preset written to benchmarks/results/.

    python benchmarks/run_sweep.py                    # full sweep -> benchmarks/results/cpu_sweep/
    python benchmarks/run_sweep.py --quick --out /tmp/q   # any `fastattn bench` option works

Writes results.md (command, date, machine, grid, method, headline, every case), results.csv,
results.json and time_*/memory_* PNGs. All the work is in fastattn.bench; this only picks
the preset and the output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_pkg"))

from fastattn.bench import main  # noqa: E402


def cli(argv: list[str]) -> int:
    argv = list(argv)
    if "--quick" not in argv and "--preset" not in argv:
        argv = ["--preset", "full", *argv]
    if "--out" not in argv:
        argv += ["--out", str(ROOT / "benchmarks" / "results" / "cpu_sweep")]
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
