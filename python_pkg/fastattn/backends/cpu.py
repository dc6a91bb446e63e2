"""cpu: fastattn's fused C++ kernels (csrc/cpu), forward and backward.

The kernels are torch.library custom ops defined in C++ (csrc/bindings/cpu_ops.cpp):

    fastattn::cpu_fwd(q, k, v, scale, window_left, window_right, block_mask[],
                      softcap=0, alibi_slopes?=None, dropout_p=0, seed=0) -> (out, lse)
    fastattn::cpu_bwd(dout, q, k, v, out, lse, dlse?, scale, window_left, window_right,
                      block_mask[], softcap=0, alibi_slopes?=None, dropout_p=0, seed=0)
                      -> (dq, dk, dv)

This module gives them fake (meta) implementations for torch.compile and registers the
autograd formula, so calling torch.ops.fastattn.cpu_fwd is differentiable.
block_mask[] is empty for dense/window calls, else BlockMask.kernel_tensors(). softcap,
alibi_slopes ((B, Hq) float32), dropout_p and seed are fastattn.score_mods' modifiers; the
backward regenerates the dropout keep bits from the seed.
"""

from __future__ import annotations

import torch

from .._extension import load as load_extension
from .base import Backend, DecodeProblem, Problem, fake_outputs

# loads the library that defines torch.ops.fastattn.cpu_* (None + reason when not built or
# built against another torch)
_C, _LOAD_ERROR = load_extension("_C")


def _register():
    @torch.library.register_fake("fastattn::cpu_fwd")
    def _fwd_fake(q, k, v, scale, window_left, window_right, block_mask, softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, seed=0):
        return fake_outputs(q, v)

    @torch.library.register_fake("fastattn::cpu_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, window_left, window_right, block_mask,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0):
        # The kernel returns contiguous gradients whatever the inputs' strides (empty_like
        # would keep a transposed k's strides and mislead torch.compile's views).
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        # inputs may omit trailing defaulted arguments (the dispatcher drops them)
        q, k, v, scale, wl, wr, block_mask = inputs[:7]
        mods = dict(zip(("softcap", "alibi_slopes", "dropout_p", "seed"), inputs[7:]))
        alibi = mods.pop("alibi_slopes", None)
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, alibi, *block_mask)
        ctx.scale, ctx.wl, ctx.wr, ctx.n_bm = scale, wl, wr, len(block_mask)
        ctx.mods = mods

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, alibi, *block_mask = ctx.saved_tensors
        # dlse flows in when a loss depends on the returned lse (ring attention merges on it).
        dq, dk, dv = torch.ops.fastattn.cpu_bwd(
            dout, q, k, v, out, lse, dlse, ctx.scale, ctx.wl, ctx.wr, block_mask,
            softcap=ctx.mods.get("softcap", 0.0), alibi_slopes=alibi,
            dropout_p=ctx.mods.get("dropout_p", 0.0), seed=ctx.mods.get("seed", 0))
        # one entry per argument the caller passed (the dispatcher drops trailing defaults;
        # needs_input_grad has the passed structure)
        grads = [dq, dk, dv, None, None, None, [None] * ctx.n_bm]
        return tuple(grads + [None] * (len(ctx.needs_input_grad) - 7))

    torch.library.register_autograd("fastattn::cpu_fwd", backward, setup_context=setup_context)

    if hasattr(torch.ops.fastattn, "cpu_decode"):  # split-KV decode (fastattn.decode), no grad
        @torch.library.register_fake("fastattn::cpu_decode")
        def _decode_fake(q, k_cache, v_cache, cache_seqlens, scale, window_left, num_splits,
                         window_right=0, softcap=0.0, alibi_slopes=None):
            return fake_outputs(q, v_cache)


if _C is not None:
    _register()


class CPUBackend(Backend):
    name = "cpu"
    priority = 20
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    max_head_dim = 256
    supports_window = True
    supports_block_mask = True
    supports_backward = True
    supports_lse = True
    supports_softcap = True
    supports_alibi = True
    supports_dropout = True
    supports_decode = True  # csrc/cpu/decode_cpu.cpp, inference-only

    def available(self):
        if _C is None:
            return False, f"the compiled extension fastattn._C is not usable: {_LOAD_ERROR}"
        return True, "ok"

    def why_not_decode(self, d: DecodeProblem) -> list[str]:
        reasons = super().why_not_decode(d)
        if not reasons and not hasattr(torch.ops.fastattn, "cpu_decode"):
            reasons.append("fastattn._C was built without the decode kernel; rebuild it")
        return reasons

    def decode(self, q, k_cache, v_cache, d: DecodeProblem):
        wl, wr = d.window
        if d.softcap or d.alibi_slopes is not None or wr != 0:
            return torch.ops.fastattn.cpu_decode(q, k_cache, v_cache, d.cache_seqlens, d.scale,
                                                 wl, d.num_splits, wr, d.softcap, d.alibi_slopes)
        # the plain schema call (what compiled graphs of unmodified models hold)
        return torch.ops.fastattn.cpu_decode(q, k_cache, v_cache, d.cache_seqlens, d.scale, wl,
                                             d.num_splits)

    def forward(self, q, k, v, p: Problem):
        mask = p.mask  # named hand-off (fastattn.kernel_mask); its window is the token rule
        wl, wr = mask.window
        if p.has_score_mods:
            out, lse = torch.ops.fastattn.cpu_fwd(
                q, k, v, p.scale, wl, wr, mask.tensors, p.softcap, p.alibi_slopes, p.dropout_p,
                p.seed_int64)
        else:  # the plain schema call (what compiled graphs of unmodified models hold)
            out, lse = torch.ops.fastattn.cpu_fwd(q, k, v, p.scale, wl, wr, mask.tensors)
        return out, lse


def cpu_model() -> str:
    """The CPU's name as the OS reports it, with its family/model numbers on x86 (a VM may
    hide the marketing name: 'AMD EPYC (family 25, model 17)')."""
    import platform

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, val = line.partition(":")
                fields[key.strip().lower()] = val.strip()
    except OSError:
        pass
    name = (fields.get("model name") or fields.get("hardware") or fields.get("cpu model")
            or platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def release_workspace() -> None:
    """Frees the operand buffers (K^T panels, padded copies) the cpu kernels keep between
    calls for the calling thread: at most 64 MB each and 128 MB per thread, kept so that
    repeated calls do not page-fault fresh multi-MB buffers every time (csrc/cpu/operands.h)."""
    if _C is None:
        raise RuntimeError(f"the compiled extension fastattn._C is not usable: {_LOAD_ERROR}")
    _C.release_workspace()


def cpu_output_cache(limit_mb: float | None = None) -> dict:
    """The cpu kernels' output cache (csrc/cpu/output_cache.h). Large outputs (forward out,
    backward dQ/dK/dV, from 1 MiB) are allocated from blocks freed by earlier calls of the same
    size, like PyTorch's CUDA caching allocator, instead of fresh pages every call (at N=16384,
    H=8, D=64 a fresh 32 MiB output costs ~13 ms of page faults with glibc). Freed blocks are
    kept up to a limit: 256 MiB by default, FASTATTN_CPU_CACHE_MB at import, or limit_mb here
    (0 turns it off and frees what is kept). Returns limit_bytes, kept_bytes, kept_blocks and
    the hits / misses of cached allocations so far."""
    if _C is None:
        raise RuntimeError(f"the compiled extension fastattn._C is not usable: {_LOAD_ERROR}")
    if limit_mb is not None:
        if (isinstance(limit_mb, bool) or not isinstance(limit_mb, (int, float))
                or not 0 <= limit_mb < float("inf")):
            raise ValueError(f"limit_mb={limit_mb!r}: pass a finite number of MiB >= 0 "
                             "(0 turns the cache off)")
        _C.set_output_cache_limit(int(limit_mb * (1 << 20)))
    return dict(_C.output_cache_stats())


def empty_cpu_output_cache() -> None:
    """Frees every block the cpu output cache keeps (the limit stays; see cpu_output_cache)."""
    if _C is None:
        raise RuntimeError(f"the compiled extension fastattn._C is not usable: {_LOAD_ERROR}")
    _C.empty_output_cache()


def kernel_stats(reset: bool = False) -> dict:
    """What the cpu kernels did (csrc/cpu/kernel_stats.h): fwd_visits / bwd_visits, the mask
    blocks computed since the last reset (one per (batch, head, query block, key block); a
    block-sparse call counts exactly its listed blocks, clipped by causal/window), and
    fwd_threads / bwd_threads, the at::parallel_for thread numbers that ran the last call's
    tasks, and fwd_bf16_dot / bwd_bf16_dot, the calls that ran the bfloat16 dot-product
    products (the avx512bf16 variant with bfloat16 inputs). reset=True zeroes them after
    reading. For tests and debugging."""
    if _C is None:
        raise RuntimeError(f"the compiled extension fastattn._C is not usable: {_LOAD_ERROR}")
    stats = dict(_C.kernel_stats())
    if reset:
        _C.reset_kernel_stats()
    return stats


def kernel_info() -> dict:
    """What the cpu backend runs on this machine: the CPU model, the kernel variant a call
    takes now (generic / avx2 / avx512 / avx512bf16; FASTATTN_CPU_ISA forces a lower one), the variants
    the CPU can run, the features the dispatcher saw and the build flags."""
    info = {"cpu": cpu_model(), "variant": None, "runnable": [], "features": "", "build": ""}
    if _C is None:
        info["build"] = f"not usable: {_LOAD_ERROR}"
        return info
    info.update(runnable=list(_C.cpu_isas()), features=_C.cpu_features(), build=_C.build_info())
    try:
        info["variant"] = _C.cpu_isa()
    except ValueError as e:  # a bad FASTATTN_CPU_ISA: say so instead of failing
        info["variant"] = f"error: {e}"
    return info
