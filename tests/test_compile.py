"""torch.compile readiness: every fastattn custom op passes torch.library.opcheck, and a
model calling the public API compiles with fullgraph=True (no graph breaks) and gives
eager's outputs and gradients.

Compiles use the aot_eager backend (dynamo + AOTAutograd, the parts that must handle the
custom ops and their fake/autograd registrations) except one inductor run, to stay quick."""

import fastattn
import fastattn.nn as fnn
import pytest
import torch
from conftest import requires_cpu_ext
from oracle import make_qkv

pytestmark = requires_cpu_ext


# ------------------------------------------------------------------ opcheck, every op


def _registered_ops():
    """Every operator under torch.ops.fastattn once all backends have been loaded."""
    fastattn.available_backends()  # imports every backend module (they register their ops)
    for mod in ("fastattn.decode", "fastattn.backends.triton.ops"):
        try:
            __import__(mod)
        except ImportError:  # optional (triton not installed): its ops are not registered
            pass
    names = sorted({n.split("::", 1)[1].split(".")[0]
                    for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("fastattn::")})
    return names


def _bm_tensors(Nq, Nk, seed):
    """A random block-sparse layout's kernel tensors, with its tile sizes."""
    from fastattn.sparse import from_dense

    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(Nq, Nk, generator=g) < 0.6
    dense[:, 0] = True
    bm = from_dense(dense, block_size=(16, 16))
    return bm.kernel_tensors(), bm.window, bm.block_size


def _fwd_cases():
    """(q, k, v, scale, (wl, wr), block_mask tensors, block_size) for forward samples."""
    cases = []
    for i, (B, Hq, Hkv, Nq, Nk, D, dtype, win) in enumerate([
        (2, 2, 2, 17, 17, 16, torch.float32, (-1, -1)),
        (1, 4, 2, 9, 33, 40, torch.float32, (-1, 0)),  # GQA, causal, Nq != Nk
        (1, 2, 1, 33, 20, 16, torch.float32, (5, 3)),
        (1, 2, 2, 20, 20, 16, torch.bfloat16, (-1, 0)),
    ]):
        q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=i)
        cases.append((q, k, v, D ** -0.5, win, [], (1, 1)))
    # (B, N, H, D) storage seen as (B, H, N, D), as models produce it: gradients must still
    # match the fake implementation's (contiguous) layout.
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in make_qkv(2, 4, 2, 16, 16, 8, torch.float32, seed=7))
    cases.append((q, k, v, 8 ** -0.5, (-1, 0), [], (1, 1)))
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, torch.float32, seed=9)
    bm, win, bs = _bm_tensors(40, 40, seed=9)
    cases.append((q, k, v, 0.3, win, bm, bs))
    return cases


def _bwd_args(case, fwd, extra=()):
    q, k, v, scale, (wl, wr), bm, bs = case
    with torch.no_grad():
        out, lse = fwd(q, k, v, scale, wl, wr, bm, *extra)
    dout = torch.randn_like(out)
    args = []
    for dlse in (None, torch.randn_like(lse)):
        args.append((dout, q.detach(), k.detach(), v.detach(), out, lse, dlse, scale, wl, wr, bm,
                     *extra))
    return args


def _samples(name):
    """Sample argument tuples for one op, or None when this file does not know the op."""
    ops = torch.ops.fastattn
    if name == "cpu_fwd":
        return [(q, k, v, s, wl, wr, bm) for q, k, v, s, (wl, wr), bm, _ in _fwd_cases()]
    if name == "cpu_bwd":
        return [a for c in _fwd_cases() for a in _bwd_args(c, ops.cpu_fwd)]
    if name in ("triton_fwd", "triton_bwd"):  # CPU tensors run in Triton's interpreter
        cases = _fwd_cases()[:2] + _fwd_cases()[-1:]
        if name == "triton_fwd":
            return [(q, k, v, s, wl, wr, bm, *bs) for q, k, v, s, (wl, wr), bm, bs in cases]
        return [a for c in cases for a in _bwd_args(c, ops.triton_fwd, c[-1])[:1]]
    if name in ("cuda_fwd", "cuda_bwd"):  # only registered where the CUDA extension built
        cases = []
        for i, (Hq, Hkv, Nq, Nk, win) in enumerate([(2, 2, 70, 70, (-1, -1)),
                                                     (4, 2, 33, 129, (-1, 0))]):
            q, k, v = (t.detach().cuda().requires_grad_()
                       for t in make_qkv(1, Hq, Hkv, Nq, Nk, 64, torch.float16, seed=i))
            cases.append((q, k, v, 0.125, win, [], (1, 1)))
        if name == "cuda_fwd":
            return [(q, k, v, s, wl, wr, bm) for q, k, v, s, (wl, wr), bm, _ in cases]
        # cuda_bwd takes no dlse: drop it from the cpu-style argument tuple
        return [a[:6] + a[7:] for c in cases for a in _bwd_args(c, ops.cuda_fwd)[:1]]
    if name == "cpu_decode":
        out = []
        for i, (B, Hq, Hkv, Nq, N, D, seqlens, wl) in enumerate([
            (2, 4, 2, 1, 37, 16, [37, 5], -1),
            (2, 2, 2, 3, 20, 40, None, 6),
        ]):
            q, k, v = make_qkv(B, Hq, Hkv, Nq, N, D, torch.float32, seed=i, requires_grad=False)
            sl = None if seqlens is None else torch.tensor(seqlens, dtype=torch.int32)
            out.append((q, k, v, sl, D ** -0.5, wl, 0))
            out.append((q, k, v, sl, D ** -0.5, wl, 2))
        return out
    if name == "cpu_decode_splits":
        return [(2, 4, 1024), (1, 1, 7)]
    return None


OPS = _registered_ops()


def test_known_ops_are_registered():
    assert {"cpu_fwd", "cpu_bwd"} <= set(OPS), OPS


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    samples = _samples(name)
    assert samples is not None, (
        f"torch.ops.fastattn.{name} is registered but tests/test_compile.py has no sample "
        f"inputs for it: add them to _samples() so opcheck covers every op")
    op = getattr(torch.ops.fastattn, name).default
    for args in samples:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------ fullgraph compile


def _compile_and_compare(fn, inputs, *, backend="aot_eager", dynamic=None, atol=1e-5):
    """fn compiled with fullgraph=True against eager: outputs and every input gradient."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        if backend == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=capture, dynamic=dynamic)
    eager_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    comp_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    ref = fn(*eager_in)
    got = compiled(*comp_in)
    ref_t = ref if isinstance(ref, tuple) else (ref,)
    got_t = got if isinstance(got, tuple) else (got,)
    for r, g in zip(ref_t, got_t, strict=True):
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-5)
    loss = lambda outs: sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)
                            if o.requires_grad)
    loss(ref_t).backward()
    loss(got_t).backward()
    for a, b in zip(eager_in, comp_in, strict=True):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=1e-5)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


def _targets(gm):
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


class TinyModel(torch.nn.Module):
    """Projections around fastattn.attention, the shape of a real attention layer."""

    def __init__(self, dim=32, heads=4, kv_heads=2, **attn_kw):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, heads * self.hd)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(heads * self.hd, dim)
        self.attn_kw = attn_kw

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.h, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kvh, self.hd).permute(2, 0, 3, 1, 4)
        out = fastattn.attention(q, k, v, **self.attn_kw)
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("attn_kw", [
    {}, {"causal": True}, {"window": (4, 0)}, {"causal": True, "window": (3, 2)},
    {"scale": 0.2, "backend": "cpu"},
], ids=["dense", "causal", "window", "causal_window", "scale_cpu"])
def test_model_fullgraph(attn_kw):
    torch.manual_seed(0)
    model = TinyModel(**attn_kw)
    x = torch.randn(2, 19, 32, requires_grad=True)
    compiled_in = [x, *model.parameters()]

    def fn(x, *params):
        return torch.func.functional_call(model, dict(zip(
            [n for n, _ in model.named_parameters()], params, strict=True)), (x,))

    gm = _compile_and_compare(fn, compiled_in)
    assert "fastattn.cpu_fwd" in _targets(gm)  # the custom op, not a decomposition


def test_lse_gqa_fullgraph():
    q, k, v = make_qkv(1, 4, 2, 11, 23, 16, torch.float32)
    gm = _compile_and_compare(
        lambda q, k, v: fastattn.attention(q, k, v, causal=True, return_lse=True), [q, k, v])
    assert "fastattn.cpu_fwd" in _targets(gm)


def test_dynamic_shapes_fullgraph():
    q, k, v = make_qkv(2, 2, 2, 13, 13, 16, torch.float32)
    _compile_and_compare(lambda q, k, v: fastattn.attention(q, k, v, causal=True), [q, k, v],
                         dynamic=True)


def test_sdpa_dropin_fullgraph():
    q, k, v = make_qkv(1, 4, 2, 17, 17, 16, torch.float32)
    gm = _compile_and_compare(
        lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              enable_gqa=True), [q, k, v])
    assert "fastattn.cpu_fwd" in _targets(gm)


def test_block_mask_fullgraph():
    from fastattn.sparse import from_dense

    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, torch.float32)
    dense = torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    dense[:, 0] = True
    bm = from_dense(dense, block_size=(16, 16))
    gm = _compile_and_compare(lambda q, k, v: fastattn.attention(q, k, v, block_mask=bm),
                              [q, k, v])
    assert "fastattn.cpu_fwd" in _targets(gm)


def test_dropout_with_seed_fullgraph_and_fresh_seed_without():
    """fullgraph needs dropout_seed (the per-call seed is a host int, drawn eagerly); then
    the compiled function equals eager. Without a seed, fullgraph fails with an error that
    names dropout_seed, and the default mode breaks the graph there and still draws a new
    seed on every call."""
    q, k, v = make_qkv(1, 2, 2, 17, 17, 16, torch.float32)
    _compile_and_compare(
        lambda q, k, v: fastattn.attention(q, k, v, causal=True, dropout_p=0.25,
                                           dropout_seed=1234, softcap=20.0), [q, k, v])
    torch._dynamo.reset()
    fn = torch.compile(lambda q: fastattn.attention(q, q, q, dropout_p=0.25), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(Exception, match="dropout_seed"):
        fn(q)
    torch._dynamo.reset()
    fn = torch.compile(lambda q: fastattn.attention(q, q, q, dropout_p=0.25), backend="aot_eager")
    assert not torch.equal(fn(q), fn(q))


def test_nn_modules_fullgraph():
    torch.manual_seed(0)
    attn = fnn.Attention(32, 4, 2, pattern="causal")
    mha = fnn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    _compile_and_compare(lambda x: attn(x), [x])
    _compile_and_compare(lambda x: mha(x, x, x, need_weights=False, is_causal=True)[0], [x])


def test_env_backend_read_at_trace_time(monkeypatch):
    """FASTATTN_BACKEND is read while tracing: the graph holds the backend it names."""
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, torch.float32)
    gm = _compile_and_compare(lambda q, k, v: fastattn.attention(q, k, v, causal=True),
                              [q, k, v])
    assert not any(t.startswith("fastattn.") for t in _targets(gm))


def test_inductor_model():
    torch.manual_seed(0)
    model = TinyModel(causal=True)
    x = torch.randn(2, 16, 32, requires_grad=True)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def fn(x, *p):
        return torch.func.functional_call(model, dict(zip(names, p, strict=True)), (x,))

    # No FX-graph cache: a cached graph from before a fake-impl change would hide it.
    with torch._inductor.config.patch(force_disable_caches=True):
        _compile_and_compare(fn, [x, *params], backend="inductor", atol=2e-5)


def test_custom_op_fake_shapes():
    """The fake implementations give the real outputs' shapes/dtypes (meta path)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(1, 4, 2, 5, 12, 16, torch.bfloat16, Dv=8, requires_grad=False)
    real = torch.ops.fastattn.cpu_fwd(q, k, v, 0.25, -1, 0, [])
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.fastattn.cpu_fwd(fq, fk, fv, 0.25, -1, 0, [])
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
