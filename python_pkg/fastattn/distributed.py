"""Context parallelism: attention over a sequence sharded across a torch.distributed group.

    out = ring_attention(q, k, v, group=None, causal=False)   # q/k/v: this rank's shards
    out = ring_attention(q, k, v, causal=True, layout="zigzag")   # causal: say how it is sharded

Ring attention (Liu et al., 2023): each rank keeps its query shard and passes its K/V shard
to the next rank, world-1 times, so every query shard meets every K/V shard once. Each
meeting is one call of fastattn's own kernels with return_lse=True, and the partial outputs
are merged by log-sum-exp in float32. The backward pass sends K/V around the ring again,
together with dK/dV accumulators that collect each rank's contribution and arrive back at
their owner after a full turn. K/V are never all-gathered: besides its own shard a rank
holds at most two K/V shards in flight (the one being used and the one arriving), and in
backward two dK/dV accumulators.

Sharding (dim 2 of q, k and v is the sequence):

    non-causal, any layout: ranks hold equal-length shards (N_local may be odd).

    causal=True needs layout= (no default: a wrong claim would give wrong results, so the
    call raises until it is given; every rank must pass the same one).

    causal=True, layout="zigzag" (load-balanced, recommended): the sequence is cut into
    2*world chunks of c tokens; rank r holds chunks r and 2*world-1-r, so every rank has
    the same amount of visible work at every ring step:

        world=2, chunks 0 1 2 3:    rank 0: [0 | 3]    rank 1: [1 | 2]

        q shard r vs K/V shard j:  j == r  causal on the whole (2c x 2c) block
                                   j <  r  all 2c queries x first chunk of K/V, no mask
                                   j >  r  second chunk of queries x all 2c keys, no mask

    causal=True, layout="contiguous": rank r holds tokens [r*n, (r+1)*n); blocks from
    later ranks are invisible and skipped (rank 0 idles at most steps; use zigzag).

Use zigzag_shard / zigzag_unshard (or contiguous_shard / contiguous_unshard) to go between a
full sequence and a rank's shard. Every call checks across the group that the ranks agree on
N_local, the head counts and dims, dtype, causal and layout (one small all_reduce), and
raises on every rank otherwise.
Supported: float32/float16/bfloat16, GQA/MQA (Hq % Hkv == 0, K/V not expanded), a value
head dim different from D. Not supported: window/block_mask, unequal N_local across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import attention

__all__ = ["ring_attention", "zigzag_shard", "zigzag_unshard", "contiguous_shard",
           "contiguous_unshard", "merge_attention"]


# ---------------------------------------------------------------------------------------
# sharding helpers


def _zigzag_check(n: int, world: int, what: str, dim: int) -> int:
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if n % (2 * world):
        raise ValueError(f"{what}: sequence length {n} (dim {dim}) must divide into 2*world = "
                         f"{2 * world} equal chunks for zigzag sharding; pad it to a multiple "
                         f"of {2 * world}")
    return n // (2 * world)


def zigzag_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s zigzag shard of the full sequence x: chunks rank and 2*world-1-rank of
    2*world equal chunks along `dim`, concatenated."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    c = _zigzag_check(x.shape[dim], world, "x", dim)
    chunks = x.split(c, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_unshard(shards, dim: int = 2) -> torch.Tensor:
    """Inverse of zigzag_shard: the full sequence from the list of every rank's shard."""
    world = len(shards)
    if world == 0:
        raise ValueError("shards must be a non-empty list (one shard per rank)")
    n = shards[0].shape[dim]
    if n % 2 or any(s.shape[dim] != n for s in shards):
        raise ValueError(f"shards: every shard must have the same even length along dim {dim}, "
                         f"got {[s.shape[dim] for s in shards]}")
    chunks = [None] * (2 * world)
    for r, s in enumerate(shards):
        chunks[r], chunks[2 * world - 1 - r] = s.split(n // 2, dim=dim)
    return torch.cat(chunks, dim=dim)


def contiguous_shard(x: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s contiguous shard of the full sequence x: tokens [rank*n, (rank+1)*n)
    along `dim`, n = length / world (the length must divide evenly)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if x.shape[dim] % world:
        raise ValueError(f"x: sequence length {x.shape[dim]} (dim {dim}) must divide into world = "
                         f"{world} equal shards; pad it to a multiple of {world}")
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)


def contiguous_unshard(shards, dim: int = 2) -> torch.Tensor:
    """Inverse of contiguous_shard: the full sequence from the list of every rank's shard."""
    if len(shards) == 0:
        raise ValueError("shards must be a non-empty list (one shard per rank)")
    if any(s.shape[dim] != shards[0].shape[dim] for s in shards):
        raise ValueError(f"shards: every shard must have the same length along dim {dim}, "
                         f"got {[s.shape[dim] for s in shards]}")
    return torch.cat(list(shards), dim=dim)


# ---------------------------------------------------------------------------------------
# log-sum-exp merge


def merge_attention(out_acc, lse_acc, out_blk, lse_blk):
    """Merges a partial result (out_blk, lse_blk) into the float32 accumulators in place.

    out_*: (B, H, N, Dv), lse_*: (B, H, N). Rows whose lse is -inf on both sides stay
    (0, -inf) instead of becoming NaN."""
    lse_new = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    w_acc = torch.exp(lse_acc - safe).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - safe).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(w_blk * out_blk.float())
    lse_acc.copy_(lse_new)


# ---------------------------------------------------------------------------------------
# the ring


_LAYOUTS = ("zigzag", "contiguous")


def _validate(q, k, v, group, causal, layout):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group (e.g. under torchrun) first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    world = dist.get_world_size(group)
    try:
        _check_local(q, k, v, causal, layout)
    except (ValueError, TypeError) as e:
        if world > 1:  # tell the other ranks first, so they raise instead of hanging
            _check_ranks_agree(q, k, v, causal, layout, group, world, failed=True)
        raise e
    if world > 1:  # the ranks must agree, or the ring hangs or merges the wrong blocks
        _check_ranks_agree(q, k, v, causal, layout, group, world)


def _check_local(q, k, v, causal, layout):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    if causal and layout is None:
        raise ValueError(
            "layout: ring_attention(causal=True) needs to know how the sequence was sharded, "
            "and has no default (a wrong guess gives wrong results silently). Pass "
            "layout='zigzag' for shards made by fastattn.distributed.zigzag_shard "
            "(load-balanced, recommended) or layout='contiguous' for shards made by "
            "fastattn.distributed.contiguous_shard (rank r holds the r-th equal slice, "
            "e.g. x.chunk(world, dim=2)[rank])")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N_local, D), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"q, k, v must hold the same N_local tokens of the sequence on each "
                         f"rank, got q {q.shape[2]}, k {k.shape[2]}, v {v.shape[2]}")
    if causal and layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"q: causal zigzag shards hold 2 equal chunks, so N_local must be even, "
                         f"got {q.shape[2]}; the sequence must divide into 2*world chunks "
                         f"(see zigzag_shard)")


_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


def _check_ranks_agree(q, k, v, causal, layout, group, world, failed=False):
    """One all_reduce of (max, -min) over each rank's description of its call, plus which
    ranks failed their local checks; every rank sees the same result and raises (a rank
    that failed locally returns and raises its own error)."""
    rank = dist.get_rank(group)
    fields = [
        "N_local (q.shape[2]; the sequence does not divide evenly across the ranks, or a rank "
        "holds a shard of another layout: every rank needs an equal shard)",
        "batch size (q.shape[0])", "query heads (q.shape[1])", "key/value heads (k.shape[1])",
        "head dim (q.shape[3])", "value head dim (v.shape[3])",
        "dtype (1 float32, 2 float16, 3 bfloat16, 4 float64)", "causal (0 False, 1 True)",
        "layout (0 None, 1 zigzag, 2 contiguous)",
    ]
    if failed:
        vals = [0] * len(fields)
    else:
        vals = [q.shape[2], q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3],
                _DTYPE_CODES.get(q.dtype, 0), int(causal),
                0 if layout is None else 1 + _LAYOUTS.index(layout)]
    flags = [0] * world
    flags[rank] = int(failed)
    t = torch.tensor(vals + [-x for x in vals] + flags, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    n = len(fields)
    hi, lo, bad_ranks = t[:n].tolist(), (-t[n:2 * n]).tolist(), t[2 * n:].tolist()
    if any(bad_ranks):
        if failed:
            return
        who = [r for r, f in enumerate(bad_ranks) if f]
        raise ValueError(f"ring_attention: rank(s) {who} of the group rejected their arguments "
                         f"(see the error there); this rank stops too instead of waiting for "
                         f"them")
    bad = [f"{fields[i]} ranges from {lo[i]} to {hi[i]}" for i in range(n) if hi[i] != lo[i]]
    if bad:
        raise ValueError(f"ring_attention: the {world} ranks of the group disagree on their "
                         f"shards or arguments (every rank must call it with the same "
                         f"arguments and equal shards of one layout): " + "; ".join(bad))


class _Ring:
    """Point-to-point exchange with the ring neighbours (rank+1 receives, rank-1 sends)."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = glob((self.rank + 1) % self.world)
        self.prev = glob((self.rank - 1) % self.world)
        self.reqs = []

    def pass_on(self, tensors):
        """Posts sends of `tensors` to next and receives of same-shaped ones from prev;
        returns the receive buffers (valid after wait())."""
        bufs = []
        for t in tensors:
            t = t.contiguous()
            buf = torch.empty_like(t)
            self.reqs.append(dist.isend(t, self.next, group=self.group))
            self.reqs.append(dist.irecv(buf, self.prev, group=self.group))
            bufs.append(buf)
        return bufs

    def wait(self):
        for r in self.reqs:
            r.wait()
        self.reqs = []


def _blocks(rank, src, n, causal, layout):
    """The (q slice, kv slice, causal) to compute for this rank's queries vs src's K/V,
    or None when the whole block is invisible."""
    full = slice(0, n)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if layout == "contiguous":
        return (full, full, False) if src < rank else None
    c = n // 2
    if src < rank:   # K/V chunk src precedes both query chunks; chunk 2w-1-src follows both
        return full, slice(0, c), False
    return slice(c, n), full, False  # only the late query chunk sees src's two chunks


def _block_grads(q, k, v, dout, delta, lse, causal, scale, backend):
    """(dq, dk, dv) of one block's share of the merged output, recomputing the block with
    fastattn's kernel. The merged out = sum_b w_b out_b with w_b = exp(lse_b - lse), so the
    block receives d out_b = w_b dO and d lse_b = w_b (dO . out_b - dO . out)."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        o_b, l_b = attention(q, k, v, causal=causal, scale=scale, backend=backend,
                             return_lse=True)
        w = torch.exp(l_b - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse))
        w = torch.where(torch.isinf(l_b), torch.zeros_like(w), w)  # rows that see no key here
        d_lse = w * ((dout * o_b.detach().float()).sum(-1) - delta)
        return torch.autograd.grad((o_b, l_b), (q, k, v),
                                   ((w.unsqueeze(-1) * dout).to(o_b.dtype), d_lse))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, backend, layout):
        ring = _Ring(group)
        B, H, n, _ = q.shape
        out = torch.zeros(B, H, n, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
        k_cur, v_cur = k, v
        for step in range(ring.world):
            if step + 1 < ring.world:  # overlap: fetch the next K/V while this one computes
                k_nxt, v_nxt = ring.pass_on((k_cur, v_cur))
            blk = _blocks(ring.rank, (ring.rank - step) % ring.world, n, causal, layout)
            if blk is not None:
                qs, ks, c = blk
                o_b, l_b = attention(q[:, :, qs], k_cur[:, :, ks], v_cur[:, :, ks], causal=c,
                                     scale=scale, backend=backend, return_lse=True)
                merge_attention(out[:, :, qs], lse[:, :, qs], o_b, l_b)
            if step + 1 < ring.world:
                ring.wait()
                k_cur, v_cur = k_nxt, v_nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (group, causal, scale, backend, layout)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, backend, layout = ctx.cfg
        ring = _Ring(group)
        n = q.shape[2]
        dout = dout.float()
        # dO . O per row: the part of d(lse_blk) that does not depend on the block.
        delta = (dout * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        k_cur, v_cur = k, v
        for step in range(ring.world):
            if step + 1 < ring.world:
                k_nxt, v_nxt = ring.pass_on((k_cur, v_cur))
            blk = _blocks(ring.rank, (ring.rank - step) % ring.world, n, causal, layout)
            if blk is not None:
                qs, ks, c = blk
                # a helper, so the block's temporaries are freed before the exchange below
                g = _block_grads(q[:, :, qs], k_cur[:, :, ks], v_cur[:, :, ks], dout[:, :, qs],
                                 delta[:, :, qs], lse[:, :, qs], c, scale, backend)
                dq[:, :, qs] += g[0]
                dk_acc[:, :, ks] += g[1]
                dv_acc[:, :, ks] += g[2]
                del g
            # The accumulators travel with their K/V block and reach its owner after a turn.
            if ring.world > 1:
                dk_in, dv_in = ring.pass_on((dk_acc, dv_acc))
                ring.wait()
                dk_acc, dv_acc = dk_in, dv_in
                if step + 1 < ring.world:
                    k_cur, v_cur = k_nxt, v_nxt
        return (dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype),
                None, None, None, None, None)


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, backend="auto",
                   layout=None):
    """Attention over a sequence sharded along dim 2 across the ranks of `group`.

    q: (B, Hq, N_local, D), k: (B, Hkv, N_local, D), v: (B, Hkv, N_local, Dv) are this
    rank's shards (Hq % Hkv == 0). Returns this rank's shard of the output,
    (B, Hq, N_local, Dv), equal to fastattn.attention on the full sequence restricted to
    this rank's queries. With causal=True, `layout` is required and says how the shards
    were made: "zigzag" (zigzag_shard) or "contiguous" (contiguous_shard: rank r holds the
    r-th equal slice); without causal it is ignored (any equal split works). Every rank of
    the group must call it with the same arguments and the same N_local (checked: a
    mismatch raises on every rank). Differentiable in
    q, k and v; backward uses the same ring. Kernels run through fastattn.attention(...,
    backend=backend)."""
    _validate(q, k, v, group, causal, layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, group, bool(causal), float(scale), backend, layout)
