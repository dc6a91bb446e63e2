"""Variable-length (packed) attention: a batch of sequences of different lengths stored
back to back with no padding, as FlashAttention's varlen functions take them.

    out = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, *, causal=False, window=None, scale=None,
                           softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None,
                           backend="auto", return_lse=False)

q is (total_q, Hq, D), k / v are (total_k, Hkv, D|Dv); sequence b owns rows
cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
Every mask rule of fastattn.attention (bottom-right causal, window, ALiBi distance) holds
inside each sequence, with that sequence's own lengths; sequences never see each other.

Two ways to run it, both on the fused kernels:
  - self-attention layout (cu_seqlens_q equals cu_seqlens_k, ALiBi slopes without a batch
    dim): ONE fastattn.attention call on the packed (1, H, total, D) view with a document
    block mask (block-diagonal; fastattn.sparse.document). Blocks between documents are
    never visited, and the causal/window rules of the packed call coincide with the
    per-document ones because q and k lengths agree in every document. Masks are cached
    per (lengths, causal, device), so a training loop reusing a batch layout builds it once.
  - otherwise (different q and k lengths, per-sequence slopes): one fastattn.attention call
    per sequence on zero-copy slices.
Dropout: each sequence's keep bits come from the counter-based hash of fastattn.score_mods
keyed by dropout_seed (packed path: rows of the packed call; per-sequence path: sequence b
uses sequence_seed(dropout_seed, b)); dropout_probs() reproduces them.
"""

from __future__ import annotations

import dataclasses

from collections import OrderedDict

import torch

from . import api
from ._validate import normalize_window
from .masking import window_mask
from .score_mods import alibi_bias, apply_softcap, dropout_hash, dropout_threshold

__all__ = ["attention_varlen"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_MASK_CACHE: OrderedDict = OrderedDict()
_MASK_CACHE_SIZE = 32


def _validate_tokens(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, heads, head_dim) for varlen "
                             f"attention, got {t.ndim}-D with shape {tuple(t.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must hold the same number of tokens, got {k.shape[0]} "
                         f"and {v.shape[0]}")


def _validate_cu_seqlens(cu, name: str, total: int, tensor_name: str, device) -> list[int]:
    """Returns the cumulative lengths as a Python list (one host sync)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape (batch + 1,), got "
                        f"{type(cu).__name__}")
    if cu.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 tensor (FlashAttention's type; int64 is "
                        f"accepted too), got {cu.dtype}; build it with "
                        f"F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))")
    if cu.ndim != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of shape (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the inputs' device {device}, got {cu.device}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {vals[0]}")
    bad = next((b for b in range(len(vals) - 1) if vals[b + 1] < vals[b]), None)
    if bad is not None:
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got "
                         f"{name}[{bad}] = {vals[bad]} > {name}[{bad + 1}] = {vals[bad + 1]}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens in {tensor_name} "
                         f"({total}), got {vals[-1]}")
    return vals


def _validate_max_seqlen(max_seqlen, name: str, actual: int) -> int:
    if max_seqlen is None:
        return actual
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 \
            and not max_seqlen.is_floating_point():
        max_seqlen = int(max_seqlen)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int (the longest sequence) or None, got "
                        f"{type(max_seqlen).__name__}")
    if max_seqlen < actual:
        raise ValueError(f"{name} = {max_seqlen} is smaller than the longest sequence in the "
                         f"batch ({actual}); pass the true maximum (or None to compute it)")
    return int(max_seqlen)


def sequence_seed(seed: int, b: int) -> int:
    """The dropout seed of sequence b on the per-sequence path (distinct streams per b)."""
    return (int(seed) + (b + 1) * 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF


def document_mask(seq_lens: tuple[int, ...], causal: bool, device):
    """fastattn.sparse.document(seq_lens, causal=causal) on `device`, cached (LRU)."""
    from .sparse import document

    key = (tuple(seq_lens), bool(causal), str(torch.device(device)))
    bm = _MASK_CACHE.get(key)
    if bm is None:
        bm = document(list(seq_lens), causal=causal).to(device)
        _MASK_CACHE[key] = bm
        while len(_MASK_CACHE) > _MASK_CACHE_SIZE:
            _MASK_CACHE.popitem(last=False)
    else:
        _MASK_CACHE.move_to_end(key)
    return bm


class _Plan:
    """How a varlen call runs: the validated lengths and the path."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 causal, window, alibi_slopes):
        _validate_tokens(q, k, v)
        self.cq = _validate_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q", q.device)
        self.ck = _validate_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k", q.device)
        if len(self.cq) != len(self.ck):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries, "
                             f"got {len(self.cq)} and {len(self.ck)}")
        self.batch = len(self.cq) - 1
        self.lens_q = [self.cq[b + 1] - self.cq[b] for b in range(self.batch)]
        self.lens_k = [self.ck[b + 1] - self.ck[b] for b in range(self.batch)]
        self.max_q = _validate_max_seqlen(max_seqlen_q, "max_seqlen_q", max(self.lens_q, default=0))
        self.max_k = _validate_max_seqlen(max_seqlen_k, "max_seqlen_k", max(self.lens_k, default=0))
        self.window = window  # (left, right), causal folded in (api.check_options)
        self.causal = causal
        if alibi_slopes is not None and isinstance(alibi_slopes, torch.Tensor) \
                and alibi_slopes.ndim == 2 and alibi_slopes.shape[0] != self.batch:
            raise ValueError(f"alibi_slopes must have shape (nheads,) = ({q.shape[1]},) or "
                             f"(batch, nheads) = ({self.batch}, {q.shape[1]}), got "
                             f"{tuple(alibi_slopes.shape)}")
        per_batch_slopes = isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.ndim == 2
        self.packed = self.cq == self.ck and not per_batch_slopes


def _bhnd(t, lo=None, hi=None):
    """(tokens, H, D) rows lo:hi as a (1, H, n, D) view."""
    if lo is not None:
        t = t[lo:hi]
    return t.unsqueeze(0).transpose(1, 2)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     *, causal=False, window=None, scale=None, softcap=0.0, alibi_slopes=None,
                     dropout_p=0.0, dropout_seed=None, backend="auto", return_lse=False,
                     deterministic=True):
    """Attention over packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D),
    v (total_k, Hkv, Dv); cu_seqlens_q / cu_seqlens_k int32 (batch + 1,) cumulative lengths
    starting at 0 and ending at total_q / total_k. max_seqlen_*: optional upper bounds
    (checked; computed when None). Other options as in fastattn.attention, applied to each
    sequence with its own lengths (causal and window are bottom-right aligned per
    sequence); alibi_slopes (Hq,) or (batch, Hq).

    Returns out (total_q, Hq, Dv) contiguous in q's dtype and, with return_lse=True, also
    lse (Hq, total_q) float32 (FlashAttention's varlen layout). Differentiable. See the
    module docstring for how the work is laid out on the kernels.
    """
    # validated once for the whole call; each kernel call below reuses them (api.run)
    opts = api.check_options(causal=causal, window=window, scale=scale, softcap=softcap,
                             dropout_p=dropout_p, dropout_seed=dropout_seed, backend=backend,
                             return_lse=return_lse, deterministic=deterministic)
    plan = _Plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                 opts.window, alibi_slopes)
    dropout_seed = opts.dropout_seed

    def call(*args, dropout_seed, **kw):  # one kernel call, as (out, lse or None)
        res = api.run(*args, dataclasses.replace(opts, dropout_seed=dropout_seed), **kw)
        return res if return_lse else (res, None)

    if plan.packed and plan.batch > 0 and q.shape[0] > 0:
        # causal documents whenever the window ends on the diagonal: fewer blocks to visit
        bm = document_mask(tuple(plan.lens_q), causal=plan.window[1] == 0, device=q.device)
        out, lse = call(_bhnd(q), _bhnd(k), _bhnd(v), block_mask=bm,
                        alibi_slopes=alibi_slopes, dropout_seed=dropout_seed)
        out = out[0].transpose(0, 1).contiguous()
        lse = None if lse is None else lse[0]
    else:
        outs, lses = [], []
        for b in range(plan.batch):
            slopes = alibi_slopes
            if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.ndim == 2:
                slopes = alibi_slopes[b]
            seed = None if dropout_seed is None else sequence_seed(dropout_seed, b)
            o, lse_b = call(
                _bhnd(q, plan.cq[b], plan.cq[b + 1]), _bhnd(k, plan.ck[b], plan.ck[b + 1]),
                _bhnd(v, plan.ck[b], plan.ck[b + 1]),
                alibi_slopes=slopes, dropout_seed=seed)
            outs.append(o[0].transpose(0, 1))
            lses.append(None if lse_b is None else lse_b[0])
        if outs:
            out = torch.cat(outs, 0)
            lse = torch.cat(lses, 1) if return_lse else None
        else:  # batch 0: still validate shapes and options through one empty call
            o, lse = call(_bhnd(q), _bhnd(k), _bhnd(v),
                          alibi_slopes=None, dropout_seed=dropout_seed)
            out = o[0].transpose(0, 1).contiguous()
            lse = None if lse is None else lse[0]
    return (out, lse) if return_lse else out


@torch.no_grad()
def attention_probs(q, k, *, scale, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                    dropout_p=0.0, dropout_seed=0, row_base=0, row_stride=None, col_base=0,
                    block_n=None):
    """The attention probabilities of one sequence, float32 (Hq, Nq, Nk), dropped entries
    negated (FlashAttention's S_dmask sign convention). q (1, Hq, Nq, D), k (1, Hkv, Nk, D)
    views; alibi_slopes (Hq,) or None. Dropout rows/columns of the hash are
    row_base + h * row_stride + i and col_base + j (what the kernel call used).

    block_n=None: the softmax probabilities (rows sum to 1 before dropout).
    block_n=n: FlashAttention's *unnormalised* form: its kernel walks key blocks of n
    columns from the last to the first, so the entries of block c are exp(s - m_c) with m_c
    the row's running maximum there, i.e. the maximum of the row over blocks c, c+1, ...
    (0 where that is -inf). Multiplying block c by exp(m_c - lse) gives the probabilities.
    Masked entries are 0. Materializes Nq x Nk: for return_attn_probs (testing) only."""
    _, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Nq == 0 or Nk == 0:
        return torch.zeros(Hq, Nq, Nk, dtype=torch.float32, device=q.device)
    kk = k[0].float()
    if Hkv != Hq:
        kk = kk.repeat_interleave(Hq // Hkv, dim=0)
    s = apply_softcap(torch.matmul(q[0].float(), kk.transpose(-1, -2)) * scale, softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.float(), 1, Hq, Nq, Nk)[0]
    if tuple(window) != (-1, -1):
        s = s.masked_fill(~window_mask(Nq, Nk, *window, device=q.device), float("-inf"))
    if block_n is None:
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        nb = -(-Nk // block_n)
        pad = nb * block_n - Nk
        sb = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(Hq, Nq, nb, block_n)
        block_max = sb.amax(-1)  # (Hq, Nq, nb)
        suffix_max = block_max.flip(-1).cummax(-1).values.flip(-1)
        suffix_max = torch.where(torch.isfinite(suffix_max), suffix_max,
                                 torch.zeros_like(suffix_max))
        p = torch.exp(sb - suffix_max.unsqueeze(-1)).view(Hq, Nq, nb * block_n)[..., :Nk]
    if dropout_p > 0:
        stride = Nq if row_stride is None else row_stride
        rows = (row_base + torch.arange(Hq, device=q.device).view(Hq, 1, 1) * stride
                + torch.arange(Nq, device=q.device).view(1, Nq, 1))
        cols = col_base + torch.arange(Nk, device=q.device).view(1, 1, Nk)
        keep = dropout_hash(dropout_seed, rows, cols) >= dropout_threshold(dropout_p)
        p = torch.where(keep, p, -p)
    return p


@torch.no_grad()
def varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                 causal=False, window=None, scale=None, softcap=0.0, alibi_slopes=None,
                 dropout_p=0.0, dropout_seed=None, block_n=None, round_to=1, dtype=None):
    """S_dmask of the attention_varlen call with the same arguments (and dropout_seed):
    (batch, Hq, max_seqlen_q, max_seqlen_k) float32, zero beyond each sequence's lengths,
    dropped entries negated (attention_probs for block_n). round_to rounds both max lengths
    up to its multiples (zero padding); dtype: the result's (default float32)."""
    plan = _Plan(q, k, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                 normalize_window(window, causal), alibi_slopes)
    Hq, D = q.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    rows_, cols_ = (-(-n // round_to) * round_to for n in (plan.max_q, plan.max_k))
    S = torch.zeros(plan.batch, Hq, rows_, cols_, dtype=dtype or torch.float32, device=q.device)
    total = q.shape[0]
    for b in range(plan.batch):
        slopes = alibi_slopes
        if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.ndim == 2:
            slopes = alibi_slopes[b]
        if plan.packed:
            rows = dict(dropout_seed=dropout_seed or 0, row_base=plan.cq[b], row_stride=total,
                        col_base=plan.ck[b])
        else:
            rows = dict(dropout_seed=sequence_seed(dropout_seed or 0, b))
        S[b, :, :plan.lens_q[b], :plan.lens_k[b]] = attention_probs(
            _bhnd(q, plan.cq[b], plan.cq[b + 1]), _bhnd(k, plan.ck[b], plan.ck[b + 1]),
            scale=scale, window=plan.window, softcap=softcap, alibi_slopes=slopes,
            dropout_p=dropout_p, block_n=block_n, **rows).to(S.dtype)
    return S
