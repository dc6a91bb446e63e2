"""FlashAttention conformance of fastattn.flash_attn_compat.

FlashAttention 2 (release v2.8.3, commit 060c9188beec3a8b62b33a3bfa6d5d2d44975fab) checks its
kernels with four parametrized tests in tests/test_flash_attn.py (test_flash_attn_output,
test_flash_attn_qkvpacked, test_flash_attn_varlen_output, test_flash_attn_kvcache). This
file sweeps the same parameter grids (GRIDS below) and applies the same acceptance rule,
written here independently (no text or code of FlashAttention's is reused):

  The reference is naive attention in float32 ("exact"); torch's own error is the same
  naive attention in the inputs' precision with the scale applied to k instead of q
  ("low"). Errors are max-abs differences from the reference.
  - dense / packed / varlen: out error <= 2x torch's. Gradients (every head dim: compute
    capability 8.0 checks them all) <= 3x torch's, for the packed-qkv test <= 2x on dqkv.
  - with dropout (return_attn_probs=True): the probabilities recovered from S_dmask, which
    holds FlashAttention's unnormalised block form (fastattn.flash_attn_compat docs), are
    within 2x torch's error of the reference probabilities; the fraction of dropped visible
    entries is within 0.01 of dropout_p (local windows: 0.025, varlen 0.04), unless ALiBi.
    An entry counts as kept when S_dmask >= 0 (so -0.0 is kept, as there).
  - kv cache: after appending k / v, the cache equals the expected one (k within
    rtol = atol = 1e-3, since rotary runs in float32 and rounds; v exactly); out error <=
    3x torch's (5x with ALiBi) + 1e-5.
  - the grids' own exclusions: softcap with dropout; kvcache: appending more new keys than
    the cache length, rotary without new keys, batch index or left padding with a paged
    cache; length 2048 when the machine has <= 16 GiB (the reference's memory).

Default suite: a seeded sample of each grid (SAMPLE_PER_TEST cases per test, lengths <=
SAMPLE_MAX_LEN; FASTATTN_FA_CONFORMANCE_SAMPLE / _MAX_LEN change them);
`-m slow`: the whole grid, split into shards (days on a 2-core CPU; pick shards with -k).
tools/run_flash_attn_tests.py runs FlashAttention's file itself.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from fastattn.flash_attn_compat import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_with_kvcache,
)
from fastattn.flash_attn_compat.bert_padding import pad_input, unpad_input

B16 = [False, True]
DTYPES = [torch.float16, torch.bfloat16]
PAIRS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256),
         (1024, 1024), (1023, 1024), (1024, 1023), (2048, 2048)]
GRIDS = {
    "output": dict(
        lengths=PAIRS, d=[32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256],
        dropout_p=[0.0, 0.17], softcap=[0.0, 50.0], causal=B16, local=B16, alibi=B16,
        deterministic=B16, mha_type=["mha", "mqa", "gqa"], dtype=DTYPES, kvpacked=B16),
    "qkvpacked": dict(
        seqlen=[97, 128, 200, 384, 768, 1024, 1025, 2048],
        d=[32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256], dropout_p=[0.0, 0.17],
        causal=B16, local=B16, alibi=B16, deterministic=B16, dtype=DTYPES),
    "varlen_output": dict(
        lengths=[(1, 147)] + PAIRS, d=[32, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256],
        dropout_p=[0.0, 0.17], softcap=[0.0, 50.0], causal=B16, local=B16, alibi=B16,
        deterministic=B16, mha_type=["mha", "mqa", "gqa"], dtype=DTYPES, kvpacked=B16),
    "kvcache": dict(
        lengths=[(1, 128), (1, 339), (3, 1024), (64, 800), (64, 256), (3, 799), (64, 2048),
                 (16, 20000), (1, 128 * 1024), (16, 128 * 1024), (128, 128)],
        d=[32, 59, 64, 80, 128, 256], has_batch_idx=[False], has_leftpad=B16,
        paged_kv_block_size=[None, 256], rotary_fraction=[0.0, 0.5, 1.0],
        rotary_interleaved=B16, seqlen_new_eq_seqlen_q=B16, causal=B16, local=B16,
        alibi=B16, new_kv=B16, mha_type=["mha", "mqa", "gqa"], num_splits=[1, 0],
        dtype=[torch.float16]),
}
SAMPLE_PER_TEST = int(os.environ.get("FASTATTN_FA_CONFORMANCE_SAMPLE", "6"))
# the default sample's longest sequence: the grids' 1023-1025 points cost up to a minute
# each on 2 cores (the naive reference in fp16); tools/run_flash_attn_tests.py and the slow
# grid cover them
SAMPLE_MAX_LEN = int(os.environ.get("FASTATTN_FA_CONFORMANCE_MAX_LEN", "512"))
SHARDS = 64


def grid_size(grid):
    return math.prod(len(v) for v in grid.values())


def grid_case(grid, index):
    """The index-th point of the grid (mixed radix, last key fastest)."""
    case = {}
    for name, values in reversed(list(grid.items())):
        index, r = divmod(index, len(values))
        case[name] = values[r]
    return dict(reversed(list(case.items())))


def max_len(case):
    if "lengths" in case:
        return max(case["lengths"])
    return case["seqlen"]


def sampled(test, n, seed, longest=1025):
    grid = dict(GRIDS[test])
    key = "seqlen" if "seqlen" in grid else "lengths"
    grid[key] = [x for x in grid[key] if (x if isinstance(x, int) else max(x)) <= longest]
    size = grid_size(grid)
    picks = random.Random(f"{test}-{seed}").sample(range(size), min(size, 50 * n))
    runnable = [i for i in picks if grid_exclusion(test, grid_case(grid, i)) is None]
    return [grid_case(grid, i) for i in sorted(runnable[:n])]


def case_id(case):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in case.items())


def grid_exclusion(test, case):
    """The grids' own exclusions (None: the case runs)."""
    if max_len(case) >= 2048:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if mem <= 16 * 2 ** 30:
            return "length 2048: the naive reference needs more memory"
    if case.get("softcap", 0.0) > 0 and case.get("dropout_p", 0.0) > 0:
        return "softcap with dropout is outside the grid"
    if test == "kvcache":
        sq, sk = case["lengths"]
        if sq > sk and case["new_kv"]:
            return "more new keys than cache length"
        if not case["new_kv"] and case["rotary_fraction"] > 0:
            return "rotary needs new keys"
        if case["paged_kv_block_size"] is not None and (case["has_batch_idx"]
                                                         or case["has_leftpad"]):
            return "batch index / left padding with a paged cache"
    return None


# ----------------------------------------------------------------------------- reference
def visible(B, Sq, Sk, causal, window, q_lens=None, k_lens=None, k_starts=None):
    """(B, 1, Sq, Sk) bool: query i of row b sees key j. Row b's queries are its first
    q_lens[b], its keys k_starts[b] .. k_lens[b] - 1; query i sits on the key diagonal
    i + k_lens[b] - q_lens[b] (bottom-right). window (left, right), -1 unbounded; causal
    forces right = 0."""
    q_lens = torch.full((B,), Sq) if q_lens is None else q_lens.long()
    k_lens = torch.full((B,), Sk) if k_lens is None else k_lens.long()
    starts = torch.zeros(B, dtype=torch.long) if k_starts is None else k_starts.long()
    i = torch.arange(Sq).view(1, Sq, 1)
    j = torch.arange(Sk).view(1, 1, Sk)
    diag = i + (k_lens - q_lens).view(B, 1, 1)
    left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    vis = (j < k_lens.view(B, 1, 1)) & (j >= starts.view(B, 1, 1)) & (i < q_lens.view(B, 1, 1))
    if left >= 0:
        vis &= j >= diag - left
    if right >= 0:
        vis &= j <= diag + right
    return vis.unsqueeze(1), diag.unsqueeze(1)


def naive(q, k, v, vis, diag, *, exact, slopes=None, softcap=0.0, keep=None, dropout_p=0.0):
    """Attention in FlashAttention's layout (q (B, Sq, H, D), k / v (B, Sk, Hk, D)) over the
    visibility mask; exact=True in float32, else in the inputs' dtype with k pre-scaled.
    Returns (out, probabilities before dropout), both in the inputs' dtype; rows that see
    nothing give 0."""
    dtype = q.dtype
    if exact:
        q, k, v = q.float(), k.float(), v.float()
    H, Hk, D = q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    if exact:
        s = torch.einsum("bihd,bjhd->bhij", q * D ** -0.5, k)
    else:
        s = torch.einsum("bihd,bjhd->bhij", q, k * D ** -0.5)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        j = torch.arange(k.shape[1]).view(1, 1, 1, -1)
        s = s - (slopes.view(-1, H, 1, 1) * (diag - j).abs()).to(s.dtype)
    s = s.masked_fill(~vis, float("-inf"))
    probs = torch.softmax(s, dim=-1).masked_fill(~vis.any(-1, keepdim=True), 0.0).to(v.dtype)
    dropped = probs if keep is None else probs.masked_fill(~keep, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", dropped, v / (1 - dropout_p))
    out = out.masked_fill(~vis.any(-1).any(1).view(out.shape[0], -1, 1, 1), 0.0)
    return out.to(dtype), probs.to(dtype)


def block_width_cc80(head_dim, is_dropout):
    """FlashAttention 2's forward key-block width on compute capability 8.0."""
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 64 if is_dropout else 128
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        return 32 if is_dropout else 64
    return 64


def probs_from_S(S, q, k, vis, diag, slopes, is_dropout):
    """Undo S_dmask's block form: (keep, probabilities in S's dtype). Block c of a row
    holds exp(s - m_c), m_c the row's maximum over blocks c, c+1, ...; multiply by
    exp(m_c - lse)."""
    B, H, Sq, Sk = q.shape[0], q.shape[2], q.shape[1], k.shape[1]
    assert S.shape[:2] == (B, H) and S.shape[2] % 128 == 0 and S.shape[3] % 128 == 0
    S = S[:, :, :Sq, :Sk].masked_fill(~vis, 0.0)
    keep = S >= 0
    k = k.float().repeat_interleave(H // k.shape[2], dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float() * q.shape[3] ** -0.5, k)
    if slopes is not None:
        j = torch.arange(Sk).view(1, 1, 1, -1)
        s = s - slopes.view(-1, H, 1, 1) * (diag - j).abs().float()
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    bn = block_width_cc80(q.shape[3], is_dropout)
    parts, blocks = [], list(s.split(bn, dim=-1))
    suffix = torch.full_like(lse, float("-inf"))
    maxima = []
    for blk in reversed(blocks):
        suffix = torch.maximum(suffix, blk.amax(-1, keepdim=True))
        maxima.append(suffix)
    maxima.reverse()
    for a, m in zip(S.abs().float().split(bn, dim=-1), maxima, strict=True):
        parts.append(a * torch.exp(m - lse))
    probs = torch.cat(parts, -1).masked_fill(~vis.any(-1, keepdim=True), 0.0)
    return keep, probs.to(S.dtype)


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def check(name, got, ref, low, factor, floor=0.0):
    err, torch_err = maxdiff(got, ref), maxdiff(low, ref)
    assert err <= factor * torch_err + floor, (
        f"{name}: error {err:.3g} > {factor} x torch's {torch_err:.3g} + {floor}")


def check_dropout(keep, vis, p, alibi, local, local_tol):
    if alibi:  # many probabilities are +-0 there: the sign says little
        return
    valid = vis.expand_as(keep)
    frac = (~keep & valid).sum().item() / max(valid.sum().item(), 1)
    tol = local_tol if local else 0.01
    assert abs(frac - p) <= tol, f"dropped fraction {frac:.4f} vs dropout_p {p}"


# ----------------------------------------------------------------------------- dense
def heads(mha_type, nheads):
    return nheads if mha_type == "mha" else (1 if mha_type == "mqa" else 2)


def run_dense(test, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    packed_qkv = test == "qkvpacked"
    Sq, Sk = (c["seqlen"], c["seqlen"]) if packed_qkv else c["lengths"]
    B, D, dtype, p = 4, c["d"], c["dtype"], c["dropout_p"]
    softcap = c.get("softcap", 0.0)
    H = 9 if packed_qkv else (6 if softcap == 0 else 4)
    Hk = H if packed_qkv else heads(c["mha_type"], H)
    window = torch.randint(0, Sk, (2,), generator=g) if c["local"] else (-1, -1)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    if softcap > 0:
        q = q * softcap
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    slopes = torch.rand(B, H, generator=g) * 0.3 if c["alibi"] else None
    kw = dict(causal=c["causal"], window_size=window, alibi_slopes=slopes,
              deterministic=c["deterministic"], return_attn_probs=True)
    if packed_qkv:
        leaves = [torch.stack([q, k, v], 2).requires_grad_()]
        out, lse, S = flash_attn_qkvpacked_func(leaves[0], p, **kw)
    elif c["kvpacked"]:
        leaves = [q.clone().requires_grad_(), torch.stack([k, v], 2).requires_grad_()]
        out, lse, S = flash_attn_kvpacked_func(*leaves, p, softcap=softcap, **kw)
    else:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, S = flash_attn_func(*leaves, p, softcap=softcap, **kw)
    vis, diag = visible(B, Sq, Sk, c["causal"], window)
    keep = None
    if p > 0:
        keep, probs = probs_from_S(S, q, k, vis, diag, slopes, True)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, leaves, dout)

    res = {}
    for exact in (True, False):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o, pr = naive(*qkv, vis, diag, exact=exact, slopes=slopes, softcap=softcap, keep=keep,
                      dropout_p=p)
        res[exact] = (o, pr, torch.autograd.grad(o, qkv, dout))
    (o_ref, p_ref, g_ref), (o_low, p_low, g_low) = res[True], res[False]
    check("out", out, o_ref, o_low, 2)
    if p > 0:
        check("attention probabilities from S_dmask", probs, p_ref, p_low, 2)
        check_dropout(keep, vis, p, c["alibi"], c["local"], 0.025)
    if packed_qkv:
        check("dqkv", got[0], torch.stack(g_ref, 2), torch.stack(g_low, 2), 2)
    else:
        if c["kvpacked"]:
            got = (got[0], *got[1].unbind(2))
        for name, a, r, lo in zip(("dq", "dk", "dv"), got, g_ref, g_low, strict=True):
            check(name, a, r, lo, 3)


def run_varlen(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    Sq, Sk = c["lengths"]
    B, D, dtype, p, softcap = 4, c["d"], c["dtype"], c["dropout_p"], c["softcap"]
    H = 6 if softcap == 0 else 4
    Hk = heads(c["mha_type"], H)
    window = torch.randint(0, Sk, (2,), generator=g) if c["local"] else (-1, -1)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    if softcap > 0:
        q = q * softcap
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)

    def padding(S):  # lengths in [max(1, S - 20), S], tokens first
        lens = torch.randint(max(1, S - 20), S + 1, (B,), generator=g)
        return torch.arange(S).view(1, S) < lens.view(B, 1), lens

    qmask, q_lens = padding(Sq)
    kmask, k_lens = padding(Sk)
    slopes = torch.rand(B, H, generator=g) * 0.3 if c["alibi"] else None
    qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
    q_u, idx_q, cu_q, max_q, _ = unpad_input(qp, qmask)
    k_u, _, cu_k, max_k, _ = unpad_input(kp, kmask)
    v_u = unpad_input(vp, kmask)[0]
    kw = dict(causal=c["causal"], window_size=window, softcap=softcap, alibi_slopes=slopes,
              deterministic=c["deterministic"], return_attn_probs=True)
    if c["kvpacked"]:
        out_u, lse, S = flash_attn_varlen_kvpacked_func(q_u, torch.stack([k_u, v_u], 1), cu_q,
                                                        cu_k, max_q, max_k, p, **kw)
    else:
        out_u, lse, S = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, p, **kw)
    out = pad_input(out_u, idx_q, B, Sq)
    vis, diag = visible(B, Sq, Sk, c["causal"], window, q_lens, k_lens)
    keep = None
    if p > 0:
        assert S.shape == (B, H, -(-max_q // 128) * 128, -(-max_k // 128) * 128)
        S_full = S.new_zeros(B, H, -(-Sq // 128) * 128, -(-Sk // 128) * 128)
        m2, m3 = min(S.shape[2], Sq), min(S.shape[3], Sk)
        S_full[:, :, :m2, :m3] = S[:, :, :m2, :m3]
        keep, probs = probs_from_S(S_full, q, k, vis, diag, slopes, True)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = torch.autograd.grad(out, (qp, kp, vp), dout)
    res = {}
    for exact in (True, False):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o, pr = naive(*qkv, vis, diag, exact=exact, slopes=slopes, softcap=softcap, keep=keep,
                      dropout_p=p)
        res[exact] = (o, pr, torch.autograd.grad(o, qkv, dout))
    (o_ref, p_ref, g_ref), (o_low, p_low, g_low) = res[True], res[False]
    check("out", out, o_ref, o_low, 2)
    if p > 0:
        check("attention probabilities from S_dmask", probs, p_ref, p_low, 2)
        check_dropout(keep, vis, p, c["alibi"], c["local"], 0.04)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, g_ref, g_low, strict=True):
        check(name, a, r, lo, 3)


# ----------------------------------------------------------------------------- kv cache
def rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding by complex multiplication in float64, rounded to x's dtype."""
    half = cos.shape[1]
    if half == 0:
        return x
    ang = torch.complex(cos.double(), sin.double())[positions].unsqueeze(2)  # (B, S, 1, half)
    xr = x[..., :2 * half].double()
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2]) * ang
        rot = torch.stack([z.real, z.imag], -1).flatten(-2)
    else:
        z = torch.complex(xr[..., :half], xr[..., half:]) * ang
        rot = torch.cat([z.real, z.imag], -1)
    return torch.cat([rot.to(x.dtype), x[..., 2 * half:]], -1)


def run_kvcache(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    Sq, Sk = c["lengths"]
    B, H, D, dtype = 2, 6, c["d"], c["dtype"]
    Hk = heads(c["mha_type"], H) if c["mha_type"] != "gqa" else 3
    causal, local, new_kv = c["causal"], c["local"], c["new_kv"]
    rd = int(c["rotary_fraction"] * D) // 16 * 16
    window = torch.randint(0, Sk, (2,), generator=g) if local else (-1, -1)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    Snew = Sq if c["seqlen_new_eq_seqlen_q"] else int(torch.randint(1, Sq + 1, (1,), generator=g))
    k_new = torch.randn(B, Snew, Hk, D, generator=g).to(dtype) if new_kv else None
    v_new = torch.randn(B, Snew, Hk, D, generator=g).to(dtype) if new_kv else None
    page = c["paged_kv_block_size"]
    if page is None:
        k_cache = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
        v_cache = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
        table, rows_ro = None, Sk
    else:
        nblk = math.ceil(Sk / page)
        num_blocks = nblk * B * 3
        k_pages = torch.randn(num_blocks, page, Hk, D, generator=g).to(dtype)
        v_pages = torch.randn(num_blocks, page, Hk, D, generator=g).to(dtype)
        table = torch.randperm(num_blocks, generator=g).to(torch.int32).view(B, -1)
        rows_ro = num_blocks * page

        def contiguous(pages):
            return pages[table.long()].reshape(B, -1, Hk, D)[:, :Sk]

        k_cache, v_cache = contiguous(k_pages), contiguous(v_pages)
    # new keys must fit, and with causal/local rotary the positions of q too
    hi = (Sk - (Sq if (causal or local) and rd > 1 else Snew) + 1) if new_kv else Sk + 1
    seqlens = torch.randint(0 if new_kv else 1, hi, (B,), generator=g, dtype=torch.int32)
    leftpad = None
    if c["has_leftpad"]:
        leftpad = torch.tensor([int(torch.randint(0, int(n), (1,), generator=g)) if n > 0 else 0
                                for n in seqlens], dtype=torch.int32)
    slopes = torch.rand(B, H, generator=g) * 0.3 if c["alibi"] else None
    cos = sin = None
    q_ro, k_ro = q, k_new
    if rd > 0:
        angle = torch.rand(rows_ro, rd // 2, generator=g) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        kpos = seqlens.long().view(B, 1) + torch.arange(Snew).view(1, Snew)
        qpos = (seqlens.long().view(B, 1) + torch.arange(Sq).view(1, Sq) if causal or local
                else seqlens.long().view(B, 1).expand(B, Sq))
        q_ro = rotate(q, cos, sin, qpos, c["rotary_interleaved"])
        k_ro = rotate(k_new, cos, sin, kpos, c["rotary_interleaved"])
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    if new_kv:
        for b in range(B):
            n = int(seqlens[b])
            k_expect[b, n:n + Snew] = k_ro[b]
            v_expect[b, n:n + Snew] = v_new[b]
    out = flash_attn_with_kvcache(
        q, k_cache if page is None else k_pages, v_cache if page is None else v_pages, k_new,
        v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_leftpad=leftpad,
        block_table=table, causal=causal, window_size=window,
        rotary_interleaved=c["rotary_interleaved"], alibi_slopes=slopes,
        num_splits=c["num_splits"])
    if new_kv:
        k_after = k_cache if page is None else contiguous(k_pages)
        v_after = v_cache if page is None else contiguous(v_pages)
        assert torch.allclose(k_after, k_expect, rtol=1e-3, atol=1e-3), "k cache after append"
        assert torch.equal(v_after, v_expect), "v cache after append"
    lens = seqlens + (Snew if new_kv else 0)
    vis, diag = visible(B, Sq, Sk, causal, window, None, lens, leftpad)
    o_ref, _ = naive(q_ro, k_expect, v_expect, vis, diag, exact=True, slopes=slopes)
    o_low, _ = naive(q_ro, k_expect, v_expect, vis, diag, exact=False, slopes=slopes)
    check("out", out, o_ref, o_low, 5 if c["alibi"] else 3, floor=1e-5)


RUNNERS = {"output": lambda c, s: run_dense("output", c, s),
           "qkvpacked": lambda c, s: run_dense("qkvpacked", c, s),
           "varlen_output": run_varlen, "kvcache": run_kvcache}


def run(test, case, seed=0):
    why = grid_exclusion(test, case)
    if why:
        pytest.skip(why)
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
    RUNNERS[test](case, seed)


SAMPLE = [(t, c) for t in GRIDS for c in sampled(t, SAMPLE_PER_TEST, 0, SAMPLE_MAX_LEN)]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("test,case", SAMPLE, ids=[f"{t}[{case_id(c)}]" for t, c in SAMPLE])
def test_flash_attn_conformance_sample(test, case):
    run(test, case)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("test", list(GRIDS))
def test_flash_attn_conformance_full_grid(test, shard):
    """Every point of the grid, shard by shard (shard s: indices = s mod SHARDS)."""
    failures, ran = [], 0
    for index in range(shard, grid_size(GRIDS[test]), SHARDS):
        case = grid_case(GRIDS[test], index)
        if grid_exclusion(test, case):
            continue
        try:
            torch.manual_seed(index)
            RUNNERS[test](case, index)
            ran += 1
        except AssertionError as e:
            failures.append(f"{case_id(case)}: {e}")
    assert not failures, f"{len(failures)} of {ran + len(failures)} failed:\n" + "\n".join(
        failures[:20])


def test_grids_are_flash_attentions():
    """The grid sizes of FlashAttention v2.8.3's four tests (cuda compute capability 8.0:
    both dtypes), a guard against editing a grid by accident."""
    assert {t: grid_size(g) for t, g in GRIDS.items()} == {
        "output": 84480, "qkvpacked": 6144, "varlen_output": 92928, "kvcache": 304128}
    first, last = grid_case(GRIDS["kvcache"], 0), grid_case(GRIDS["kvcache"], 304127)
    assert first["lengths"] == (1, 128) and last["lengths"] == (128, 128)
    assert first["num_splits"] == 1 and last["num_splits"] == 0
