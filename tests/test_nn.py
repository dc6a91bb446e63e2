"""fastattn.nn: MultiheadAttention against torch.nn.MultiheadAttention (state_dict, outputs,
weights, masks, layouts, bad input) and the Attention module against a naive computation."""

import fastattn.nn as fnn
import pytest
import torch
from conftest import requires_cpu_ext
from fastattn.backends.reference import reference_attention

pytestmark = requires_cpu_ext

E, H = 32, 4


def _pair(**kw):
    """A torch MHA and a fastattn MHA holding the same weights (loaded via state_dict)."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **kw).eval()
    ours = fnn.MultiheadAttention(E, H, **kw).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref, ours


def _inputs(batch_first, L=7, S=11, N=3, kdim=E, vdim=E, self_attn=False):
    g = torch.Generator().manual_seed(1)
    shape = (lambda n, d: (N, n, d)) if batch_first else (lambda n, d: (n, N, d))
    q = torch.randn(*shape(L, E), generator=g)
    if self_attn:
        return q, q, q
    return q, torch.randn(*shape(S, kdim), generator=g), torch.randn(*shape(S, vdim), generator=g)


def _check(ref, ours, args, kwargs, atol=2e-6):
    out_r, w_r = ref(*args, **kwargs)
    out_o, w_o = ours(*args, **kwargs)
    torch.testing.assert_close(out_o, out_r, atol=atol, rtol=1e-5)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, atol=atol, rtol=1e-5)


def test_state_dict_keys_match_torch():
    for kw in [{}, {"bias": False}, {"add_bias_kv": True}, {"kdim": 12, "vdim": 20}]:
        ref = torch.nn.MultiheadAttention(E, H, **kw)
        ours = fnn.MultiheadAttention(E, H, **kw)
        assert {k: v.shape for k, v in ref.state_dict().items()} == \
               {k: v.shape for k, v in ours.state_dict().items()}, kw
        # and the other way round: torch loads ours
        ref.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_matches_torch(batch_first, need_weights, average):
    ref, ours = _pair(batch_first=batch_first)
    _check(ref, ours, _inputs(batch_first),
           dict(need_weights=need_weights, average_attn_weights=average))


def test_fused_path_is_taken(monkeypatch):
    """need_weights=False without masks goes through fastattn.attention (a fused kernel)."""
    seen = []
    real = fnn.attention
    monkeypatch.setattr(fnn, "attention", lambda *a, **k: seen.append(k) or real(*a, **k))
    ref, ours = _pair(batch_first=True)
    _check(ref, ours, _inputs(True, self_attn=True), dict(need_weights=False))
    assert len(seen) == 1


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask(batch_first, need_weights):
    ref, ours = _pair(batch_first=batch_first)
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[0, 8:] = True
    kpm[2, :3] = True
    _check(ref, ours, _inputs(batch_first), dict(key_padding_mask=kpm, need_weights=need_weights))
    # float padding mask (added to the scores), as torch accepts
    fkpm = torch.zeros(3, 11).masked_fill(kpm, float("-inf"))
    _check(ref, ours, _inputs(batch_first), dict(key_padding_mask=fkpm, need_weights=need_weights))


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal(need_weights):
    ref, ours = _pair(batch_first=True)
    x = _inputs(True, L=9, self_attn=True)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(9)
    _check(ref, ours, x, dict(attn_mask=mask, is_causal=True, need_weights=need_weights))
    # is_causal without attn_mask: torch raises, fastattn applies the causal mask
    out, _ = ours(*x, is_causal=True, need_weights=False)
    torch.testing.assert_close(out, ref(*x, attn_mask=mask, need_weights=False)[0],
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attn_mask_bool_float_per_head_and_padding(need_weights):
    ref, ours = _pair(batch_first=True)
    g = torch.Generator().manual_seed(3)
    bool_mask = torch.rand(7, 11, generator=g) < 0.3
    bool_mask[:, 0] = False
    per_head = torch.randn(3 * H, 7, 11, generator=g)
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[1, 5:] = True
    x = _inputs(True)
    _check(ref, ours, x, dict(attn_mask=bool_mask, need_weights=need_weights))
    _check(ref, ours, x, dict(attn_mask=per_head, need_weights=need_weights))
    _check(ref, ours, x, dict(attn_mask=bool_mask, key_padding_mask=kpm, need_weights=need_weights))


@pytest.mark.parametrize("kw", [{"kdim": 12, "vdim": 20}, {"add_bias_kv": True},
                                {"add_zero_attn": True}, {"bias": False},
                                {"add_bias_kv": True, "add_zero_attn": True}])
@pytest.mark.parametrize("need_weights", [False, True])
def test_constructor_options(kw, need_weights):
    ref, ours = _pair(batch_first=False, **kw)
    args = _inputs(False, kdim=kw.get("kdim", E), vdim=kw.get("vdim", E))
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[0, 9:] = True
    _check(ref, ours, args, dict(need_weights=need_weights))
    _check(ref, ours, args, dict(need_weights=need_weights, key_padding_mask=kpm))


def test_unbatched():
    ref, ours = _pair(batch_first=True)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, E, generator=g), torch.randn(8, E, generator=g)
    kpm = torch.zeros(8, dtype=torch.bool)
    kpm[6:] = True
    _check(ref, ours, (q, k, k), dict(key_padding_mask=kpm))
    _check(ref, ours, (q, k, k), dict(need_weights=False))


def test_gradients_match_torch():
    ref, ours = _pair(batch_first=True)
    ref.train(), ours.train()  # dropout is 0: training mode changes nothing else
    x = _inputs(True, self_attn=True)[0]
    for m in (ref, ours):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        m(xi, xi, xi, need_weights=False)[0].square().sum().backward()
        m.xgrad = xi.grad
    torch.testing.assert_close(ours.xgrad, ref.xgrad, atol=1e-5, rtol=1e-5)
    for (n, p_r), p_o in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_o.grad, p_r.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_dropout_training_runs_and_eval_is_deterministic():
    torch.manual_seed(0)
    m = fnn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    x = _inputs(True, self_attn=True)[0]
    m.train()
    a, _ = m(x, x, x, need_weights=False)
    b, _ = m(x, x, x, need_weights=False)
    assert not torch.allclose(a, b)
    m.eval()
    torch.testing.assert_close(m(x, x, x)[0], m(x, x, x)[0])


def test_fully_masked_query_gives_zero_not_nan():
    _, ours = _pair(batch_first=True)
    x = _inputs(True)
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key
    for nw in (False, True):
        out, w = ours(*x, key_padding_mask=kpm, need_weights=nw)
        assert not out.isnan().any()
        # attention output of batch 1 is 0, so the layer returns the output bias (0 at init)
        torch.testing.assert_close(out[1], ours.out_proj.bias.expand(7, E))
        if nw:
            assert (w[1] == 0).all()


@pytest.mark.parametrize("call,err,match", [
    (lambda m: m(torch.randn(2, 3, E + 1), torch.randn(2, 3, E), torch.randn(2, 3, E)),
     ValueError, "query must have last dim embed_dim"),
    (lambda m: m(torch.randn(2, 3, E), torch.randn(2, 4, E), torch.randn(2, 5, E)),
     ValueError, "key and value must have the same sequence length"),
    (lambda m: m(torch.randn(2, 3, E), torch.randn(3, 4, E), torch.randn(3, 4, E)),
     ValueError, "same batch size"),
    (lambda m: m(torch.randn(2, 3, 4, E), torch.randn(2, 3, E), torch.randn(2, 3, E)),
     ValueError, "query must be 3-D"),
    (lambda m: m(torch.randn(3, E), torch.randn(2, 3, E), torch.randn(2, 3, E)),
     ValueError, "all be batched"),
    (lambda m: m(torch.randn(2, 3, E), torch.randn(2, 3, E).double(), torch.randn(2, 3, E)),
     TypeError, "share one dtype"),
    (lambda m: m(*[torch.randn(2, 3, E)] * 3, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape"),
    (lambda m: m(*[torch.randn(2, 3, E)] * 3, attn_mask=torch.zeros(5, 3, dtype=torch.bool)),
     ValueError, "attn_mask must have shape"),
    (lambda m: m(*[torch.randn(2, 3, E)] * 3, attn_mask=torch.zeros(3, 3, dtype=torch.int64)),
     TypeError, "attn_mask must be a bool tensor"),
    (lambda m: m(*[torch.randn(2, 3, E)] * 3, attn_mask=torch.zeros(3, 3, dtype=torch.float64)),
     TypeError, "query's dtype"),
    (lambda m: m(*[torch.randn(2, 3, E)] * 3, is_causal=1),
     TypeError, "is_causal must be a bool"),
    (lambda m: m(torch.randint(0, 3, (2, 3, E)), *[torch.randn(2, 3, E)] * 2),
     TypeError, "query must be a floating tensor"),
])
def test_bad_input(call, err, match):
    m = fnn.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(err, match=match):
        call(m)


def test_bad_constructor():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        fnn.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        fnn.MultiheadAttention(32, 4, dropout=1.5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        fnn.Attention(32, 4, 3)
    with pytest.raises(ValueError, match="pattern"):
        fnn.Attention(32, 4, pattern="diagonal")
    with pytest.raises(ValueError, match="sliding_window"):
        fnn.Attention(32, 4, pattern=("sliding_window", -2))


# ------------------------------------------------------------------ Attention


def _naive_attention_module(m, x, context=None, window=(-1, -1), mask=None):
    context = x if context is None else context
    B, N, _ = x.shape
    q = m.q_proj(x).view(B, N, m.n_heads, m.head_dim).transpose(1, 2)
    k = m.k_proj(context).view(B, -1, m.n_kv_heads, m.head_dim).transpose(1, 2)
    v = m.v_proj(context).view(B, -1, m.n_kv_heads, m.head_dim).transpose(1, 2)
    out, _ = reference_attention(q, k, v, scale=m.head_dim ** -0.5, window=window, mask=mask)
    return m.o_proj(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("pattern,window", [
    (None, (-1, -1)), ("causal", (-1, 0)), (("sliding_window", 3), (3, 0)),
    (("window", 2, 4), (2, 4)),
])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_module_patterns(pattern, window, n_kv_heads):
    torch.manual_seed(0)
    m = fnn.Attention(32, 4, n_kv_heads, pattern=pattern, bias=True)
    x = torch.randn(2, 13, 32, requires_grad=True)
    ref = _naive_attention_module(m, x, window=window)
    out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_attention_module_cross_and_backend():
    torch.manual_seed(0)
    m = fnn.Attention(32, 4, 2, head_dim=16, pattern="causal", backend="reference")
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    # bottom-right causal: query i sees keys j <= i + (9 - 5)
    torch.testing.assert_close(m(x, ctx), _naive_attention_module(m, x, ctx, window=(-1, 0)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context must be"):
        m(x, torch.randn(3, 9, 32))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 5, 31))


def test_attention_module_block_mask_pattern():
    from fastattn.sparse import from_dense

    torch.manual_seed(0)
    built = []

    def pattern(Nq, Nk):
        built.append((Nq, Nk))
        dense = torch.ones(Nq, Nk, dtype=torch.bool).tril() & (torch.arange(Nk) % 3 != 1)
        return from_dense(dense, block_size=(16, 16))

    m = fnn.Attention(32, 4, 2, pattern=pattern)
    x = torch.randn(2, 37, 32)
    dense = torch.ones(37, 37, dtype=torch.bool).tril() & (torch.arange(37) % 3 != 1)
    torch.testing.assert_close(m(x), _naive_attention_module(m, x, mask=dense),
                               atol=1e-5, rtol=1e-5)
    m(x)
    assert built == [(37, 37)]  # built once per length pair, then cached
    fixed = fnn.Attention(32, 4, 2, pattern=pattern(37, 37))
    fixed.load_state_dict(m.state_dict())
    torch.testing.assert_close(fixed(x), m(x))


def test_mha_fused_and_masked_paths_agree():
    """MultiheadAttention's fused and masked paths agree with each other."""
    _, ours = _pair(batch_first=True)
    x = _inputs(True, self_attn=True, L=10)
    fused = ours(*x, need_weights=False, is_causal=True)[0]
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)
    masked = ours(*x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(fused, masked, atol=2e-6, rtol=1e-5)


def test_need_weights_warns_once_that_it_is_the_naive_path():
    import warnings

    _, ours = _pair(batch_first=True)
    args = _inputs(True, self_attn=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours(*args)  # torch's default need_weights=True
        ours(*args)
        ours(*args, need_weights=False)
    msgs = [str(w.message) for w in caught if "need_weights" in str(w.message)]
    assert len(msgs) == 1 and "need_weights=False" in msgs[0], msgs
