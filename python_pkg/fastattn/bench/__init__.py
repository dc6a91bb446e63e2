"""fastattn.bench: the benchmark harness behind `fastattn bench`.

    fastattn bench --quick                       # the README's main job (< 3 min on 2 cores)
    python -m fastattn.bench --preset full --out DIR
    python -m fastattn.bench --patterns window,bigbird --modes fwd --seqlens 4k-1M \
        --backends cpu,sdpa --heads 8 --dtypes fp32,bf16

Grid: sequence lengths x backends (reference = naive, sdpa, flex = torch.compile(
flex_attention), cpu, triton, cuda) x patterns (dense, causal, window, bigbird, longformer,
strided, streaming; see patterns.py for their parameters) x modes (fwd, bwd, fwd+bwd) x
configs (batch, heads, head dim, dtype). Backends that differ only in name share a *group*:
the same inputs and masks, timed interleaved.

How it measures (also written into every results.md):
  time     warm-up, one memory run, then the median of >= 3 repetitions interleaved
           round-robin across the group's backends (each round starts one backend later);
           time.perf_counter around each call on CPU, CUDA events on GPU.
  TFLOP/s  4*B*H*Nq*Nk*D forward, x2.5 backward, x3.5 forward+backward (attention_flops).
           For masked patterns only the VISIBLE (query, key) pairs count (density * N^2, from
           BlockMask.density), identically for every backend: the number is useful work per
           second, so naive attention, which computes all N^2 pairs, scores low on sparse
           patterns. Visited blocks are reported separately (visited_blocks column).
  memory   in a child process: peak resident bytes of one call above the bytes resident just
           before it (inputs, masks, for bwd the forward graph already there), with glibc's
           mmap threshold fixed at 64 KiB so freed tensors leave the RSS, and the kernel's
           high-water mark reset through /proc/self/clear_refs (worker.py).
  skips    predicted before running, with the reason in the table/CSV: backend unavailable,
           triton/cuda without a GPU, FlexAttention backward on CPU, memory over budget
           (naive's N^2 scores, SDPA's dense N^2 mask, create_block_mask's N^2 evaluation),
           time extrapolated from the same series at the previous N over --case-budget.
           A call running past --case-timeout is killed with its worker (status timeout);
           a crashed worker (e.g. the OOM killer) marks its case crashed; the sweep goes on.
Outputs: live progress bar, rich table, results.csv/json (one row per kernel, backend,
pattern, mode, metric, N, config, device; machine, versions, command), results.md,
time_<mode>.png and memory_<mode>.png (log-log).

Library use: Sweep(SweepSpec(...)).run() -> [Result]; report.write_csv/write_json/plot.
"""

from .cli import add_subparser, main, run
from .runner import Result, Sweep
from .spec import Case, Config, SweepSpec, attention_flops, predict_skip

__all__ = ["add_subparser", "run", "main", "Sweep", "Result", "SweepSpec", "Case", "Config",
           "attention_flops", "predict_skip"]
