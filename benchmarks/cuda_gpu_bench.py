"""GPU benchmark of the cuda backend: TFLOP/s of fastattn's CUDA kernels vs torch SDPA and the
triton backend, forward and forward+backward. For users with a GPU; on a machine without one it
says so and exits 0 (this project's machines have none, so no result is recorded here).

    python benchmarks/cuda_gpu_bench.py [--dtype bf16] [--heads 16] [--dim 128] [--out PATH]

FLOPs: 4 * B * H * Nq * Nk * D per forward (two matmuls), x0.5 with causal, x2.5 for the
backward (five matmuls), as FlashAttention's benchmarks count them. Results go to
benchmarks/results/cuda_gpu_bench.md with the command, date and device.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

from fastattn.bench.spec import attention_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "cuda_gpu_bench.md")
PROVIDERS = ("cuda", "sdpa", "triton")


def _time_ms(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_cuda_gpu(seq_lens=(1024, 2048, 4096, 8192), *, batch_tokens=16384, heads=16, dim=128,
                   dtype=torch.bfloat16, causal_options=(False, True),
                   modes=("fwd", "fwd+bwd")):
    """Rows (provider, mode, causal, N, ms, TFLOP/s or None with the reason). Returns [] and
    prints why when no GPU is present."""
    if not torch.cuda.is_available():
        print(f"no GPU present (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "the cuda backend benchmark needs an NVIDIA GPU; nothing measured")
        return []
    import fastattn

    rows = []
    for N in seq_lens:
        B = max(1, batch_tokens // N)
        q, k, v = (torch.randn(B, heads, N, dim, device="cuda", dtype=dtype) for _ in range(3))
        for causal in causal_options:
            for mode in modes:
                for prov in PROVIDERS:
                    qq, kk, vv = (t.detach().requires_grad_(mode == "fwd+bwd") for t in (q, k, v))
                    do = torch.randn_like(q)

                    def run():
                        out = fastattn.attention(qq, kk, vv, causal=causal, backend=prov)
                        if mode == "fwd+bwd":
                            out.backward(do)

                    try:
                        ms = _time_ms(run)
                    except Exception as e:  # a provider that cannot serve this shape
                        rows.append((prov, mode, causal, N, None, f"n/a: {str(e).splitlines()[0]}"))
                        continue
                    tf = attention_flops(B, heads, N, N, dim, mode, causal=causal) / (ms * 1e-3) / 1e12
                    rows.append((prov, mode, causal, N, ms, tf))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--seq-lens", default="1024,2048,4096,8192")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = bench_cuda_gpu(tuple(int(x) for x in args.seq_lens.split(",")), heads=args.heads,
                          dim=args.dim, dtype=dtype)
    if not rows:
        return 0
    lines = [
        "# cuda backend on GPU: TFLOP/s vs SDPA and triton", "",
        f"- command: `python benchmarks/cuda_gpu_bench.py {' '.join(argv or sys.argv[1:])}`",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        f"- device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})",
        f"- dtype {args.dtype}, heads {args.heads}, head dim {args.dim}, 16k tokens per batch", "",
        "| provider | mode | causal | N | ms | TFLOP/s |", "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for prov, mode, causal, N, ms, tf in rows:
        tfs = f"{tf:.1f}" if isinstance(tf, float) else tf
        lines.append(f"| {prov} | {mode} | {causal} | {N} | {'' if ms is None else f'{ms:.3f}'} | {tfs} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
