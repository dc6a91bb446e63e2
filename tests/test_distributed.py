"""fastattn.distributed.ring_attention against single-process attention on the full sequence.

Spawns 2 and 4 gloo processes on the CPU (one spawn per world size runs every case, since
starting processes dominates the time). Each rank runs ring attention on its shard and
checks its shard of out, dq, dk, dv by the DESIGN.md rule against the float64 oracle on the
whole sequence, and agreement with single-process fastattn.attention."""

from __future__ import annotations

import os
import traceback

import fastattn
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import requires_cpu_ext
from fastattn.distributed import (contiguous_shard, contiguous_unshard, merge_attention,
                                  ring_attention, zigzag_shard, zigzag_unshard)
from oracle import assert_by_rule, make_qkv, oracle

# (name, B, Hq, Hkv, n_local, D, Dv, causal, layout, dtype[, window, chunk_size, backend]);
# n_local is per rank; window is over global positions (None: none); chunk_size None: the
# default; backend "cpu" unless given (another backend takes the recompute backward).
CASES = [
    ("noncausal-odd", 2, 2, 2, 13, 16, 16, False, "zigzag", torch.float32),
    ("noncausal-mqa-d40", 1, 4, 1, 9, 40, 40, False, "zigzag", torch.float32),
    ("causal-zigzag-gqa-oddchunk", 1, 4, 2, 10, 16, 16, True, "zigzag", torch.float32),
    ("causal-zigzag-chunk1", 1, 2, 2, 2, 16, 16, True, "zigzag", torch.float32),
    ("causal-zigzag-dv", 2, 2, 1, 12, 32, 24, True, "zigzag", torch.float32),
    ("causal-contiguous-gqa-odd", 1, 4, 2, 7, 16, 16, True, "contiguous", torch.float32),
    ("causal-zigzag-bf16", 1, 4, 2, 16, 64, 64, True, "zigzag", torch.bfloat16),
    ("noncausal-f16", 1, 2, 1, 11, 64, 64, False, "zigzag", torch.float16),
    # K/V cut into several chunks per shard (chunks never straddle the two zigzag halves)
    ("causal-zigzag-chunked-gqa-dv", 2, 4, 2, 14, 32, 24, True, "zigzag", torch.float32,
     None, 3),
    ("causal-contiguous-chunked-odd", 1, 2, 1, 13, 16, 16, True, "contiguous", torch.float32,
     None, 4),
    ("noncausal-chunked-odd", 1, 2, 2, 11, 16, 16, False, "zigzag", torch.float32, None, 2),
    # sliding windows over the ring: empty blocks (and whole steps) are skipped
    ("window-causal-zigzag", 1, 4, 2, 12, 16, 16, True, "zigzag", torch.float32, (5, -1), 4),
    ("window-causal-contiguous", 1, 2, 1, 10, 16, 16, True, "contiguous", torch.float32,
     (6, 0), 3),
    ("window-bidir-contiguous-odd", 1, 2, 1, 11, 16, 16, False, "contiguous", torch.float32,
     (4, 3), 3),
    ("window-bidir-zigzag-long-left", 2, 2, 2, 8, 16, 16, False, "zigzag", torch.float32,
     (17, 2), 3),
    ("window-causal-zigzag-bf16", 1, 4, 2, 16, 64, 64, True, "zigzag", torch.bfloat16,
     (9, 0), 5),
    ("causal-zigzag-chunked-f16", 1, 2, 1, 12, 64, 64, True, "zigzag", torch.float16, None, 4),
    ("window-causal-zigzag-reference", 1, 4, 2, 12, 16, 24, True, "zigzag", torch.float32,
     (7, 0), 4, "reference"),
]


def _shard(x, rank, world, positional, layout):
    if positional and layout == "zigzag":
        return zigzag_shard(x, rank, world, dim=2)
    return contiguous_shard(x, rank, world, dim=2)


def _check_case(case, rank, world):
    name, B, Hq, Hkv, n, D, Dv, causal, layout, dtype = case[:10]
    win, chunk, backend = (tuple(case[10:]) + (None, None, None))[:3]
    backend = backend or "cpu"
    N = n * world
    q, k, v = make_qkv(B, Hq, Hkv, N, N, D, dtype, Dv=Dv, seed=7)
    dout = torch.randn(B, Hq, N, Dv, generator=torch.Generator().manual_seed(8))
    window = win or (-1, -1)
    if causal:
        window = (window[0], 0 if window[1] == -1 else min(window[1], 0))
    pos = causal or win is not None  # shards where positions matter follow the layout
    ref = oracle(q, k, v, window=window, dout=dout)                  # float64
    low = oracle(q, k, v, window=window, dout=dout,                 # torch in dtype
                 compute_dtype=dtype)

    sq, sk, sv = (_shard(t.detach(), rank, world, pos, layout).clone().requires_grad_(True)
                  for t in (q, k, v))
    out = ring_attention(sq, sk, sv, causal=causal, window=win, layout=layout, backend=backend,
                         chunk_size=chunk)
    assert out.dtype == dtype and out.shape == (B, Hq, n, Dv), f"{name}: {out.dtype} {out.shape}"
    sdout = _shard(dout, rank, world, pos, layout).to(dtype)
    dq, dk, dv = torch.autograd.grad(out, (sq, sk, sv), sdout)

    # Single-process fastattn on the full sequence, sharded the same way.
    qf, kf, vf = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    of = fastattn.attention(qf, kf, vf, causal=causal, window=win, backend="cpu")
    single = (of, *torch.autograd.grad(of, (qf, kf, vf), dout.to(dtype)))

    for i, (tag, got) in enumerate((("out", out), ("dq", dq), ("dk", dk), ("dv", dv))):
        j = 0 if i == 0 else i + 1  # oracle tuples are (out, lse, dq, dk, dv)
        r64, lo = (_shard(t, rank, world, pos, layout) for t in (ref[j], low[j]))
        sp = _shard(single[i].detach(), rank, world, pos, layout)
        label = f"{name} world={world} rank={rank} {tag}"
        assert_by_rule(label + " vs float64 oracle", got.detach(), r64.double(), lo, dtype)
        # as close to single-process fastattn as fastattn is to the oracle (+ floor)
        assert_by_rule(label + " vs single-process fastattn", got.detach(), sp.double(),
                       sp + (lo.double() - r64.double()).to(sp.dtype), dtype)


def _check_errors(rank, world):
    x = torch.randn(1, 2, 4, 8)
    # causal needs layout= (no default): the error names both layouts and their helpers
    with pytest.raises(ValueError) as ei:
        ring_attention(x, x, x, causal=True)
    msg = str(ei.value)
    for w in ("layout", "no default", "layout='zigzag'", "fastattn.distributed.zigzag_shard",
              "layout='contiguous'", "fastattn.distributed.contiguous_shard"):
        assert w in msg, (w, msg)
    x3 = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="N_local must be even"):
        ring_attention(x3, x3, x3, causal=True, layout="zigzag")
    # unequal shard lengths across ranks: a clear error on every rank instead of a hang
    y = torch.randn(1, 2, 4 + rank, 8)
    with pytest.raises(ValueError, match=rf"ranks of the group disagree.*N_local \(q.shape\[2\]; "
                                         rf"the sequence does not divide evenly.*ranges from 4 "
                                         rf"to {3 + world}"):
        ring_attention(y, y, y)
    # a window needs the layout too, and the ranks must agree on it and on chunk_size
    with pytest.raises(ValueError, match=r"layout: ring_attention\(window=...\) needs to know"):
        ring_attention(x, x, x, window=(2, 2))
    with pytest.raises(ValueError, match="window must be a pair of ints"):
        ring_attention(x, x, x, window=(-3, 0), layout="zigzag")
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1"):
        ring_attention(x, x, x, chunk_size=0)
    with pytest.raises(ValueError, match=r"disagree.*window left \(-1 unbounded\) ranges from "
                                         r"2 to 3"):
        ring_attention(x, x, x, window=(2 + (rank == 0), 0), layout="zigzag")
    with pytest.raises(ValueError, match=r"disagree.*chunk_size \(0 None\) ranges from 0 to 2"):
        ring_attention(x, x, x, chunk_size=2 if rank == 0 else None)
    with pytest.raises(ValueError, match="layout must be 'zigzag' or 'contiguous'"):
        ring_attention(x, x, x, layout="striped")
    # ranks that claim different layouts, or disagree on causal or heads: every rank raises
    lay = "zigzag" if rank == 0 else "contiguous"
    with pytest.raises(ValueError, match=r"disagree.*layout \(0 None, 1 zigzag, 2 contiguous\) "
                                         r"ranges from 1 to 2"):
        ring_attention(x, x, x, causal=True, layout=lay)
    with pytest.raises(ValueError, match=r"disagree.*causal \(0 False, 1 True\) ranges from 0 to 1"):
        ring_attention(x, x, x, causal=rank == 0, layout="zigzag")
    h = torch.randn(1, 2 if rank else 4, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(q.shape\[1\]\) ranges from 2 to 4"):
        ring_attention(h, x, x)
    # one rank's bad call: it raises its own error, the others say which rank failed (no hang)
    if rank == world - 1:
        with pytest.raises(ValueError, match="no default"):
            ring_attention(x, x, x, causal=True)
    else:
        with pytest.raises(ValueError, match=rf"rank\(s\) \[{world - 1}\] of the group "
                                             rf"rejected their arguments"):
            ring_attention(x, x, x, causal=True, layout="zigzag")


def _worker(rank, world, init_file, cases, err_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            _check_case(case, rank, world)
        _check_errors(rank, world)
        dist.barrier()
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@requires_cpu_ext
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_single_process(world, tmp_path):
    init_file = tmp_path / "init"
    try:
        mp.spawn(_worker, args=(world, str(init_file), CASES, str(tmp_path)), nprocs=world,
                 join=True)
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt")))
        pytest.fail(f"ring attention failed with world={world}:\n{errs or e}")


# --- single-process checks (no process group) -----------------------------------------


def test_not_initialized_names_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="group"):
        ring_attention(x, x, x)


def test_zigzag_roundtrip_and_layout():
    world = 3
    x = torch.arange(2 * world * 5).view(1, 1, -1, 1)
    shards = [zigzag_shard(x, r, world, dim=2) for r in range(world)]
    # rank r holds chunks r and 2*world-1-r
    assert shards[0].flatten().tolist() == list(range(0, 5)) + list(range(25, 30))
    assert shards[2].flatten().tolist() == list(range(10, 20))
    assert torch.equal(zigzag_unshard(shards, dim=2), x)


def test_contiguous_shard_roundtrip_and_errors():
    x = torch.arange(12).view(1, 1, -1, 1)
    shards = [contiguous_shard(x, r, 3, dim=2) for r in range(3)]
    assert shards[1].flatten().tolist() == [4, 5, 6, 7]
    assert torch.equal(contiguous_unshard(shards, dim=2), x)
    with pytest.raises(ValueError, match="must divide into world = 5 equal shards"):
        contiguous_shard(x, 0, 5, dim=2)
    with pytest.raises(ValueError, match="rank"):
        contiguous_shard(x, 3, 3, dim=2)
    with pytest.raises(ValueError, match="same length"):
        contiguous_unshard([x[:, :, :2], x[:, :, :3]], dim=2)


def test_zigzag_errors():
    with pytest.raises(ValueError, match="2\\*world"):
        zigzag_shard(torch.randn(1, 1, 10, 4), 0, 2, dim=2)
    with pytest.raises(ValueError, match="rank"):
        zigzag_shard(torch.randn(1, 1, 8, 4), 2, 2, dim=2)
    with pytest.raises(ValueError, match="shards"):
        zigzag_unshard([torch.randn(1, 1, 3, 4)], dim=2)


def test_merge_handles_empty_rows():
    """Rows that see no key on either side stay (0, -inf); one-sided rows take that side."""
    ninf = float("-inf")
    out = torch.zeros(1, 1, 3, 2)
    lse = torch.tensor([[[ninf, ninf, 0.5]]])
    blk = torch.tensor([[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]])
    blk_lse = torch.tensor([[[ninf, 1.0, ninf]]])
    out[0, 0, 2] = torch.tensor([7.0, 8.0])
    merge_attention(out, lse, blk, blk_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0, 0, 0], torch.zeros(2)) and lse[0, 0, 0] == ninf
    assert torch.equal(out[0, 0, 1], torch.tensor([3.0, 4.0])) and lse[0, 0, 1] == 1.0
    assert torch.equal(out[0, 0, 2], torch.tensor([7.0, 8.0])) and lse[0, 0, 2] == 0.5


def test_merge_equals_attention_over_concatenated_keys():
    q, k, v = (t.detach() for t in make_qkv(1, 2, 1, 5, 12, 16, torch.float32))
    o1, l1 = fastattn.attention(q, k[:, :, :7], v[:, :, :7], return_lse=True, backend="cpu")
    o2, l2 = fastattn.attention(q, k[:, :, 7:], v[:, :, 7:], return_lse=True, backend="cpu")
    out = torch.zeros_like(o1)
    lse = torch.full_like(l1, float("-inf"))
    merge_attention(out, lse, o1, l1)
    merge_attention(out, lse, o2, l2)
    o, lo = fastattn.attention(q, k, v, return_lse=True, backend="cpu")
    torch.testing.assert_close(out, o, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lo, atol=2e-6, rtol=1e-5)


def test_window_plan_skips_empty_steps():
    """A sliding window shorter than a shard talks only to its neighbours: with contiguous
    shards rank r receives only from r-1 (step 1) and sends only to r+1; every other step
    of the ring exchanges nothing. Blocks are trimmed to the visible rectangle."""
    from fastattn.distributed import _Plan

    world, n = 4, 16
    plan = _Plan(world, n, True, (6, -1), "contiguous", 4)
    for r in range(world):
        items = plan.items(r)
        assert {s for _, s, _, _ in items} <= {0, 1}, (r, items)
        assert all(recv == (s == 0 or r > 0) for _, s, recv, _ in items if s in (0, 1))
    # zigzag: the neighbours of chunk r are held by ranks r-1 and r+1 (steps 1 and world-1)
    plan = _Plan(world, n, True, (3, 0), "zigzag", 8)
    steps = {s for r in range(world) for _, s, recv, _ in plan.items(r) if recv}
    assert steps == {0, 1, world - 1}, steps
    # without a window every step is used (causal zigzag: every rank sees every other one)
    plan = _Plan(world, n, True, (-1, -1), "zigzag", 8)
    assert {s for _, s, _, _ in plan.items(0)} == set(range(world))


def test_visible_block_trimming_matches_the_token_rule():
    """_visible: the trimmed rectangle and its kernel window (bottom-right aligned) show
    exactly the (query, key) pairs the global window shows."""
    import random

    from fastattn.distributed import _visible

    rng = random.Random(0)
    for _ in range(3000):
        qa, ka = rng.randrange(0, 40), rng.randrange(0, 40)
        nq, nk = rng.randrange(1, 12), rng.randrange(1, 12)
        L, R = rng.choice([-1, 0, 1, 2, 5, 30]), rng.choice([-1, 0, 0, 1, 4, 9])
        want = {(i, j) for i in range(qa, qa + nq) for j in range(ka, ka + nk)
                if (L < 0 or j >= i - L) and (R < 0 or j <= i + R)}
        vis = _visible(qa, nq, ka, nk, L, R)
        if vis is None:
            assert not want
            continue
        qo, qn, ko, kn, (wl, wr) = vis
        off = kn - qn
        got = {(qa + qo + i, ka + ko + j) for i in range(qn) for j in range(kn)
               if (wl < 0 or j >= i + off - wl) and (wr < 0 or j <= i + off + wr)}
        assert got == want, (qa, nq, ka, nk, L, R, vis)
