"""cuda: fastattn's hand-written CUDA kernels (csrc/cuda), forward and backward.

The kernels are torch.library custom ops defined in C++ (csrc/bindings/cuda_ops.cpp, built into
fastattn._cuda only when torch has CUDA and nvcc is found):

    fastattn::cuda_fwd(q, k, v, scale, window_left, window_right, block_mask[],
                       softcap=0., alibi_slopes=None, dropout_p=0., dropout_seed=0,
                       deterministic=True) -> (out, lse)
    fastattn::cuda_bwd(dout, q, k, v, out, lse, scale, window_left, window_right, block_mask[],
                       softcap=0., alibi_slopes=None, dropout_p=0., dropout_seed=0, dlse=None,
                       deterministic=True) -> (dq, dk, dv)

deterministic (Problem.deterministic, the API's option) picks the backward: True the atomic-free
wmma kernels (flash_bwd_kernel.h: separate dK/dV and dQ kernels, bitwise reproducible), False the
FlashAttention-2 class kernel (fa2_bwd_kernel.h: mma.sync/ldmatrix/cp.async, dQ accumulated in
float32 with atomicAdd: not bitwise reproducible). cuda_fwd takes it only to hand it to autograd.

This module gives them fake (meta) implementations for torch.compile and registers the
autograd formula, so calling torch.ops.fastattn.cuda_fwd is differentiable (through out and lse:
the lse gradient reaches the kernels as dlse). block_mask[] is
empty for dense/window calls, else BlockMask.kernel_tensors() with the mask's own token window.

What the kernels do: float16/bfloat16 (fp32 softmax statistics and accumulation), head dims
that are multiples of 8 up to 256: the FlashAttention-2 class forward and the deterministic=False
backward are compiled for 32, 64, 96, 128, 192 and 256 (others zero-padded up to the next), the
deterministic=True backward (and the forward of block masks with BLOCK_M = 64) for 64 and 128,
so gradients above head dim 128 need deterministic=False; GQA,
causal/window (bottom-right aligned), block masks whose BLOCK_M and BLOCK_N are multiples of 64,
and the score modifiers of fastattn.score_mods inside the fused loops (softcap, ALiBi slopes
(Hq,) or (B, Hq), dropout whose keep bits the backward regenerates from the seed).

Decode (fastattn.decode_attention): fastattn::cuda_decode, the split-KV kernels of
csrc/cuda/decode_kernel.h (one CTA per (key chunk, batch, kv head, row tile) over all query rows
of the GQA group, then a combine kernel), float16/bfloat16, head dims up to 128, cache_seqlens,
any (window_left, window_right), softcap and ALiBi; inference only. Under backend="auto" on a
GPU it is a candidate only where gpu_validation records the cuda family validated on that arch
(auto_priority); elsewhere auto keeps decode on triton, and backend="cuda" asks for it.
"""

from __future__ import annotations

import torch

from .. import gpu_validation
from .._extension import load as load_extension
from .base import Backend, DecodeProblem, Problem, fake_outputs

# loads the library that defines torch.ops.fastattn.cuda_* (None + reason when not built:
# CPU-only torch, no nvcc, FASTATTN_BUILD_CUDA=0, or built against another torch)
_cuda, _LOAD_ERROR = load_extension("_cuda")

MASK_BLOCK_MULTIPLE = 64  # csrc/cuda/flash.h kMaskBlockMultiple


def _register():
    @torch.library.register_fake("fastattn::cuda_fwd")
    def _fwd_fake(q, k, v, scale, window_left, window_right, block_mask, softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, dropout_seed=0, deterministic=True):
        return fake_outputs(q, v)

    @torch.library.register_fake("fastattn::cuda_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, scale, window_left, window_right, block_mask,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0, dlse=None,
                  deterministic=True):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, scale, wl, wr, block_mask, *mods = inputs
        softcap, alibi, dropout_p, dropout_seed, deterministic = (
            mods + [0.0, None, 0.0, 0, True][len(mods):])
        out, lse = output
        ctx.has_alibi = alibi is not None
        ctx.save_for_backward(q, k, v, out, lse, *([alibi] if ctx.has_alibi else []), *block_mask)
        ctx.scale, ctx.wl, ctx.wr = scale, wl, wr
        ctx.softcap, ctx.dropout_p, ctx.dropout_seed = softcap, dropout_p, dropout_seed
        ctx.deterministic = deterministic

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        alibi, block_mask = (rest[0], rest[1:]) if ctx.has_alibi else (None, rest)
        # dlse (None when the loss ignores lse) enters the kernels as delta -= dlse
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = torch.ops.fastattn.cuda_bwd(
            dout, q, k, v, out, lse, ctx.scale, ctx.wl, ctx.wr, list(block_mask), ctx.softcap,
            alibi, ctx.dropout_p, ctx.dropout_seed, dlse, ctx.deterministic)
        # One grad per input as the dispatcher passed them (it drops trailing arguments equal to
        # their defaults), shaped like it: a list for the Tensor[] block_mask. needs_input_grad
        # has exactly that structure here.
        rest = tuple([None] * len(x) if isinstance(x, (list, tuple)) else None
                     for x in ctx.needs_input_grad[3:])
        return (dq, dk, dv) + rest

    torch.library.register_autograd("fastattn::cuda_fwd", backward, setup_context=setup_context)

    @torch.library.register_fake("fastattn::cuda_decode")
    def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right,
                     softcap, alibi_slopes, num_splits, max_len):
        return fake_outputs(q, v_cache)


if _cuda is not None:
    _register()


def _availability_reasons() -> list[str]:
    reasons = []
    if _cuda is None and "was built against" in (_LOAD_ERROR or ""):  # a torch mismatch
        reasons.append(f"the compiled extension fastattn._cuda is not usable: {_LOAD_ERROR}")
    elif _cuda is None:
        why = ("torch has no CUDA" if torch.version.cuda is None
               else "nvcc was missing or FASTATTN_BUILD_CUDA=0 at build time")
        reasons.append(f"the compiled extension fastattn._cuda is not built ({why}; "
                       f"import error: {_LOAD_ERROR}); rebuild with a CUDA build of torch and "
                       "nvcc: FASTATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is a CPU-only build")
    elif not torch.cuda.is_available():
        reasons.append("no GPU present (torch.cuda.is_available() is False)")
    return reasons


DECODE_KEY_STEP = 16  # csrc/cuda/decode.h kDecodeKeyStep: keys per CTA step


def default_decode_splits(B: int, Hkv: int, rows: int, head_dim: int, max_len: int,
                          n_sm: int = 108) -> int:
    """Key chunks of the cuda decode kernel: enough (chunk, batch, kv head, row tile) CTAs for
    two per SM, each chunk at least 16 key steps (256 keys) so the combine stays cheap."""
    per_cta = 8 if head_dim > 64 else 16  # decode.h decode_rows_per_cta
    ctas = B * Hkv * -(-rows // per_cta)
    want = max(1, -(-2 * n_sm // max(1, ctas)))
    return max(1, min(want, max_len // (16 * DECODE_KEY_STEP), 128))


class CUDABackend(Backend):
    name = "cuda"
    priority = 40
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    max_head_dim = 256  # forward, and the deterministic=False (atomic-dQ) backward
    max_head_dim_grad = 128  # the deterministic=True backward (the wmma kernels)
    supports_window = True
    supports_block_mask = True
    supports_backward = True
    supports_lse = True
    supports_softcap = True
    supports_alibi = True
    supports_dropout = True

    def available(self):
        reasons = _availability_reasons()
        return (False, "; ".join(reasons)) if reasons else (True, "ok")

    def why_not(self, p: Problem) -> list[str]:
        # Every reason at once: availability and what this problem asks for.
        reasons = _availability_reasons()
        if p.device.type not in self.devices:
            reasons.append(f"runs on cuda, inputs are on {p.device.type}")
        if p.dtype not in self.dtypes:
            reasons.append(f"supports dtypes float16, bfloat16, got "
                           f"{str(p.dtype).replace('torch.', '')}")
        if max(p.D, p.Dv) > self.max_head_dim:
            reasons.append(f"supports head dims up to {self.max_head_dim}, got {max(p.D, p.Dv)}")
        elif p.needs_grad and p.deterministic and max(p.D, p.Dv) > self.max_head_dim_grad:
            reasons.append(f"supports head dims up to {self.max_head_dim_grad} with gradients "
                           f"when deterministic=True (its bitwise-reproducible backward), got "
                           f"{max(p.D, p.Dv)}; deterministic=False (the atomic-dQ backward) "
                           f"serves up to {self.max_head_dim}")
        if p.D % 8 != 0:
            reasons.append(f"needs a head dim that is a multiple of 8, got {p.D}")
        if p.D != p.Dv:
            reasons.append(f"needs equal head dims for q/k ({p.D}) and v ({p.Dv})")
        if p.B * p.Hq > 65535:
            reasons.append(f"supports batch * heads up to 65535, got {p.B * p.Hq}")
        bm = p.block_mask
        if bm is not None and (bm.BLOCK_M % MASK_BLOCK_MULTIPLE or bm.BLOCK_N % MASK_BLOCK_MULTIPLE):
            reasons.append(f"needs block-mask blocks that are multiples of {MASK_BLOCK_MULTIPLE}, "
                           f"got (BLOCK_M, BLOCK_N) = ({bm.BLOCK_M}, {bm.BLOCK_N}); build the "
                           f"mask with block_size=128 (the default) or 64")
        return reasons

    supports_decode = True  # flash_decode.cu: split-KV + combine, inference-only

    def auto_priority(self, p: Problem | DecodeProblem):
        # decode joined this family after its GPU checks were designed: backend="auto" takes it
        # only where a recorded gpu-check (which runs tests/gpu/test_gpu_cuda.py::test_decode)
        # validated the cuda family on this arch; backend="cuda" always can
        if isinstance(p, DecodeProblem):
            if p.device.type != "cuda" or not torch.cuda.is_available():
                return None
            arch = gpu_validation.device_arch(p.device)
            return self.priority if gpu_validation.validated(self.name, arch) else None
        return self.priority

    def why_not_decode(self, d: DecodeProblem) -> list[str]:
        if not self.available()[0]:
            return _availability_reasons()
        reasons = self._input_reasons(d)
        hd = max(d.D, d.Dv)
        if self.max_head_dim_grad < hd <= self.max_head_dim:  # the forward goes to 256; decode stops at 128
            reasons.append(f"its decode kernel supports head dims up to {self.max_head_dim_grad}, got {hd}")
        if d.needs_grad:
            reasons.append("its decode kernel is inference-only (no backward) and an input "
                           "requires grad; call it under torch.no_grad(), or use "
                           "backend='reference' or fastattn.attention to train")
        if d.B * d.Hkv > 65535:
            reasons.append(f"supports batch * kv heads up to 65535, got {d.B * d.Hkv}")
        return reasons

    def decode(self, q, k_cache, v_cache, d: DecodeProblem):
        Ncache = k_cache.shape[2]
        max_len = int(d.cache_seqlens.max()) if d.cache_seqlens is not None else Ncache
        splits = d.num_splits or default_decode_splits(
            d.B, d.Hkv, (d.Hq // d.Hkv) * d.Nq, max(d.D, d.Dv), max_len,
            torch.cuda.get_device_properties(q.device).multi_processor_count)
        slopes = d.alibi_slopes
        return torch.ops.fastattn.cuda_decode(q, k_cache, v_cache, d.cache_seqlens, float(d.scale),
                                              int(d.window[0]), int(d.window[1]),
                                              float(d.softcap or 0.0), slopes, int(splits),
                                              int(max_len))

    def forward(self, q, k, v, p: Problem):
        mask = p.mask  # named hand-off (fastattn.kernel_mask); its window is the token rule
        (wl, wr), bm = mask.window, mask.tensors
        out, lse = torch.ops.fastattn.cuda_fwd(q, k, v, p.scale, wl, wr, bm, float(p.softcap),
                                               p.alibi_slopes, float(p.dropout_p), p.seed_int64,
                                               bool(p.deterministic))
        return out, lse
