"""GPU benchmark of the triton backend: forward and backward time with
triton.testing.do_bench, reported as TFLOP/s by the usual formula

    flops(fwd) = 4 * B * Hq * Nq * Nk * D     (two matmuls of 2 * Nq * Nk * D each)
                 x 0.5 with causal masking     (half the score matrix is visited)
    flops(bwd) = 2.5 * flops(fwd)              (five matmuls instead of two)

with torch's own scaled_dot_product_attention (flash/efficient kernels) as the peer.
Runs wherever a CUDA GPU exists; elsewhere `gpu_benchmark` returns no rows and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import attention_flops


@dataclass
class BenchResult:
    available: bool
    reason: str
    device: str = ""
    rows: list[dict] = field(default_factory=list)  # one per (provider, mode, shape)

    def to_markdown(self) -> str:
        if not self.available:
            return f"No GPU benchmark: {self.reason}\n"
        head = ("| provider | mode | B | Hq | Hkv | N | D | causal | dtype | ms | TFLOP/s |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|\n")
        body = "".join(
            f"| {r['provider']} | {r['mode']} | {r['B']} | {r['Hq']} | {r['Hkv']} | {r['N']} | "
            f"{r['D']} | {r['causal']} | {r['dtype']} | {r['ms']:.3f} | {r['tflops']:.1f} |\n"
            for r in self.rows)
        return f"Device: {self.device}\n\n" + head + body


def gpu_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, ("no GPU present: torch.cuda.is_available() is False (torch "
                       f"{torch.__version__}, CUDA build {torch.version.cuda})")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU {torch.cuda.get_device_name()} is below sm_80"
    return True, "ok"


def gpu_benchmark(seq_lens=(1024, 2048, 4096, 8192), head_dims=(64, 128), batch=4, heads=16,
                  kv_heads=None, dtype=torch.float16, causal=(False, True),
                  modes=("fwd", "bwd"), providers=("triton", "sdpa"), warmup=25, rep=100,
                  max_tokens=32768) -> BenchResult:
    """Time fastattn's triton backend (and torch SDPA) over a sweep of (N, D, causal).
    batch shrinks so that batch * N <= max_tokens (the tutorial's 16k-token budget, x2)."""
    ok, why = gpu_available()
    if not ok:
        return BenchResult(False, why)
    import triton.testing

    import fastattn
    import torch.nn.functional as F

    kv_heads = kv_heads or heads
    res = BenchResult(True, "ok", device=torch.cuda.get_device_name())
    for N in seq_lens:
        B = max(1, min(batch, max_tokens // N))
        for D in head_dims:
            for is_causal in causal:
                q = torch.randn(B, heads, N, D, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(B, kv_heads, N, D, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(B, kv_heads, N, D, device="cuda", dtype=dtype, requires_grad=True)
                for provider in providers:
                    if provider == "triton":
                        fn = lambda: fastattn.attention(q, k, v, causal=is_causal, backend="triton")
                    else:
                        fn = lambda: F.scaled_dot_product_attention(
                            q, k, v, is_causal=is_causal, enable_gqa=kv_heads != heads)
                    for mode in modes:
                        if mode == "fwd":
                            bench = fn
                        else:
                            out = fn()
                            do = torch.randn_like(out)
                            bench = lambda: out.backward(do, retain_graph=True)
                        ms = triton.testing.do_bench(bench, warmup=warmup, rep=rep)
                        flops = attention_flops(B, heads, N, N, D, mode, causal=is_causal)
                        res.rows.append(dict(provider=provider, mode=mode, B=B, Hq=heads,
                                             Hkv=kv_heads, N=N, D=D, causal=is_causal,
                                             dtype=str(dtype).replace("torch.", ""), ms=ms,
                                             tflops=flops / (ms * 1e-3) / 1e12))
    return res


__all__ = ["BenchResult", "gpu_available", "gpu_benchmark"]
