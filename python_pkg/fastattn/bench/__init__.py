"""fastattn.bench: the benchmark harness behind `fastattn bench`.

Sweeps sequence lengths x backends (naive reference, torch SDPA, FlexAttention, fastattn's
cpu/triton/cuda kernels) x patterns x modes x configs, timing the backends of each group
interleaved, measuring peak memory per case in a child process, skipping what cannot run with
the reason, and writing a rich table, CSV/JSON rows and log-log plots.

    fastattn bench --quick                      # the README's main job (< 3 min on 2 cores)
    python -m fastattn.bench --preset full --out benchmarks/results/cpu

Library use: Sweep(SweepSpec(...)).run() -> [Result]; report.write_csv/write_json/plot.
"""

from .cli import add_subparser, main, run
from .runner import Result, Sweep
from .spec import Case, Config, SweepSpec, attention_flops, predict_skip

__all__ = ["add_subparser", "run", "main", "Sweep", "Result", "SweepSpec", "Case", "Config",
           "attention_flops", "predict_skip"]
