"""Attention modules on fastattn's kernels.

    MultiheadAttention  torch.nn.MultiheadAttention's constructor, forward and state_dict;
                        fused when the call allows it, the same outputs either way
    Attention           a plain (B, N, dim) -> (B, N, dim) layer: q/k/v projections, GQA
                        (n_kv_heads), a mask pattern and a backend, chosen at construction

Both import only the public API (fastattn.attention / scaled_dot_product_attention).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import validate_mask_device
from .api import attention, scaled_dot_product_attention

__all__ = ["MultiheadAttention", "Attention"]


# ------------------------------------------------------------------ MultiheadAttention


def _check_mask(name, mask, shapes, dtype):
    """mask must be bool or floating (float masks in the query's dtype, as torch requires)
    and have one of `shapes`; returns it unchanged."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} must be a bool tensor (True = masked out) or a float tensor (added to the "
            f"scores), got {mask.dtype}"
        )
    if mask.is_floating_point() and mask.dtype != dtype:
        raise TypeError(f"a float {name} must have the query's dtype {dtype}, got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        raise ValueError(
            f"{name} must have shape {' or '.join(str(s) for s in shapes)}, got "
            f"{tuple(mask.shape)}"
        )
    return mask


def _to_additive(mask, dtype):
    """bool (True = masked out) -> float with -inf there; float masks pass through."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask


class MultiheadAttention(nn.Module):
    """Drop-in for torch.nn.MultiheadAttention (same constructor, forward, parameter names
    and state_dict, so torch's checkpoints load and give the same outputs).

    Which path a call takes (the outputs agree up to float rounding):

        need_weights=False, no masks (or is_causal)   fastattn.attention: fused kernels,
                                                       dropout while training included
        need_weights=False, key_padding_mask/attn_mask fastattn.scaled_dot_product_attention
                                                       with the merged mask (torch's SDPA
                                                       serves masks today)
        need_weights=True (torch's default)            naive attention that materializes the
                                                       (L, S) weights, as torch does

    Pass need_weights=False to get the fused path; torch's own default (True) has to
    materialize the weights it returns.

    Differences from torch, all on inputs torch rejects or gets NaN for:
      - is_causal=True without attn_mask applies the causal mask (torch raises);
        is_causal=True with attn_mask trusts the hint, as torch does;
      - a query that may see no key returns 0 (and weights 0), not NaN.
    backend (keyword only, not in torch's signature) goes to fastattn.attention.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend="auto"):
        if not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.backend = backend

        # Parameter names, shapes and init follow torch.nn.MultiheadAttention exactly.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

    # -- input checks -----------------------------------------------------------------

    def _check_inputs(self, query, key, value):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if query.ndim not in (2, 3):
            raise ValueError(
                f"query must be 3-D ({'batch, seq, embed' if self.batch_first else 'seq, batch, embed'}) "
                f"or 2-D (seq, embed) unbatched, got {query.ndim}-D with shape {tuple(query.shape)}")
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"query, key and value must all be batched (3-D) or all unbatched (2-D), got "
                f"{query.ndim}-D, {key.ndim}-D and {value.ndim}-D")
        if not (query.dtype == key.dtype == value.dtype):
            raise TypeError(f"query, key, value must share one dtype, got {query.dtype}, "
                            f"{key.dtype}, {value.dtype}")
        for name, t, want in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):
            if t.shape[-1] != want:
                what = "embed_dim" if name == "query" else f"{name[0]}dim"
                raise ValueError(f"{name} must have last dim {what} = {want}, got shape "
                                 f"{tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same sequence length and batch size, "
                             f"got shapes {tuple(key.shape)} and {tuple(value.shape)}")
        if query.ndim == 3:
            bdim = 0 if self.batch_first else 1
            if query.shape[bdim] != key.shape[bdim]:
                raise ValueError(f"query and key must have the same batch size, got "
                                 f"{query.shape[bdim]} and {key.shape[bdim]} (batch_first="
                                 f"{self.batch_first})")

    # -- forward ----------------------------------------------------------------------

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        """query (L, N, E) / (N, L, E) with batch_first / (L, E) unbatched; key (S, N, kdim),
        value (S, N, vdim) likewise. key_padding_mask (N, S) or (S,): True (or -inf) = ignore
        that key. attn_mask (L, S) or (N * num_heads, L, S): True = may not attend, or a float
        mask added to the scores. Returns (attn_output like query, weights or None); weights
        are (N, L, S) averaged over heads, or (N, num_heads, L, S)."""
        self._check_inputs(query, key, value)
        unbatched = query.ndim == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        S, H = key.shape[1], self.num_heads

        if key_padding_mask is not None:
            kpm_shapes = [(S,)] if unbatched else [(N, S)]
            _check_mask("key_padding_mask", key_padding_mask, kpm_shapes, query.dtype)
            validate_mask_device(key_padding_mask, query.device, name="key_padding_mask")
            key_padding_mask = key_padding_mask.reshape(N, 1, 1, S)
        if attn_mask is not None:
            _check_mask("attn_mask", attn_mask, [(L, S), (N * H, L, S)], query.dtype)
            validate_mask_device(attn_mask, query.device, name="attn_mask")
            attn_mask = attn_mask.reshape(-1, H, L, S) if attn_mask.ndim == 3 else attn_mask
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")

        q, k, v = self._project(query, key, value)  # (N, H, L, hd), (N, H, S, hd) x2
        extra = 0  # keys appended after the S given ones: bias_k, then the zero key
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, -1).expand(N, H, 1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, -1).expand(N, H, 1, -1)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, k.shape[-1])], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, v.shape[-1])], dim=2)
            extra += 1

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if (not need_weights and key_padding_mask is None and dropout_p < 1.0
                and (attn_mask is None or is_causal) and (not is_causal or (extra == 0 and L == S))):
            # The fused path: no mask, or exactly causal (L == S, so alignments agree).
            out = attention(q, k, v, causal=is_causal, backend=self.backend, dropout_p=dropout_p or None)
        else:
            mask = self._merged_mask(attn_mask, key_padding_mask, is_causal, L, S, extra,
                                     query.dtype, query.device)
            if need_weights:
                if not getattr(self, "_warned_weights", False):
                    self._warned_weights = True  # once per module: it may run every step
                    warnings.warn(
                        "fastattn.nn.MultiheadAttention: need_weights=True (torch's default) "
                        "returns the attention weights, so it runs naive attention that "
                        "materializes (L, S) scores per head, not the fused kernels; pass "
                        "need_weights=False for speed (shown once per module)", stacklevel=2)
                out, weights = self._naive(q, k, v, mask, dropout_p)
                weights = weights.mean(dim=1) if average_attn_weights else weights
                if unbatched:
                    weights = weights.squeeze(0)
            else:
                out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
                if mask is not None:  # contract: a query that sees no key gives 0, not NaN
                    blind = torch.isneginf(mask).all(dim=-1, keepdim=True)
                    out = out.masked_fill(blind, 0.0)

        out = out.transpose(1, 2).reshape(N, L, E)  # (N, L, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        H, hd = self.num_heads, self.head_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if query is key and key is value and self._qkv_same_embed_dim:
            q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        N = query.shape[0]
        return (q.view(N, -1, H, hd).transpose(1, 2), k.view(N, -1, H, hd).transpose(1, 2),
                v.view(N, -1, H, hd).transpose(1, 2))

    @staticmethod
    def _merged_mask(attn_mask, key_padding_mask, is_causal, L, S, extra, dtype, device):
        """One additive float mask (0 = visible, -inf = hidden) broadcastable to
        (N, H, L, S + extra), or None. The appended bias/zero keys are visible to all."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
        mask = None
        for m in (attn_mask, key_padding_mask):
            if m is not None:
                m = _to_additive(m, dtype)
                mask = m if mask is None else mask + m
        if mask is not None and extra:
            mask = F.pad(mask, (0, extra))
        return mask

    @staticmethod
    def _naive(q, k, v, mask, dropout_p):
        """Materializes the weights (N, H, L, S'): softmax(q k^T / sqrt(hd) + mask)."""
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            s = s + mask
        w = torch.softmax(s, dim=-1)
        if mask is not None:  # rows with every key hidden: 0, not NaN
            w = w.masked_fill(torch.isneginf(mask).all(dim=-1, keepdim=True), 0.0)
        if dropout_p > 0.0:
            w = F.dropout(w, p=dropout_p)
        return torch.matmul(w, v), w


# ------------------------------------------------------------------ Attention


def _normalize_pattern(pattern):
    """-> (causal, window, block_mask, block_mask_fn); see Attention's docstring."""
    if pattern is None or (isinstance(pattern, str) and pattern == "full"):
        return False, None, None, None
    if isinstance(pattern, str) and pattern == "causal":
        return True, None, None, None
    if isinstance(pattern, tuple) and pattern[:1] == ("sliding_window",):
        if len(pattern) != 2 or not isinstance(pattern[1], int) or pattern[1] < 0:
            raise ValueError(f"pattern ('sliding_window', left) needs one int left >= 0, got "
                             f"{pattern!r}")
        return True, (pattern[1], 0), None, None
    if isinstance(pattern, tuple) and pattern[:1] == ("window",):
        if len(pattern) != 3:
            raise ValueError(f"pattern ('window', left, right) needs two ints, got {pattern!r}")
        return False, (pattern[1], pattern[2]), None, None
    if not isinstance(pattern, (str, tuple)):
        from .sparse import BlockMask  # local: only block-mask patterns need fastattn.sparse

        if isinstance(pattern, BlockMask):
            return False, None, pattern, None
        if callable(pattern):
            return False, None, None, pattern
    raise ValueError(
        "pattern must be None/'full', 'causal', ('sliding_window', left), "
        "('window', left, right), a fastattn.sparse.BlockMask, or a function (Nq, Nk) -> "
        f"BlockMask, got {pattern!r}")


class Attention(nn.Module):
    """Multi-head attention layer, batch first: x (B, N, dim) -> (B, N, dim).

        q = x Wq  (n_heads heads)      k, v = context Wk, context Wv  (n_kv_heads heads)
        out = fastattn.attention(q, k, v, <pattern>, backend=backend) Wo

    n_kv_heads < n_heads is grouped-query attention (n_heads % n_kv_heads == 0; 1 is MQA);
    K/V are never expanded. context defaults to x (self-attention).

    pattern (fixed at construction, like the backend):
        None or "full"              every query sees every key
        "causal"                    bottom-right aligned causal (KV-cache friendly)
        ("sliding_window", left)    causal and at most `left` keys back (Mistral-style)
        ("window", left, right)     fastattn's window=(left, right), -1 = unbounded
        BlockMask                   a fixed fastattn.sparse.BlockMask (fixed lengths)
        fn(Nq, Nk) -> BlockMask     built on first use for each (Nq, Nk) and cached
    """

    def __init__(self, dim, n_heads, n_kv_heads=None, *, head_dim=None, bias=False,
                 pattern=None, backend="auto", device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, val in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads "
                             f"({n_kv_heads}) for grouped-query attention")
        if head_dim is None:
            if dim % n_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}), or "
                                 f"pass head_dim")
            head_dim = dim // n_heads
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.backend = backend
        self.causal, self.window, self.block_mask, self._block_mask_fn = _normalize_pattern(pattern)
        self._block_masks = {}  # (Nq, Nk) -> BlockMask built by the pattern function
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias, **factory)

    def extra_repr(self):
        pat = ("block_mask" if self.block_mask is not None or self._block_mask_fn is not None
               else "causal" if self.causal and self.window is None
               else f"window={self.window}, causal={self.causal}" if self.window else "full")
        return (f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, pattern={pat}, backend={self.backend!r}")

    def _mask_for(self, Nq, Nk):
        if self._block_mask_fn is None:
            return self.block_mask
        if (Nq, Nk) not in self._block_masks:
            self._block_masks[(Nq, Nk)] = self._block_mask_fn(Nq, Nk)
        return self._block_masks[(Nq, Nk)]

    def forward(self, x, context=None):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be a (batch, seq, dim={self.dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        context = x if context is None else context
        if (not isinstance(context, torch.Tensor) or context.ndim != 3
                or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]):
            raise ValueError(f"context must be a (batch={x.shape[0]}, seq, dim={self.dim}) "
                             f"tensor, got {tuple(getattr(context, 'shape', ()))}")
        B, Nq, _ = x.shape
        Nk = context.shape[1]
        q = self.q_proj(x).view(B, Nq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(B, Nk, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(B, Nk, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, causal=self.causal, window=self.window,
                        block_mask=self._mask_for(Nq, Nk), backend=self.backend)  # (B, H, Nq, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, Nq, self.n_heads * self.head_dim))
