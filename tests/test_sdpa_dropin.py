"""fastattn.scaled_dot_product_attention is torch's function: same signature, same results
(masks, causal top-left, GQA, scale, dropout), through fastattn's kernels where they apply."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cpu_ext

import fastattn
from fastattn import dispatch


def test_signature_matches_torch():
    # torch's function is a builtin; its docstring's first line states the signature.
    ours = inspect.signature(fastattn.scaled_dot_product_attention)
    doc = F.scaled_dot_product_attention.__doc__
    theirs = " ".join(doc[: doc.index("->")].split())
    expected = "scaled_dot_product_attention" + str(ours).replace(", ", ", ")
    assert " ".join(expected.split()) == theirs.replace("( ", "(").replace(" )", ")")


@pytest.fixture
def count_cpu(monkeypatch):
    calls = []
    b = dispatch.get("cpu")
    if b is not None:
        orig = b.forward
        monkeypatch.setattr(b, "forward", lambda *a: calls.append(1) or orig(*a))
    return calls


def _inputs(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32, Dv=None):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, Hq, Nq, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nk, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Nk, Dv or D, generator=g).to(dtype))


def _tol(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", [(33, 33), (64, 17), (1, 1), (100, 100)])
def test_routes_to_fastattn_and_matches_torch(count_cpu, Nq, Nk, is_causal, dtype):
    q, k, v = _inputs(2, 4, 4, Nq, Nk, 32, dtype)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(ours, theirs, **_tol(dtype))
    assert count_cpu == [1], "expected the call to run on fastattn's cpu kernel"


@requires_cpu_ext
def test_top_left_causal_when_nq_greater_than_nk(count_cpu):
    q, k, v = _inputs(1, 2, 2, 50, 20, 16)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


@requires_cpu_ext
@pytest.mark.parametrize("scale", [None, 0.1, 1.0])
def test_gqa_and_scale(count_cpu, scale):
    q, k, v = _inputs(2, 8, 2, 40, 40, 16)
    ours = fastattn.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
    assert count_cpu == [1]


@requires_cpu_ext
def test_gradients_match_torch():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, 37, 37, 16))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).square().sum().backward()
    F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "broadcast_bool"])
def test_attn_mask_matches_torch(mask_kind):
    q, k, v = _inputs(2, 2, 2, 12, 15, 8)
    if mask_kind == "bool":
        mask = torch.rand(12, 15) > 0.3
        mask[:, 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 2, 12, 15)
    else:
        mask = torch.rand(2, 1, 1, 15) > 0.2
        mask[..., 0] = True
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_dropout_behaves_like_torch():
    q, k, v = _inputs(1, 2, 2, 64, 64, 16)
    torch.manual_seed(5)
    ours = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(ours, theirs)


def test_3d_inputs_and_value_dim():
    q, k, v = torch.randn(3, 10, 8), torch.randn(3, 12, 8), torch.randn(3, 12, 5)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))


def test_errors_like_torch_when_heads_mismatch_without_gqa():
    q, k, v = _inputs(1, 4, 2, 8, 8, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        fastattn.scaled_dot_product_attention(q, k, v)


def test_float64_goes_to_torch(count_cpu):
    q, k, v = _inputs(1, 2, 2, 8, 8, 8, torch.float64)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))
    assert count_cpu == []
