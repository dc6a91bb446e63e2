"""Regressions found by running PyTorch's own SDPA tests (test/test_transformers.py) with
fastattn.patch_sdpa() active (tools/run_torch_sdpa_tests.py,
benchmarks/results/torch_sdpa_conformance.md): each case is checked against torch's own
function, called while unpatched, and against where the call ran (fastattn.patching.stats)."""

import fastattn
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cpu_ext
from fastattn.patching import patch_sdpa, stats, unpatch_sdpa
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

pytestmark = requires_cpu_ext

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean():
    stats.reset()
    yield
    unpatch_sdpa()
    assert F.scaled_dot_product_attention is ORIGINAL


def _qkv(B, H, Nq, Nk, D, dtype=torch.float32, Hkv=None, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv or H, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv or H, Nk, D, generator=g).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _grads(fn, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(torch.ones_like(out).mul_(0.5).add_(torch.arange(out.shape[-1]) / 7))
    return out.detach(), q.grad, k.grad, v.grad


# torch's CausalBias routes itself from inside F.scaled_dot_product_attention
# (__torch_function__ compares the called function with F's attribute). While patched, that
# attribute is fastattn's wrapper, so the bias reached torch's builtin as a plain tensor:
# wrong results for lower_right, "Explicit attn_mask should not be set" errors, and the
# wrong error for is_causal=True.
@pytest.mark.parametrize("make_bias", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("Nq,Nk", [(8, 8), (7, 19), (19, 7)])
def test_causal_bias_under_patch_matches_torch(make_bias, Nq, Nk):
    q, k, v = _qkv(2, 3, Nq, Nk, 16)
    bias = make_bias(Nq, Nk)
    ref = _grads(ORIGINAL, q, k, v, attn_mask=bias)
    with patch_sdpa():
        got = _grads(F.scaled_dot_product_attention, q, k, v, attn_mask=bias)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, equal_nan=True)
    lower_right_empty_rows = make_bias is causal_lower_right and Nq > Nk
    # every case but lower-right with rows that see no key runs on fastattn's kernel
    assert (stats.fastattn, stats.torch) == ((0, 1) if lower_right_empty_rows else (1, 0))


def test_causal_bias_with_is_causal_raises_torchs_error():
    q, k, v = _qkv(1, 2, 8, 8, 16)
    for fn in (fastattn.scaled_dot_product_attention, ORIGINAL):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            fn(q, k, v, attn_mask=causal_upper_left(8, 8), is_causal=True)
    with patch_sdpa():
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 8),
                                           is_causal=True)


def test_causal_bias_with_dropout_goes_to_torch_with_torchs_mask():
    q, k, v = _qkv(1, 2, 6, 11, 8)
    torch.manual_seed(3)
    ref = ORIGINAL(q, k, v, attn_mask=causal_lower_right(6, 11), dropout_p=0.4)
    with patch_sdpa():
        torch.manual_seed(3)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(6, 11),
                                             dropout_p=0.4)
    torch.testing.assert_close(got, ref)
    assert (stats.fastattn, stats.torch) == (0, 1)


# is_causal=True with Nq < Nk (top-left: keys Nq.. are seen by no query) used to go to torch;
# it runs on fastattn's kernel over the first Nq keys, with zero gradients for the others.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_left_causal_with_fewer_queries_than_keys_is_served(dtype):
    q, k, v = _qkv(2, 4, 23, 56, 16, dtype=dtype, Hkv=2)
    ref = _grads(ORIGINAL, q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    with patch_sdpa():
        got = _grads(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, **tol)
    assert (stats.fastattn, stats.torch) == (1, 0)
    assert got[2][:, :, 23:].abs().max() == 0 and got[3][:, :, 23:].abs().max() == 0


# 3-D inputs (H, L, E) used to go to torch; they run on the kernel as one batch, with torch's
# reading of dim -3 as the heads (enable_gqa groups it).
@pytest.mark.parametrize("gqa", [False, True])
def test_3d_inputs_are_served_and_match_torch(gqa):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(6, 10, 8, generator=g)
    k = torch.randn(3 if gqa else 6, 13, 8, generator=g)
    v = torch.randn(3 if gqa else 6, 13, 5, generator=g)
    ref = _grads(ORIGINAL, q, k, v, is_causal=True, enable_gqa=gqa)
    with patch_sdpa():
        got = _grads(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=gqa)
    assert got[0].shape == (6, 10, 5)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    assert (stats.fastattn, stats.torch) == (1, 0)


# Tensor masks (bool, or float like nn.MultiheadAttention's 0/-inf masks) go to torch's own
# function: turning a dense mask into a block mask on every call costs more than the attention
# (api.py says the figures). Results are torch's, in every shape torch broadcasts.
@pytest.mark.parametrize("mask_shape", [(13, 21), (2, 1, 1, 21), (1, 4, 13, 21), (2, 4, 13, 21),
                                        (13, 1), (4, 13, 21)])
def test_bool_mask_goes_to_torch_and_matches(mask_shape):
    g = torch.Generator().manual_seed(len(mask_shape))
    three_d = len(mask_shape) == 3
    q, k, v = _qkv(2, 4, 13, 21, 16, Hkv=2)
    if three_d:
        q, k, v = q[0], k[0].repeat(2, 1, 1), v[0].repeat(2, 1, 1)
    mask = torch.rand(mask_shape, generator=g) < 0.6
    mask.view(-1)[::5] = False
    ref = _grads(ORIGINAL, q, k, v, attn_mask=mask, enable_gqa=not three_d)
    with patch_sdpa():
        got = _grads(F.scaled_dot_product_attention, q, k, v, attn_mask=mask,
                     enable_gqa=not three_d)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert (stats.fastattn, stats.torch) == (0, 1)


def test_bool_mask_with_is_causal_is_left_to_torch():
    # torch decides what a mask together with is_causal means (an error on some paths)
    q, k, v = _qkv(1, 2, 8, 8, 16)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.7
    ref = ORIGINAL(q, k, v, attn_mask=mask, is_causal=True)
    with patch_sdpa():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(got, ref)
    assert (stats.fastattn, stats.torch) == (0, 1)


def test_bool_mask_under_torch_compile_keeps_torchs_path():
    # a compiled call with a tensor mask stays on torch's traceable path (fullgraph: no
    # graph break, no host read of the mask's values)
    q = torch.randn(1, 2, 9, 16)
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(2)) < 0.7
    mask[:, 0] = True
    fn = torch.compile(lambda q, m: fastattn.scaled_dot_product_attention(q, q, q, attn_mask=m),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, mask), ORIGINAL(q, q, q, attn_mask=mask))


# torch's CPU SDPA lays its output out in the query's memory order; fastattn returned a
# contiguous (B, H, L, Ev) whatever the query, so the common
# `out.transpose(1, 2).view(B, L, H * Ev)` after a projection split into heads raised.
@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                   (2, 1, 0)])
@pytest.mark.parametrize("kind", ["plain", "causal"])
def test_output_layout_follows_the_query_like_torch(order, kind):
    B, H, L, E = 2, 3, 10, 8
    shape = (B, H, L, E)
    mem = [shape[i] for i in order] + [E]
    inv = [list(order).index(i) for i in range(3)] + [3]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(mem, generator=g).permute(inv) for _ in range(3))
    kw = dict(is_causal=kind == "causal")
    ref = ORIGINAL(q, k, v, **kw)
    with patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert stats.fastattn == 1
    assert out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_projection_split_into_heads_views_back_like_torch():
    B, L, H, E = 2, 7, 4, 8
    x = torch.randn(B, L, 3 * H * E)
    q, k, v = (t.view(B, L, H, E).transpose(1, 2) for t in x.split(H * E, dim=-1))
    with patch_sdpa():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert stats.fastattn == 1
    merged = y.transpose(1, 2).view(B, L, H * E)  # raised on a contiguous (B, H, L, E)
    torch.testing.assert_close(merged, ORIGINAL(q, k, v, is_causal=True).transpose(1, 2)
                               .reshape(B, L, H * E), atol=2e-5, rtol=2e-5)


# TorchScript resolves torch.nn.functional's functions through a table of builtins keyed by
# the function object; while patched, scripting nn.MultiheadAttention or a
# TransformerEncoderLayer (which call F.scaled_dot_product_attention) raised
# "TypeError: ... code object was expected, got builtin_function_or_method".
def test_torchscript_of_torch_modules_works_under_patch():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(embed_dim=32, num_heads=4, kdim=48, vdim=48).eval()
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    x, kv, src = torch.randn(5, 2, 32), torch.randn(7, 2, 48), torch.randn(2, 6, 16)
    with patch_sdpa():
        scripted_mha = torch.jit.script(mha)
        scripted_layer = torch.jit.script(layer)
        wrapper = F.scaled_dot_product_attention
        torch.testing.assert_close(scripted_mha(x, kv, kv)[0], mha(x, kv, kv)[0])
        torch.testing.assert_close(scripted_layer(src), layer(src))
    from torch.jit import _builtins
    assert _builtins._find_builtin(wrapper) is None  # removed from the table on restore


def test_float_bias_and_mask_with_grad_stay_torchs():
    q, k, v = _qkv(1, 2, 6, 6, 8)
    bias = torch.randn(6, 6)
    bias[0, 1] = float("-inf")
    learned = torch.zeros(6, 6, requires_grad=True)
    with patch_sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        F.scaled_dot_product_attention(q, k, v, attn_mask=learned).sum().backward()
    torch.testing.assert_close(out, ORIGINAL(q, k, v, attn_mask=bias))
    assert learned.grad is not None
    assert (stats.fastattn, stats.torch) == (0, 2)


def test_multihead_attention_with_padding_mask_matches_torch():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 11, 32)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, 7:] = True
    causal = torch.nn.Transformer.generate_square_subsequent_mask(11)
    ref = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
    with patch_sdpa():
        out = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(out, ref)
    assert (stats.fastattn, stats.torch) == (0, 1)  # its merged 0/-inf mask: torch's path
