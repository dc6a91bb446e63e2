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
