"""The public attention functions: validate, describe the call, dispatch, run.

    out = attention(q, k, v, *, causal=False, window=None, block_mask=None,
                    scale=None, backend="auto", return_lse=False)
    out = scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                       is_causal=False, scale=None, enable_gqa=False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dispatch
from ._validate import (normalize_window, validate_alibi_slopes, validate_attn_mask,
                        validate_dropout, validate_qkv, validate_scale, validate_softcap)
from .backends.base import Problem
from .score_mods import draw_seed


def _check_block_mask(block_mask, B, Hq, Nq, Nk, device):
    from .sparse import BlockMask  # local: sparse is optional for dense calls

    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"block_mask must be a fastattn.sparse.BlockMask (build one with "
            f"fastattn.sparse.causal(...), from_mask_fn(...) or from_dense(...)), "
            f"got {type(block_mask).__name__}"
        )
    block_mask.validate_for(B=B, H=Hq, Nq=Nq, Nk=Nk)
    return block_mask.to(device)


def _empty_result(q, k, v, lse_fill: float):
    B, Hq, Nq, _ = q.shape
    Dv = v.shape[-1]
    # Connected to the inputs through empty sums so autograd gives zero gradients.
    zero = q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum()
    out = q.new_zeros((B, Hq, Nq, Dv)) + zero.to(q.dtype)
    lse = torch.full((B, Hq, Nq), lse_fill, dtype=torch.float32, device=q.device)
    return out, lse


def attention(q, k, v, *, causal=False, window=None, block_mask=None, scale=None,
              softcap=None, alibi_slopes=None, dropout_p=None, dropout_seed=None,
              backend="auto", return_lse=False, deterministic=True):
    """Fused attention over q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    Hq must be a multiple of Hkv (GQA/MQA: query head h reads kv head h // (Hq // Hkv)).
    Masks are bottom-right aligned (FlashAttention >= 2.1), with offset = Nk - Nq:

        causal=True            query i sees key j iff j <= i + offset
        window=(left, right)   i + offset - left <= j <= i + offset + right (-1: unbounded)
        block_mask             a fastattn.sparse.BlockMask; intersected with the above

        causal, Nq=3, Nk=5:    window=(1, 0), Nq=Nk=4:
            x x x . .              x . . .
            x x x x .              x x . .
            x x x x x              . x x .
                                   . . x x

    A query that sees no key returns 0 (lse -inf) and gets zero gradients.
    scale defaults to D ** -0.5. Score modifiers (exact formulas in fastattn.score_mods;
    None or 0 = off): softcap > 0 caps logits as softcap * tanh(s / softcap); alibi_slopes
    (Hq,) or (B, Hq) adds -slope * |i + offset - j|; dropout_p drops probabilities with a
    counter-based hash of dropout_seed (default: drawn from torch's generator, so
    torch.manual_seed reproduces it) that the backward regenerates, so no N^2 mask is
    stored. Dropout applies whenever dropout_p > 0 (pass 0 at eval time, as with
    FlashAttention). backend: "auto" (FASTATTN_BACKEND overrides), "cpu", "triton",
    "cuda", "sdpa" or "reference". Returns out (B, Hq, Nq, Dv) in q's dtype, and with
    return_lse=True also lse (B, Hq, Nq) float32, the natural-log log-sum-exp of the
    scaled, modified, masked scores.

    deterministic=True (the default) asks for a bitwise reproducible backward pass; False
    allows one that accumulates dQ with floating-point atomics (FlashAttention's default).
    Every backend accepts both. cpu and triton are atomic-free either way; on cuda, False
    selects the FlashAttention-2 class backward (atomic dQ: gradients not bitwise
    reproducible run to run), True the atomic-free one.
    """
    opts = check_options(causal=causal, window=window, scale=scale, softcap=softcap,
                         dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend,
                         return_lse=return_lse, deterministic=deterministic)
    return run(q, k, v, opts, block_mask=block_mask, alibi_slopes=alibi_slopes)


@dataclass(frozen=True)
class Options:
    """The shape-independent options of an attention call, validated once
    (check_options). Entry points that make several kernel calls for one public call
    (varlen, flash_attn_compat) validate once and hand the same Options to run()."""

    window: tuple[int, int]  # (left, right), causal folded in, -1 = unbounded
    scale: float | None  # None: D ** -0.5
    softcap: float
    dropout_p: float
    dropout_seed: int | None  # drawn when dropout_p > 0 and none was given
    backend: str  # a backend name or "auto" (FASTATTN_BACKEND resolved)
    return_lse: bool
    deterministic: bool = True  # False allows an atomic (non-reproducible) backward


def check_options(*, causal=False, window=None, scale=None, softcap=None, dropout_p=None,
                  dropout_seed=None, backend="auto", return_lse=False,
                  deterministic=True) -> Options:
    """Validates attention()'s scalar options (the arguments as attention() takes them)."""
    backend = dispatch.validate_backend_name(backend)
    left_right = normalize_window(window, causal)
    if scale is not None:
        scale = validate_scale(scale, 1)
    softcap = validate_softcap(softcap)
    dropout_p, dropout_seed = validate_dropout(dropout_p, dropout_seed)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = draw_seed()
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    return Options(window=left_right, scale=scale, softcap=softcap, dropout_p=dropout_p,
                   dropout_seed=dropout_seed, backend=backend, return_lse=return_lse,
                   deterministic=deterministic)


def run(q, k, v, opts: Options, *, block_mask=None, alibi_slopes=None):
    """attention() with validated options: checks what depends on the tensors (shapes,
    block mask, ALiBi slopes), describes the call, dispatches, runs the kernel."""
    validate_qkv(q, k, v)
    left_right = opts.window
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = opts.scale if opts.scale is not None else validate_scale(None, D)
    alibi_slopes = validate_alibi_slopes(alibi_slopes, B, Hq, q.device)
    if block_mask is not None:
        block_mask = _check_block_mask(block_mask, B, Hq, Nq, Nk, q.device)
        if left_right != (-1, -1):
            block_mask = block_mask.with_window(*left_right)
            left_right = (-1, -1)
    p = Problem(
        device=q.device, dtype=q.dtype, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv,
        window=left_right, block_mask=block_mask, scale=scale,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        return_lse=opts.return_lse, softcap=opts.softcap, alibi_slopes=alibi_slopes,
        dropout_p=opts.dropout_p, dropout_seed=int(opts.dropout_seed or 0),
        deterministic=opts.deterministic,
    )
    impl = dispatch.select(p, opts.backend)  # raises before any kernel runs
    if B == 0 or Hq == 0 or Nq == 0 or Nk == 0:
        out, lse = _empty_result(q, k, v, float("-inf"))
    else:
        out, lse = impl.forward(q, k, v, p)
    return (out, lse) if opts.return_lse else out


# Backends that scaled_dot_product_attention routes to; anything else goes to torch.
_SDPA_FUSED = ("cuda", "triton", "cpu")


def _causal_bias_variant(attn_mask):
    """'upper_left' / 'lower_right' for torch's CausalBias objects
    (torch.nn.attention.bias.causal_upper_left / causal_lower_right), else None."""
    bias = getattr(getattr(torch.nn, "attention", None), "bias", None)
    if bias is None or not isinstance(attn_mask, bias.CausalBias):
        return None
    return "upper_left" if attn_mask.variant == bias.CausalVariant.UPPER_LEFT else "lower_right"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, same signature and semantics
    (is_causal is top-left aligned, as in torch; torch's CausalBias masks as torch applies
    them). Calls fastattn's fused kernels where they apply (3-D or 4-D inputs, no tensor
    attn_mask, no dropout, a dtype and head dim a kernel takes) and torch's own function
    otherwise."""
    validate_attn_mask(attn_mask, query, key)  # before torch or a kernel sees it
    torch_sdpa = _torch_sdpa()
    lower_right = False
    variant = _causal_bias_variant(attn_mask)
    if variant is not None:
        # What torch's CausalBias does (torch.nn.attention.bias.CausalBias._dispatch), done
        # here: torch finds that code through F.scaled_dot_product_attention, which the
        # patch replaces, so handing the bias object to torch's builtin would ignore it.
        if is_causal:
            raise ValueError("CausalBias should not be used with causal=True")
        L, S = attn_mask.seq_len_q, attn_mask.seq_len_kv
        if L == S or variant == "upper_left":
            attn_mask, is_causal = None, True  # torch: is_causal=True, top-left
        else:
            attn_mask, lower_right = None, True  # bottom-right: query i sees j <= i + S - L
    args = (query, key, value)
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                  enable_gqa=enable_gqa)

    def to_torch():
        if lower_right:  # the mask torch's CausalBias materializes for this case
            L, S = query.shape[-2], key.shape[-2]
            kwargs["attn_mask"] = torch.ones(L, S, dtype=torch.bool,
                                             device=query.device).tril(diagonal=S - L)
        return torch_sdpa(*args, **kwargs)

    ndim = query.ndim if isinstance(query, torch.Tensor) else -1
    # Tensor masks (bool or additive float) stay torch's: the kernels take masks as block
    # masks, and building one from a dense mask on every call (fastattn.sparse.from_dense)
    # costs more than the attention it would save (BERT-style padding masks, B=16 H=12 N=128:
    # 2.5x torch's time; a causal (N, N) mask at N=8192: ~0.8 s of analysis per call). Build
    # the block mask once and pass it to fastattn.attention(block_mask=...) instead.
    route = (
        all(isinstance(t, torch.Tensor) and t.ndim == ndim and not t.is_nested for t in args)
        and ndim in (3, 4)
        and attn_mask is None
        and dropout_p == 0.0
        and query.dtype == key.dtype == value.dtype
        and query.device == key.device == value.device
        and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]
        and key.shape[-3] == value.shape[-3] and key.shape[-2] == value.shape[-2]
        and query.shape[-1] == key.shape[-1]
        and (query.shape[-3] == key.shape[-3] or (enable_gqa and key.shape[-3] > 0
                                                  and query.shape[-3] % key.shape[-3] == 0))
        # lower-right with Nq > Nk leaves the first rows without keys: torch's semantics
        and (not lower_right or query.shape[-2] <= key.shape[-2])
        and min(query.shape[-2], key.shape[-2], query.shape[-3], *query.shape[:-3]) > 0
    )
    if not route:
        return to_torch()
    if ndim == 3:  # (H, L, E): torch reads dim -3 as the heads (enable_gqa groups it)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    Nq, Nk = query.shape[2], key.shape[2]
    if lower_right:
        window = (-1, 0)  # fastattn's own (bottom-right) causal rule
    elif is_causal and Nq < Nk:
        # top-left: query i sees j <= i, so keys Nq.. are seen by no query; on the first Nq
        # keys top-left and bottom-right coincide (their gradients are 0 through the slice)
        key, value, Nk = key[:, :, :Nq], value[:, :, :Nq], Nq
        window = (-1, 0)
    elif is_causal:
        # torch's causal is top-left: j <= i, i.e. right = Nq - Nk in bottom-right terms.
        window = (-1, Nq - Nk)
    else:
        window = (-1, -1)
    p = Problem(
        device=query.device, dtype=query.dtype, B=query.shape[0], Hq=query.shape[1],
        Hkv=key.shape[1], Nq=Nq, Nk=Nk, D=query.shape[-1], Dv=value.shape[-1],
        window=window, block_mask=None, scale=validate_scale(scale, query.shape[-1]),
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in args),
        return_lse=False,
    )
    try:
        impl = dispatch.select(p, "auto", candidates=_SDPA_FUSED)
    except dispatch.BackendUnavailableError:
        return to_torch()
    if impl.name == "sdpa":  # the GPU policy hands this call to torch (DESIGN.md)
        return to_torch()
    out = _in_layout_of(impl.forward(query, key, value, p)[0], query)
    return out.squeeze(0) if ndim == 3 else out


def _in_layout_of(out, query):
    """out (B, H, L, Ev) laid out in memory in the order of query's dims, as torch's CPU
    SDPA returns it: for q = x.view(B, L, H, E).transpose(1, 2) (a projection split into
    heads), out.transpose(1, 2) is contiguous and .view(B, L, H * Ev) works on it."""
    order = sorted(range(3), key=lambda d: -query.stride(d))  # stable: ties keep dim order
    if order == [0, 1, 2]:
        return out
    order.append(3)
    return out.permute(order).contiguous().permute([order.index(d) for d in range(4)])


def _torch_sdpa():
    """torch's original function, even while fastattn.patch_sdpa() has replaced it."""
    return getattr(F.scaled_dot_product_attention, "__fastattn_original__",
                   F.scaled_dot_product_attention)
