"""fastattn.flash_attn_compat against FlashAttention's own test method: a float64 oracle
(written here, in FlashAttention's (batch, seqlen, nheads, headdim) layout, independent
of fastattn's reference backend) versus the same math in the inputs' low precision; the
compat call passes when its error is <= 2x torch's for the output and lse, <= 3x for the
gradients, plus a small floor (tests/oracle.py).

The parameter space is FlashAttention's (causal, random local windows, MHA/MQA/GQA, head
dims 59/111, odd lengths, seqlen_q != seqlen_k, packed layouts, softcap, ALiBi, dropout);
the default suite runs a covering sample of it, `-m slow` a wider one.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from fastattn.flash_attn_compat import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from fastattn.flash_attn_compat.bert_padding import (
    index_first_axis,
    pad_input,
    unpad_input,
    unpad_input_for_concatenated_sequences,
)
from oracle import assert_by_rule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Shapes here are small; on a loaded 2-core machine intra-op threads only add waiting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- oracle
def attn_ref(q, k, v, *, query_padding_mask=None, key_padding_mask=None, causal=False,
             window_size=(-1, -1), softcap=0.0, alibi_slopes=None, keep=None, dropout_p=0.0,
             upcast=True):
    """Naive attention in FlashAttention's layout. q (B, Sq, H, D), k / v (B, Sk, Hk, D);
    padding masks (B, S) bool (True = token; tokens first); keep (B, H, Sq, Sk) bool.
    upcast=True: float64 (the oracle); False: the inputs' dtype (torch's own error), with
    the softmax in float32 as FlashAttention's reference does. Returns out, lse."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q * (D ** -0.5), k)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    lq = (query_padding_mask.sum(1) if query_padding_mask is not None
          else torch.full((B,), Sq)).view(B, 1, 1)
    lk = (key_padding_mask.sum(1) if key_padding_mask is not None
          else torch.full((B,), Sk)).view(B, 1, 1)
    i = torch.arange(Sq).view(1, Sq, 1)
    j = torch.arange(Sk).view(1, 1, Sk)
    diag = i + lk - lq  # bottom-right: query i sits on key diagonal i + Lk - Lq
    vis = j < lk
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        vis = vis & (j >= diag - left)
    if right >= 0:
        vis = vis & (j <= diag + right)
    vis = vis.unsqueeze(1)  # (B, 1, Sq, Sk)
    if alibi_slopes is not None:
        sl = alibi_slopes.view(-1, H, 1, 1).to(s.dtype)
        s = s - sl * (diag - j).abs().unsqueeze(1).to(s.dtype)
    s = s.masked_fill(~vis, float("-inf"))
    sm = s if upcast else s.float()
    lse = torch.logsumexp(sm, -1)
    p = torch.softmax(sm, -1).masked_fill(~vis.any(-1, keepdim=True), 0.0).to(v.dtype)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(B, Sq, 1, 1), 0.0)
    return out.to(dtype) if not upcast else out, lse


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout.to(out.dtype))


def check_rule(name, got, ref, low, dtype, factor):
    assert_by_rule(name, got, ref.double(), low, dtype, factor=factor)


def check_lse(got, ref, low, dtype):
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin), "lse: rows that see no key differ"
    assert (got[~fin] < 0).all(), "lse: expected -inf on rows that see no key"
    assert_by_rule("lse", got[fin].float(), ref[fin].double(), low[fin].float(), dtype)


def round128(n):
    return -(-n // 128) * 128


def keep_from(S_dmask):
    """FlashAttention's dropout encoding: a negative entry (sign bit) was dropped."""
    return ~torch.signbit(S_dmask)


def random_window(rng, Sk):
    return (rng.randrange(0, Sk), rng.randrange(0, Sk))


def covering_cases(space: dict, n: int, seed: int):
    """n cases where every value of every parameter appears about equally often."""
    rng = random.Random(seed)
    cols = {}
    for name, values in space.items():
        col = (list(values) * (n // len(values) + 1))[:n]
        rng.shuffle(col)
        cols[name] = col
    return [{name: cols[name][i] for name in space} for i in range(n)]


DENSE_SPACE = dict(
    layout=["split", "kvpacked", "qkvpacked"],
    dtype=[torch.float16, torch.bfloat16],
    heads=[(4, 4), (6, 2), (4, 1)],  # MHA, GQA, MQA
    d=[59, 111],
    lengths=[(97, 113), (113, 203), (203, 97), (113, 113), (203, 203)],
    causal=[False, True],
    local=[False, True],
    softcap=[0.0, 50.0],
    alibi=[None, "heads", "batch"],
    dropout_p=[0.0, 0.17],
)
DENSE_CASES = covering_cases(DENSE_SPACE, 36, seed=0)
DENSE_SLOW = covering_cases(DENSE_SPACE, 240, seed=1)
# 1025 only in a few cases
DENSE_LONG = [
    dict(layout="split", dtype=torch.bfloat16, heads=(2, 1), d=59, lengths=(1025, 1025),
         causal=True, local=False, softcap=0.0, alibi=None, dropout_p=0.0),
    dict(layout="kvpacked", dtype=torch.float16, heads=(2, 2), d=111, lengths=(113, 1025),
         causal=False, local=True, softcap=50.0, alibi="heads", dropout_p=0.0),
]


def _case_id(c):
    return (f"{c['layout']}-{str(c['dtype'])[6:]}-h{c['heads'][0]}x{c['heads'][1]}-d{c['d']}-"
            f"{c['lengths'][0]}x{c['lengths'][1]}-c{int(c['causal'])}l{int(c['local'])}-"
            f"cap{int(c['softcap'])}-alibi{c['alibi']}-p{c['dropout_p']}")


def run_dense_case(c, seed=0):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, (H, Hk), D, (Sq, Sk), dtype = 2, c["heads"], c["d"], c["lengths"], c["dtype"]
    if c["layout"] == "qkvpacked":  # one sequence length, one head count
        Sk, Hk = Sq, H
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    window = random_window(rng, Sk) if c["local"] else (-1, -1)
    alibi = None
    if c["alibi"] == "heads":
        alibi = torch.rand(H, generator=g) * 0.3
    elif c["alibi"] == "batch":
        alibi = torch.rand(B, H, generator=g) * 0.3
    opts = dict(causal=c["causal"], window_size=window, softcap=c["softcap"], alibi_slopes=alibi)
    p = c["dropout_p"]

    if c["layout"] == "split":
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        res = flash_attn_func(*inputs, dropout_p=p, return_attn_probs=True, **opts)
    elif c["layout"] == "kvpacked":
        inputs = [q.clone().requires_grad_(), torch.stack([k, v], 2).requires_grad_()]
        res = flash_attn_kvpacked_func(*inputs, dropout_p=p, return_attn_probs=True, **opts)
    else:
        inputs = [torch.stack([q, k, v], 2).requires_grad_()]
        res = flash_attn_qkvpacked_func(*inputs, dropout_p=p, return_attn_probs=True, **opts)
    out, lse, S_dmask = res
    assert out.shape == (B, Sq, H, D) and out.is_contiguous() and out.dtype == dtype
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    assert S_dmask.shape == (B, H, round128(Sq), round128(Sk)) and S_dmask.dtype == dtype
    keep = keep_from(S_dmask[:, :, :Sq, :Sk]) if p > 0 else None
    dout = torch.randn(B, Sq, H, D, generator=g)
    got = grads(out, inputs, dout)
    if c["layout"] == "kvpacked":
        got = (got[0], got[1][:, :, 0], got[1][:, :, 1])
    elif c["layout"] == "qkvpacked":
        got = got[0].unbind(2)

    refs = []
    for upcast in (True, False):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse_r = attn_ref(*qkv, keep=keep, dropout_p=p, upcast=upcast, **opts)
        refs.append((o, lse_r, *grads(o, qkv, dout)))
    (o64, lse64, *g64), (olow, lselow, *glow) = refs
    check_rule("out", out, o64, olow, dtype, 2.0)
    check_lse(lse, lse64, lselow, dtype)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, g64, glow, strict=True):
        check_rule(name, a, r, lo, dtype, 3.0)
    if p > 0:  # FlashAttention's dropout-fraction check, on the positions that are visible
        vis = torch.isfinite(attn_scores_mask(Sq, Sk, opts))
        frac = (~keep)[vis.expand_as(keep)].float().mean().item()
        assert abs(frac - p) <= 0.01, f"dropped fraction {frac:.4f} vs dropout_p {p}"
    return out


def attn_scores_mask(Sq, Sk, opts):
    """0 where visible, -inf where masked, (1, 1, Sq, Sk) (no padding)."""
    i = torch.arange(Sq).view(Sq, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, Sk)
    left, right = opts["window_size"]
    if opts["causal"]:
        right = 0 if right < 0 else min(right, 0)
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return torch.zeros(Sq, Sk).masked_fill(~vis, float("-inf")).view(1, 1, Sq, Sk)


@pytest.mark.parametrize("case", DENSE_CASES + DENSE_LONG, ids=_case_id)
def test_dense_against_oracle(case):
    run_dense_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", DENSE_SLOW, ids=_case_id)
def test_dense_against_oracle_sweep(case):
    run_dense_case(case, seed=7)


# ----------------------------------------------------------------------------- dropout
def _dropout_run(seed_torch, deterministic, p=0.17):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 97, 4, 64, generator=g).requires_grad_() for _ in range(3))
    torch.manual_seed(seed_torch)
    out = flash_attn_func(q, k, v, dropout_p=p, causal=True, deterministic=deterministic)
    dout = torch.randn(out.shape, generator=g)
    return (out.detach(), *grads(out, (q, k, v), dout))


def test_dropout_reproducible_from_torch_seed_and_deterministic_bitwise():
    a = _dropout_run(123, deterministic=True)
    b = _dropout_run(123, deterministic=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), "same torch.manual_seed must give bitwise equal out and grads"
    c = _dropout_run(124, deterministic=False)
    assert not torch.equal(a[0], c[0]), "another seed must drop other entries"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_fraction(p):
    """The kernel's own keep bits, read out: with q = k = 0 every key gets probability 1/N,
    and with v = I (head dim N) row i of the output is keep[i, :] / (N (1 - p)). Their dropped
    fraction is p, and S_dmask (same seed) marks exactly those entries dropped."""
    N, H = 203, 4
    z = torch.zeros(2, N, H, N)
    eye = torch.eye(N).view(1, N, 1, N).expand(2, N, H, N).contiguous()
    torch.manual_seed(11)
    out = flash_attn_func(z, z, eye, dropout_p=p)  # the cpu kernel under auto
    keep = (out != 0).transpose(1, 2)  # (B, H, N, N) from the kernel
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (N * (1 - p))))
    frac = 1 - keep.float().mean().item()
    assert abs(frac - p) <= 0.01, (frac, p)
    torch.manual_seed(11)  # the same seed draw: S_dmask describes the kernel's keep bits
    _, _, S = flash_attn_func(z, z, eye, dropout_p=p, return_attn_probs=True)
    assert torch.equal(keep_from(S[:, :, :N, :N]), keep)
    # and an ordinary call's output is the one its S_dmask describes
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, N, H, 32, generator=g) for _ in range(3))
    out, _, S = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    ref, _ = attn_ref(q, k, v, keep=keep_from(S[:, :, :N, :N]), dropout_p=p)
    assert (out.double() - ref).abs().max() < 1e-5


def test_dropout_zero_is_deterministic_attention():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 50, 2, 16, generator=g) for _ in range(3))
    out, lse, S = flash_attn_func(q, k, v, return_attn_probs=True)
    assert not torch.signbit(S).any()
    # one key block (50 keys <= 128 for headdim 16): S = exp(s - rowmax), S * exp(max - lse)
    # is the softmax
    s = torch.einsum("bihd,bjhd->bhij", q, k) * 16 ** -0.5
    probs = S[:, :, :50, :50] * torch.exp(s.amax(-1, keepdim=True) - lse.unsqueeze(-1))
    torch.testing.assert_close(probs, torch.softmax(s, -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 50))


# ----------------------------------------------------------------------------- varlen
def random_padding_mask(B, S, g, full_row=False):
    """Right padding with random lengths in [1, S] (FlashAttention's 'random' mode, wider)."""
    lens = torch.randint(1, S + 1, (B,), generator=g)
    if full_row:
        lens[0] = S
    return torch.arange(S).view(1, S) < lens.view(B, 1)


VARLEN_SPACE = dict(
    layout=["split", "kvpacked", "qkvpacked"],
    dtype=[torch.float16, torch.bfloat16],
    heads=[(4, 4), (6, 2), (4, 1)],
    d=[59, 111],
    lengths=[(97, 113), (113, 97), (113, 113), (203, 203)],
    causal=[False, True],
    local=[False, True],
    softcap=[0.0, 50.0],
    alibi=[None, "heads", "batch"],
    dropout_p=[0.0, 0.17],
    same_mask=[True, False],  # self-attention layout -> one packed call with a document mask
)
VARLEN_CASES = covering_cases(VARLEN_SPACE, 24, seed=2)
VARLEN_SLOW = covering_cases(VARLEN_SPACE, 160, seed=3)


def run_varlen_case(c, seed=0):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, (H, Hk), D, (Sq, Sk), dtype = 3, c["heads"], c["d"], c["lengths"], c["dtype"]
    same = c["same_mask"] or c["layout"] == "qkvpacked"
    if same or c["layout"] == "qkvpacked":
        Sk = Sq
    if c["layout"] == "qkvpacked":
        Hk = H
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g).to(dtype)
    qmask = random_padding_mask(B, Sq, g)
    kmask = qmask if same else random_padding_mask(B, Sk, g)
    window = random_window(rng, Sk) if c["local"] else (-1, -1)
    alibi = None
    if c["alibi"] == "heads":
        alibi = torch.rand(H, generator=g) * 0.3
    elif c["alibi"] == "batch":
        alibi = torch.rand(B, H, generator=g) * 0.3
    opts = dict(causal=c["causal"], window_size=window, softcap=c["softcap"], alibi_slopes=alibi)
    p = c["dropout_p"]

    # padded leaves -> unpad_input -> varlen -> pad_input (gradients flow back through both)
    qp, kp, vp = (t.clone().requires_grad_() for t in (q, k, v))
    q_u, idx_q, cu_q, max_q, used_q = unpad_input(qp, qmask)
    k_u, idx_k, cu_k, max_k, _ = unpad_input(kp, kmask)
    v_u = unpad_input(vp, kmask)[0]
    assert cu_q.dtype == torch.int32 and torch.equal(used_q, qmask.sum(1).int())
    if c["layout"] == "split":
        res = flash_attn_varlen_func(q_u, k_u, v_u, cu_q, cu_k, max_q, max_k, dropout_p=p,
                                     return_attn_probs=True, **opts)
    elif c["layout"] == "kvpacked":
        res = flash_attn_varlen_kvpacked_func(q_u, torch.stack([k_u, v_u], 1), cu_q, cu_k,
                                              max_q, max_k, dropout_p=p,
                                              return_attn_probs=True, **opts)
    else:
        res = flash_attn_varlen_qkvpacked_func(torch.stack([q_u, k_u, v_u], 1), cu_q, max_q,
                                               dropout_p=p, return_attn_probs=True, **opts)
    out_u, lse_u, S_dmask = res
    assert out_u.shape == (q_u.shape[0], H, D) and lse_u.shape == (H, q_u.shape[0])
    assert S_dmask.shape == (B, H, round128(max_q), round128(max_k))
    out = pad_input(out_u, idx_q, B, Sq)
    dout = torch.randn(B, Sq, H, D, generator=g)
    got = grads(out, (qp, kp, vp), dout)
    keep = None
    if p > 0:
        keep = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
        keep[:, :, :max_q, :max_k] = keep_from(S_dmask[:, :, :max_q, :max_k])
    refs = []
    for upcast in (True, False):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse_r = attn_ref(*qkv, query_padding_mask=qmask, key_padding_mask=kmask, keep=keep,
                            dropout_p=p, upcast=upcast, **opts)
        refs.append((o, lse_r, *grads(o, qkv, dout)))
    (o64, lse64, *g64), (olow, lselow, *glow) = refs
    check_rule("out", out, o64, olow, dtype, 2.0)
    # lse (H, total_q) vs the padded oracle's (B, H, Sq) at the real tokens
    pick = lambda t: t.permute(1, 0, 2).reshape(H, B * Sq)[:, idx_q]  # noqa: E731
    check_lse(lse_u, pick(lse64), pick(lselow), dtype)
    for name, a, r, lo in zip(("dq", "dk", "dv"), got, g64, glow, strict=True):
        check_rule(name, a, r, lo, dtype, 3.0)


def _varlen_id(c):
    return _case_id(c) + f"-same{int(c['same_mask'])}"


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_varlen_against_padded_oracle(case):
    run_varlen_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", VARLEN_SLOW, ids=_varlen_id)
def test_varlen_against_padded_oracle_sweep(case):
    run_varlen_case(case, seed=11)


def test_varlen_packed_path_uses_one_document_masked_call(monkeypatch):
    """Self-attention layout: one kernel call (fastattn.api.run) over all tokens, with a
    block-diagonal mask; other layouts: one call per sequence."""
    import fastattn.api as api

    calls = []
    real = api.run

    def spy(q, k, v, opts, **kw):
        calls.append((tuple(q.shape), kw.get("block_mask")))
        return real(q, k, v, opts, **kw)

    monkeypatch.setattr(api, "run", spy)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 5, 40, 97], dtype=torch.int32)
    q, k, v = (torch.randn(97, 2, 16, generator=g) for _ in range(3))
    flash_attn_varlen_func(q, k, v, cu, cu, 57, 57, causal=True)
    assert len(calls) == 1 and calls[0][0] == (1, 2, 97, 16)
    dense = calls[0][1].to_dense()[0, 0]
    assert not dense[10, 3] and dense[10, 6] and not dense[6, 10]  # other doc / causal
    calls.clear()
    cu_k = torch.tensor([0, 10, 20, 30, 97], dtype=torch.int32)
    flash_attn_varlen_func(q, k, v, cu, cu_k, 57, 67, causal=True)
    assert [c[0][2] for c in calls] == [5, 0, 35, 57]


def test_varlen_paged_block_table_matches_contiguous():
    g = torch.Generator().manual_seed(1)
    lens = [37, 5, 64]
    cu = torch.tensor([0, 37, 42, 106], dtype=torch.int32)
    page, H = 16, 2
    q = torch.randn(106, H, 32, generator=g)
    k, v = torch.randn(106, H, 32, generator=g), torch.randn(106, H, 32, generator=g)
    nblocks = [math.ceil(n / page) for n in lens]
    perm = torch.randperm(sum(nblocks) + 3, generator=g)
    table = torch.zeros(3, max(nblocks), dtype=torch.int32)
    kc = torch.zeros(len(perm), page, H, 32)
    vc = torch.zeros_like(kc)
    used = 0
    for b in range(len(lens)):
        for t in range(nblocks[b]):
            blk = int(perm[used])
            used += 1
            table[b, t] = blk
            rows = slice(int(cu[b]) + t * page, min(int(cu[b]) + (t + 1) * page, int(cu[b + 1])))
            m = rows.stop - rows.start
            kc[blk, :m], vc[blk, :m] = k[rows], v[rows]
    want = flash_attn_varlen_func(q, k, v, cu, cu, 64, 64, causal=True)
    got = flash_attn_varlen_func(q, kc, vc, cu, cu, 64, 64, causal=True, block_table=table)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bert_padding_roundtrip_and_concatenated():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7, [1, 0, 0, 0, 0, 0, 0]]).bool()
    xu, idx, cu, mx, used = unpad_input(x, mask)
    assert xu.shape == (11, 5) and cu.tolist() == [0, 3, 10, 11] and mx == 7
    assert torch.equal(index_first_axis(x.view(21, 5), idx), xu)
    back = pad_input(xu, idx, 3, 7)
    assert torch.equal(back, x * mask[..., None])
    # unused_mask: allocated tokens counted in cu_seqlens but not in seqused
    unused = torch.zeros_like(mask)
    unused[0, 3] = True
    _, _, cu2, _, used2 = unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 4, 11, 12] and used2.tolist() == [3, 7, 1]
    lens_in_row = torch.tensor([[2, 3, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    xu3, idx3, cu3, mx3 = unpad_input_for_concatenated_sequences(x, lens_in_row)
    assert cu3.tolist() == [0, 2, 5, 12, 13] and mx3 == 7 and xu3.shape == (13, 5)


# ----------------------------------------------------------------------------- kv cache
def rotary_ref(x, angles, positions, interleaved):
    """Rotary embedding via complex multiplication (independent of the compat code).
    x (B, S, H, D) float64; angles (seqlen_ro, rd / 2); positions (B, S)."""
    half = angles.shape[1]
    rd = 2 * half
    a = angles.double()[positions].unsqueeze(2)  # (B, S, 1, half)
    xr = x[..., :rd].double()
    if interleaved:
        z = torch.view_as_complex(xr.reshape(*xr.shape[:-1], half, 2).contiguous())
        rot = torch.view_as_real(z * torch.polar(torch.ones_like(a), a)).flatten(-2)
    else:
        z = torch.complex(xr[..., :half], xr[..., half:]) * torch.polar(torch.ones_like(a), a)
        rot = torch.cat([z.real, z.imag], -1)
    return torch.cat([rot, x[..., rd:].double()], -1)


KV_SPACE = dict(
    dtype=[torch.float16, torch.bfloat16],
    heads=[(4, 4), (6, 2), (4, 1)],
    d=[59, 111, 64],
    seqlen_q=[1, 1, 4],
    seqlen_k=[97, 203],
    causal=[False, True],
    local=[False, True],
    new_kv=[True, False],
    rotary=[0.0, 0.5, 1.0],
    interleaved=[True, False],
    batch_idx=[False, True],
    leftpad=[False, True],
    softcap=[0.0, 50.0],
    alibi=[None, "heads", "batch"],
)
KV_CASES = covering_cases(KV_SPACE, 24, seed=4)
KV_SLOW = covering_cases(KV_SPACE, 160, seed=5)
# extra causal / causal-window cases without score modifiers (the decode kernel's plain path)
KV_DECODE = covering_cases(dict(KV_SPACE, causal=[True], softcap=[0.0], alibi=[None]), 8, seed=8)


def _kv_id(c):
    return "-".join(f"{k}{str(v).replace('torch.', '')}" for k, v in c.items())


def run_kvcache_case(c, seed=0, page_size=None):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    B, (H, Hk), D, dtype = 3, c["heads"], c["d"], c["dtype"]
    Sq, Smax = c["seqlen_q"], c["seqlen_k"]
    Snew = Sq if c["new_kv"] else 0
    rd = 0
    if c["rotary"] and c["new_kv"]:
        rd = int(c["rotary"] * D) // 2 * 2
    Bc = B + 2 if c["batch_idx"] else B
    k_cache = torch.randn(Bc, Smax, Hk, D, generator=g).to(dtype)
    v_cache = torch.randn(Bc, Smax, Hk, D, generator=g).to(dtype)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype)
    k_new = torch.randn(B, Snew, Hk, D, generator=g).to(dtype) if Snew else None
    v_new = torch.randn(B, Snew, Hk, D, generator=g).to(dtype) if Snew else None
    seqlens = torch.randint(0, Smax - Snew + 1, (B,), generator=g, dtype=torch.int32)
    batch_idx = torch.randperm(Bc, generator=g)[:B].int() if c["batch_idx"] else None
    leftpad = None
    if c["leftpad"]:
        leftpad = (torch.rand(B, generator=g) * seqlens).int()
    window = random_window(rng, Smax) if c["local"] else (-1, -1)
    alibi = None
    if c["alibi"] == "heads":
        alibi = torch.rand(H, generator=g) * 0.3
    elif c["alibi"] == "batch":
        alibi = torch.rand(B, H, generator=g) * 0.3
    cos = sin = angles = None
    if rd:
        angles = torch.rand(Smax + Sq, rd // 2, generator=g) * 2 * math.pi
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        angles = torch.atan2(sin.double(), cos.double())  # what the low-precision tables say

    # the expected cache after the append, and the rotated q, in float64
    rows = batch_idx.long() if batch_idx is not None else torch.arange(B)
    kc_ref, vc_ref = k_cache.double().clone(), v_cache.double().clone()
    q_ref = q.double()
    if Snew:
        kpos = seqlens.long().view(B, 1) + torch.arange(Snew).view(1, Snew)
        k_rot = rotary_ref(k_new, angles, kpos, c["interleaved"]) if rd else k_new.double()
        for b in range(B):
            n = int(seqlens[b])
            kc_ref[rows[b], n:n + Snew] = k_rot[b]
            vc_ref[rows[b], n:n + Snew] = v_new[b].double()
        if rd:
            qpos = (kpos[:, :Sq] if (c["causal"] or c["local"])
                    else seqlens.long().view(B, 1).expand(B, Sq))
            q_ref = rotary_ref(q, angles, qpos, c["interleaved"])

    kc_in, vc_in = k_cache.clone(), v_cache.clone()
    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                  cache_leftpad=leftpad, causal=c["causal"], window_size=window,
                  softcap=c["softcap"], rotary_interleaved=c["interleaved"], alibi_slopes=alibi,
                  return_softmax_lse=True)
    if page_size is None:
        out, lse = flash_attn_with_kvcache(q, kc_in, vc_in, k_new, v_new, **kwargs)
        kc_after = kc_in
    else:  # the same cache, scattered into random pages
        assert batch_idx is None
        nb = math.ceil(Smax / page_size)
        perm = torch.randperm(B * nb + 2, generator=g)
        table = perm[:B * nb].view(B, nb).int()
        kp = torch.zeros(B * nb + 2, page_size, Hk, D, dtype=dtype)
        vp = torch.zeros_like(kp)
        pad = nb * page_size - Smax
        kp[table.long()] = torch.nn.functional.pad(kc_in, (0, 0, 0, 0, 0, pad)).view(
            B, nb, page_size, Hk, D)
        vp[table.long()] = torch.nn.functional.pad(vc_in, (0, 0, 0, 0, 0, pad)).view(
            B, nb, page_size, Hk, D)
        out, lse = flash_attn_with_kvcache(q, kp, vp, k_new, v_new, block_table=table, **kwargs)
        kc_after = kp[table.long()].reshape(B, nb * page_size, Hk, D)[:, :Smax]
    assert out.shape == (B, Sq, H, D) and lse.shape == (B, H, Sq)

    # the cache was updated in place
    tol = dict(rtol=0, atol=(2e-2 if dtype == torch.bfloat16 else 4e-3) if rd else 0)
    for b in range(B):
        n = int(seqlens[b])
        torch.testing.assert_close(kc_after[b if page_size else rows[b], n:n + Snew].double(),
                                   kc_ref[rows[b], n:n + Snew], **tol)

    # oracle: each row against its keys leftpad:seqlens+new, bottom-right aligned
    lens = seqlens.long() + Snew
    starts = leftpad.long() if leftpad is not None else torch.zeros(B, dtype=torch.long)
    for b in range(B):
        s0, n = int(starts[b]), int(lens[b])
        kb, vb = kc_ref[rows[b]:rows[b] + 1, s0:n], vc_ref[rows[b]:rows[b] + 1, s0:n]
        sl = None if alibi is None else (alibi if alibi.ndim == 1 else alibi[b])
        o = {}
        for upcast in (True, False):
            qq = q_ref[b:b + 1] if upcast else q_ref[b:b + 1].to(dtype)
            o[upcast] = attn_ref(qq, kb if upcast else kb.to(dtype),
                                 vb if upcast else vb.to(dtype), causal=c["causal"],
                                 window_size=window, softcap=c["softcap"], alibi_slopes=sl,
                                 upcast=upcast)
        check_rule(f"out[{b}]", out[b:b + 1], o[True][0], o[False][0], dtype, 2.0)
        check_lse(lse[b:b + 1], o[True][1], o[False][1], dtype)
    return out, lse


@pytest.mark.parametrize("case", KV_CASES, ids=_kv_id)
def test_kvcache_against_oracle(case):
    run_kvcache_case(case)


@pytest.mark.parametrize("case", KV_DECODE, ids=_kv_id)
def test_kvcache_decode_kernel_cases(case):
    run_kvcache_case(case, seed=17)


@pytest.mark.slow
@pytest.mark.parametrize("case", KV_SLOW, ids=_kv_id)
def test_kvcache_against_oracle_sweep(case):
    run_kvcache_case(case, seed=13)


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("case", covering_cases(dict(KV_SPACE, batch_idx=[False]), 3, seed=6),
                         ids=_kv_id)
def test_kvcache_paged_matches_contiguous(case, page_size):
    out_p, lse_p = run_kvcache_case(case, seed=21, page_size=page_size)  # checks the oracle too
    out_c, lse_c = run_kvcache_case(case, seed=21)
    torch.testing.assert_close(out_p, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse_p, lse_c, rtol=0, atol=0)


def test_kvcache_generation_loop_matches_full_attention():
    """Token-by-token decoding with in-place appends equals causal attention over the
    whole sequence."""
    g = torch.Generator().manual_seed(9)
    B, T, H, Hk, D = 2, 24, 4, 2, 32
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hk, Hk))
    kc, vc = torch.zeros(B, 32, Hk, D), torch.zeros(B, 32, Hk, D)
    outs = [flash_attn_with_kvcache(q[:, :5], kc, vc, k[:, :5], v[:, :5], cache_seqlens=0,
                                    causal=True)]
    seqlens = torch.full((B,), 5, dtype=torch.int32)
    for t in range(5, T):
        outs.append(flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1],
                                            cache_seqlens=seqlens, causal=True))
        seqlens += 1
    full = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:, :T], k)


# ----------------------------------------------------------------------------- bad input
def _qkv(B=1, S=8, H=2, D=16):
    return (torch.randn(B, S, H, D) for _ in range(3))


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: flash_attn_func(q[0], k, v), r"q must be 4-D \(batch, seqlen"),
    (lambda q, k, v: flash_attn_func(q, k, v, window_size=(3,)), "window_size"),
    (lambda q, k, v: flash_attn_func(q, k, v, window_size=[1.5, 2]), "window_size"),
    (lambda q, k, v: flash_attn_func(q, k, v, dropout_p=1.0), "dropout_p"),
    (lambda q, k, v: flash_attn_func(q, k, v, causal=1), "causal"),
    (lambda q, k, v: flash_attn_func(q, k, v, softcap=-1.0), "softcap"),
    (lambda q, k, v: flash_attn_func(q, k, v, alibi_slopes=torch.rand(3)), "alibi_slopes"),
    (lambda q, k, v: flash_attn_func(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1]
                                     .expand(1, 8, 3, 16)), "multiple"),
    (lambda q, k, v: flash_attn_qkvpacked_func(torch.stack([q, k], 2)), "qkv must have 3"),
    (lambda q, k, v: flash_attn_kvpacked_func(q, k), "kv must be 5-D"),
    (lambda q, k, v: flash_attn_func(q, k.half(), v), "dtype"),
])
def test_bad_input_dense(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*_qkv())


def _varlen_inputs():
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    return q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: dict(a, cu_seqlens_q=a["cu_seqlens_q"].float()), "cu_seqlens_q must be an int32"),
    (lambda a: dict(a, cu_seqlens_k=torch.tensor([0, 7, 4, 10], dtype=torch.int32)),
     "cu_seqlens_k must be non-decreasing"),
    (lambda a: dict(a, cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)),
     r"cu_seqlens_q\[-1\] must equal the number of tokens in q \(10\)"),
    (lambda a: dict(a, cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)),
     "cu_seqlens_q must start at 0"),
    (lambda a: dict(a, cu_seqlens_k=torch.tensor([[0, 4, 10]], dtype=torch.int32)),
     r"cu_seqlens_k must be 1-D"),
    (lambda a: dict(a, cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)),
     "batch \\+ 1 entries"),
    (lambda a: dict(a, max_seqlen_q=3), "max_seqlen_q = 3 is smaller"),
    (lambda a: dict(a, q=a["q"][None]), "q must be 3-D"),
    (lambda a: dict(a, alibi_slopes=torch.rand(3, 2)), "alibi_slopes must have shape"),
])
def test_bad_input_varlen(mutate, match):
    q, k, v, cu = _varlen_inputs()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6)
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_varlen_func(**mutate(args))


@pytest.mark.parametrize("kw,match", [
    (dict(cache_seqlens=torch.tensor([16, 3], dtype=torch.int32), new=True), "cache_seqlens"),
    (dict(cache_seqlens=None, new=True), "cache_seqlens is required"),
    (dict(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)), r"cache_seqlens must have shape"),
    (dict(cache_seqlens=2, rotary_cos=torch.ones(20, 8), rotary_sin=torch.ones(20, 8)),
     "rotary_cos / rotary_sin need the new keys"),
    (dict(cache_seqlens=2, new=True, rotary_cos=torch.ones(20, 8)), "rotary_sin must be given"),
    (dict(cache_seqlens=2, new=True, rotary_cos=torch.ones(2, 8), rotary_sin=torch.ones(2, 8)),
     "positions"),
    (dict(cache_seqlens=2, cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32)),
     "cache_batch_idx must index rows"),
    (dict(cache_seqlens=2, block_table=torch.zeros(2, 1, dtype=torch.int32),
          cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), "cache_batch_idx cannot"),
    (dict(cache_seqlens=2, cache_leftpad=torch.tensor([3, 0], dtype=torch.int32)),
     "cache_leftpad"),
    (dict(cache_seqlens=2, only_k=True), "k and v must be given together"),
    (dict(cache_seqlens=2, num_splits=-1), "num_splits"),
])
def test_bad_input_kvcache(kw, match):
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 16, 2, 16), torch.randn(2, 16, 2, 16)
    kw = dict(kw)
    new, only_k = kw.pop("new", False), kw.pop("only_k", False)
    k = torch.randn(2, 1, 2, 16) if (new or only_k) else None
    v = torch.randn(2, 1, 2, 16) if new else None
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(q, kc, vc, k, v, **kw)


def test_empty_and_zero_length_sequences():
    q, k, v = (torch.randn(2, 0, 2, 16) for _ in range(3))
    assert flash_attn_func(q, k, v).shape == (2, 0, 2, 16)
    cu = torch.tensor([0, 0, 3, 3], dtype=torch.int32)
    q, k, v = (torch.randn(3, 2, 16) for _ in range(3))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 3, 3, causal=True,
                                         return_attn_probs=True)
    assert out.shape == (3, 2, 16) and lse.shape == (2, 3) and torch.isfinite(out).all()


def test_attention_varlen_public_api_matches_per_sequence_attention():
    import fastattn

    g = torch.Generator().manual_seed(12)
    cu = torch.tensor([0, 31, 31, 100, 113], dtype=torch.int32)
    q = torch.randn(113, 4, 40, generator=g)
    k, v = torch.randn(113, 2, 40, generator=g), torch.randn(113, 2, 40, generator=g)
    out, lse = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, window=(20, 0),
                                         return_lse=True)
    assert out.shape == (113, 4, 40) and lse.shape == (4, 113)
    for b in range(4):
        s, e = int(cu[b]), int(cu[b + 1])
        if s == e:
            continue
        o, l_b = fastattn.attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)),
                                    causal=True, window=(20, 0), return_lse=True)
        torch.testing.assert_close(out[s:e], o[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, s:e], l_b[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------- issue 21: FlashAttention's argument forms
def _window_forms(left, right):
    import numpy as np

    return {
        "tuple": (left, right), "list": [left, right],
        "int64 tensor": torch.tensor([left, right]),
        "int32 tensor": torch.tensor([left, right], dtype=torch.int32),
        "numpy array": np.array([left, right]),
        "0-d tensors": (torch.tensor(left), torch.tensor(right)),
        "numpy ints": (np.int64(left), np.int32(right)),
    }


def test_window_size_as_tensor_like_flash_attention():
    """FlashAttention's tests pass window_size = torch.randint(0, seqlen_k, (2,)); any pair
    whose items convert to int is the same window as the int tuple (failure class 1)."""
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g) for _ in range(3))
    want = flash_attn_func(q, k, v, causal=True, window_size=(9, 3))
    drawn = torch.randint(0, 37, (2,), generator=g)
    want_drawn = flash_attn_func(q, k, v, window_size=tuple(int(w) for w in drawn))
    assert torch.equal(flash_attn_func(q, k, v, window_size=drawn), want_drawn)
    for name, w in _window_forms(9, 3).items():
        assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=w), want), name
        qkv = torch.stack([q, k, v], 2)
        assert torch.equal(flash_attn_qkvpacked_func(qkv, causal=True, window_size=w), want), name
        assert torch.equal(flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True,
                                                    window_size=w), want), name
    cu = torch.tensor([0, 37, 74], dtype=torch.int32)
    flat = [t.reshape(74, 4, 16) for t in (q, k, v)]
    want_v = flash_attn_varlen_func(*flat, cu, cu, 37, 37, window_size=(9, 3), causal=True)
    got_v = flash_attn_varlen_func(*flat, cu, cu, 37, 37, window_size=torch.tensor([9, 3]),
                                   causal=True)
    assert torch.equal(got_v, want_v)
    kc, vc = k.clone(), v.clone()
    lens = torch.tensor([30, 37], dtype=torch.int32)
    want_c = flash_attn_with_kvcache(q[:, :2], kc, vc, cache_seqlens=lens, window_size=(9, 3),
                                     causal=True)
    for name, w in _window_forms(9, 3).items():
        got_c = flash_attn_with_kvcache(q[:, :2], kc, vc, cache_seqlens=lens, window_size=w,
                                        causal=True)
        assert torch.equal(got_c, want_c), name
    # a negative item is unbounded, as -1 is
    assert torch.equal(flash_attn_func(q, k, v, window_size=torch.tensor([-5, 3])),
                       flash_attn_func(q, k, v, window_size=(-1, 3)))


@pytest.mark.parametrize("bad", [(1.5, 2), torch.tensor([1.5, 2.0]), torch.tensor([[1, 2]]),
                                 torch.tensor([1, 2, 3]), (True, 0), "ab", 3, (1, 2, 3),
                                 (None, 1)], ids=repr)
def test_window_size_bad_forms_still_rejected(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window_size must be a pair of ints"):
        flash_attn_func(q, k, v, window_size=bad)


def test_scalar_arguments_in_flash_attentions_forms():
    """Numbers FlashAttention takes as one-element tensors or numpy scalars: softmax_scale,
    softcap, dropout_p, max_seqlen_*, num_splits, cache_seqlens."""
    import numpy as np

    g = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(1, 19, 2, 16, generator=g) for _ in range(3))
    want = flash_attn_func(q, k, v, softmax_scale=0.2, softcap=30.0, dropout_p=0.0)
    for scale, cap, p in ((torch.tensor(0.2), torch.tensor(30.0), torch.tensor(0.0)),
                          (np.float32(0.2), np.float64(30.0), np.float64(0.0)),
                          (0.2, 30, 0)):
        got = flash_attn_func(q, k, v, softmax_scale=scale, softcap=cap, dropout_p=p)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    cu = torch.tensor([0, 19], dtype=torch.int32)
    flat = [t[0] for t in (q, k, v)]
    want_v = flash_attn_varlen_func(*flat, cu, cu, 19, 19)
    assert torch.equal(flash_attn_varlen_func(*flat, cu, cu, np.int64(19), torch.tensor(19)),
                       want_v)
    kc, vc = k.clone(), v.clone()
    want_c = flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=7, num_splits=0)
    assert torch.equal(flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=np.int64(7),
                                               num_splits=np.int64(0)), want_c)
    for kw, match in ((dict(softmax_scale="0.2"), "softmax_scale must be a float"),
                      (dict(softcap=torch.ones(2)), "softcap must be a float"),
                      (dict(dropout_p=True), "dropout_p must be a float")):
        with pytest.raises(TypeError, match=match):
            flash_attn_func(q, k, v, **kw)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
        flash_attn_varlen_func(*flat, cu, cu, 19.0, 19)
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=7, num_splits=1.0)


# ------------------------------------------- issue 21: S_dmask in FlashAttention's form
def _cc80_block_n(d, dropout):
    """FlashAttention 2's forward key-block width on an A100 (compute capability 8.0)."""
    return {32: 128, 64: 64 if dropout else 128, 96: 64, 128: 32 if dropout else 64}.get(
        next((c for c in (32, 64, 96, 128) if d <= c), 256), 64)


def _expected_block_form(q, k, scale, vis, slopes, block_n):
    """float64 (B, H, Sq, Sk): entries of block c are exp(s - max of the row over blocks
    c, c+1, ...), 0 where masked. Returns (form, lse)."""
    B, Sq, H, D = q.shape
    kk = k.double().repeat_interleave(H // k.shape[2], 2)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), kk) * scale
    if slopes is not None:
        i = torch.arange(Sq).view(Sq, 1) + k.shape[1] - Sq
        s = s - slopes.double().view(-1, H, 1, 1) * (i - torch.arange(k.shape[1])).abs()
    s = s.masked_fill(~vis, float("-inf"))
    form = torch.zeros_like(s)
    running = torch.full(s.shape[:-1], float("-inf"), dtype=torch.float64)
    for c0 in reversed(range(0, s.shape[-1], block_n)):
        blk = s[..., c0:c0 + block_n]
        running = torch.maximum(running, blk.amax(-1))
        m = torch.where(torch.isfinite(running), running, torch.zeros_like(running))
        form[..., c0:c0 + block_n] = torch.exp(blk - m.unsqueeze(-1))
    return form, torch.logsumexp(s, -1)


@pytest.mark.parametrize("d,causal,local,alibi,dtype", [
    (59, True, False, False, torch.float16),  # the issue's example (kvpacked below)
    (32, False, True, True, torch.bfloat16),
    (111, True, True, False, torch.float16),
    (160, False, False, True, torch.float32),
])
def test_S_dmask_is_flash_attentions_unnormalised_block_form(d, causal, local, alibi, dtype):
    """return_attn_probs=True with dropout: S_dmask holds what FlashAttention's kernel
    writes (failure class 2): (batch, nheads, seqlen_q and seqlen_k rounded up to 128) in
    q's dtype; block c of 128/64/32 keys (the A100 kernel's width for this head dim) scaled
    by the row's running maximum over blocks c.. (the kernel walks blocks last to first),
    dropped entries negated; times exp(running max - lse) it is the softmax."""
    g = torch.Generator().manual_seed(d)
    B, Sq, Sk, H = 2, 113, 203, 4
    q = torch.randn(B, Sq, H, d, generator=g).to(dtype)
    k = torch.randn(B, Sk, H, d, generator=g).to(dtype)
    v = torch.randn(B, Sk, H, d, generator=g).to(dtype)
    window = torch.randint(0, Sk, (2,), generator=g) if local else (-1, -1)
    slopes = torch.rand(B, H, generator=g) * 0.3 if alibi else None
    torch.manual_seed(0)
    out, lse, S = flash_attn_kvpacked_func(q, torch.stack([k, v], 2), 0.17, causal=causal,
                                           window_size=window, alibi_slopes=slopes,
                                           return_attn_probs=True)
    assert S.shape == (B, H, 128, 256) and S.dtype == dtype
    assert not S[:, :, Sq:].any() and not S[:, :, :, Sk:].any()
    S = S[:, :, :Sq, :Sk]
    opts = dict(causal=causal, window_size=tuple(int(w) for w in window))
    vis = torch.isfinite(attn_scores_mask(Sq, Sk, opts))
    form, lse_ref = _expected_block_form(q, k, d ** -0.5, vis, slopes, _cc80_block_n(d, True))
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(S.abs().double(), form, rtol=tol, atol=tol)
    keep = ~torch.signbit(S)
    frac = (~keep)[vis.expand_as(keep)].float().mean().item()
    assert abs(frac - 0.17) <= 0.02
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-3, atol=1e-3)
    # the output is the one S_dmask describes
    ref, _ = attn_ref(q, k, v, keep=keep, dropout_p=0.17, alibi_slopes=slopes, **opts)
    assert (out.double() - ref).abs().max() < {torch.float32: 1e-5}.get(dtype, 2e-2)


def test_S_dmask_varlen_block_form_per_sequence():
    g = torch.Generator().manual_seed(23)
    cu = torch.tensor([0, 70, 70, 300], dtype=torch.int32)
    q, k, v = (torch.randn(300, 2, 64, generator=g) for _ in range(3))
    _, _, S = flash_attn_varlen_func(q, k, v, cu, cu, 230, 230, 0.3, causal=True,
                                     return_attn_probs=True)
    assert S.shape == (3, 2, 256, 256) and S.dtype == torch.float32
    for b, (s0, s1) in enumerate(((0, 70), (70, 70), (70, 300))):
        n = s1 - s0
        got = S[b, :, :n, :n]
        assert not S[b, :, n:].any() and not S[b, :, :, n:].any()
        vis = torch.isfinite(attn_scores_mask(n, n, dict(causal=True, window_size=(-1, -1))))
        form, _ = _expected_block_form(q[None, s0:s1], k[None, s0:s1], 64 ** -0.5, vis, None,
                                       _cc80_block_n(64, True))
        torch.testing.assert_close(got.abs().double(), form[0], rtol=1e-5, atol=1e-6)


def test_get_block_size_n_is_the_a100_table():
    from fastattn.flash_attn_compat.flash_attn_interface import _get_block_size_n

    for d in (16, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256):
        for dropout in (False, True):
            assert _get_block_size_n("cpu", d, dropout, True) == _cc80_block_n(d, dropout)


# ------------------------------------------- issue 21: paged cache + rotary append
KV_ISSUE21 = dict(dtype=torch.float16, heads=(6, 6), d=32, seqlen_q=1, seqlen_k=128, causal=True,
                  local=False, new_kv=True, rotary=0.5, interleaved=False, batch_idx=False,
                  leftpad=False, softcap=0.0, alibi=None)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("page_size", [256, 16, None])
def test_kvcache_paged_rotary_append_issue21(isa, page_size, monkeypatch):
    """FlashAttention's test_flash_attn_kvcache[1-128-32-False-False-256-0.5-False-True-True-
    False-False-True-mha-1-dtype0] (failure class 3): a paged cache of 256-token pages, one
    new key appended with half the head dim rotated (GPT-NeoX pairs), causal, MHA, fp16.
    The cache after the append and the output match the float64 oracle, on every kernel
    variant the CPU runs, paged or not."""
    import fastattn

    if isa not in fastattn.cpu_info()["runnable"]:
        pytest.skip(f"this CPU cannot run the {isa} variant")
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    run_kvcache_case(KV_ISSUE21, seed=21, page_size=page_size)


@pytest.mark.parametrize("case", covering_cases(dict(
    KV_SPACE, rotary=[0.5, 1.0], new_kv=[True], seqlen_q=[1, 4, 16], seqlen_k=[128, 339]), 12,
    seed=21), ids=_kv_id)
def test_kvcache_rotary_append_relatives(case):
    """Rotary appends with every paged / left-padding / batch-index combination that
    FlashAttention allows (paged excludes the other two)."""
    if case["batch_idx"] or case["leftpad"]:
        run_kvcache_case(case, seed=24)
    else:
        for page in (256, 16):
            run_kvcache_case(case, seed=24, page_size=page)


def test_options_are_validated_once_per_public_call(monkeypatch):
    """flash_attn_func / flash_attn_varlen_func / attention_varlen validate the call's
    options once (api.check_options), however many kernel calls follow (api.run)."""
    import fastattn.api as api
    from fastattn import attention_varlen

    counts = {"check": 0, "run": 0}
    real_check, real_run = api.check_options, api.run

    def check(**kw):
        counts["check"] += 1
        return real_check(**kw)

    def run(*a, **kw):
        counts["run"] += 1
        return real_run(*a, **kw)

    monkeypatch.setattr(api, "check_options", check)
    monkeypatch.setattr(api, "run", run)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=g) for _ in range(3))
    flash_attn_func(q, k, v, window_size=(3, 0), dropout_p=0.1)
    assert counts == {"check": 1, "run": 1}
    cu_q = torch.tensor([0, 5, 9, 17], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 10, 17], dtype=torch.int32)
    t = [torch.randn(17, 2, 16, generator=g) for _ in range(3)]
    counts.update(check=0, run=0)
    flash_attn_varlen_func(*t, cu_q, cu_k, 8, 7, causal=True, window_size=(4, 0))
    assert counts == {"check": 1, "run": 3}  # one kernel call per sequence, one validation
    counts.update(check=0, run=0)
    attention_varlen(*t, cu_q, cu_k, causal=True)
    assert counts == {"check": 1, "run": 3}


# ---- deterministic (issue 16) -------------------------------------------------------------

def test_deterministic_flag_passes_through(monkeypatch):
    """FlashAttention's `deterministic` reaches fastattn.attention's option unchanged (its
    default False allows an atomic dQ backward; fastattn's own default is True)."""
    from fastattn import api as fa_api

    seen = []
    real_run = fa_api.run

    def spy(*args, **kw):
        seen.append(args[3].deterministic)
        return real_run(*args, **kw)

    monkeypatch.setattr(fa_api, "run", spy)
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    flash_attn_func(q, k, v)
    flash_attn_func(q, k, v, deterministic=True)
    flash_attn_func(q, k, v, deterministic=False)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, deterministic=True)
    assert seen[:3] == [False, True, False]
    assert len(seen) > 3 and all(seen[3:])  # varlen: one api.run per kernel call
    with pytest.raises(TypeError, match="deterministic"):
        flash_attn_func(q, k, v, deterministic=1)
