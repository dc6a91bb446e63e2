"""Concurrent calls from several Python threads give bitwise the same results as serial
calls (cpu backend, forward and backward, several problem kinds at once): the kernels keep
no state between calls, each call owns its scratch, and block masks / caches shared by the
threads are read-only once built."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import requires_cpu_ext

import fastattn
from fastattn import sparse
from fastattn.decode import decode_attention

SHARED_BM = sparse.from_mask_fn(lambda b, h, i, j: ((i - j) % 5 == 0) | (j <= i - 40), 150, 150,
                                block_size=(64, 64))


def _problem(kind, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, dt=torch.float32: torch.randn(*s, generator=g).to(dt)
    if kind == "dense-causal-gqa":
        args = (rnd(2, 4, 97, 32), rnd(2, 2, 97, 32), rnd(2, 2, 97, 32))
        kw = dict(causal=True)
    elif kind == "window-bf16":
        args = (rnd(1, 2, 130, 64, dt=torch.bfloat16), rnd(1, 2, 150, 64, dt=torch.bfloat16),
                rnd(1, 2, 150, 48, dt=torch.bfloat16))
        kw = dict(window=(30, 5))
    elif kind == "block-mask":
        args = (rnd(1, 2, 150, 32), rnd(1, 2, 150, 32), rnd(1, 2, 150, 32))
        kw = dict(block_mask=SHARED_BM)
    elif kind == "mods-dropout":
        args = (rnd(1, 4, 80, 32), rnd(1, 2, 90, 32), rnd(1, 2, 90, 32))
        kw = dict(causal=True, softcap=20.0, alibi_slopes=torch.rand(4, generator=g),
                  dropout_p=0.2, dropout_seed=1234)
    else:
        raise ValueError(kind)
    dout = torch.randn(args[0].shape[:3] + (args[2].shape[-1],), generator=g).to(args[0].dtype)
    return args, kw, dout


def _run(kind, seed):
    (q, k, v), kw, dout = _problem(kind, seed)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = fastattn.attention(q, k, v, backend="cpu", return_lse=True, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return [t.detach() for t in (out, lse, dq, dk, dv)]


def _run_decode(seed):
    g = torch.Generator().manual_seed(seed)
    q, kc, vc = (torch.randn(3, 4, 2, 32, generator=g), torch.randn(3, 2, 200, 32, generator=g),
                 torch.randn(3, 2, 200, 32, generator=g))
    lens = torch.tensor([200, 17, 133])
    return list(decode_attention(q, kc, vc, cache_seqlens=lens, backend="cpu", return_lse=True))


KINDS = ["dense-causal-gqa", "window-bf16", "block-mask", "mods-dropout", "decode"]


def _job(kind, seed):
    return _run_decode(seed) if kind == "decode" else _run(kind, seed)


@requires_cpu_ext
@pytest.mark.parametrize("threads", [8])
def test_threads_match_serial_bitwise(threads):
    jobs = [(KINDS[i % len(KINDS)], i) for i in range(3 * threads)]
    serial = {j: _job(*j) for j in jobs}
    results, errors = {}, []
    barrier = threading.Barrier(threads)

    def worker(t):
        try:
            barrier.wait()  # start together, so the calls really overlap
            for j in jobs[t::threads]:
                results[j] = _job(*j)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert set(results) == set(jobs)
    for j in jobs:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), serial[j], results[j]):
            assert torch.equal(a, b), f"{j} {name}: a concurrent call differs from the serial one"
