"""The triton backend's torch.library ops: kernel loading, launchers, autograd.

    fastattn::triton_fwd(q, k, v, scale, window_left, window_right, block_mask[],
                         mask_block_m, mask_block_n) -> (out, lse)
    fastattn::triton_bwd(dout, q, k, v, out, lse, dlse?, scale, window_left, window_right,
                         block_mask[], mask_block_m, mask_block_n) -> (dq, dk, dv)

block_mask[] is empty for dense/window calls, else BlockMask.kernel_tensors() (11 tensors,
see fastattn/sparse/block_mask.py); then (window_left, window_right) is the mask's token
rule for partial blocks, and the kernels walk the mask's (mask_block_m, mask_block_n) blocks
in tiles that divide them.
CUDA tensors run the compiled kernels; CPU tensors run them in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

import torch
import triton

_KERNELS: dict[bool, object] = {}
_LOCK = threading.Lock()


def load_kernels(interpret: bool):
    """kernels.py executed with Triton's interpreter on or off. The interpreter is decided
    when @triton.jit runs, i.e. at import; loading the file once per mode makes the CPU
    path work whenever TRITON_INTERPRET was set, and keeps CUDA/AOT kernels compilable."""
    with _LOCK:
        mod = _KERNELS.get(interpret)
        if mod is not None:
            return mod
        name = f"{__package__}._kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("kernels.py"))
        mod = importlib.util.module_from_spec(spec)
        runtime = triton.knobs.runtime
        had = "interpret" in runtime.__dict__
        old = runtime.__dict__.get("interpret")
        env_old = os.environ.get("TRITON_INTERPRET")
        try:
            runtime.interpret = interpret
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        finally:
            if had:
                runtime.__dict__["interpret"] = old
            else:
                runtime.__dict__.pop("interpret", None)
            if env_old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = env_old
        _KERNELS[interpret] = mod
        return mod


def _cdiv(a, b):
    return (a + b - 1) // b


def _layout_args(bm, forward: bool, B: int, H: int, device):
    """Six pointer args and nine strides of the block-mask lists a kernel walks (forward
    lists for fwd/dQ, transposed lists for dK/dV), broadcast dims given stride 0."""
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    if not bm:
        return [dummy] * 5 + [dummy.to(torch.uint8)], [0] * 9
    num, idx, fnum, fidx, mid = bm[0:5] if forward else bm[5:10]
    pm = bm[10]

    def strides3(t):
        return list(t.expand(B, H, *t.shape[2:]).stride()[:3])

    strides = strides3(num) + strides3(idx) + strides3(fidx)
    ptrs = [num, idx if idx.numel() else dummy, fnum, fidx if fidx.numel() else dummy,
            mid if mid.numel() else dummy, pm if pm.numel() else dummy.to(torch.uint8)]
    return ptrs, strides


def _constexprs(q, k, v, wl, wr, bm, mbn, interpret):
    D, Dv, Nk = q.shape[-1], v.shape[-1], k.shape[2]
    pad = lambda d: max(16, triton.next_power_of_2(d))
    return dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=pad(D), BLOCK_DV=pad(Dv),
        WINDOW_LEFT=wl != -1, WINDOW_RIGHT=wr != -1, SPARSE=bool(bm),
        BITMASK=bool(bm) and bm[10].shape[0] > 0,
        EVEN_N=bool(bm) and Nk % mbn == 0,
        DOT_UPCAST=interpret,
        DOT_PRECISION=load_kernels(interpret).dot_precision(q.element_size(), max(pad(D), pad(Dv)),
                                                            interpret),
    )


def _tiles(kern, bm, mbm, mbn, interpret, dense_name, sparse_name, raw_name):
    """(kernel, extra constexprs). Compiled: the autotuner picks BLOCK_M/BLOCK_N (for block
    masks among tiles that divide the mask's blocks). Interpreter: INTERPRET_TILE, clipped
    to the mask's blocks."""
    if interpret:
        fn, tiles = getattr(kern, raw_name), dict(kern.INTERPRET_TILE)
        if bm:
            tiles = dict(BLOCK_M=min(tiles["BLOCK_M"], mbm), BLOCK_N=min(tiles["BLOCK_N"], mbn))
    else:
        fn, tiles = getattr(kern, sparse_name if bm else dense_name), {}
    # dense calls never read MASK_BM/MASK_BN; 16 keeps them valid constexprs
    tiles.update(MASK_BM=mbm if bm else 16, MASK_BN=mbn if bm else 16)
    return fn, tiles


def _check_cuda_device(t):
    if t.device.type == "cuda":
        torch.cuda.set_device(t.device)  # launches go to the current device


def attention_forward(q, k, v, scale, window_left, window_right, block_mask, mask_block_m,
                      mask_block_n):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or Nk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    interpret = q.device.type != "cuda"
    _check_cuda_device(q)
    kern = load_kernels(interpret)
    bm = list(block_mask)
    ptrs, lstrides = _layout_args(bm, True, B, H, q.device)
    meta = _constexprs(q, k, v, window_left, window_right, bm, mask_block_n, interpret)
    fn, tiles = _tiles(kern, bm, mask_block_m, mask_block_n, interpret,
                       "attn_fwd_dense", "attn_fwd_sparse", "_attn_fwd")
    grid = lambda META: (_cdiv(Nq, META["BLOCK_M"]), B * H)
    fn[grid](q, k, v, out, lse, scale,
             *q.stride(), *k.stride(), *v.stride(), *out.stride(),
             H, H // Hkv, Nq, Nk, window_left, window_right,
             *ptrs, *lstrides, **meta, **tiles)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, dlse, scale, window_left, window_right,
                       block_mask, mask_block_m, mask_block_n):
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Nk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Nk, Dv), dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or Nq == 0 or Nk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interpret = q.device.type != "cuda"
    _check_cuda_device(q)
    kern = load_kernels(interpret)
    bm = list(block_mask)
    meta = _constexprs(q, k, v, window_left, window_right, bm, mask_block_n, interpret)

    delta = torch.empty_like(lse)
    pre_m = 32 if interpret else 64
    has_dlse = dlse is not None
    # the preprocess kernel indexes dlse with lse's (B, H, Nq) contiguous layout; autograd can
    # hand us an expanded or strided gradient (e.g. from lse.sum()), so make it match.
    dlse = dlse.to(torch.float32).contiguous() if has_dlse else None
    lse = lse.contiguous()
    kern._attn_bwd_preprocess[(_cdiv(Nq, pre_m), B * H)](
        out, dout, dlse if has_dlse else lse, delta, *out.stride(), *dout.stride(), H, Nq,
        HEAD_DIM_V=Dv, BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=pre_m, HAS_DLSE=has_dlse)

    ptrs, lstrides = _layout_args(bm, False, B, H, q.device)
    fn, tiles = _tiles(kern, bm, mask_block_m, mask_block_n, interpret,
                       "attn_bwd_dkdv_dense", "attn_bwd_dkdv_sparse", "_attn_bwd_dkdv")
    grid = lambda META: (_cdiv(Nk, META["BLOCK_N"]), B * Hkv)
    for part in kern.dkdv_parts(meta["BLOCK_D"], meta["BLOCK_DV"]):
        fn[grid](q, k, v, dout, lse, delta, dk, dv, scale,
                 *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(),
                 *dv.stride(), H, H // Hkv, Nq, Nk, window_left, window_right,
                 *ptrs, *lstrides, **meta, **tiles, PART=part)

    ptrs, lstrides = _layout_args(bm, True, B, H, q.device)
    fn, tiles = _tiles(kern, bm, mask_block_m, mask_block_n, interpret,
                       "attn_bwd_dq_dense", "attn_bwd_dq_sparse", "_attn_bwd_dq")
    grid = lambda META: (_cdiv(Nq, META["BLOCK_M"]), B * H)
    fn[grid](q, k, v, dout, lse, delta, dq, scale,
             *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
             H, H // Hkv, Nq, Nk, window_left, window_right,
             *ptrs, *lstrides, **meta, **tiles)
    return dq, dk, dv


# --------------------------------------------------------------------------- torch.library


@torch.library.custom_op("fastattn::triton_fwd", mutates_args=())
def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               window_left: int, window_right: int, block_mask: list[torch.Tensor],
               mask_block_m: int, mask_block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, window_left, window_right, block_mask,
                             mask_block_m, mask_block_n)


@triton_fwd.register_fake
def _(q, k, v, scale, window_left, window_right, block_mask, mask_block_m, mask_block_n):
    B, H, Nq, _ = q.shape
    return (q.new_empty((B, H, Nq, v.shape[-1])),
            q.new_empty((B, H, Nq), dtype=torch.float32))


@torch.library.custom_op("fastattn::triton_bwd", mutates_args=())
def triton_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, scale: float,
               window_left: int, window_right: int, block_mask: list[torch.Tensor],
               mask_block_m: int, mask_block_n: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(dout, q, k, v, out, lse, dlse, scale, window_left, window_right,
                              block_mask, mask_block_m, mask_block_n)


@triton_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, scale, window_left, window_right, block_mask,
      mask_block_m, mask_block_n):
    # the real op allocates fresh contiguous gradients (torch.empty(shape)), so must the fake
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, wl, wr, block_mask, mbm, mbn = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *block_mask)
    ctx.args = (scale, wl, wr, mbm, mbn)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *block_mask = ctx.saved_tensors
    scale, wl, wr, mbm, mbn = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    # A loss on lse (ring attention merges on it) enters through Delta' = Delta - dlse.
    dq, dk, dv = triton_bwd(dout, q, k, v, out, lse, dlse, scale, wl, wr, block_mask, mbm, mbn)
    return dq, dk, dv, None, None, None, [None] * len(block_mask), None, None


triton_fwd.register_autograd(_backward, setup_context=_setup_context)
