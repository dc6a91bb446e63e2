"""FlashAttention 2's public functions (signatures and semantics of flash_attn 2.6/2.7) on
fastattn's kernels, on every device fastattn runs on (CPU included).

Layout is FlashAttention's (batch, seqlen, nheads, headdim); every call turns into
fastattn.attention / fastattn.attention_varlen / fastattn.decode_attention on transposed
views (no copies of q, k, v; the output is made contiguous, as FlashAttention's is).

Semantics shared by all functions (as in FlashAttention >= 2.1):
  - softmax_scale defaults to headdim ** -0.5.
  - causal=True is aligned to the bottom-right corner: query i sees key j iff
    j <= i + seqlen_k - seqlen_q. Rows that see no key return 0.

        seqlen_q = 2, seqlen_k = 5:    seqlen_q = 5, seqlen_k = 2:
            1 1 1 1 0                      0 0
            1 1 1 1 1                      0 0
                                           0 0
                                           1 0
                                           1 1

  - window_size=(left, right) (any pair of int-convertible items, e.g. a (2,) integer
    tensor, as FlashAttention takes): query i sees keys in
    [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; -1 (any negative)
    is unbounded on that side; causal caps right at 0.
  - GQA/MQA: k and v may have fewer heads; query head h reads kv head h // (nheads // nheads_k).
  - softcap > 0: scores become softcap * tanh(score / softcap) (after softmax_scale).
  - alibi_slopes (nheads,) or (batch, nheads) float32: bias -slope * |i + seqlen_k - seqlen_q - j|.
  - dropout_p: dropout on the attention probabilities whenever > 0 (pass 0.0 at eval
    time). The keep bits come from fastattn's counter-based hash (fastattn.score_mods)
    seeded from torch's default generator, so torch.manual_seed(s) reproduces the
    forward and the backward regenerates the same bits (no N x N mask is stored).
  - deterministic: passed through to fastattn.attention(deterministic=...) (FlashAttention's
    default False allows an atomic dQ backward). On the cuda backend False runs the
    FlashAttention-2 class backward, whose dQ is accumulated with float atomics (gradients are
    not bitwise reproducible run to run); True the atomic-free one. cpu and triton are
    bitwise reproducible either way.
  - Scalars (softmax_scale, softcap, dropout_p, max_seqlen_*, num_splits, an int
    cache_seqlens) may also be numpy scalars or one-element tensors, as in FlashAttention.
  - return_attn_probs=True returns (out, softmax_lse, S_dmask): softmax_lse (batch, nheads,
    seqlen_q) float32 ((nheads, total_q) for varlen); S_dmask in FlashAttention's own form
    (what its kernel writes, which its test suite decodes): shape (batch, nheads,
    seqlen_q rounded up to 128, seqlen_k rounded up to 128) (max_seqlen_* for varlen), q's
    dtype, zero outside each sequence, and *unnormalised*: the kernel walks key blocks of
    _get_block_size_n(...) columns (the A100 / compute capability 8.0 widths) from the last
    to the first, so block c of a row holds exp(score - m_c), m_c the row's maximum over
    blocks c, c+1, ...; exp(m_c - softmax_lse) times it is the softmax. Entries dropped by
    dropout are negated. Computed by the naive reference with the call's dropout seed.
    Unlike FlashAttention (an empty tensor without dropout), fastattn returns it for
    dropout_p=0 too. For testing only: it materializes seqlen_q x seqlen_k.
  - A row that sees no key has out 0 and softmax_lse -inf (log of an empty sum;
    FlashAttention stores +inf there).
"""

from __future__ import annotations

import numbers
import operator

import torch

from .. import api
from .._validate import (normalize_window, validate_alibi_slopes, validate_mask_device,
                         validate_scale)
from ..decode import decode_attention
from ..score_mods import draw_seed
from ..varlen import _validate_cu_seqlens, attention_probs, attention_varlen, varlen_probs
from .layers.rotary import rotate_at

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


# ------------------------------------------------------------------------- input checks
def _int_like(x):
    """x as a Python int if FlashAttention would take it for an int argument (an int, a
    numpy integer, an integer tensor of one element), else None. bools are refused."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor)
                               and (x.numel() != 1 or x.dtype == torch.bool
                                    or x.is_floating_point() or x.is_complex())):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _float_like(name, x, allow_none=False):
    """x as a Python float if FlashAttention would take it for a float argument (an int or
    float, a numpy number, a real tensor of one element); otherwise a TypeError naming the
    argument."""
    if x is None and allow_none:
        return None
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool \
            and not x.is_complex():
        return float(x.item())
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got "
                    f"{type(x).__name__}")


def _window(window_size) -> tuple[int, int]:
    """window_size as (left, right) ints, negative -> -1. Like FlashAttention, any pair whose
    two items convert to int is taken: a tuple or list, a (2,) integer tensor (as from
    torch.randint), a numpy array, or a pair of numpy / one-element-tensor integers."""
    items = None
    if not isinstance(window_size, (str, bytes, dict)) and not (
            isinstance(window_size, torch.Tensor) and window_size.ndim != 1):
        try:
            if len(window_size) == 2:
                items = [_int_like(w) for w in window_size]
        except TypeError:
            items = None
    if items is None or any(w is None for w in items):
        raise ValueError(f"window_size must be a pair of ints (left, right), -1 for unbounded "
                         f"(e.g. (-1, -1) for none, (255, 0) for a causal window of 256; a "
                         f"(2,) integer tensor is taken too), got {window_size!r}")
    return tuple(-1 if w < 0 else int(w) for w in items)


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width of FlashAttention 2's forward kernel on an A100 (compute
    capability 8.0), whatever `device` is: the block structure of S_dmask (see
    _probs_block_n). Same signature as flash_attn.flash_attn_interface's helper, which the
    FlashAttention test suite imports to undo that structure."""
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        return 32 if is_dropout else 64
    return 64


def _round128(n: int) -> int:
    return -(-n // 128) * 128


def _flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _tensor(name, t, ndim, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got {t.ndim}-D with shape "
                         f"{tuple(t.shape)}")


def _packed(name, t, ndim, axis, n, layout):
    _tensor(name, t, ndim, layout)
    if t.shape[axis] != n:
        raise ValueError(f"{name} must have {n} at dim {axis} {layout}, got shape {tuple(t.shape)}")
    return t.unbind(axis)


def _dropout(dropout_p):
    """(dropout_p as a float, a seed drawn when p > 0): the seed is fixed here because the
    S_dmask of return_attn_probs must replay the kernel's keep bits. The value itself is
    checked once, by the call that runs the kernels."""
    p = _float_like("dropout_p", dropout_p)
    return p, (draw_seed() if p > 0 else None)


def _scalars(softmax_scale, softcap):
    return _float_like("softmax_scale", softmax_scale, allow_none=True), \
        _float_like("softcap", softcap)


def _probs_block_n(head_dim, dropout_p, causal):
    """S_dmask's key-block width: FlashAttention's kernel block for these arguments on
    compute capability 8.0."""
    return _get_block_size_n(None, head_dim, dropout_p > 0, causal)


def _common_flags(causal, deterministic, return_attn_probs):
    _flag("causal", causal)
    _flag("deterministic", deterministic)
    _flag("return_attn_probs", return_attn_probs)


# ------------------------------------------------------------------------- dense
def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           deterministic, return_attn_probs):
    _common_flags(causal, deterministic, return_attn_probs)
    layout = "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, 4, layout)
    win = _window(window_size)
    softmax_scale, softcap = _scalars(softmax_scale, softcap)
    # FlashAttention's argument forms converted above; fastattn's rules checked once here
    opts = api.check_options(causal=causal, window=win, scale=softmax_scale, softcap=softcap,
                             dropout_p=_float_like("dropout_p", dropout_p),
                             return_lse=return_attn_probs, deterministic=bool(deterministic))
    p, seed = opts.dropout_p, opts.dropout_seed
    res = api.run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), opts,
                  alibi_slopes=alibi_slopes)
    out, lse = res if return_attn_probs else (res, None)
    out = out.transpose(1, 2).contiguous()
    if not return_attn_probs:
        return out
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = validate_scale(opts.scale, D)
    block_n = _probs_block_n(D, p, causal)
    S = q.new_zeros((B, H, _round128(Sq), _round128(Sk)))
    with torch.no_grad():
        for b in range(B):
            slopes = alibi_slopes
            if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.ndim == 2:
                slopes = alibi_slopes[b]
            S[b, :, :Sq, :Sk] = attention_probs(
                q[b:b + 1].transpose(1, 2), k[b:b + 1].transpose(1, 2), scale=scale,
                window=opts.window, softcap=opts.softcap, alibi_slopes=slopes,
                dropout_p=p, dropout_seed=seed or 0, row_base=b * H * Sq, row_stride=Sq,
                block_n=block_n)
    return out, lse, S


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k / v (batch, seqlen_k, nheads_k, headdim).
    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask) with
    return_attn_probs=True. Semantics of every option: see the module docstring."""
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim).
    Same as flash_attn_func(q, kv[:, :, 0], kv[:, :, 1]); gradients flow into kv."""
    k, v = _packed("kv", kv, 5, 2, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim). Same as flash_attn_func on its three
    slices (views); gradients flow into qkv."""
    q, k, v = _packed("qkv", qkv, 5, 2, 3, "(batch, seqlen, 3, nheads, headdim)")
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                  alibi_slopes, deterministic, return_attn_probs)


# ------------------------------------------------------------------------- varlen
def _gather_paged(k_cache, v_cache, block_table, cu_seqlens_k):
    """Packed (total_k, nheads_k, d) keys/values of a paged cache: sequence b's token t
    lives in block block_table[b, t // page_block_size] at row t % page_block_size."""
    layout = "(num_blocks, page_block_size, nheads_k, headdim) with a block_table"
    _tensor("k", k_cache, 4, layout)
    _tensor("v", v_cache, 4, layout)
    _tensor("block_table", block_table, 2, "(batch, max_num_blocks_per_seq) int32")
    if block_table.dtype not in _INDEX_DTYPES:
        raise TypeError(f"block_table must be an int32 tensor, got {block_table.dtype}")
    validate_mask_device(block_table, k_cache.device, name="block_table", owner="k")
    validate_mask_device(cu_seqlens_k, k_cache.device, name="cu_seqlens_k", owner="k")
    if isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_k.ndim == 1 and cu_seqlens_k.numel():
        total = int(cu_seqlens_k[-1])
    else:
        total = -1  # let the check below report the malformed argument
    cu = _validate_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total, "the paged k", k_cache.device)
    batch, page = len(cu) - 1, k_cache.shape[1]
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence ({batch}), got shape "
                         f"{tuple(block_table.shape)}")
    cu_t = torch.tensor(cu, device=k_cache.device)
    seq = torch.repeat_interleave(torch.arange(batch, device=k_cache.device), cu_t.diff())
    pos = torch.arange(total, device=k_cache.device) - cu_t[seq]
    if total and int(pos.max()) >= block_table.shape[1] * page:
        raise ValueError(f"a sequence needs more than block_table.shape[1] * page_block_size = "
                         f"{block_table.shape[1] * page} tokens")
    blocks = block_table.long()[seq, pos // page]
    if total and (int(blocks.min()) < 0 or int(blocks.max()) >= k_cache.shape[0]):
        raise ValueError(f"block_table entries in use must lie in [0, num_blocks = "
                         f"{k_cache.shape[0]}), got values in [{int(blocks.min())}, "
                         f"{int(blocks.max())}]")
    rows = blocks * page + pos % page
    flat = (lambda t: t.reshape((-1,) + tuple(t.shape[2:])))
    return flat(k_cache).index_select(0, rows), flat(v_cache).index_select(0, rows)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs, block_table=None):
    _common_flags(causal, deterministic, return_attn_probs)
    if block_table is not None:
        k, v = _gather_paged(k, v, block_table, cu_seqlens_k)
    win = _window(window_size)
    softmax_scale, softcap = _scalars(softmax_scale, softcap)
    p, seed = _dropout(dropout_p)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and not isinstance(m, torch.Tensor) and _int_like(m) is None:
            raise TypeError(f"{name} must be an int, got {type(m).__name__}")
    max_seqlen_q, max_seqlen_k = (m if m is None or isinstance(m, torch.Tensor) else _int_like(m)
                                  for m in (max_seqlen_q, max_seqlen_k))
    kw = dict(causal=causal, window=win, scale=softmax_scale, softcap=softcap,
              alibi_slopes=alibi_slopes)
    res = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=p, dropout_seed=seed, return_lse=return_attn_probs,
                           deterministic=bool(deterministic), **kw)
    if not return_attn_probs:
        return res
    S = varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     dropout_p=p, dropout_seed=seed, block_n=_probs_block_n(q.shape[-1], p, causal),
                     round_to=128, dtype=q.dtype, **kw)
    return res[0], res[1], S


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, nheads, headdim), k / v (total_k, nheads_k, headdim);
    cu_seqlens_q / cu_seqlens_k (batch + 1,) int32 cumulative lengths; max_seqlen_q /
    max_seqlen_k the longest sequences (checked). Masks, ALiBi and the causal corner apply
    per sequence with its own lengths. block_table (batch, max_num_blocks_per_seq) int32:
    k / v are then a paged cache (num_blocks, page_block_size, nheads_k, headdim), gathered
    into packed form per call. Returns out (total_q, nheads, headdim), or
    (out, softmax_lse (nheads, total_q), S_dmask (batch, nheads, max_seqlen_q, max_seqlen_k))
    with return_attn_probs=True. Runs as fastattn.attention_varlen (one packed call with a
    document block mask when cu_seqlens_q equals cu_seqlens_k)."""
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, block_table)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim); otherwise as
    flash_attn_varlen_func."""
    k, v = _packed("kv", kv, 4, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim), cu_seqlens (batch + 1,) int32, max_seqlen int;
    self-attention over each sequence (one packed call with a document block mask)."""
    q, k, v = _packed("qkv", qkv, 4, 1, 3, "(total, 3, nheads, headdim)")
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


# ------------------------------------------------------------------------- kv cache
def apply_rotary(x, cos, sin, positions, interleaved: bool):
    """Rotary embedding of x (batch, seqlen, nheads, headdim) at integer `positions`
    (batch, seqlen): the first rotary_dim = 2 * cos.shape[1] channels are rotated, the rest
    pass through. interleaved=True pairs channels (0, 1), (2, 3), ... (GPT-J);
    False pairs (i, i + rotary_dim / 2) (GPT-NeoX). Computed in float32
    (layers.rotary.rotate_at, also behind apply_rotary_emb)."""
    return rotate_at(x, cos, sin, positions, interleaved)


def _index_vector(name, t, B, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape ({B},), got "
                        f"{type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{name} must have shape (batch,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t.long()


def _attend_cache(q, kc, vc, lens, starts, win, scale, softcap, alibi_slopes, num_splits):
    """q (B, Hq, Sq, D) against kc / vc (B, Hkv, Ncache, D|Dv), row b reading keys
    starts[b]:lens[b] (bottom-right aligned to lens[b]); returns (out, lse). One
    decode_attention call, or one per row (zero-copy slices) when rows start at
    cache_leftpad."""
    left, right = win
    kw = dict(scale=scale, window_left=left, window_right=right, num_splits=num_splits or None,
              return_lse=True)
    if softcap:
        kw["softcap"] = softcap
    if starts is None:
        return decode_attention(q, kc, vc, cache_seqlens=lens.to(torch.int32),
                                alibi_slopes=alibi_slopes, **kw)
    outs, lses = [], []
    for b in range(q.shape[0]):
        s0, n = int(starts[b]), int(lens[b])
        slopes = alibi_slopes
        if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.ndim == 2:
            slopes = alibi_slopes[b:b + 1]
        o, lse = decode_attention(q[b:b + 1], kc[b:b + 1, :, s0:n], vc[b:b + 1, :, s0:n],
                                  alibi_slopes=slopes, **kw)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Incremental decoding against a KV cache (inference only, like FlashAttention's).

    q (batch, seqlen_q, nheads, headdim). k_cache / v_cache (batch_cache, seqlen_cache,
    nheads_k, headdim), or with block_table (batch, max_num_blocks_per_seq) int32 a paged
    cache (num_blocks, page_block_size, nheads_k, headdim) (any page size). Row b uses cache
    row cache_batch_idx[b] (default b) and its first cache_seqlens[b] tokens (int or
    (batch,) int32; default: the whole cache), starting at cache_leftpad[b] (default 0).

    If k / v (batch, seqlen_new, nheads_k, headdim) are given, they are written into the
    caches IN PLACE at positions cache_seqlens[b] ... cache_seqlens[b] + seqlen_new - 1, and
    attention sees them too. rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2) (only with
    k / v): the new keys are rotated at those positions; q at cache_seqlens[b] + i if causal
    or local, else all at cache_seqlens[b] (positions count from the start of the cache row,
    cache_leftpad included, as in FlashAttention). rotary_interleaved: GPT-J pairs (True) or
    GPT-NeoX halves (False).

    Attention: query i of row b sees keys [cache_leftpad[b], L) with L = cache_seqlens[b] +
    seqlen_new, bottom-right aligned to L under causal / window_size; softcap and
    alibi_slopes as in flash_attn_func. Runs on fastattn.decode_attention (the split-KV
    decode kernel; one call, or one per row on zero-copy slices with cache_leftpad).
    A paged cache (or a cache_batch_idx that is not 0..batch-1) is gathered into a
    contiguous (batch, L_max, nheads_k, headdim) copy per call.

    Returns out (batch, seqlen_q, nheads, headdim), and softmax_lse (batch, nheads,
    seqlen_q) float32 with return_softmax_lse=True. num_splits: 0 = automatic, else the
    number of KV chunks of the split-KV kernel. Inference only: with inputs that require
    grad, decode_attention falls back to its (differentiable) reference.
    """
    for name in ("causal", "rotary_interleaved", "return_softmax_lse"):
        _flag(name, locals()[name])
    paged = block_table is not None
    cache_layout = ("(num_blocks, page_block_size, nheads_k, headdim) with a block_table"
                    if paged else "(batch_cache, seqlen_cache, nheads_k, headdim)")
    _tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    _tensor("k_cache", k_cache, 4, cache_layout)
    _tensor("v_cache", v_cache, 4, cache_layout)
    B, Sq, Hq, D = q.shape
    dev = q.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != dev:
            raise TypeError(f"{name} must have q's dtype and device ({q.dtype}, {dev}), got "
                            f"{t.dtype}, {t.device}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must agree in their first three dims, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache's head dim must equal q's ({D}), got {k_cache.shape[3]}")
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's number of heads ({Hq}) must be a multiple of the caches' "
                         f"({Hkv})")
    if paged:
        _tensor("block_table", block_table, 2, "(batch, max_num_blocks_per_seq) int32")
        if block_table.dtype not in _INDEX_DTYPES:
            raise TypeError(f"block_table must be an int32 tensor, got {block_table.dtype}")
        if block_table.shape[0] != B or block_table.device != dev:
            raise ValueError(f"block_table must have shape (batch = {B}, max_num_blocks_per_seq) "
                             f"on {dev}, got {tuple(block_table.shape)} on {block_table.device}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table: a paged "
                             "cache is addressed through block_table only")
        page = k_cache.shape[1]
        capacity = block_table.shape[1] * page
    else:
        capacity = k_cache.shape[1]
    if cache_batch_idx is not None:
        idx = _index_vector("cache_batch_idx", cache_batch_idx, B, dev)
        if B and (int(idx.min()) < 0 or int(idx.max()) >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx must index rows of k_cache, in [0, "
                             f"{k_cache.shape[0]}), got values in [{int(idx.min())}, "
                             f"{int(idx.max())}]")
        if torch.equal(idx, torch.arange(B, device=dev)):
            idx = None
    else:
        idx = None
        if not paged and k_cache.shape[0] < B:
            raise ValueError(f"k_cache holds {k_cache.shape[0]} rows but q has batch {B}; pass "
                             f"cache_batch_idx to map rows")

    # new keys / values
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append)")
    Snew = 0
    if k is not None:
        _tensor("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        _tensor("v", v, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if tuple(k.shape) != (B, k.shape[1], Hkv, D) or tuple(v.shape) != (B, k.shape[1], Hkv, Dv):
            raise ValueError(f"k and v must have shapes (batch, seqlen_new, nheads_k, headdim) = "
                             f"({B}, seqlen_new, {Hkv}, {D} / {Dv}), got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k and v must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when appending k / v: it says where "
                             "each row's new tokens go")
        Snew = k.shape[1]

    # lengths
    if cache_seqlens is None:
        L = torch.full((B,), capacity, dtype=torch.long, device=dev)
    elif not isinstance(cache_seqlens, torch.Tensor) and _int_like(cache_seqlens) is not None:
        L = torch.full((B,), _int_like(cache_seqlens), dtype=torch.long, device=dev)
    else:
        L = _index_vector("cache_seqlens", cache_seqlens, B, dev)
    if B and (int(L.min()) < 0 or int(L.max()) + Snew > capacity):
        raise ValueError(f"cache_seqlens (+ seqlen_new = {Snew}) must lie in [0, {capacity}] "
                         f"(the cache's capacity per row), got cache_seqlens in "
                         f"[{int(L.min())}, {int(L.max())}]")
    starts = None
    if cache_leftpad is not None:
        starts = _index_vector("cache_leftpad", cache_leftpad, B, dev)
        if B and (bool((starts < 0).any()) or bool((starts > L).any())):
            raise ValueError("cache_leftpad must lie in [0, cache_seqlens[b]] for every row")
        if not bool(starts.any()):
            starts = None

    softmax_scale, softcap = _scalars(softmax_scale, softcap)
    scale = validate_scale(softmax_scale, D)
    local = _window(window_size)
    win = normalize_window(local, causal)
    splits = _int_like(num_splits)
    if splits is None or splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    num_splits = splits

    # rotary embedding of q and the new keys
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos / rotary_sin need the new keys k and v (FlashAttention "
                             "rotates only what it appends)")
        _tensor("rotary_cos", rotary_cos, 2, "(seqlen_ro, rotary_dim / 2)")
        _tensor("rotary_sin", rotary_sin, 2, "(seqlen_ro, rotary_dim / 2)")
        if rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > D:
            raise ValueError(f"rotary_cos and rotary_sin must share a shape (seqlen_ro, "
                             f"rotary_dim / 2) with rotary_dim <= headdim = {D}, got "
                             f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        kpos = L.view(B, 1) + torch.arange(Snew, device=dev).view(1, Snew)
        if causal or local != (-1, -1):
            qpos = L.view(B, 1) + torch.arange(Sq, device=dev).view(1, Sq)
        else:
            qpos = L.view(B, 1).expand(B, Sq)
        need = max(int(kpos.max()) if kpos.numel() else 0, int(qpos.max()) if qpos.numel() else 0)
        if need >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos / rotary_sin have {rotary_cos.shape[0]} positions but "
                             f"position {need} is needed")
        q = apply_rotary(q, rotary_cos, rotary_sin, qpos, rotary_interleaved)
        k = apply_rotary(k, rotary_cos, rotary_sin, kpos, rotary_interleaved)

    # append in place
    if Snew:
        pos = L.view(B, 1) + torch.arange(Snew, device=dev).view(1, Snew)
        with torch.no_grad():
            if paged:
                blk = block_table.long().gather(1, pos // page)
                if int(blk.min()) < 0 or int(blk.max()) >= k_cache.shape[0]:
                    raise ValueError(f"block_table entries in use must lie in [0, num_blocks = "
                                     f"{k_cache.shape[0]})")
                k_cache[blk, pos % page] = k
                v_cache[blk, pos % page] = v
            else:
                rows = (torch.arange(B, device=dev) if idx is None else idx).view(B, 1)
                k_cache[rows.expand(B, Snew), pos] = k
                v_cache[rows.expand(B, Snew), pos] = v
    lens = L + Snew

    # the keys each row reads, as (B, L_max, Hkv, D) (a view unless gathered)
    Lmax = int(lens.max()) if B else 0
    if paged:
        nblk = -(-Lmax // page)
        blocks = block_table[:, :nblk].long()
        used = torch.arange(nblk, device=dev).view(1, -1) * page < lens.view(B, 1)
        if bool(((blocks < 0) | (blocks >= k_cache.shape[0]))[used].any()):
            raise ValueError(f"block_table entries in use must lie in [0, num_blocks = "
                             f"{k_cache.shape[0]})")
        blocks = torch.where(used, blocks, torch.zeros_like(blocks))
        kc = k_cache[blocks].reshape(B, nblk * page, Hkv, D)[:, :Lmax]
        vc = v_cache[blocks].reshape(B, nblk * page, Hkv, Dv)[:, :Lmax]
    elif idx is not None:
        kc, vc = k_cache[idx, :Lmax], v_cache[idx, :Lmax]
    else:
        kc, vc = k_cache[:B, :Lmax], v_cache[:B, :Lmax]

    if B == 0 or Sq == 0:
        out = q.new_zeros((B, Hq, Sq, Dv))
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=dev)
    else:
        if alibi_slopes is not None:  # validate here: per-row calls slice it
            validate_alibi_slopes(alibi_slopes, B, Hq, dev)
        out, lse = _attend_cache(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                 lens, starts, win, scale, softcap, alibi_slopes, num_splits)
    out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_softmax_lse else out

