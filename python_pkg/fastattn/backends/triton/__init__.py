"""triton: FlashAttention-2 kernels written in Triton, dense, windowed and block-sparse,
forward and backward (kernels.py), behind torch.library ops with autograd (ops.py), with
softcap, ALiBi and hash-based dropout (fastattn.score_mods) fused into every kernel.

Serves CUDA tensors when a GPU is present. With TRITON_INTERPRET=1 it also serves CPU
tensors through Triton's interpreter, but only when asked for by name (backend="triton"):
correct, and far too slow to be picked by backend="auto".
"""

from __future__ import annotations

import os

import torch

from ..base import Backend, DecodeProblem, Problem

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except ImportError as e:  # optional dependency: pip install 'fastattn[triton]'
    _TRITON_ERROR = str(e)

__all__ = ["TritonBackend"]



def _pow2_at_least_16(n: int) -> bool:  # tl.dot needs tiles >= 16; tiles divide mask blocks
    return n >= 16 and n & (n - 1) == 0


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def mask_tiles(block_mask) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a fastattn.sparse.BlockMask."""
    if hasattr(block_mask, "BLOCK_M"):
        return int(block_mask.BLOCK_M), int(block_mask.BLOCK_N)
    bm, bn = block_mask.block_size
    return int(bm), int(bn)


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    devices = ("cuda", "cpu")  # cpu: interpreter only, by name only
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 256
    supports_window = True
    supports_block_mask = True
    supports_backward = True
    supports_lse = True
    supports_softcap = True
    supports_alibi = True
    supports_dropout = True
    supports_decode = True  # decode.py: split-KV + combine kernels, inference-only

    def available(self):
        if _TRITON_ERROR is not None:
            return False, (f"triton is not installed ({_TRITON_ERROR}); "
                           "pip install 'fastattn[triton]'")
        if torch.cuda.is_available() and torch.version.cuda is not None:
            return True, "ok (CUDA GPU)"
        if _interpreter_on():
            return True, "ok (Triton interpreter on CPU tensors, TRITON_INTERPRET=1; by name only)"
        return False, ("no CUDA GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET "
                       "is not 1; set TRITON_INTERPRET=1 to run the kernels on CPU tensors in "
                       "Triton's interpreter (slow)")

    def why_not(self, p: Problem) -> list[str]:
        ok, why = self.available()
        if not ok:
            return [why]
        reasons = []
        if p.device.type == "cuda":
            if not torch.cuda.is_available():
                reasons.append("inputs are on cuda but no CUDA GPU is available")
            else:
                major, _ = torch.cuda.get_device_capability(p.device)
                if major < 8:
                    reasons.append(f"needs a GPU of compute capability >= 8.0 (sm_80), "
                                   f"got sm_{major}x")
                if p.dtype == torch.float32:
                    reasons.append("float32 runs only in Triton's interpreter: on GPUs its "
                                   "products (float32 FMAs or 3xTF32) spill registers in these "
                                   "kernels (benchmarks/results/triton_compile_report.md); use "
                                   "float16/bfloat16, or the cuda/sdpa backend for float32")
        elif p.device.type == "cpu":
            if not _interpreter_on():
                reasons.append("CPU tensors run only in Triton's interpreter; set "
                               "TRITON_INTERPRET=1 (slow; for testing)")
        else:
            reasons.append(f"runs on cuda (or cpu under TRITON_INTERPRET=1), inputs are on "
                           f"{p.device.type}")
        if p.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {str(p.dtype).replace('torch.', '')}")
        if min(p.D, p.Dv) < self.min_head_dim:
            reasons.append(f"needs head dims >= {self.min_head_dim}, got D={p.D}, Dv={p.Dv}")
        if max(p.D, p.Dv) > self.max_head_dim:
            reasons.append(f"supports head dims up to {self.max_head_dim}, got {max(p.D, p.Dv)}")
        if p.block_mask is not None:
            bm, bn = mask_tiles(p.block_mask)
            if not (_pow2_at_least_16(bm) and _pow2_at_least_16(bn)):
                reasons.append(f"block masks need block sizes that are powers of two >= 16 "
                               f"(kernel tiles divide them), got ({bm}, {bn})")
        return reasons

    def auto_priority(self, p: Problem | DecodeProblem):
        # The interpreter is a correctness tool: never picked by backend="auto".
        return None if p.device.type != "cuda" else self.priority

    def why_not_decode(self, d: DecodeProblem) -> list[str]:
        reasons = super().why_not_decode(d)
        if reasons and not self.available()[0]:
            return reasons
        if d.device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("inputs are on cuda but no CUDA GPU is available")
        elif d.device.type == "cpu" and not _interpreter_on():
            reasons.append("CPU tensors run only in Triton's interpreter; set TRITON_INTERPRET=1 "
                           "(slow; for testing)")
        if d.window[1] != 0:
            reasons.append("its decode kernel is causal (window_right=0); use backend='cpu' "
                           "or 'reference' for other window_right")
        return reasons

    def decode(self, q, k_cache, v_cache, d: DecodeProblem):
        from .decode import triton_decode_attention

        return triton_decode_attention(q, k_cache, v_cache, cache_seqlens=d.cache_seqlens,
                                       window_left=d.window[0], scale=d.scale,
                                       num_splits=d.num_splits or None, softcap=d.softcap,
                                       alibi_slopes=d.alibi_slopes)

    def forward(self, q, k, v, p: Problem):
        from . import ops  # noqa: F401  (registers torch.ops.fastattn.triton_*)

        mask = p.mask  # named hand-off (fastattn.kernel_mask); its window is the token rule
        tensors, (left, right) = mask.tensors, mask.window
        bm, bn = mask.block_size or (0, 0)
        seed = p.seed_int64
        out, lse = torch.ops.fastattn.triton_fwd(q, k, v, float(p.scale), int(left), int(right),
                                                 tensors, bm, bn, float(p.softcap),
                                                 p.alibi_slopes, float(p.dropout_p), seed)
        return out, lse
