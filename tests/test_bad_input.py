"""Every bad input named in DESIGN.md gets a clear ValueError/TypeError naming the argument,
raised before any kernel runs."""

import pytest
import torch
from conftest import requires_cpu_ext

import fastattn
from fastattn import dispatch


@pytest.fixture
def qkv():
    return torch.randn(2, 4, 16, 32), torch.randn(2, 2, 20, 32), torch.randn(2, 2, 20, 32)


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if any backend's forward runs."""
    calls = []
    for name in dispatch.BACKEND_NAMES:
        b = dispatch.get(name)
        if b is not None:
            monkeypatch.setattr(b, "forward", lambda *a, _n=name, **k: calls.append(_n))
    yield calls
    assert not calls, f"a kernel ran before the error: {calls}"


CASES = [
    # (description, mutate(q, k, v) -> (args, kwargs), error type, words the message must hold)
    ("3-D q", lambda q, k, v: ((q[0], k, v), {}), ValueError, ["q", "4-D"]),
    ("5-D k", lambda q, k, v: ((q, k[None], v), {}), ValueError, ["k", "4-D"]),
    ("batch mismatch", lambda q, k, v: ((q, k[:1], v[:1]), {}), ValueError, ["batch"]),
    ("k/v heads differ", lambda q, k, v: ((q, k, v[:, :1]), {}), ValueError, ["heads"]),
    ("k/v lengths differ", lambda q, k, v: ((q, k, v[:, :, :5]), {}), ValueError, ["sequence length"]),
    ("head dim mismatch", lambda q, k, v: ((q, k[..., :16], v), {}), ValueError, ["head dim"]),
    ("Hq % Hkv", lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, ["multiple", "3", "2"]),
    ("dtype mismatch", lambda q, k, v: ((q.half(), k, v), {}), TypeError, ["dtype"]),
    ("integer dtype", lambda q, k, v: ((q.long(), k.long(), v.long()), {}), TypeError, ["floating"]),
    ("not a tensor", lambda q, k, v: (([1.0], k, v), {}), TypeError, ["q", "Tensor"]),
    ("window not a pair", lambda q, k, v: ((q, k, v), {"window": 4}), ValueError, ["window", "pair"]),
    ("window too negative", lambda q, k, v: ((q, k, v), {"window": (-2, 3)}), ValueError, ["window", "-1"]),
    ("window of floats", lambda q, k, v: ((q, k, v), {"window": (1.5, 2)}), ValueError, ["window"]),
    ("causal not bool", lambda q, k, v: ((q, k, v), {"causal": "yes"}), TypeError, ["causal"]),
    ("bad scale", lambda q, k, v: ((q, k, v), {"scale": "big"}), TypeError, ["scale"]),
    ("nan scale", lambda q, k, v: ((q, k, v), {"scale": float("nan")}), ValueError, ["scale"]),
    ("unknown backend", lambda q, k, v: ((q, k, v), {"backend": "fast"}), ValueError, ["backend", "'cpu'"]),
    ("block_mask wrong type", lambda q, k, v: ((q, k, v), {"block_mask": torch.ones(16, 20, dtype=torch.bool)}),
     TypeError, ["block_mask", "BlockMask"]),
    ("return_lse not bool", lambda q, k, v: ((q, k, v), {"return_lse": 1}), TypeError, ["return_lse"]),
]


@pytest.mark.parametrize("desc,mutate,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(qkv, no_kernel, desc, mutate, exc, words):
    args, kwargs = mutate(*qkv)
    with pytest.raises(exc) as ei:
        fastattn.attention(*args, **kwargs)
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{desc}: message {msg!r} lacks {w!r}"


def test_device_mismatch_is_reported(qkv, no_kernel):
    q, k, v = qkv
    with pytest.raises(ValueError, match="one device"):
        fastattn.attention(q.to("meta"), k, v)


@requires_cpu_ext
def test_backend_that_cannot_serve_lists_every_reason(no_kernel):
    q = torch.randn(1, 2, 8, 512, dtype=torch.float64)  # float64 and head dim 512: two reasons
    with pytest.raises(fastattn.BackendUnavailableError) as ei:
        fastattn.attention(q, q, q, backend="cpu")
    msg = str(ei.value)
    assert "float64" in msg and "head dims up to 256" in msg and "reference: can serve it" in msg


def test_sdpa_backend_cannot_return_lse(no_kernel):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="log-sum-exp"):
        fastattn.attention(q, q, q, backend="sdpa", return_lse=True)


def test_env_var_overrides_auto(monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    seen = []
    ref = dispatch.get("reference")
    orig = ref.forward
    monkeypatch.setattr(ref, "forward", lambda *a: seen.append(1) or orig(*a))
    fastattn.attention(q, q, q)
    assert seen == [1]
    monkeypatch.setenv("FASTATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.attention(q, q, q)


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 8, 16), (0, 2, 8, 16)),
                                              ((1, 2, 0, 16), (1, 2, 8, 16)),
                                              ((1, 2, 8, 16), (1, 2, 0, 16)),
                                              ((1, 0, 8, 16), (1, 0, 8, 16))])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_inputs_give_empty_outputs(shape_q, shape_kv, backend):
    q = torch.randn(shape_q, requires_grad=True)
    k = torch.randn(shape_kv, requires_grad=True)
    v = torch.randn(shape_kv, requires_grad=True)
    if shape_q[1] == 0:  # zero heads: no GQA ratio to check, fastattn rejects Hkv == 0
        with pytest.raises(ValueError, match="heads"):
            fastattn.attention(q, k, v, backend=backend)
        return
    out, lse = fastattn.attention(q, k, v, backend=backend, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3]
    if shape_kv[2] == 0 and out.numel():  # queries that see no key: 0 and lse -inf
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


# ------------------------------------------------------------------ masks of every entry point
# (issue 20) Each mask-like argument is checked (shape, dtype, broadcastability, device) before
# torch or a kernel sees it, with an error naming the argument and the accepted shapes.

from fastattn.flash_attn_compat import flash_attn_varlen_func  # noqa: E402


def _torch_sdpa_result(q, k, v, mask):
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    except (RuntimeError, IndexError, ValueError, TypeError):
        return None


def _mask_shapes(target):
    """Every 2-D..4-D shape whose dims are the target's, 1, or off by one (wrong)."""
    import itertools
    out = set()
    for n in range(1, len(target) + 2):
        tail = target[len(target) - n:] if n <= len(target) else (1,) + target
        for picks in itertools.product((0, 1, 2), repeat=len(tail)):
            out.add(tuple(t if p == 0 else 1 if p == 1 else t + 1 for t, p in zip(tail, picks)))
    return sorted(out)


def test_sdpa_attn_mask_accepts_exactly_what_torch_accepts():
    """Differential against torch: every shape in a grid (right, 1 or wrong per dim, 1-D to
    5-D) and every dtype pairing either works in both (same output) or is rejected by both,
    fastattn's error naming attn_mask and the accepted shapes."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    n_ok = n_bad = 0
    for shape in _mask_shapes((2, 3, 5, 7)):
        mask = torch.rand(shape) > 0.3
        ref = _torch_sdpa_result(q, k, v, mask)
        if ref is None:
            with pytest.raises(ValueError) as ei:
                fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            msg = str(ei.value)
            assert "attn_mask" in msg and "(L=5, S=7), (H=3, L=5, S=7) or (B=2, H=3, L=5, S=7)" \
                in msg and str(shape) in msg, msg
            n_bad += 1
        else:
            torch.testing.assert_close(
                fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref,
                equal_nan=True)
            n_ok += 1
    assert n_ok >= 20 and n_bad >= 20
    for qdt in (torch.float32, torch.bfloat16, torch.float64):
        for mdt in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64,
                    torch.int64, torch.uint8):
            qq, kk, vv = (t.to(qdt) for t in (q, k, v))
            mask = torch.zeros(5, 7, dtype=mdt)
            ref = _torch_sdpa_result(qq, kk, vv, mask)
            if ref is None:
                with pytest.raises(TypeError, match=r"attn_mask must be a bool.*float32.*got"):
                    fastattn.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            else:
                torch.testing.assert_close(
                    fastattn.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask), ref)


def test_sdpa_attn_mask_shape_error_names_argument_and_forms(no_kernel):
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 3, 8)
    bad = torch.zeros(2, 16, 16, dtype=torch.bool)  # the case: (B, L, L) for L x S
    with pytest.raises(ValueError) as ei:
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=bad)
    assert str(ei.value) == (
        "attn_mask must broadcast to (2, 4, 16, 3) (*query.shape[:-2], L = query.shape[-2], "
        "S = key.shape[-2]): accepted shapes are (L=16, S=3), (H=4, L=16, S=3) or (B=2, H=4, "
        "L=16, S=3), where any dim may be 1; got attn_mask of shape (2, 16, 16)")


@pytest.mark.parametrize("mask,exc,words", [
    ([[True]], TypeError, ["attn_mask must be a torch.Tensor or None", "list"]),
    (torch.zeros(16, 20, dtype=torch.int64), TypeError,
     ["attn_mask must be a bool or float32 tensor", "torch.int64", ".to(torch.float32)"]),
    (torch.zeros(16, 20, dtype=torch.float64), TypeError, ["attn_mask", "torch.float64"]),
    (torch.zeros(20), ValueError, ["attn_mask must broadcast to (2, 4, 16, 20)", "(20,)"]),
    (torch.zeros(1, 1, 1, 16, 20), ValueError, ["attn_mask", "(1, 1, 1, 16, 20)"]),
    (torch.zeros(16, 20, device="meta"), ValueError,
     ["attn_mask must be on the query's device cpu, got meta", "attn_mask.to(query.device)"]),
], ids=["list", "int64", "float64", "1-D", "5-D", "device"])
def test_sdpa_attn_mask_errors(no_kernel, mask, exc, words):
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 20, 8)
    with pytest.raises(exc) as ei:
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_sdpa_attn_mask_dtype_error_names_query_dtype():
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"bool, float32 or the query's dtype \(torch.bfloat16\) "
                                        r"tensor .* got torch.float16"):
        fastattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(4, 4).half())


def test_sdpa_causal_bias_masks():
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8)
    F = torch.nn.functional
    for make in (causal_lower_right, causal_upper_left):
        torch.testing.assert_close(
            fastattn.scaled_dot_product_attention(q, k, k, attn_mask=make(5, 9)),
            F.scaled_dot_product_attention(q, k, k, attn_mask=make(5, 9)))
    with pytest.raises(ValueError, match=r"attn_mask is a causal bias built for \(L, S\) = "
                                         r"\(5, 7\) .* causal_lower_right\(5, 9\)"):
        fastattn.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 7))


def test_sdpa_attn_mask_checked_while_patched(no_kernel):
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 3, 8)
    with fastattn.patch_sdpa(), pytest.raises(ValueError, match="attn_mask must broadcast"):
        torch.nn.functional.scaled_dot_product_attention(
            q, k, k, attn_mask=torch.zeros(3, 16, 3, dtype=torch.bool))


def test_attention_block_mask_errors_before_kernel(no_kernel):
    from fastattn import sparse
    q, k = torch.randn(2, 4, 100, 16), torch.randn(2, 4, 130, 16)
    with pytest.raises(ValueError, match=r"block_mask was built for Nq=128, Nk=128 but the "
                                         r"inputs have Nq=100 \(q.shape\[2\]\) and Nk=130"):
        fastattn.attention(q, k, k, block_mask=sparse.causal(128, 128))
    with pytest.raises(ValueError, match="block_mask has per-head layouts for 3 heads but the "
                                         "inputs have 4 query heads"):
        fastattn.attention(q, k, k, block_mask=sparse.from_mask_fn(
            lambda b, h, i, j: j <= i + h, 100, 130, H=3))


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_multihead_attention_mask_device(which):
    mha = fastattn.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    mask = (torch.zeros(3, 3, dtype=torch.bool) if which == "attn_mask"
            else torch.zeros(2, 3, dtype=torch.bool)).to("meta")
    with pytest.raises(ValueError, match=f"{which} must be on the query's device cpu, got meta"):
        mha(x, x, x, **{which: mask}, need_weights=False)


def test_varlen_paged_block_table_and_cu_seqlens_device():
    q, cache = torch.randn(10, 2, 8), torch.randn(4, 4, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    bt = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table must be on the k's device cpu, got meta"):
        flash_attn_varlen_func(q, cache, cache, cu, cu, 6, 6, block_table=bt.to("meta"))
    with pytest.raises(ValueError, match="cu_seqlens_k must be on the k's device cpu, got meta"):
        flash_attn_varlen_func(q, cache, cache, cu, cu.to("meta"), 6, 6, block_table=bt)
