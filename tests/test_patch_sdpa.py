"""fastattn.patch_sdpa(): existing code calling F.scaled_dot_product_attention runs through
fastattn inside the patch (counted by fastattn.patching.stats) and through torch outside it,
with equal outputs; the original is restored on exit, on error, and when nested."""

import sys
import types

import fastattn
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cpu_ext
from fastattn import patching
from fastattn.patching import patch_sdpa, stats, unpatch_sdpa

pytestmark = requires_cpu_ext

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean():
    stats.reset()
    yield
    unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL


class SDPAModel(torch.nn.Module):
    """Unmodified user code: a causal self-attention block calling F.sdpa by attribute."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


def test_model_routes_through_fastattn_inside_and_torch_outside():
    torch.manual_seed(0)
    model = SDPAModel()
    x = torch.randn(2, 17, 32, requires_grad=True)
    ref = model(x)
    assert stats.calls == 0
    with patch_sdpa() as p:
        assert fastattn.patching.is_patched() and isinstance(p, patching.SDPAPatch)
        out = model(x)
        assert (stats.calls, stats.fastattn, stats.torch) == (1, 1, 0)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    g, = torch.autograd.grad(out.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    model(x)  # restored: not counted
    assert stats.calls == 1


def test_fused_kernel_actually_runs(monkeypatch):
    """The routed call reaches fastattn's cpu backend (not torch's function)."""
    from fastattn import dispatch

    served = []
    real_select = dispatch.select
    monkeypatch.setattr(dispatch, "select",
                        lambda *a, **k: served.append(real_select(*a, **k).name) or
                        real_select(*a, **k))
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with patch_sdpa():
        F.scaled_dot_product_attention(q, k, v)
    assert served == ["cpu"]


def test_uncovered_arguments_fall_back_to_torch():
    torch.manual_seed(0)
    model = SDPAModel()
    x = torch.randn(2, 9, 32)
    keep = torch.rand(9, 9) < 0.7
    keep[:, 0] = True
    mask = torch.randn(9, 9).masked_fill(~keep, float("-inf"))  # a float bias: torch only
    ref = model(x, mask)
    q3 = torch.randn(4, 9, 16, dtype=torch.float64)  # float64: no fastattn kernel takes it
    with patch_sdpa():
        out = model(x, mask)
        y3 = F.scaled_dot_product_attention(q3, q3, q3)
        drop = F.scaled_dot_product_attention(*(torch.randn(1, 2, 5, 8),) * 3, dropout_p=0.5)
    assert (stats.calls, stats.fastattn, stats.torch) == (3, 0, 3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(y3, ORIGINAL(q3, q3, q3))
    assert drop.shape == (1, 2, 5, 8)


def test_semantics_match_torch_gqa_scale_causal_top_left():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 5, 16, generator=g)
    k = torch.randn(2, 2, 12, 16, generator=g)
    v = torch.randn(2, 2, 12, 16, generator=g)
    cases = [dict(enable_gqa=True), dict(enable_gqa=True, scale=0.1),
             dict(enable_gqa=True, is_causal=True)]
    for kw in cases:
        with patch_sdpa():
            got = F.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(got, ORIGINAL(q, k, v, **kw), atol=2e-6, rtol=1e-5)


def test_restored_on_error_and_nested():
    with pytest.raises(RuntimeError, match="boom"):
        with patch_sdpa():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL
    with patch_sdpa():
        outer = F.scaled_dot_product_attention
        with patch_sdpa():
            inner = F.scaled_dot_product_attention
            # never a wrapper around a wrapper: both call torch's function underneath
            assert inner.__fastattn_original__.__wrapped__ is ORIGINAL
            F.scaled_dot_product_attention(*(torch.randn(1, 1, 4, 8),) * 3)
        assert F.scaled_dot_product_attention is outer
    assert F.scaled_dot_product_attention is ORIGINAL
    assert stats.calls == 1


def test_function_form_and_unpatch():
    patch_sdpa()
    assert F.scaled_dot_product_attention is not ORIGINAL
    assert fastattn.patching.is_patched()
    unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL
    unpatch_sdpa()  # no-op


def test_restore_order_enforced():
    a = patch_sdpa()
    b = patch_sdpa()
    with pytest.raises(RuntimeError, match="innermost first"):
        a.restore()
    b.restore()
    a.restore()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_modules_that_imported_the_name():
    mod = types.ModuleType("user_mod_sdpa")
    exec("from torch.nn.functional import scaled_dot_product_attention\n"
         "def run(q, k, v):\n    return scaled_dot_product_attention(q, k, v)\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        q = torch.randn(1, 2, 7, 16)
        with patch_sdpa():  # the attribute only: the module's own binding is torch's
            mod.run(q, q, q)
        assert stats.calls == 0
        with patch_sdpa(modules=["user_mod_sdpa"]):
            out = mod.run(q, q, q)
        assert stats.calls == 1 and stats.fastattn == 1
        assert mod.scaled_dot_product_attention is ORIGINAL
        torch.testing.assert_close(out, ORIGINAL(q, q, q), atol=2e-6, rtol=1e-5)
        with pytest.raises(ValueError, match="no global"):
            patch_sdpa(modules=[types.ModuleType("empty")])
    finally:
        del sys.modules[mod.__name__]


def test_torch_multihead_attention_routes():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)  # training mode: no fast path
    x = torch.randn(2, 6, 32)
    ref = mha(x, x, x, need_weights=False)[0]
    with patch_sdpa():
        out = mha(x, x, x, need_weights=False)[0]
    assert stats.fastattn == 1
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_compiled_model_under_patch():
    torch.manual_seed(0)
    model = SDPAModel()
    x = torch.randn(2, 11, 32)
    ref = model(x)
    torch._dynamo.reset()
    with patch_sdpa():
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
