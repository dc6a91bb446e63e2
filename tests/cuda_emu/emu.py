"""Run fastattn's CUDA kernels in the CPU emulator from torch tensors.

    out, lse = emu.forward(q, k, v, scale=..., window=(l, r), block_mask=None)
    dq, dk, dv = emu.backward(dout, q, k, v, out, lse, scale=..., window=..., block_mask=None,
                              dlse=None)

Both also take the score modifiers as keywords: softcap=, alibi_slopes= ((Hq,) or (B, Hq)),
dropout_p=, dropout_seed= (64-bit int), with fastattn.score_mods' meaning.

q (B, Hq, Nq, d), k/v (B, Hkv, Nk, d), float16 or bfloat16 CPU tensors. block_mask is the list
BlockMask.kernel_tensors() returns (11 tensors) plus, as the kernel needs it, the mask's token
window passed as `window`. This mirrors what csrc/bindings/cuda_ops.cpp does for real GPUs:
fill a FlashParams, call run_fwd / run_bwd.
"""

from __future__ import annotations

import ctypes
import math

import torch

from . import build

_I64 = ctypes.c_int64
_P = ctypes.c_void_p

_FIELDS = (
    [(n, _P) for n in ("q", "k", "v", "o", "lse", "dout", "dq", "dk", "dv", "delta")]
    + [(f"{t}_{s}_stride", _I64) for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")
       for s in ("batch", "head", "row")]
    + [(n, _I64) for n in ("b", "hq", "hkv", "nq", "nk", "d", "is_bf16", "window_left",
                           "window_right", "block_sparse")]
    + [(n, _P) for n in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                         "kv_mask_ids", "q_num_blocks", "q_indices", "full_q_num_blocks",
                         "full_q_indices", "q_mask_ids", "partial_masks")]
    + [(n, _I64) for n in ("mask_b", "mask_h", "nqb", "nkb", "kmax", "kmax_full", "qmax",
                           "qmax_full", "mask_block_m", "mask_block_n")]
    + [("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("alibi_slopes", _P),
       ("dropout_seed", ctypes.c_uint64), ("dropout_threshold", ctypes.c_uint32),
       ("dropout_p", ctypes.c_float), ("dlse", _P), ("dq_accum", _P), ("atomic_dq", _I64)]
)


class FlashParams(ctypes.Structure):
    _fields_ = _FIELDS


_lib = None


def lib() -> ctypes.CDLL:
    """The emulated kernel library, built on first use; checks the struct mirror."""
    global _lib
    if _lib is None:
        L = build.load("fastattn_cuda_emu")
        L.fa_emu_run.restype = ctypes.c_char_p
        L.fa_emu_run.argtypes = [ctypes.POINTER(FlashParams), ctypes.c_int]
        L.fa_emu_check_params.restype = ctypes.c_char_p
        L.fa_emu_params_size.restype = ctypes.c_long
        L.fa_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        L.fa_emu_dropout_threshold.restype = ctypes.c_uint
        L.fa_emu_dropout_threshold.argtypes = [ctypes.c_double]
        if L.fa_emu_params_size() != ctypes.sizeof(FlashParams):
            raise RuntimeError("emu.FlashParams does not mirror csrc/cuda/flash.h (size)")
        offs = (ctypes.c_long * 128)()
        n = L.fa_emu_params_offsets(offs, 128)
        mine = [getattr(FlashParams, name).offset for name, _ in _FIELDS]
        if n != len(mine) or list(offs[:n]) != mine:
            raise RuntimeError("emu.FlashParams does not mirror csrc/cuda/flash.h (field offsets)")
        _lib = L
    return _lib


def set_schedule(schedule: str = "forward", seed: int = 0) -> None:
    """Order the emulator resumes threads in: 'forward', 'reverse' or 'random' (seeded)."""
    lib().fa_emu_set_schedule({"forward": 0, "reverse": 1, "random": 2}[schedule], seed)


class EmulatedKernelError(RuntimeError):
    pass


def _ptr(t):
    return None if t is None else t.data_ptr()


def _prep(t):
    """Last dim contiguous, other strides multiples of 8, 16-byte aligned (else copy)."""
    if (t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16):
        t = t.contiguous()
    return t


def dropout_threshold(p: float) -> int:
    """The kernels' 24-bit dropout threshold (flash.h dropout_threshold_24)."""
    return int(lib().fa_emu_dropout_threshold(float(p)))


def _params(q, k, v, scale, window, block_mask, keep, mods=None):
    B, Hq, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    p = FlashParams()
    p.b, p.hq, p.hkv, p.nq, p.nk, p.d = B, Hq, Hkv, Nq, Nk, d
    p.is_bf16 = int(q.dtype == torch.bfloat16)
    p.window_left, p.window_right = window
    p.scale = scale
    mods = mods or {}
    p.softcap = float(mods.get("softcap", 0.0))
    slopes = mods.get("alibi_slopes")
    if slopes is not None:  # (Hq,) or (B, Hq) -> (B, Hq) contiguous float32, as the binding does
        slopes = slopes.to(torch.float32).expand(B, Hq).contiguous()
        keep.append(slopes)
        p.alibi_slopes = slopes.data_ptr()
    p.dropout_p = float(mods.get("dropout_p", 0.0))
    p.dropout_threshold = dropout_threshold(p.dropout_p) if p.dropout_p > 0 else 0
    p.dropout_seed = int(mods.get("dropout_seed", 0)) & 0xFFFFFFFFFFFFFFFF
    for name, t in (("q", q), ("k", k), ("v", v)):
        setattr(p, name, t.data_ptr())
        for i, s in enumerate(("batch", "head", "row")):
            setattr(p, f"{name}_{s}_stride", t.stride(i))
    p.block_sparse = 0
    if block_mask:
        (kv_num, kv_idx, full_kv_num, full_kv_idx, kv_mid, q_num, q_idx, full_q_num, full_q_idx,
         q_mid, partial) = [t.contiguous() for t in block_mask]
        partial = partial.to(torch.uint8).contiguous()
        keep.extend([kv_num, kv_idx, full_kv_num, full_kv_idx, kv_mid, q_num, q_idx, full_q_num,
                     full_q_idx, q_mid, partial])
        for name, t in (("kv_num_blocks", kv_num), ("kv_indices", kv_idx),
                        ("full_kv_num_blocks", full_kv_num), ("full_kv_indices", full_kv_idx),
                        ("kv_mask_ids", kv_mid), ("q_num_blocks", q_num), ("q_indices", q_idx),
                        ("full_q_num_blocks", full_q_num), ("full_q_indices", full_q_idx),
                        ("q_mask_ids", q_mid)):
            assert t.dtype == torch.int32, (name, t.dtype)
            setattr(p, name, t.data_ptr())
        p.partial_masks = partial.data_ptr() if partial.numel() else None
        p.block_sparse = 1
        p.mask_b, p.mask_h, p.nqb = kv_num.shape
        p.nkb = q_num.shape[2]
        p.kmax, p.kmax_full = kv_idx.shape[3], full_kv_idx.shape[3]
        p.qmax, p.qmax_full = q_idx.shape[3], full_q_idx.shape[3]
        p.mask_block_m, p.mask_block_n = partial.shape[1], partial.shape[2]
    return p


def _run(p, backward):
    err = lib().fa_emu_run(ctypes.byref(p), int(backward))
    if err is not None:
        raise EmulatedKernelError(err.decode())


def last_launches() -> list[dict]:
    """The kernel launches of the last forward / backward call, in order: grid (x, y), threads
    per block and dynamic shared memory bytes (which instantiation ran: tiles and head dim)."""
    L = lib()
    L.fa_emu_last_launches.restype = ctypes.c_long
    buf = (ctypes.c_long * (4 * 16))()
    n = L.fa_emu_last_launches(buf, 16)
    return [dict(grid=(buf[4 * i], buf[4 * i + 1]), threads=buf[4 * i + 2], smem=buf[4 * i + 3])
            for i in range(min(n, 16))]


def forward(q, k, v, *, scale=None, window=(-1, -1), block_mask=None, **mods):
    """mods: softcap=, alibi_slopes= ((Hq,) or (B, Hq)), dropout_p=, dropout_seed=."""
    q, k, v = _prep(q), _prep(k), _prep(v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = []
    p = _params(q, k, v, scale, window, block_mask, keep, mods)
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    p.o, p.lse = out.data_ptr(), lse.data_ptr()
    for i, s in enumerate(("batch", "head", "row")):
        setattr(p, f"o_{s}_stride", out.stride(i))
    _run(p, False)
    return out, lse


def backward(dout, q, k, v, out, lse, *, scale=None, window=(-1, -1), block_mask=None,
             dlse=None, deterministic=True, **mods):
    """dlse: optional gradient of lse (B, Hq, Nq). deterministic=False runs the FlashAttention-2
    class backward (csrc/cuda/fa2_bwd_kernel.h: atomic dQ into a float32 workspace), as the
    binding does for fastattn.attention(deterministic=False)."""
    q, k, v, out, dout = _prep(q), _prep(k), _prep(v), _prep(out), _prep(dout)
    lse = lse.float().contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = []
    p = _params(q, k, v, scale, window, block_mask, keep, mods)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty(q.shape[:3], dtype=torch.float32)
    p.o, p.lse, p.dout, p.dq, p.dk, p.dv, p.delta = (
        out.data_ptr(), lse.data_ptr(), dout.data_ptr(), dq.data_ptr(), dk.data_ptr(),
        dv.data_ptr(), delta.data_ptr())
    for name, t in (("o", out), ("do", dout), ("dq", dq), ("dk", dk), ("dv", dv)):
        for i, s in enumerate(("batch", "head", "row")):
            setattr(p, f"{name}_{s}_stride", t.stride(i))
    if dlse is not None:
        dlse = dlse.float().contiguous()
        keep.append(dlse)
        p.dlse = dlse.data_ptr()
    if not deterministic:
        # NaN-filled: the kernels must zero it themselves (the preprocess kernel does)
        accum = torch.full(q.shape[:3] + (q.shape[-1],), float("nan"), dtype=torch.float32)
        keep.append(accum)
        p.dq_accum, p.atomic_dq = accum.data_ptr(), 1
    _run(p, True)
    return dq, dk, dv


def check_params_reason(q, k, v, *, window=(-1, -1), block_mask=None, backward=False, **mods):
    keep = []
    p = _params(_prep(q), _prep(k), _prep(v), 1.0, window, block_mask, keep, mods)
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    p.o, p.lse = out.data_ptr(), lse.data_ptr()
    for i, s in enumerate(("batch", "head", "row")):
        setattr(p, f"o_{s}_stride", out.stride(i))
    r = lib().fa_emu_check_params(ctypes.byref(p), int(backward))
    return None if r is None else r.decode()


# ---- split-KV decode (csrc/cuda/decode.h) --------------------------------------------------

_DECODE_FIELDS = (
    [(n, _P) for n in ("q", "k", "v", "o", "lse", "o_part", "lse_part", "cache_seqlens",
                       "alibi_slopes")]
    + [(f"{t}_{s}_stride", _I64) for t in ("q", "k", "v", "o") for s in ("batch", "head", "row")]
    + [(n, _I64) for n in ("b", "hq", "hkv", "nq", "ncache", "d", "dv", "is_bf16", "window_left",
                           "window_right", "num_splits", "max_len", "chunk")]
    + [("scale", ctypes.c_float), ("softcap", ctypes.c_float)]
)


class DecodeParams(ctypes.Structure):
    _fields_ = _DECODE_FIELDS


_decode_checked = False


def _decode_lib():
    global _decode_checked
    L = lib()
    if not _decode_checked:
        L.fa_emu_decode.restype = ctypes.c_char_p
        L.fa_emu_decode.argtypes = [ctypes.POINTER(DecodeParams)]
        L.fa_emu_decode_params_size.restype = ctypes.c_long
        L.fa_emu_decode_chunk.restype = ctypes.c_long
        L.fa_emu_decode_chunk.argtypes = [ctypes.c_long, ctypes.c_long]
        if L.fa_emu_decode_params_size() != ctypes.sizeof(DecodeParams):
            raise RuntimeError("emu.DecodeParams does not mirror csrc/cuda/decode.h (size)")
        offs = (ctypes.c_long * 64)()
        n = L.fa_emu_decode_params_offsets(offs, 64)
        mine = [getattr(DecodeParams, name).offset for name, _ in _DECODE_FIELDS]
        if n != len(mine) or list(offs[:n]) != mine:
            raise RuntimeError("emu.DecodeParams does not mirror csrc/cuda/decode.h (offsets)")
        _decode_checked = True
    return L


def decode_chunk(max_len: int, num_splits: int) -> int:
    return int(_decode_lib().fa_emu_decode_chunk(max_len, num_splits))


def decode(q, k_cache, v_cache, *, cache_seqlens=None, scale=None, window=(-1, 0), num_splits=1,
           softcap=0.0, alibi_slopes=None, max_len=None):
    """The CUDA split-KV decode kernels on CPU tensors: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)).
    Mirrors what the cuda_decode op does on a GPU (the S partials live in a float32 workspace)."""
    B, Hq, Nq, D = q.shape
    Hkv, Ncache, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    for t in (q, k_cache, v_cache):
        assert t.stride(-1) == 1
    scale = D ** -0.5 if scale is None else scale
    keep = []
    p = DecodeParams()
    p.b, p.hq, p.hkv, p.nq, p.ncache, p.d, p.dv = B, Hq, Hkv, Nq, Ncache, D, Dv
    p.is_bf16 = int(q.dtype == torch.bfloat16)
    p.window_left, p.window_right = window
    p.scale, p.softcap = float(scale), float(softcap)
    if cache_seqlens is not None:
        cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
        keep.append(cache_seqlens)
        p.cache_seqlens = cache_seqlens.data_ptr()
        max_len = int(cache_seqlens.max()) if max_len is None else max_len
    p.max_len = max(1, Ncache if max_len is None else max_len)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32).expand(B, Hq).contiguous()
        keep.append(slopes)
        p.alibi_slopes = slopes.data_ptr()
    p.num_splits = num_splits
    R = (Hq // Hkv) * Nq
    out = torch.empty((B, Hq, Nq, Dv), dtype=q.dtype)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32)
    if num_splits > 1:  # NaN-filled: a partial the combine reads but nobody wrote shows up
        o_part = torch.full((B * Hkv, num_splits, R, Dv), float("nan"))
        lse_part = torch.full((B * Hkv, num_splits, R), float("nan"))
        keep += [o_part, lse_part]
        p.o_part, p.lse_part = o_part.data_ptr(), lse_part.data_ptr()
    for name, t in (("q", q), ("k", k_cache), ("v", v_cache), ("o", out)):
        setattr(p, name, t.data_ptr())
        for i, s in enumerate(("batch", "head", "row")):
            setattr(p, f"{name}_{s}_stride", t.stride(i))
    p.lse = lse.data_ptr()
    err = _decode_lib().fa_emu_decode(ctypes.byref(p))
    if err is not None:
        raise EmulatedKernelError(err.decode())
    return out, lse


del math
