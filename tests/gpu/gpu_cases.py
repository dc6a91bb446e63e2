"""The GPU test suites' cases and checks (tests/gpu/test_gpu_triton.py, test_gpu_cuda.py),
run by `make gpu-check` (benchmarks/gpu_check.py) on a machine with a CUDA GPU; skipped
elsewhere (collected, so the dry run can count them).

Every case runs the kernel on the GPU, forward and backward, and checks out, lse and
dq/dk/dv against the float64 oracle by the DESIGN.md rule (|kernel - oracle| <= 2 |torch in
the input precision - oracle| + floor), with the oracle computed on the GPU too. The cases
cover fp16 and bf16, head dims 40/64/128/256, dense/causal (incl. bottom-right, Nq != Nk)/
window/block-sparse, GQA/MQA, ragged lengths (odd sizes, documents), softcap, ALiBi, dropout
and decode (split-KV, GQA row tiles, ragged caches, windows). A case a backend does not
serve (e.g. head dim 256 on cuda) is skipped with the backend's own reason.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastattn
import fastattn.sparse as fs
from fastattn import dispatch
from fastattn.backends.base import Problem
from fastattn.backends.reference import reference_attention
from oracle import assert_by_rule, run_with_grads

F16, BF16 = torch.float16, torch.bfloat16
HAVE_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU (run by make gpu-check)")
DEV = "cuda"

# name: (dtype, B, Hq, Hkv, Nq, Nk, D, options)
CASES = {
    "f16-d64-dense-gqa": (F16, 2, 4, 2, 257, 257, 64, {}),
    "bf16-d64-causal": (BF16, 2, 4, 4, 300, 300, 64, dict(causal=True)),
    "f16-d128-causal-bottom-right": (F16, 1, 4, 2, 97, 257, 128, dict(causal=True)),
    "bf16-d128-window": (BF16, 1, 4, 4, 513, 513, 128, dict(window=(63, 0))),
    "f16-d40-dense-odd": (F16, 2, 3, 3, 97, 131, 40, {}),
    "bf16-d40-window-two-sided": (BF16, 1, 4, 2, 200, 200, 40, dict(window=(31, 17))),
    "f16-d256-causal": (F16, 1, 2, 2, 129, 129, 256, dict(causal=True)),
    "bf16-d256-dense-mqa": (BF16, 1, 8, 1, 65, 200, 256, {}),
    "bf16-d64-sparse-sliding": (BF16, 1, 4, 2, 640, 640, 64,
                                dict(block_mask=("sliding_window", 640, 640, 191, True))),
    "f16-d128-sparse-bigbird": (F16, 1, 2, 2, 1024, 1024, 128,
                                dict(block_mask=("bigbird", 1024))),
    "bf16-d128-sparse-document-ragged": (BF16, 1, 4, 4, 410, 410, 128,
                                         dict(block_mask=("document", [100, 250, 60]))),
    "f16-d64-softcap-causal": (F16, 2, 4, 2, 300, 300, 64, dict(causal=True, softcap=20.0)),
    "bf16-d128-alibi-window": (BF16, 1, 4, 4, 256, 256, 128,
                               dict(window=(100, 0), alibi=True)),
    "f16-d64-dropout": (F16, 1, 4, 4, 256, 256, 64, dict(dropout_p=0.2, dropout_seed=1234)),
}

# name: (dtype, B, Hq, Hkv, Nq, Ncache, D, seqlens, window_left)
DECODE_CASES = {
    "f16-d128-gqa8": (F16, 3, 16, 2, 1, 4096, 128, [4096, 1, 777], None),
    "bf16-d128-gqa8-4q-rowtiles": (BF16, 2, 32, 4, 4, 1000, 128, [1000, 333], None),  # R = 32
    "bf16-d64-mqa-16q": (BF16, 1, 8, 1, 16, 600, 64, [600], 100),  # R = 128: 2 row tiles
    "f16-d256-gqa8-8q": (F16, 1, 8, 1, 8, 300, 256, [300], None),  # R = 64: 2 tiles of 32
    "bf16-d40-window": (BF16, 2, 4, 4, 1, 513, 40, [513, 20], 64),
}


def _block_mask(spec):
    kind, *args = spec
    if kind == "sliding_window":
        Nq, Nk, w, causal = args
        return fs.sliding_window(Nq, Nk, w, causal=causal, block_size=64)
    if kind == "bigbird":
        return fs.bigbird(args[0], num_random_blocks=2, seed=0)
    if kind == "document":
        return fs.document(args[0], causal=True, block_size=64)
    raise ValueError(kind)


def _skip_unless_served(backend, dtype, B, Hq, Hkv, Nq, Nk, D, bm, opts, needs_grad=True,
                        deterministic=True):
    p = Problem(device=torch.device(DEV), dtype=dtype, B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D,
                Dv=D, window=(-1, -1), block_mask=bm, scale=D ** -0.5, needs_grad=needs_grad,
                return_lse=True, softcap=opts.get("softcap", 0.0),
                dropout_p=opts.get("dropout_p", 0.0), deterministic=deterministic)
    why = dispatch.reasons(backend, p)
    if why:
        pytest.skip(f"{backend} does not serve this case: {'; '.join(why)}")


def check_attention(backend, name, deterministic=True):
    """deterministic=False runs the backend's non-reproducible backward where it has one (cuda:
    the FlashAttention-2 class backward with atomic dQ)."""
    dtype, B, Hq, Hkv, Nq, Nk, D, opts = CASES[name]
    opts = dict(opts)
    bm = _block_mask(opts.pop("block_mask")) if "block_mask" in opts else None
    # (cuda: gradients above head dim 128 only through the deterministic=False backward)
    _skip_unless_served(backend, dtype, B, Hq, Hkv, Nq, Nk, D, bm, opts,
                        deterministic=deterministic)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).to(DEV)
               for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))
    dout = torch.randn(B, Hq, Nq, D, generator=g).to(DEV)
    slopes = (torch.rand(B, Hq, generator=g) * 0.5).to(DEV) if opts.pop("alibi", False) else None
    causal = opts.pop("causal", False)
    window = opts.pop("window", None)
    kw = dict(causal=causal, window=window, block_mask=bm, alibi_slopes=slopes, **opts)
    got = run_with_grads(lambda a, b, c: fastattn.attention(a, b, c, backend=backend,
                                                           return_lse=True,
                                                           deterministic=deterministic, **kw),
                         q, k, v, dout)
    # the oracle: naive attention, same mask and modifiers, in float64 / in the input dtype
    wl, wr = window if window is not None else (-1, -1)
    if causal:
        wr = 0 if wr == -1 else min(wr, 0)
    mask = bm.to_dense().to(DEV) if bm is not None else None
    ref_kw = dict(scale=D ** -0.5, window=(wl, wr), mask=mask, softcap=opts.get("softcap", 0.0),
                  alibi_slopes=slopes, dropout_p=opts.get("dropout_p", 0.0),
                  dropout_seed=opts.get("dropout_seed", 0))
    ref = run_with_grads(lambda a, b, c: reference_attention(a.double(), b.double(), c.double(),
                                                             **ref_kw), q, k, v, dout)
    low = run_with_grads(lambda a, b, c: reference_attention(a, b, c, compute_dtype=dtype,
                                                             **ref_kw), q, k, v, dout)
    for i, what in enumerate(("out", "lse", "dq", "dk", "dv")):
        if what == "lse":
            inf = torch.isinf(ref[1])
            assert torch.equal(torch.isinf(got[1]), inf), "lse: -inf rows differ"
            assert_by_rule("lse", got[1][~inf], ref[1][~inf].double(), low[1][~inf], dtype)
        else:
            assert_by_rule(what, got[i], ref[i].double(), low[i], dtype)


def check_decode(backend, name):
    dtype, B, Hq, Hkv, Nq, Nc, D, seqlens, wl = DECODE_CASES[name]
    if D > dispatch.get(backend).max_head_dim:
        pytest.skip(f"backend {backend!r} decodes head dims up to "
                    f"{dispatch.get(backend).max_head_dim}, the case has {D}")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).to(DEV)
               for s in ((B, Hq, Nq, D), (B, Hkv, Nc, D), (B, Hkv, Nc, D)))
    sl = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
    with torch.no_grad():
        out, lse = fastattn.decode_attention(q, k, v, cache_seqlens=sl, window_left=wl,
                                             backend=backend, return_lse=True)
        ref, ref_lse = fastattn.decode_attention(q.double(), k.double(), v.double(),
                                                 cache_seqlens=sl, window_left=wl,
                                                 backend="reference", return_lse=True)
        low, _ = fastattn.decode_attention(q, k, v, cache_seqlens=sl, window_left=wl,
                                           backend="reference", return_lse=True)
    assert_by_rule("out", out, ref, low, dtype)
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf)
    assert (lse[~inf].double() - ref_lse[~inf]).abs().max().item() <= 1e-3


@pytest.fixture(autouse=True, scope="module")
def first_tile_without_autotuning():
    """Autotuning compiles every candidate tile per problem class; the suites check the
    kernels' numerics with the first table tile (FASTATTN_TRITON_AUTOTUNE=0) so a run fits
    its time cap (set FASTATTN_TRITON_AUTOTUNE=1 to test the tuned path). Restored after."""
    old = os.environ.get("FASTATTN_TRITON_AUTOTUNE")
    os.environ.setdefault("FASTATTN_TRITON_AUTOTUNE", "0")
    yield
    if old is None:
        os.environ.pop("FASTATTN_TRITON_AUTOTUNE", None)
